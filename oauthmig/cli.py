"""The ``oauthmig`` command line: parse, call one service, render. The only place that exits."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import IO, TYPE_CHECKING, Any, NoReturn, cast

import click

import oauthmig
from oauthmig.cli_options import (
    FLEET_OPTIONS,
    FORMAT_OPTION,
    MAX_RUNTIME_SECONDS,
    META_JSON,
    MIN_SEVERITY,
    AppState,
    BackfillGroup,
    FiniteRange,
    Group,
    dry_run_option,
    fail_on_option,
    given_options,
    global_options,
    jobs_option,
    offline_options,
    sleep_option,
    state_of,
)
from oauthmig.config import (
    SARIF_MAX_RESULTS,
    SUMMARY_CONCURRENCY,
    SUMMARY_TIMEOUT_SECONDS,
    Settings,
    load_settings,
    parse_duration_ms,
)
from oauthmig.errors import ConfigError, OauthmigError, PlanRefusedError, Terminated, UsageError
from oauthmig.output.json import (
    backfill_to_dict,
    check_reports_to_list,
    history_to_list,
    interrupted_to_dict,
    prune_to_dict,
    report_to_dict,
    requests_to_dict,
    runs_to_dict,
    sql_runs_to_list,
    stamp_to_dict,
    to_json,
)
from oauthmig.output.streams import PipeSafeStdout, flush_standard_streams, to_devnull

if TYPE_CHECKING:
    from rich.console import Console

    from oauthmig.output.consoles import Consoles
    from oauthmig.output.outcomes import Failures
    from oauthmig.rollout import backfill as backfill_service
    from oauthmig.rollout import fleet
    from oauthmig.rollout.revisions import Catalogue
    from oauthmig.rollout.runner import Direction, PlanOutcome, RunResult


EXIT_OK, EXIT_FINDINGS, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_TERMINATED = 143  # 128 + SIGTERM: backfill stopped by SIGTERM, state saved
EXIT_UNFINISHED = 3  # backfill stopped by --max-runtime with rows left: run it again


class Findings(Exception):
    """Raised by a command that finished but has something CI should fail on (exit 1)."""


class Unfinished(Exception):
    """Raised by ``backfill`` when ``--max-runtime`` stopped a job with rows left (exit 3)."""


@click.group(
    cls=Group,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    params=global_options(late=False),
)
@click.version_option(package_name="oauthmig")
def cli(
    config_path: str | None,
    databases: tuple[str, ...],
    verbose: bool,
    quiet: bool,
) -> None:
    """Roll out PKCE, redirect binding, refresh-token rotation and RFC 7591 client metadata on a
    live Sentry-style OAuth provider, across routed databases, without blocking traffic.

    Global options (--config, -d, -v, -q) go before or after the command name.

    \b
    The rollout is: upgrade -> backfill -> upgrade.
      oauthmig status                 # where every database stands
      oauthmig upgrade --dry-run      # what would run, with the SQL
      oauthmig upgrade                # expand: add the new columns everywhere
    """


def emit(
    c: Consoles,
    fmt: str,
    document: Callable[[], object],
    render: Callable[[Console], None],
    *,
    always: bool = False,
) -> None:
    """A command's result on stdout: the JSON ``document()`` with ``--format json``, else
    ``render(console)``, which ``--quiet`` leaves out unless ``always``."""
    if fmt == "json":
        click.echo(to_json(document()))
    elif always or not c.quiet:
        render(c.out)


def fail_summary(c: Consoles, failures: Failures) -> None:
    """End a command whose work failed somewhere: one failure raises its own line; several
    print each line, then raise the summary. Nothing failed (no lines): return."""
    if len(failures.lines) == 1:
        raise OauthmigError(failures.lines[0])
    if failures.lines:
        for line in failures.lines:
            c.error(line)
        raise OauthmigError(failures.summary)


def _catalogue(target: str, from_revision: str | None) -> Catalogue:
    """The invocation's revision catalogue; refuses unknown ``--to``/``--from`` revisions
    before any database is opened."""
    from oauthmig.rollout.revisions import Catalogue

    cat = Catalogue.load()
    cat.resolve(target, "--to")
    if from_revision is not None:
        cat.resolve(from_revision, "--from")
    return cat


def _wave_gate(
    state: AppState, cat: Catalogue, target: str | None
) -> Callable[[Settings, fleet.Selection], None]:
    """Refuses ``--wave`` while an earlier wave failed or has not reached ``target``."""
    from oauthmig.rollout import fleet

    def gate(full: Settings, selection: fleet.Selection) -> None:
        fleet.wave_gate(full, selection, target, cat.revisions, state.command_prefix())

    return gate


def _show_plan(
    c: Consoles, direction: Direction, as_json: bool
) -> Callable[[Sequence[PlanOutcome]], None]:
    """Prints the plan the runner made before it writes anything (or refuses)."""
    from oauthmig.output.text import render_plan

    def show(plans: Sequence[PlanOutcome]) -> None:
        problems = any(isinstance(p, OauthmigError) for p in plans)
        # With JSON on stdout the plan would go to stderr: there, only the error lines go.
        if not c.quiet and not (as_json and problems):
            render_plan(c.human(as_json), plans, direction)

    return show


def _refused(c: Consoles, exc: PlanRefusedError) -> PlanRefusedError:
    """Print every refusal but the first above the error line that ends the command."""
    for error in exc.errors[1:]:
        c.error(error.message)
    return exc


def _migrate(
    ctx: click.Context,
    direction: Direction,
    target: str,
    dry_run: bool,
    offline: bool,
    from_revision: str | None,
    output_dir: str | None,
    fmt: str,
    jobs: int = 1,
    wave: str | None = None,
    part: str | None = None,
) -> None:
    """upgrade and downgrade: check the options, select the databases (a wave is gated
    online), run, render, end with the failures."""
    from oauthmig.rollout import runner
    from oauthmig.rollout.runner import Mode

    if dry_run and offline:
        raise UsageError("--dry-run and --sql exclude each other")
    for flag, given in (("--from", from_revision), ("--output-dir", output_dir is not None)):
        if given and not offline:
            raise UsageError(f"{flag} only applies to --sql")
    cat = _catalogue(target, from_revision)
    state = state_of(ctx)
    c = state.consoles
    mode = Mode.SQL if offline else Mode.DRY_RUN if dry_run else Mode.ONLINE
    online = mode is Mode.ONLINE
    gate = _wave_gate(state, cat, cat.resolve(target)) if online else None
    if (settings := state.select(wave, part, gate=gate)) is None:
        return
    try:
        result = runner.migrate(
            settings,
            direction,
            target,
            mode=mode,
            jobs=jobs if mode is Mode.ONLINE else 1,
            from_revision=from_revision,
            catalogue=cat,
            on_plan=_show_plan(c, direction, fmt == "json"),
        )
    except PlanRefusedError as exc:
        raise _refused(c, exc) from None
    _show_migration(c, fmt, result, output_dir, state.command_prefix())


def _show_migration(
    c: Consoles, fmt: str, result: RunResult, output_dir: str | None, command: str
) -> None:
    """The SQL (--sql), the plan (--dry-run) or the run; then the failures."""
    from oauthmig.output.outcomes import run_failures, unscripted
    from oauthmig.output.text import render_dry_run, render_run
    from oauthmig.rollout.runner import Direction, Mode

    if result.mode is Mode.SQL:
        _emit_sql(c, result, fmt == "json", output_dir)
        return
    dry = result.mode is Mode.DRY_RUN
    _refuse(unscripted(result, "nothing was changed") if dry else None)
    if result.direction is Direction.DOWNGRADE:
        fail_summary(c, run_failures(result))  # a failed downgrade shows no table
    emit(
        c,
        fmt,
        lambda: runs_to_dict(result, dry_run=dry),
        lambda out: render_dry_run(out, result) if dry else render_run(out, result, command),
        always=dry,
    )
    fail_summary(c, run_failures(result))


def _refuse(message: str | None) -> None:
    if message is not None:
        raise OauthmigError(message)


def _emit_sql(c: Consoles, result: RunResult, as_json: bool, output_dir: str | None) -> None:
    """Print or write ``--sql`` output; nothing at all if any database cannot be scripted."""
    from oauthmig.output.files import write_scripts
    from oauthmig.output.outcomes import unscripted
    from oauthmig.output.text import sql_script, sql_section

    _refuse(unscripted(result, "no SQL was written"))
    if output_dir is None:
        click.echo(to_json(sql_runs_to_list(result)) if as_json else sql_script(result), nl=False)
        return
    files = {r.database: sql_section(r) for r in result.runs}
    for path in write_scripts(output_dir, files):
        c.info(f"wrote {path}")


@cli.command()
@click.option(
    "--to",
    "target",
    default="head",
    show_default=True,
    metavar="REV",
    help="Target revision (id, unique prefix, or head).",
)
@dry_run_option(
    "Connect read-only and print, per database, the pending revisions and their "
    "SQL. Writes nothing, not even the version table."
)
@offline_options(
    "Emit the SQL only, offline: no connection needed; one section per database, each "
    "guarded to stop on another database, another revision or unfinished backfills.",
    from_default="base",
)
@jobs_option("Upgrade this many databases in parallel.")
@FLEET_OPTIONS
@FORMAT_OPTION
@click.pass_context
def upgrade(
    ctx: click.Context,
    target: str,
    dry_run: bool,
    offline: bool,
    from_revision: str | None,
    output_dir: str | None,
    jobs: int,
    wave: str | None,
    part: str | None,
    fmt: str,
) -> None:
    """Apply pending revisions on every routed database.

    Each database runs only the operations for the tables routed to it, records every revision
    as applied or skipped (not routed) in its own version table, and takes every DDL lock under
    lock_timeout with bounded retries. A plain upgrade stops, on each database, before the first
    revision whose backfill is unfinished, says which one, and exits 0. A database whose
    upgrade lock another runner holds is skipped, and said so (not an error).

    \b
    Examples:
      oauthmig upgrade --dry-run
      oauthmig upgrade --sql > rollout.sql
      oauthmig upgrade -d control --to 0002
      oauthmig upgrade --part 2/4 --jobs 8   # one CI job's share (add --wave NAME)
    """
    from oauthmig.rollout.runner import Direction

    _migrate(ctx, Direction.UPGRADE, **ctx.params)  # the parameters, by name


@cli.command()
@click.option(
    "--to",
    "target",
    required=True,
    metavar="REV|base",
    help="Revision to go back to, or base to remove everything oauthmig added.",
)
@dry_run_option("Print the revisions and SQL; write nothing.")
@offline_options("Emit the SQL only, offline.", from_default="head")
@FORMAT_OPTION
@click.pass_context
def downgrade(
    ctx: click.Context,
    target: str,
    dry_run: bool,
    offline: bool,
    from_revision: str | None,
    output_dir: str | None,
    fmt: str,
) -> None:
    """Reverse revisions down to --to on every routed database.

    Columns that oauthmig adopted (they existed before it ran) are kept: only columns the
    revision log proves oauthmig added are dropped. With --sql, PostgreSQL scripts read the
    revision log when they run; SQLite offline downgrades are refused (run them online).

    \b
    Examples:
      oauthmig downgrade --to base --dry-run
      oauthmig downgrade --to 0003 --dry-run   # PostgreSQL: also --sql --output-dir sql/
      oauthmig downgrade --to 0001 -d shard
    """
    from oauthmig.rollout.runner import Direction

    _migrate(ctx, Direction.DOWNGRADE, **ctx.params)


@cli.command()
@click.argument("revision", metavar="REV")
@FORMAT_OPTION
@click.pass_context
def stamp(ctx: click.Context, revision: str, fmt: str) -> None:
    """Record revisions up to REV as applied without running them.

    For databases whose revisions' SQL was applied by hand (from `upgrade --sql` output)
    without the version table and revision log. Nothing is recorded anywhere unless, on every
    selected database, each column those revisions add exists with a compatible type, the
    constraints and indexes of finalize exist, and gated revisions' backfills are finished.
    Stamped columns count as adopted: a later downgrade keeps them.

    \b
    Examples:
      oauthmig stamp 0003                 # databases already at 0003: nothing to record
      oauthmig stamp 0003 -d control --format json
    """
    from oauthmig.output.stamp_text import render_stamp
    from oauthmig.rollout.stamp import stamp as stamp_revisions

    state = state_of(ctx)
    result = stamp_revisions(state.settings(), revision)
    emit(state.consoles, fmt, lambda: stamp_to_dict(result), lambda out: render_stamp(out, result))


@cli.command()
@FORMAT_OPTION
@click.option(
    "--check",
    is_flag=True,
    help="Exit 1 if any revision or backfill is pending, waiting or failed, or a revision "
    "file changed since it was applied.",
)
@click.option(
    "--exact",
    is_flag=True,
    help="Count every row a backfill has left (a full scan of its table) instead of estimating.",
)
@click.option(
    "--summary",
    is_flag=True,
    help="One view of the fleet: databases per revision and state, the stragglers by name, "
    "each backfill's rows left and slowest database; databases read in parallel.",
)
@jobs_option("With --summary: read this many databases at once.", default=SUMMARY_CONCURRENCY)
@click.option(
    "--timeout",
    type=FiniteRange(0.1, 3600),
    default=SUMMARY_TIMEOUT_SECONDS,
    show_default=True,
    metavar="S",
    help="With --summary: give up on a database after S seconds (it is one line of the view).",
)
@FLEET_OPTIONS
@click.pass_context
def status(
    ctx: click.Context,
    fmt: str,
    check: bool,
    exact: bool,
    summary: bool,
    jobs: int,
    timeout: float,
    wave: str | None,
    part: str | None,
) -> None:
    """Show the revision x database matrix, backfill progress and PKCE coverage.

    Cells read applied, skipped (not routed), pending, waiting (for a backfill) or failed; a
    revision whose file changed since it was applied is flagged. Backfill rows left are read
    from the job table and bounded index ranges, never a scan: counts that are estimates
    read "~N" ("estimate": true in JSON). Reads only; never writes.

    \b
    Examples:
      oauthmig status
      oauthmig status --format json | jq '.databases[].current'
      oauthmig status --check        # in CI: fails while anything is outstanding
      oauthmig status --exact        # count the rows left instead of estimating
      oauthmig status --summary --check   # the whole fleet in one view
    """
    from oauthmig.output.fleet import render_status_with_waves, status_with_waves_to_dict
    from oauthmig.output.outcomes import status_failures
    from oauthmig.rollout.status import status as read_status

    state = state_of(ctx)
    if summary:
        _status_summary(state, fmt, check, exact, jobs, timeout, wave, part)
        return
    summary_only = given_options(ctx, {"jobs": "--jobs", "timeout": "--timeout"})
    if summary_only:
        raise UsageError(f"{summary_only[0]} only applies to --summary")
    if (selected := state.select(wave, part)) is None:
        return
    report, waves = read_status(selected, exact=exact), selected.waves
    emit(
        state.consoles,
        fmt,
        lambda: status_with_waves_to_dict(report, waves),
        lambda out: render_status_with_waves(out, report, waves),
        always=True,
    )
    fail_summary(state.consoles, status_failures(report))
    failure = report.check_failure()
    if check and failure:
        raise Findings(failure)


def _status_summary(
    state: AppState,
    fmt: str,
    check: bool,
    exact: bool,
    jobs: int,
    timeout: float,
    wave: str | None,
    part: str | None,
) -> None:
    from oauthmig.output.fleet import render_summary, summary_to_dict
    from oauthmig.rollout import fleet
    from oauthmig.rollout.revisions import Catalogue

    if exact:
        raise UsageError("--exact does not apply to --summary (it reads estimates)")
    full = load_settings(state.config_path)
    selection = fleet.select(
        full, state.databases, wave, fleet.parse_part(part) if part is not None else None
    )
    result = fleet.summary(
        full, selection, Catalogue.load().revisions, concurrency=jobs, timeout=timeout
    )
    emit(
        state.consoles,
        fmt,
        lambda: summary_to_dict(result),
        lambda out: render_summary(out, result),
        always=True,
    )
    if check and result.outstanding:
        raise Findings("outstanding work: databases not done (see the stragglers)")


@cli.command()
@FORMAT_OPTION
@click.pass_context
def history(ctx: click.Context, fmt: str) -> None:
    """List revisions with the tables they touch and the backfills they require.

    \b
    Example:
      oauthmig history
    """
    from oauthmig.output.history_text import render_history
    from oauthmig.rollout.revisions import Catalogue

    revisions = Catalogue.load().revisions
    emit(
        state_of(ctx).consoles,
        fmt,
        lambda: history_to_list(revisions),
        lambda out: render_history(out, revisions),
        always=True,
    )


_RUN_OPTIONS = {
    "batch_size": "--batch",
    "dry_run": "--dry-run",
    "sleep_seconds": "--sleep",
    "max_runtime": "--max-runtime",
    "restart": "--restart",
    "jobs": "--jobs",
    "metrics_file": "--metrics-file",
    "wave": "--wave",
    "part": "--part",
}


@cli.group(
    cls=BackfillGroup,
    invoke_without_command=True,
    subcommand_metavar="[JOB]... | pause|resume|cancel [JOB]...",
)
@click.option(
    "--batch",
    "batch_size",
    type=click.IntRange(1, 1_000_000),
    default=None,
    help="Starting batch size (default: backfill.batch_size); it then adapts toward "
    "backfill.target_batch_seconds.",
)
@dry_run_option(
    "Report rows to change per job and database and an estimated duration. "
    "Writes nothing, not even the job tables."
)
@sleep_option("Pause between batches, in seconds, 0 to 3600 (default: backfill.sleep_seconds).")
@click.option(
    "--max-runtime",
    type=FiniteRange(0.1, MAX_RUNTIME_SECONDS),
    default=None,
    metavar="S",
    help="Stop cleanly after S seconds (0.1 to 2592000, 30 days); state is saved and the next "
    "run resumes; exit 3 when it stopped a job with rows left (0: every job finished). "
    "Without it the run goes until done.",
)
@click.option("--restart", is_flag=True, help="Forget saved progress and start over.")
@jobs_option("Run this many job x database pairs in parallel.")
@click.option(
    "--metrics-file",
    metavar="PATH",
    default=None,
    help="Write OpenMetrics text (rows done/left, batch seconds, paused and why, per job and "
    "database) to PATH after every batch and while held, by atomic rename: for "
    "node_exporter's textfile collector (name it *.prom). Not written by --dry-run.",
)
@click.option(
    "--report",
    is_flag=True,
    help="Print each job's batch history instead of running: state, rate, ETA, p50/p99 "
    "batch time, failed attempts by error class, the last batches. Reads only.",
)
@click.option(
    "--last",
    type=click.IntRange(0, 100_000),
    default=None,
    metavar="N",
    help="With --report: how many recent batches to list per job (default 20).",
)
@FLEET_OPTIONS
@FORMAT_OPTION
@click.pass_context
def backfill(
    ctx: click.Context,
    batch_size: int | None,
    dry_run: bool,
    sleep_seconds: float | None,
    max_runtime: float | None,
    restart: bool,
    jobs: int,
    metrics_file: str | None,
    report: bool,
    last: int | None,
    wave: str | None,
    part: str | None,
    fmt: str,
    job_names: tuple[str, ...] = (),
) -> None:
    """Run backfill jobs (all by default): token-families, client-metadata; or pause, resume
    or cancel them from any shell.

    Keyset batches, each its own short transaction, guarded so a rerun is harmless; progress
    is saved in each database, so Ctrl-C, a crash or kill -9 resumes where it stopped. Only one
    run per job and database at a time. Every batch is recorded in oauthmig_backfill_batch
    (the last backfill.keep_batches per job); --report prints that history. With
    [backfill.health] configured, the run holds between batches while a replica lags,
    autovacuum works on the table or check_sql is over its limit, and goes on by itself
    (PostgreSQL; a no-op on SQLite).

    pause / cancel are seen by the running backfill, on any host, before its next batch: pause
    saves the state and exits 0 ("paused by request"), and holds the job (later runs stop
    before their first batch) until resume; cancel marks the job cancelled, and only --restart
    runs it again. status shows who asked and when.

    Exit 0: every selected job is finished (or held by a pause request); 3: --max-runtime
    stopped a job with rows left (run it again); 2: a job failed or is cancelled.

    \b
    Examples:
      oauthmig backfill --dry-run
      oauthmig backfill token-families --batch 2000 --sleep 0.1
      oauthmig backfill --max-runtime 600 -d shard
      oauthmig backfill --metrics-file backfill.prom
      oauthmig backfill pause token-families -d shard   # from another shell
      oauthmig backfill resume token-families -d shard
      oauthmig backfill --report token-families --last 5
      oauthmig backfill --report --format json | jq '.jobs[].state.history'
      oauthmig backfill --part 1/4   # one CI job's share; skips what another runner holds
    """
    from oauthmig.rollout import backfill as backfill_service

    if ctx.invoked_subcommand is not None:
        given = given_options(ctx, {**_RUN_OPTIONS, "report": "--report", "last": "--last"})
        if given:
            raise UsageError(
                f"{given[0]} does not apply to `backfill {ctx.invoked_subcommand}`; "
                f"give the options after the subcommand name"
            )
        return
    if report:
        given = given_options(ctx, _RUN_OPTIONS)
        if given:
            raise UsageError(f"--report reads the history only; it does not take {given[0]}")
        _backfill_report(ctx, job_names, last, fmt)
        return
    if last is not None:
        raise UsageError("--last only applies to --report")
    options = backfill_service.BackfillOptions(
        batch_size, sleep_seconds, max_runtime, restart, dry_run, jobs
    )
    _backfill_run(ctx, job_names, options, metrics_file, fmt, wave, part)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C (the job is saved as paused), then exits 143."""

    def on_sigterm(_signum: int, _frame: object) -> None:
        raise Terminated

    main = threading.current_thread() is threading.main_thread()  # signals: main thread only
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def _backfill_run(
    ctx: click.Context,
    job_names: tuple[str, ...],
    options: backfill_service.BackfillOptions,
    metrics_file: str | None,
    fmt: str,
    wave: str | None,
    part: str | None,
) -> None:
    from oauthmig.output.backfill_watch import watch_backfill
    from oauthmig.output.outcomes import backfill_failures, unfinished
    from oauthmig.output.text import render_backfill
    from oauthmig.rollout import backfill as backfill_service
    from oauthmig.rollout.revisions import Catalogue

    state = state_of(ctx)
    c = state.consoles
    cat = Catalogue.load()
    head = cat.revisions[-1].revision if cat.revisions else None
    gate = None if options.dry_run else _wave_gate(state, cat, head)
    if (settings := state.select(wave, part, gate=gate)) is None:
        return
    with watch_backfill(c, metrics_file, options.dry_run) as watch, _sigterm_interrupts():
        result = backfill_service.backfill(
            settings, job_names, options, progress=watch.progress, observe=watch.observe
        )
    emit(
        c,
        fmt,
        lambda: backfill_to_dict(result),
        lambda out: render_backfill(out, result),
        always=bool(result.failed),
    )
    fail_summary(c, backfill_failures(result))
    if (unfinished_work := unfinished(result)) is not None:
        raise Unfinished(unfinished_work)


