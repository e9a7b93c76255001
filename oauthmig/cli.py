"""The ``oauthmig`` command line: parse, call one service, render. The only place that exits."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, NoReturn, cast

import click

from oauthmig import migrations
from oauthmig.config import Settings, load_settings
from oauthmig.console import (
    Consoles,
    render_dry_run,
    render_history,
    render_plan,
    render_run,
    render_status,
    run_to_dict,
    sql_script,
    status_to_dict,
    to_json,
)
from oauthmig.errors import OauthmigError, UsageError
from oauthmig.migrations import RunResult
from oauthmig.status import status as read_status

EXIT_OK, EXIT_FINDINGS, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 130


@dataclass(frozen=True, slots=True)
class AppState:
    """Global options, shared by every command."""

    config_path: str | None
    databases: tuple[str, ...]
    consoles: Consoles

    def settings(self) -> Settings:
        """Load the configuration and apply ``--database``."""
        return load_settings(self.config_path).restrict(self.databases)


class Findings(Exception):
    """Raised by a command that finished but has something CI should fail on (exit 1)."""


FORMAT = click.Choice(["text", "json"])
OUTPUT_DIR = click.option(
    "--output-dir",
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="With --sql: write one script per database, DIR/<database>.sql, instead of stdout.",
)
FAIL_ON = click.Choice(["error", "warning", "never"])


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Config file (default: $OAUTHMIG_CONFIG, ./oauthmig.toml, or the embedded "
    "SQLite default under ./.oauthmig/).",
)
@click.option(
    "--database",
    "-d",
    "databases",
    multiple=True,
    metavar="NAME",
    help="Only act on this database (repeatable).",
)
@click.option("--verbose", "-v", is_flag=True, help="More detail.")
@click.option("--quiet", "-q", is_flag=True, help="Only errors and requested output.")
@click.version_option(package_name="oauthmig")
@click.pass_context
def cli(
    ctx: click.Context,
    config_path: str | None,
    databases: tuple[str, ...],
    verbose: bool,
    quiet: bool,
) -> None:
    """Roll out PKCE, redirect binding, refresh-token rotation and RFC 7591 client metadata on a
    live Sentry-style OAuth provider, across routed databases, without blocking traffic.

    \b
    The rollout is: upgrade -> backfill -> upgrade.
      oauthmig status                 # where every database stands
      oauthmig upgrade --dry-run      # what would run, with the SQL
      oauthmig upgrade                # expand: add the new columns everywhere
    """
    if verbose and quiet:
        raise click.UsageError("--verbose and --quiet exclude each other")
    if verbose:
        # Alembic reports each revision it runs ("Running upgrade 0001 -> 0002") at INFO.
        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(name)s: %(message)s")
    ctx.obj = AppState(config_path, databases, Consoles.create(quiet=quiet, verbose=verbose))


def _state(ctx: click.Context) -> AppState:
    state: AppState = ctx.find_root().obj
    return state


def _plan_or_refuse(
    c: Consoles, settings: Settings, direction: str, target: str, as_json: bool
) -> None:
    """Print the plan; refuse before touching any database if one of them cannot be planned."""
    plans = migrations.plan(settings, direction, target)
    if not c.quiet:
        render_plan(c.human(as_json), plans, direction)
    problems = [p for p in plans if isinstance(p, str)]
    if problems:
        for problem in problems[1:]:
            c.error(problem)
        more = f" (and {len(problems) - 1} more above)" if len(problems) > 1 else ""
        raise OauthmigError(
            f"{problems[0]}{more}; nothing was changed on any database (fix it, or leave that "
            "database out with -d)"
        )


def _refuse_failed(result: RunResult, outcome: str) -> None:
    """One line for runs that write nothing (dry-run, --sql): the first failure, and a count."""
    if result.failed:
        first = result.failed[0].error or "failed"
        more = f" (and {len(result.failed) - 1} more)" if len(result.failed) > 1 else ""
        raise OauthmigError(f"{first}{more}; {outcome}")


def _emit_sql(c: Consoles, result: RunResult, as_json: bool, output_dir: str | None) -> None:
    """Print or write ``--sql`` output; nothing at all if any database cannot be scripted."""
    _refuse_failed(result, "no SQL was written")
    if output_dir is None:
        click.echo(
            to_json([run_to_dict(r) for r in result.runs]) if as_json else sql_script(result),
            nl=False,
        )
        return
    from oauthmig.console import sql_section
    from oauthmig.offline import write_scripts

    files = {r.database: sql_section(r) for r in result.runs}
    for path in write_scripts(output_dir, files):
        c.info(f"wrote {path}")


def _report_failures(state: AppState, result: RunResult) -> None:
    for run in result.failed:
        state.consoles.error(run.error or "failed")
    if result.failed:
        names = ", ".join(r.database for r in result.failed)
        ok = [r.database for r in result.runs if not r.error]
        tail = f"; {', '.join(ok)} completed and are consistent" if ok else ""
        raise OauthmigError(f"{len(result.failed)} database(s) failed: {names}{tail}")


@cli.command()
@click.option(
    "--to",
    "target",
    default="head",
    show_default=True,
    metavar="REV",
    help="Target revision (id, unique prefix, or head).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Connect read-only and print, per database, the pending revisions and their "
    "SQL. Writes nothing, not even the version table.",
)
@click.option(
    "--sql",
    "offline",
    is_flag=True,
    help="Emit the SQL only, offline: no connection needed; one section per database, "
    "each guarded to stop on another database, another revision or unfinished backfills.",
)
@click.option(
    "--from",
    "from_revision",
    metavar="REV",
    help="With --sql: the revision the databases are at (default: base).",
)
@OUTPUT_DIR
@click.option(
    "--jobs",
    "-j",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Upgrade this many databases in parallel.",
)
@click.option("--format", "fmt", type=FORMAT, default="text", show_default=True)
@click.pass_context
def upgrade(
    ctx: click.Context,
    target: str,
    dry_run: bool,
    offline: bool,
    from_revision: str | None,
    output_dir: str | None,
    jobs: int,
    fmt: str,
) -> None:
    """Apply pending revisions on every routed database.

    Each database runs only the operations for the tables routed to it, records every revision
    as applied or skipped (not routed) in its own version table, and takes every DDL lock under
    lock_timeout with bounded retries. A plain upgrade stops, on each database, before the first
    revision whose backfill is unfinished, says which one, and exits 0.

    \b
    Examples:
      oauthmig upgrade --dry-run
      oauthmig upgrade --sql > rollout.sql
      oauthmig upgrade -d control --to 0002
    """
    state = _state(ctx)
    if dry_run and offline:
        raise UsageError("--dry-run and --sql exclude each other")
    if from_revision and not offline:
        raise UsageError("--from only applies to --sql")
    if output_dir is not None and not offline:
        raise UsageError("--output-dir only applies to --sql")
    settings = state.settings()
    c = state.consoles
    as_json = fmt == "json"
    if offline:
        result = migrations.upgrade(settings, target, mode="sql", from_revision=from_revision)
        _emit_sql(c, result, as_json, output_dir)
        return
    if dry_run:
        result = migrations.upgrade(settings, target, mode="dry-run")
        _refuse_failed(result, "nothing was changed")
        if as_json:
            click.echo(
                to_json({"dry_run": True, "databases": [run_to_dict(r) for r in result.runs]})
            )
        else:
            render_dry_run(c.out, result)
        return
    _plan_or_refuse(c, settings, "upgrade", target, as_json)
    result = migrations.upgrade(settings, target, jobs=jobs)
    if as_json:
        click.echo(to_json({"dry_run": False, "databases": [run_to_dict(r) for r in result.runs]}))
    elif not c.quiet:
        render_run(c.out, result)
    _report_failures(state, result)


@cli.command()
@click.option(
    "--to",
    "target",
    required=True,
    metavar="REV|base",
    help="Revision to go back to, or base to remove everything oauthmig added.",
)
@click.option("--dry-run", is_flag=True, help="Print the revisions and SQL; write nothing.")
@click.option("--sql", "offline", is_flag=True, help="Emit the SQL only, offline.")
@click.option(
    "--from",
    "from_revision",
    metavar="REV",
    help="With --sql: the revision the databases are at (default: head).",
)
@OUTPUT_DIR
@click.option("--format", "fmt", type=FORMAT, default="text", show_default=True)
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
      oauthmig downgrade --to base --sql --output-dir sql/
      oauthmig downgrade --to 0001 -d shard
    """
    state = _state(ctx)
    if dry_run and offline:
        raise UsageError("--dry-run and --sql exclude each other")
    if from_revision and not offline:
        raise UsageError("--from only applies to --sql")
    if output_dir is not None and not offline:
        raise UsageError("--output-dir only applies to --sql")
    settings = state.settings()
    c = state.consoles
    as_json = fmt == "json"
    mode = "sql" if offline else "dry-run" if dry_run else "online"
    if mode == "online":
        _plan_or_refuse(c, settings, "downgrade", target, as_json)
    result = migrations.downgrade(settings, target, mode=mode, from_revision=from_revision)
    if mode == "sql":
        _emit_sql(c, result, as_json, output_dir)
        return
    if mode == "dry-run":
        _refuse_failed(result, "nothing was changed")
    _report_failures(state, result)
    if as_json:
        click.echo(
            to_json(
                {"dry_run": mode != "online", "databases": [run_to_dict(r) for r in result.runs]}
            )
        )
    elif mode == "dry-run":
        render_dry_run(c.out, result)
    elif not c.quiet:
        render_run(c.out, result)