def _backfill_report(
    ctx: click.Context, job_names: tuple[str, ...], last: int | None, fmt: str
) -> None:
    from oauthmig.output.backfill_text import render_report
    from oauthmig.rollout.batch_report import DEFAULT_LAST, backfill_report

    state = state_of(ctx)
    histories = backfill_report(state.settings(), job_names, DEFAULT_LAST if last is None else last)
    emit(
        state.consoles,
        fmt,
        lambda: report_to_dict(histories),
        lambda out: render_report(out, histories),
        always=True,
    )
    errors = list(dict.fromkeys(h.error for h in histories if h.error))
    for error in errors[1:]:
        state.consoles.error(error)
    if errors:
        more = f" (and {len(errors) - 1} more databases)" if len(errors) > 1 else ""
        raise OauthmigError(f"{errors[0]}{more}")


_WAIT = click.option(
    "--wait",
    is_flag=True,
    help="Return only once no backfill runs the jobs any more (the running one has seen the "
    "request and stopped), or fail after --timeout.",
)
_TIMEOUT = click.option(
    "--timeout",
    type=FiniteRange(0.1, MAX_RUNTIME_SECONDS),
    default=600.0,
    show_default=True,
    metavar="S",
    help="With --wait: how long to wait, in seconds.",
)


def _request(
    ctx: click.Context,
    action: str,
    job_names: tuple[str, ...],
    fmt: str,
    wait: bool = False,
    timeout: float = 600.0,
) -> None:

    from oauthmig.output.backfill_text import render_requests
    from oauthmig.output.outcomes import still_running
    from oauthmig.rollout import control

    if ctx.get_parameter_source("timeout") == click.core.ParameterSource.COMMANDLINE and not wait:
        raise UsageError("--timeout only applies to --wait")
    state = state_of(ctx)
    settings = state.settings()
    outcomes = control.request(settings, action, job_names)
    emit(
        state.consoles,
        fmt,
        lambda: requests_to_dict(action, outcomes),
        lambda out: render_requests(out, action, outcomes),
    )
    if wait:
        _refuse(still_running(control.wait_stopped(settings, outcomes, timeout), timeout))
        state.consoles.info("no backfill runs these jobs now", fmt == "json")


@backfill.command("pause")
@click.argument("job_names", nargs=-1, metavar="[JOB]...")
@_WAIT
@_TIMEOUT
@FORMAT_OPTION
@click.pass_context
def backfill_pause(
    ctx: click.Context, job_names: tuple[str, ...], wait: bool, timeout: float, fmt: str
) -> None:
    """Pause jobs (all by default) on every selected database, from any shell or host.

    Recorded in the job table with your OS user@host and the time. A running backfill stops
    before its next batch (the batch in flight commits first), saves its state and exits 0
    with "paused by request". The pause holds: every later `oauthmig backfill` of the job
    stops before its first batch until `oauthmig backfill resume`. A job that is not running,
    or never started, is held the same way.

    \b
    Examples:
      oauthmig backfill pause
      oauthmig backfill pause token-families -d shard
      oauthmig backfill pause token-families --wait --timeout 120
    """
    _request(ctx, "pause", job_names, fmt, wait, timeout)


@backfill.command("resume")
@click.argument("job_names", nargs=-1, metavar="[JOB]...")
@FORMAT_OPTION
@click.pass_context
def backfill_resume(ctx: click.Context, job_names: tuple[str, ...], fmt: str) -> None:
    """Withdraw a pause (or a cancel the running backfill has not acted on yet).

    Starts nothing by itself: the next `oauthmig backfill` continues from the saved cursor.
    A job already cancelled is refused: `oauthmig backfill --restart JOB` starts it over.

    \b
    Examples:
      oauthmig backfill resume
      oauthmig backfill resume token-families -d shard
    """
    _request(ctx, "resume", job_names, fmt)