@cli.command()
@click.option("--format", "fmt", type=FORMAT, default="text", show_default=True)
@click.option(
    "--check",
    is_flag=True,
    help="Exit 1 if any revision or backfill is pending, waiting or failed.",
)
@click.pass_context
def status(ctx: click.Context, fmt: str, check: bool) -> None:
    """Show the revision x database matrix, backfill progress and PKCE coverage.

    Cells read applied, skipped (not routed), pending, waiting (for a backfill) or failed.
    Reads only; never writes.

    \b
    Examples:
      oauthmig status
      oauthmig status --format json | jq '.databases[].current'
      oauthmig status --check        # in CI: fails while anything is outstanding
    """
    state = _state(ctx)
    report = read_status(state.settings())
    if fmt == "json":
        click.echo(to_json(status_to_dict(report)))
    else:
        render_status(state.consoles.out, report)
    errors = [d for d in report.databases if d.error]
    if errors:
        raise OauthmigError(errors[0].error or "a database could not be read")
    if check and report.outstanding:
        raise Findings("outstanding work: pending, waiting or failed revisions or backfills")


@cli.command()
@click.option("--format", "fmt", type=FORMAT, default="text", show_default=True)
@click.pass_context
def history(ctx: click.Context, fmt: str) -> None:
    """List revisions with the tables they touch and the backfills they require.

    \b
    Example:
      oauthmig history
    """
    revisions = migrations.history()
    if fmt == "json":
        click.echo(
            to_json(
                [
                    {
                        "revision": r.revision,
                        "down_revision": r.down_revision,
                        "message": r.message,
                        "tables": list(r.tables),
                        "columns": [f"{c.table}.{c.name}" for c in r.columns],
                        "requires_backfills": list(r.requires_backfills),
                    }
                    for r in revisions
                ]
            )
        )
    else:
        render_history(_state(ctx).consoles.out, revisions)