@backfill.command("cancel")
@click.argument("job_names", nargs=-1, metavar="[JOB]...")
@_WAIT
@_TIMEOUT
@FORMAT_OPTION
@click.pass_context
def backfill_cancel(
    ctx: click.Context, job_names: tuple[str, ...], wait: bool, timeout: float, fmt: str
) -> None:
    """Cancel jobs (all by default) on every selected database, from any shell or host.

    A running backfill stops before its next batch and marks the job cancelled; a job that is
    not running is marked at once. Progress is kept, but no run continues a cancelled job: a
    plain `oauthmig backfill` says so and exits 2; `oauthmig backfill --restart JOB` starts it
    over.

    \b
    Examples:
      oauthmig backfill cancel client-metadata
      oauthmig backfill cancel token-families -d shard --wait
    """
    _request(ctx, "cancel", job_names, fmt, wait, timeout)


@cli.command()
@FORMAT_OPTION
@click.pass_context
def verify(ctx: click.Context, fmt: str) -> None:
    """Check that every row has the new columns' values (what finalize needs).

    On each database: no refreshable token without token_family_id, every parent_token_id
    pointing into its token's family, no application without client metadata. Walks each table
    by primary key in chunks of backfill.batch_size, one short transaction per chunk, records
    its progress and result in oauthmig_verify (resumed after an interruption; shown by
    status). upgrade and stamp run it before finalize. Exit 1 when a check fails (the first
    offending ids are named).

    \b
    Examples:
      oauthmig verify
      oauthmig verify -d control --format json
    """
    from oauthmig.output.phases_text import render_verify, verify_to_list
    from oauthmig.rollout.verify import verify as verify_service

    state = state_of(ctx)
    results = verify_service(state.settings())
    emit(
        state.consoles,
        fmt,
        lambda: verify_to_list(results),
        lambda out: render_verify(out, results),
    )
    errors = [d for d in results if d.error]
    if errors:
        raise OauthmigError(errors[0].error or "a database could not be verified")
    failed = [d for d in results if not d.passed]
    if failed:
        raise Findings(failed[0].problem() or "verify failed")


@cli.command()
@click.option(
    "--since",
    required=True,
    metavar="TIME",
    help="ISO 8601 time (UTC unless it has an offset) from which the provider's code writes the "
    "new columns itself, e.g. the end of its deploy.",
)
@FORMAT_OPTION
@click.pass_context
def contract(ctx: click.Context, since: str, fmt: str) -> None:
    """End the compatibility phase: remove the triggers that fill the new columns for the
    provider's old code.

    Run it once every instance of the provider writes the new columns itself. Refused (exit 2,
    nothing removed) while the compatibility layer filled any row since TIME on any database:
    the old code still writes there.

    \b
    Example:
      oauthmig contract --since 2026-12-07T15:00:00Z
    """
    from oauthmig.output.phases_text import contract_to_list, render_contract
    from oauthmig.rollout.verify import contract as contract_service

    try:
        when = datetime.fromisoformat(since.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"--since {since!r}: not an ISO 8601 time; write e.g. 2026-12-07T15:00:00Z"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    state = state_of(ctx)
    results = contract_service(state.settings(), when)
    emit(
        state.consoles,
        fmt,
        lambda: contract_to_list(results),
        lambda out: render_contract(out, results),
    )


@cli.command("prune-grants")
@click.option(
    "--batch",
    type=click.IntRange(1, 100_000),
    default=1000,
    show_default=True,
    help="Grants deleted per transaction (1 to 100000).",
)
@click.option(
    "--older-than",
    metavar="DURATION",
    default="0s",
    show_default=True,
    help="Only delete grants that expired more than DURATION ago (e.g. 30min, 12h, 7d; at "
    "most 3650d): a consumed code is recognized as a replay until it is deleted.",
)
@sleep_option("Pause between batches, in seconds (default: backfill.sleep_seconds).")
@dry_run_option("Count what would be deleted; write nothing.")
@FORMAT_OPTION
@click.pass_context
def prune_grants(
    ctx: click.Context,
    batch: int,
    older_than: str,
    sleep_seconds: float | None,
    dry_run: bool,
    fmt: str,
) -> None:
    """Delete expired authorization codes (grant rows) in short batches.

    Since revision 0005 an exchanged code is kept, marked consumed, until it expires, so that
    presenting it again revokes the tokens it produced; this deletes every grant whose
    expiry is more than --older-than in the past, consumed or not. Each batch is one
    keyset-bounded DELETE in its own short transaction under lock_timeout and
    statement_timeout (rows being exchanged right now are skipped, not waited for); rerun at
    any time, e.g. from cron, or after an interruption.

    \b
    Examples:
      oauthmig prune-grants --dry-run
      oauthmig prune-grants --older-than 1d --batch 500
      oauthmig prune-grants -d control --format json | jq '.databases[].deleted'
    """
    from oauthmig.output.outcomes import prune_failures
    from oauthmig.output.text import render_prune
    from oauthmig.prune import prune
    from oauthmig.rollout.revisions import Catalogue

    try:
        keep_ms = parse_duration_ms(older_than, "--older-than", high_ms=3650 * 86_400_000)
    except ConfigError as exc:
        raise UsageError(exc.message) from None
    state = state_of(ctx)
    settings = state.settings()
    result = prune(
        settings,
        batch=batch,
        older_than=timedelta(milliseconds=keep_ms),
        dry_run=dry_run,
        sleep=sleep_seconds,
        revisions=Catalogue.load().revisions,
    )
    c = state.consoles
    emit(
        c,
        fmt,
        lambda: prune_to_dict(result),
        lambda out: render_prune(out, result),
        always=bool(result.failed),
    )
    fail_summary(c, prune_failures(result))


@cli.command()
@click.option(
    "--apps",
    default=2000,
    show_default=True,
    type=click.IntRange(1, 10_000_000),
    help="Applications to create.",
)
@click.option(
    "--tokens",
    default=20000,
    show_default=True,
    type=click.IntRange(0, 100_000_000),
    help="Tokens to create, split over the databases hosting the token table.",
)
@click.option(
    "--seed",
    default=42,
    show_default=True,
    type=click.IntRange(0, 2**63 - 1),
    help="Random seed.",
)
@click.option("--setup-only", is_flag=True, help="Create and fill the legacy tables, then stop.")
@click.pass_context
def demo(ctx: click.Context, apps: int, tokens: int, seed: int, setup_only: bool) -> None:
    """Create legacy tables with realistic data, then run the whole rollout on them:
    upgrade, backfill, upgrade, then audit-redirects (a summary; findings are expected
    and do not fail the demo).

    Refuses to touch databases whose tables exist and were not created by the demo.
    With no config this uses the embedded SQLite default under ./.oauthmig/.

    \b
    Examples:
      oauthmig demo
      oauthmig demo --apps 200 --tokens 5000 --setup-only
    """
    from oauthmig.demo.progress import console_hooks
    from oauthmig.demo.progress import failures as demo_failures
    from oauthmig.demo.run import run_demo

    state = state_of(ctx)
    c = state.consoles
    settings = state.settings()
    hooks = console_hooks(c, settings, state.command_prefix())
    try:
        run = run_demo(
            settings, apps=apps, tokens=tokens, seed=seed, setup_only=setup_only, hooks=hooks
        )
    except PlanRefusedError as exc:
        raise _refused(c, exc) from None
    fail_summary(c, demo_failures(run))


@cli.command("check-redirect")
@click.argument("uris", nargs=-1, required=True, metavar="URI...")
@click.option(
    "--app-type",
    type=click.Choice(["web", "native"]),
    default="web",
    show_default=True,
    help="OpenID Connect application_type the URIs are registered for.",
)
@FORMAT_OPTION
@fail_on_option("Exit 1 when any URI has a finding of this severity or worse.")
@click.pass_context
def check_redirect(
    ctx: click.Context, uris: tuple[str, ...], app_type: str, fmt: str, fail_on: str
) -> None:
    """Validate redirect URIs as client registration would, and print their normalized form.

    Each URI gets a verdict (fail: an error, warn: a warning, pass), its normalized form
    (RFC 3986 §6.2.2) and every finding with its rule code. Needs no config or database.
    Quote URIs in the shell; put -- before a URI that starts with "-".

    \b
    Examples:
      oauthmig check-redirect https://app.example.com/callback
      oauthmig check-redirect --app-type native com.example.app:/cb http://127.0.0.1/cb
      oauthmig check-redirect --format json 'https://*.example.com/cb' | jq '.[].verdict'
    """
    from oauthmig.output.uri_text import render_uri_reports
    from oauthmig.redirects.rules import check_uri

    reports = [check_uri(uri, app_type) for uri in uris]
    emit(
        state_of(ctx).consoles,
        fmt,
        lambda: check_reports_to_list(reports),
        lambda out: render_uri_reports(out, reports),
        always=True,
    )
    failing = {"error": ("fail",), "warning": ("fail", "warn"), "never": ()}[fail_on]
    bad = [r for r in reports if r.verdict in failing]
    if bad:
        raise Findings(f"{len(bad)} of {len(reports)} URI(s) at or above --fail-on {fail_on}")


@cli.command("audit-redirects")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json", "csv", "sarif"]),
    default="text",
    show_default=True,
    help="text: tables grouped by application; json, csv, sarif (2.1.0): for machines.",
)
@click.option(
    "--output",
    "-o",
    metavar="FILE",
    help="Write the report to FILE (a regular file is replaced atomically when complete; a "
    "device or FIFO is written directly); print only the summary.",
)
@fail_on_option("Exit 1 when findings of this severity or worse exist.")
@click.option(
    "--min-severity",
    type=MIN_SEVERITY,
    default=None,
    help="Report only findings of this severity or worse (default: warning for text; json, "
    "csv and sarif keep every finding). Counts always cover every finding.",
)
@click.option(
    "--baseline",
    "baseline_path",
    metavar="FILE",
    help="Report and fail only on findings absent from FILE (written by --write-baseline); "
    "SARIF keeps every result, marked new, unchanged or absent.",
)
@click.option(
    "--write-baseline",
    "write_baseline",
    metavar="FILE",
    help="Record every current finding in FILE by a stable fingerprint (hashes and masked "
    "URIs, no secret): the baseline to adopt the audit on existing data.",
)
@click.option(
    "--sarif-max-results",
    type=click.IntRange(1, SARIF_MAX_RESULTS),
    default=SARIF_MAX_RESULTS,
    show_default=True,
    help="SARIF: write at most this many results, the most severe first, with a notification "
    "saying what was left out (GitHub code scanning rejects runs over 25,000).",
)
@click.pass_context
def audit_redirects(
    ctx: click.Context,
    fmt: str,
    output: str | None,
    fail_on: str,
    min_severity: str | None,
    baseline_path: str | None,
    write_baseline: str | None,
    sarif_max_results: int,
) -> None:
    """Audit every stored redirect URI, and the URIs live grants are bound to.

    Reads every application on every database hosting the application table, in batches
    (memory does not grow with the number of applications), and checks its redirect URIs
    with the redirect rules (RU001...; reference: rules.md, installed with the package as
    oauthmig/docs/rules.md) as a web or native app (the application_type column, or
    inferred from the URIs as the client-metadata backfill does). Secrets and tokens are never
    read. Codes listed in [audit] ignore are dropped and counted. JSON puts the summary after
    the findings, so that they can be streamed.

    \b
    Examples:
      oauthmig audit-redirects
      oauthmig audit-redirects --min-severity info   # also the info-level findings
      oauthmig audit-redirects --format sarif --output redirects.sarif
      oauthmig audit-redirects --format json --fail-on warning | jq .summary.by_code
      oauthmig audit-redirects --write-baseline audit-baseline.json   # adopt: record today's
      oauthmig audit-redirects --baseline audit-baseline.json         # CI: fail on new ones
    """
    from oauthmig.output.audit_report import AuditOptions, write_audit_report
    from oauthmig.redirects.audit import FailOn
    from oauthmig.redirects.audit import audit as audit_service
    from oauthmig.rollout.revisions import Catalogue

    state = state_of(ctx)
    settings = state.settings()
    options = AuditOptions(
        fmt,
        output,
        cast(FailOn, fail_on),
        min_severity,
        baseline_path,
        write_baseline,
        sarif_max_results,
    )
    failure = write_audit_report(
        state.consoles,
        options,
        lambda progress: audit_service(
            settings, revisions=Catalogue.load().revisions, progress=progress
        ),
        application_table=settings.tables.application,
        docs_url=settings.audit.docs_url,
        on_interrupt_closed=lambda: ctx.meta.update({META_JSON: "done"}),
    )
    if failure is not None:
        raise Findings(failure)