@cli.command()
@click.argument("job_names", nargs=-1, metavar="[JOB]...")
@click.option(
    "--batch",
    "batch_size",
    type=click.IntRange(1, 1_000_000),
    default=None,
    help="Starting batch size (default: backfill.batch_size); it then adapts toward "
    "backfill.target_batch_seconds.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Report rows to change per job and database and an estimated duration. "
    "Writes nothing, not even the job tables.",
)
@click.option(
    "--sleep",
    "sleep_seconds",
    type=click.FloatRange(0, 3600),
    default=None,
    help="Pause between batches, in seconds (default: backfill.sleep_seconds).",
)
@click.option(
    "--max-runtime",
    type=click.FloatRange(0.1, None),
    default=None,
    metavar="S",
    help="Stop cleanly after S seconds; state is saved and the next run resumes.",
)
@click.option("--restart", is_flag=True, help="Forget saved progress and start over.")
@click.option(
    "--jobs",
    "-j",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Run this many job x database pairs in parallel.",
)
@click.option("--format", "fmt", type=FORMAT, default="text", show_default=True)
@click.pass_context
def backfill(
    ctx: click.Context,
    job_names: tuple[str, ...],
    batch_size: int | None,
    dry_run: bool,
    sleep_seconds: float | None,
    max_runtime: float | None,
    restart: bool,
    jobs: int,
    fmt: str,
) -> None:
    """Run backfill jobs (all by default): token-families, client-metadata.

    Keyset batches, each its own short transaction, guarded so a rerun is harmless; progress
    is saved in each database, so Ctrl-C, a crash or kill -9 resumes where it stopped. Only one
    run per job and database at a time.

    \b
    Examples:
      oauthmig backfill --dry-run
      oauthmig backfill token-families --batch 2000 --sleep 0.1
      oauthmig backfill --max-runtime 600 -d shard_eu
    """
    from oauthmig import backfill as service
    from oauthmig.console import backfill_to_dict, progress_bar, render_backfill

    state = _state(ctx)
    c = state.consoles
    settings = state.settings()
    options = service.BackfillOptions(
        batch_size, sleep_seconds, max_runtime, restart, dry_run, jobs
    )
    as_json = fmt == "json"
    with progress_bar(c.err, enabled=not c.quiet and not dry_run) as update:
        result = service.backfill(settings, job_names, options, progress=update)
    if as_json:
        click.echo(to_json(backfill_to_dict(result)))
    elif not c.quiet or result.failed:
        render_backfill(c.out, result)
    if result.failed:
        first = result.failed[0]
        raise OauthmigError(first.message or f"backfill {first.job} failed on {first.database}")


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
@click.option("--seed", default=42, show_default=True, type=int, help="Random seed.")
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
    from oauthmig.demo import setup_legacy
    from oauthmig.identity import check_distinct

    state = _state(ctx)
    c = state.consoles
    settings = state.settings()
    check_distinct(settings)
    c.info(
        f"demo: creating legacy tables on {', '.join(settings.database_names())} "
        f"({settings.source})"
    )
    from oauthmig.console import progress_bar

    with progress_bar(c.err, enabled=not c.quiet) as update:
        setup = setup_legacy(settings, apps=apps, tokens=tokens, seed=seed, progress=update)
    for d in setup.databases:
        c.info(
            f"  {d.database}: {d.applications:,} applications, {d.grants:,} grants "
            f"({d.live_grants:,} live), {d.tokens:,} tokens ({d.refreshable_tokens:,} "
            "refreshable)"
        )
    if setup_only:
        return
    c.info("demo: upgrade (expand)")
    result = migrations.upgrade(settings)
    if not c.quiet:
        render_run(c.out, result)
    _report_failures(state, result)
    from oauthmig import backfill as backfill_service
    from oauthmig.console import render_backfill

    c.info("demo: backfill")
    filled = backfill_service.backfill(settings)
    if not c.quiet:
        render_backfill(c.out, filled)
    if filled.failed:
        raise OauthmigError(filled.failed[0].message or "backfill failed")
    c.info("demo: upgrade (finalize)")
    result = migrations.upgrade(settings)
    if not c.quiet:
        render_run(c.out, result)
    _report_failures(state, result)
    report = read_status(settings)
    if not c.quiet:
        render_status(c.out, report)
    from oauthmig.audit import audit as audit_service
    from oauthmig.console import render_audit_brief

    # The demo data holds every kind of redirect-URI mess on purpose: findings are expected
    # and never fail the demo (`oauthmig audit-redirects` is the command that gates CI).
    c.info("demo: audit-redirects")
    audit = audit_service(settings)
    for _finding in audit:
        pass
    if not c.quiet:
        render_audit_brief(c.out, audit.summary())