@cli.command()
@click.option(
    "--html",
    "html_path",
    required=True,
    metavar="FILE",
    help="Write the report to FILE (a regular file is replaced atomically when complete; a "
    "device or FIFO is written directly).",
)
@click.option(
    "--max-findings",
    type=click.IntRange(0, 1_000_000),
    default=10_000,
    show_default=True,
    help="Findings listed in the table, the most severe first (the counts cover them all).",
)
@click.pass_context
def report(ctx: click.Context, html_path: str, max_findings: int) -> None:
    """Write the rollout report: one self-contained HTML file to open in a browser.

    It shows the revision x database matrix, each backfill with its progress, rows left, rate
    and ETA, PKCE readiness (live grants with and without a code_challenge, per application),
    the client metadata distribution (auth methods, application types) and the redirect audit
    by rule, with a table of findings to filter by rule, severity and text. Reads only. The
    file loads nothing from the network, and holds no secret: no client secret, token or grant
    code is read, and database URLs are masked.

    \b
    Examples:
      oauthmig report --html report.html
      oauthmig report --html control.html -d control --max-findings 500
    """
    from oauthmig.html_report import gather_report
    from oauthmig.output.consoles import escape
    from oauthmig.output.files import output_file
    from oauthmig.output.html import render_html
    from oauthmig.output.outcomes import report_brief
    from oauthmig.output.text import progress_bar

    state = state_of(ctx)
    c = state.consoles
    settings = state.settings()
    with output_file(html_path, "--html") as sink:
        with progress_bar(c.err, enabled=not c.quiet) as update:
            data = gather_report(settings, max_findings=max_findings, progress=update)
        sink.write(render_html(data))
    if not c.quiet:
        c.out.print(f"wrote the HTML report to {escape(html_path)}")
        c.out.print(escape(report_brief(data)))


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point: run the CLI and turn every outcome into an exit code."""
    try:
        code = run(argv)
    except KeyboardInterrupt:  # between the CLI's own handlers (before or after them)
        code = EXIT_INTERRUPTED
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write("interrupted\n")
    flush_standard_streams()
    if threading.current_thread() is threading.main_thread():
        # From here on nothing is left to save: a Ctrl-C while the interpreter shuts down
        # (atexit hooks, pool disposal) ends the process as an interrupted run would.
        signal.signal(signal.SIGINT, lambda _signum, _frame: os._exit(EXIT_INTERRUPTED))
    sys.exit(code)


def _usage_line(exc: click.UsageError) -> str:
    """``error: <what>; see 'oauthmig CMD --help'`` on one line."""
    what = " ".join(exc.format_message().split()).rstrip(".")
    if what[:1].isupper() and what[1:2].islower():
        what = what[0].lower() + what[1:]
    path = exc.ctx.command_path if exc.ctx is not None else "oauthmig"
    return f"error: {what}; see '{path} --help'"


def _interrupted(
    ctx_obj: dict[str, Any], stdout: PipeSafeStdout, argv: list[str], *, terminated: bool = False
) -> None:
    if terminated:
        message, code = "terminated (SIGTERM); state is saved, rerun to resume", EXIT_TERMINATED
    else:
        message, code = "interrupted; state is saved, rerun to resume", EXIT_INTERRUPTED
    # Interrupted while click still parsed the arguments: the command line says the format.
    as_json = ctx_obj[META_JSON] == "json" if META_JSON in ctx_obj else oauthmig.wants_json(argv)
    if as_json and not stdout.written:
        click.echo(to_json(interrupted_to_dict(ctx_obj.get("command"), code, message)))
    click.echo(message, err=True)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return the exit code (0 ok, 1 findings, 2 failed, 3 backfill stopped
    by --max-runtime with rows left, 130 interrupted, 143 backfill terminated by SIGTERM)."""
    meta: dict[str, Any] = {}
    real_stdout = sys.stdout
    stdout = PipeSafeStdout(real_stdout)
    sys.stdout = cast(IO[str], stdout)
    try:
        code = _run(argv, meta, stdout)
        stdout.flush()
    finally:
        sys.stdout = real_stdout
    if stdout.failed is not None:
        click.echo(
            f"error: cannot write to stdout: {stdout.failed}; the output is lost (redirect it "
            "to a file with room, or use --output where the command has it)",
            err=True,
        )
        if code in (EXIT_OK, EXIT_FINDINGS):
            return EXIT_FAILED
    return code


def _run(argv: list[str] | None, meta: dict[str, Any], stdout: PipeSafeStdout) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        with cli.make_context("oauthmig", list(args)) as ctx:
            meta = ctx.meta
            cli.invoke(ctx)
        return EXIT_OK
    except click.exceptions.NoArgsIsHelpError as exc:
        # Bare `oauthmig`: help on stdout, success.
        root = exc.ctx or click.Context(cli, info_name="oauthmig")
        click.echo(root.get_help())
        return EXIT_OK
    except (KeyboardInterrupt, click.exceptions.Abort) as exc:
        terminated = isinstance(exc, Terminated) or isinstance(exc.__cause__, Terminated)
        _interrupted(meta, stdout, args, terminated=terminated)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except BrokenPipeError:
        # A write that bypassed sys.stdout: stop quietly.
        to_devnull(sys.__stdout__.fileno if sys.__stdout__ else lambda: 1)
        return EXIT_FAILED
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except (Findings, Unfinished, OauthmigError, click.ClickException, OSError) as exc:
        message, code = _exit_for(exc)
        click.echo(message, err=True)
        return code


def _exit_for(exc: Exception) -> tuple[str, int]:
    """The line and the exit code that end a command that raised ``exc``."""
    if isinstance(exc, Findings):
        return str(exc), EXIT_FINDINGS
    if isinstance(exc, Unfinished):
        return str(exc), EXIT_UNFINISHED
    if isinstance(exc, OauthmigError):
        return f"error: {' '.join(exc.message.split())}", EXIT_FAILED
    if isinstance(exc, click.UsageError):
        return _usage_line(exc), EXIT_FAILED
    if isinstance(exc, click.ClickException):
        return f"error: {' '.join(exc.format_message().split())}", EXIT_FAILED
    # The system refused a file operation no writer turned into its own error (a full
    # temporary directory for the audit's spool, say): one line, not a traceback.
    assert isinstance(exc, OSError)
    where = f" ({exc.filename})" if exc.filename else ""
    return f"error: {exc.strerror or exc}{where}", EXIT_FAILED


oauthmig.cli_loaded()