@cli.command("check-redirect")
@click.argument("uris", nargs=-1, required=True, metavar="URI...")
@click.option(
    "--app-type",
    type=click.Choice(["web", "native"]),
    default="web",
    show_default=True,
    help="OpenID Connect application_type the URIs are registered for.",
)
@click.option("--format", "fmt", type=FORMAT, default="text", show_default=True)
@click.option(
    "--fail-on",
    type=FAIL_ON,
    default="error",
    show_default=True,
    help="Exit 1 when any URI has a finding of this severity or worse.",
)
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
    from oauthmig.console import render_uri_reports
    from oauthmig.redirect_rules import check_uri
    from oauthmig.reports import check_report_to_dict

    reports = [check_uri(uri, app_type) for uri in uris]
    if fmt == "json":
        click.echo(to_json([check_report_to_dict(r) for r in reports]))
    else:
        render_uri_reports(_state(ctx).consoles.out, reports)
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
    type=click.Path(dir_okay=False, writable=True),
    metavar="FILE",
    help="Write the report to FILE (replaced atomically when complete); print only the summary.",
)
@click.option(
    "--fail-on",
    type=FAIL_ON,
    default="error",
    show_default=True,
    help="Exit 1 when findings of this severity or worse exist.",
)
@click.pass_context
def audit_redirects(ctx: click.Context, fmt: str, output: str | None, fail_on: str) -> None:
    """Audit every stored redirect URI, and the URIs live grants are bound to.

    Reads every application on every database hosting the application table, in batches
    (memory does not grow with the number of applications), and checks its redirect URIs
    with the rules of docs/rules.md as a web or native app (the application_type column, or
    inferred from the URIs as the client-metadata backfill does). Secrets and tokens are never
    read. Codes listed in [audit] ignore are dropped and counted. JSON puts the summary after
    the findings, so that they can be streamed.

    \b
    Examples:
      oauthmig audit-redirects
      oauthmig audit-redirects --format sarif --output redirects.sarif
      oauthmig audit-redirects --format json --fail-on warning | jq .summary.by_code
    """
    from oauthmig.audit import FailOn
    from oauthmig.audit import audit as audit_service
    from oauthmig.console import (
        escape,
        plain_console,
        progress_bar,
        render_audit_findings,
        render_audit_summary,
    )
    from oauthmig.reports import atomic_output, writer_for

    state = _state(ctx)
    c = state.consoles
    settings = state.settings()
    machine = fmt != "text"
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(atomic_output(output)) if output else None
        # Progress (stderr, terminals only) when the report does not go to the terminal.
        show_progress = not c.quiet and (sink is not None or not c.out.is_terminal)
        update = stack.enter_context(progress_bar(c.err, enabled=show_progress))
        audit = audit_service(settings, progress=update)
        if machine:
            out = sink if sink is not None else sys.stdout
            writer = writer_for(fmt, out, application_table=settings.tables.application)
            writer.begin()
            for finding in audit:
                writer.finding(finding)
            writer.end(audit.summary())
        else:
            report_console = c.out if sink is None else plain_console(sink)
            render_audit_findings(report_console, audit)
            render_audit_summary(report_console, audit.summary())
    summary = audit.summary()
    if sink is not None and not c.quiet:
        c.out.print(f"wrote the {fmt} report to {escape(str(output))}")
        render_audit_summary(c.out, summary)
    elif machine and not c.quiet:
        render_audit_summary(c.err, summary)
    if summary.fails(cast(FailOn, fail_on)):
        raise Findings(
            f"{summary.by_severity['error']:,} error(s), {summary.by_severity['warning']:,} "
            f"warning(s): findings at or above --fail-on {fail_on}"
        )


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point: run the CLI and turn every outcome into an exit code."""
    code = run(argv)
    sys.exit(code)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return the exit code (0 ok, 1 findings, 2 failed, 130 interrupted)."""
    ctx_obj: dict[str, Any] = {}
    try:
        cli.main(args=argv, prog_name="oauthmig", standalone_mode=False, obj=ctx_obj)
        return EXIT_OK
    except Findings as exc:
        click.echo(str(exc), err=True)
        return EXIT_FINDINGS
    except OauthmigError as exc:
        click.echo(f"error: {exc.message}", err=True)
        return EXIT_FAILED
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return EXIT_FAILED
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("interrupted; state is saved, rerun to resume", err=True)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away: stop quietly, as the Python docs recommend.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FINDINGS
