"""The operator's contract, run as real processes on SQLite and PostgreSQL: every bad input
(option, config, URL, database state) exits 2 with exactly one line on stderr, no traceback,
no secret, and writes nothing."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.cli_demo import (
    OAUTHMIG,
    Demo,
    cli_env,
    demo_installation,
    fingerprint,
    run_forked,
)
from tests.helpers import assert_matches_schema, write_config

#: A change to a copy of the demo config mapping.
ConfigChange = Callable[[dict[str, Any]], None]

SECRET = "s3cr3t-pw"
pytestmark = pytest.mark.xdist_group("cli_contract")  # one worker builds the demo fixture


@dataclass(frozen=True)
class Case:
    """One bad input: CLI arguments (``{cfg}`` is the case's config file, ``{dir}`` a
    directory) and optionally a change to the demo config, or a raw config text."""

    name: str
    args: tuple[str, ...]
    config: ConfigChange | None = None  # mutates a copy of the demo config
    raw_config: str | None = None
    expect: str = ""  # a fragment the one error line must contain


def _set(path: str, value: object) -> ConfigChange:
    def change(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value

    return change


def _database_url(name: str, url: str) -> ConfigChange:
    return _set(f"databases.{name}.url", url)


G = ("--config", "{cfg}")
CASES: list[Case] = [
    # ---- usage: option values, missing arguments, conflicts, unknown names
    Case("verbose-and-quiet", (*G, "-v", "-q", "status"), expect="exclude each other"),
    Case("verbose-and-quiet-after", (*G, "status", "-v", "-q"), expect="'oauthmig status --help'"),
    Case("unknown-command", (*G, "statuss"), expect="'oauthmig --help'"),
    Case("unknown-option", (*G, "status", "--nope"), expect="--nope"),
    Case("unknown-global-option", (*G, "--nope", "status"), expect="--nope"),
    Case("status-format", (*G, "status", "--format", "xml"), expect="'--format'"),
    Case("history-format", (*G, "history", "--format", "yaml"), expect="'--format'"),
    Case("upgrade-extra-argument", (*G, "upgrade", "extra"), expect="extra"),
    Case("upgrade-jobs-0", (*G, "upgrade", "--jobs", "0"), expect="'--jobs'"),
    Case("upgrade-jobs-65", (*G, "upgrade", "-j", "65"), expect="'--jobs'"),
    Case("upgrade-to-missing-value", (*G, "upgrade", "--to"), expect="--to"),
    Case("upgrade-to-unknown", (*G, "upgrade", "--to", "9999"), expect="--to 9999"),
    Case("upgrade-sql-from-unknown", (*G, "upgrade", "--sql", "--from", "7777"), expect="--from"),
    Case("upgrade-from-without-sql", (*G, "upgrade", "--from", "0001"), expect="--from"),
    Case("upgrade-dry-run-and-sql", (*G, "upgrade", "--dry-run", "--sql"), expect="exclude"),
    Case("upgrade-format", (*G, "upgrade", "--format", "yaml"), expect="'--format'"),
    Case("downgrade-without-to", (*G, "downgrade"), expect="'--to'"),
    Case("downgrade-to-unknown", (*G, "downgrade", "--to", "9999"), expect="9999"),
    Case("downgrade-dry-run-and-sql", (*G, "downgrade", "--to", "base", "--dry-run", "--sql")),
    Case("downgrade-sql-from-unknown", (*G, "downgrade", "--to", "base", "--sql", "--from", "x")),
    Case("backfill-batch-0", (*G, "backfill", "--batch", "0"), expect="'--batch'"),
    Case("backfill-batch-negative", (*G, "backfill", "--batch", "-5"), expect="'--batch'"),
    Case("backfill-batch-text", (*G, "backfill", "--batch", "abc"), expect="'--batch'"),
    Case("backfill-batch-fraction", (*G, "backfill", "--batch", "1.5"), expect="'--batch'"),
    Case("backfill-jobs-0", (*G, "backfill", "--jobs", "0"), expect="'--jobs'"),
    Case("backfill-sleep-nan", (*G, "backfill", "--sleep", "nan"), expect="'--sleep'"),
    Case("backfill-sleep-inf", (*G, "backfill", "--sleep", "inf"), expect="'--sleep'"),
    Case("backfill-sleep-negative", (*G, "backfill", "--sleep", "-1"), expect="'--sleep'"),
    Case("backfill-sleep-1e300", (*G, "backfill", "--sleep", "1e300"), expect="'--sleep'"),
    Case("backfill-max-runtime-nan", (*G, "backfill", "--max-runtime", "nan"), expect="runtime"),
    Case("backfill-max-runtime-inf", (*G, "backfill", "--max-runtime", "inf"), expect="runtime"),
    Case("backfill-max-runtime-0", (*G, "backfill", "--max-runtime", "0"), expect="runtime"),
    Case("backfill-max-runtime-huge", (*G, "backfill", "--max-runtime", "99999999999")),
    Case("backfill-unknown-job", (*G, "backfill", "no-such-job"), expect="no-such-job"),
    Case("backfill-pause-unknown-job", (*G, "backfill", "pause", "nope"), expect="'nope'"),
    Case("backfill-cancel-format", (*G, "backfill", "cancel", "--format", "x"), expect="--format"),
    Case("backfill-option-on-pause", (*G, "backfill", "--batch", "5", "pause"), expect="--batch"),
    Case("backfill-pause-run-option", (*G, "backfill", "pause", "--restart"), expect="--restart"),
    Case("backfill-timeout-no-wait", (*G, "backfill", "pause", "--timeout", "5"), expect="--wait"),
    Case("backfill-resume-wait", (*G, "backfill", "resume", "--wait"), expect="--wait"),
    Case("backfill-report-restart", (*G, "backfill", "--report", "--restart"), expect="--restart"),
    Case("backfill-last-no-report", (*G, "backfill", "--last", "3"), expect="--report"),
    Case("backfill-report-last-neg", (*G, "backfill", "--report", "--last", "-1"), expect="--last"),
    Case("backfill-pause-not-routed", (*G, "-d", "shard", "backfill", "pause", "client-metadata")),
    Case("keep-batches-0", (*G, "backfill"), _set("backfill.keep_batches", 0), expect="keep_batc"),
    Case("demo-apps-0", (*G, "demo", "--apps", "0"), expect="'--apps'"),
    Case("demo-tokens-negative", (*G, "demo", "--tokens", "-1"), expect="'--tokens'"),
    Case("demo-seed-negative", (*G, "demo", "--seed", "-1"), expect="'--seed'"),
    Case("check-redirect-no-uri", ("check-redirect",), expect="URI"),
    Case("check-redirect-app-type", ("check-redirect", "--app-type", "tv", "https://a.io/cb")),
    Case("check-redirect-fail-on", ("check-redirect", "--fail-on", "often", "https://a.io/cb")),
    Case("audit-format", (*G, "audit-redirects", "--format", "xml"), expect="'--format'"),
    Case("audit-output-dir", (*G, "audit-redirects", "--output", "{dir}"), expect="directory"),
    Case("audit-min-severity", (*G, "audit-redirects", "--min-severity", "debug")),
    Case("audit-fail-on", (*G, "audit-redirects", "--fail-on", "all"), expect="'--fail-on'"),
    Case("report-without-html", (*G, "report"), expect="'--html'"),
    Case("report-html-dir", (*G, "report", "--html", "{dir}"), expect="directory"),
    Case("report-html-empty", (*G, "report", "--html", ""), expect="empty"),
    Case("report-max-findings", (*G, "report", "--html", "{dir}/r.html", "--max-findings", "-1")),
    Case("config-is-a-directory", ("--config", "{dir}", "status"), expect="directory"),
    Case("config-dir-after-command", ("status", "--config", "{dir}"), expect="directory"),
    Case("config-missing", ("--config", "{dir}/nope.toml", "status"), expect="does not exist"),
    Case("database-unknown", (*G, "-d", "nosuch", "status"), expect="nosuch"),
    Case("database-unknown-after", (*G, "upgrade", "-d", "nosuch"), expect="nosuch"),
    Case("database-missing-value", (*G, "status", "-d"), expect="-d"),
    # ---- config files: syntax, keys, numbers and durations (each names its key)
    Case("config-invalid-toml", (*G, "status"), raw_config="[databases\nx = 1\n"),
    Case("config-unknown-key", (*G, "status"), _set("colour", "blue"), expect="colour"),
    Case("lock-timeout-inf", (*G, "status"), _set("migrate.lock_timeout", float("inf"))),
    Case("lock-timeout-nan", (*G, "status"), _set("migrate.lock_timeout", float("nan"))),
    Case("lock-timeout-1e300", (*G, "status"), _set("migrate.lock_timeout", 1e300)),
    Case("lock-timeout-huge", (*G, "upgrade"), _set("migrate.lock_timeout", "99999999999s")),
    Case("lock-timeout-zero", (*G, "status"), _set("migrate.lock_timeout", "0s")),
    Case("lock-timeout-unit", (*G, "status"), _set("migrate.lock_timeout", "2 weeks")),
    Case("statement-timeout-neg", (*G, "status"), _set("migrate.statement_timeout", -1)),
    Case("statement-timeout-inf", (*G, "backfill"), _set("migrate.statement_timeout", "inf")),
    Case("lock-retries-1000", (*G, "status"), _set("migrate.lock_retries", 1000)),
    Case("lock-retries-text", (*G, "status"), _set("migrate.lock_retries", "many")),
    Case("batch-size-0", (*G, "backfill"), _set("backfill.batch_size", 0), expect="batch_size"),
    Case("target-batch-nan", (*G, "backfill"), _set("backfill.target_batch_seconds", float("nan"))),
    Case("sleep-seconds-inf", (*G, "backfill"), _set("backfill.sleep_seconds", float("inf"))),
    Case("sleep-seconds-1e300", (*G, "backfill"), _set("backfill.sleep_seconds", 1e300)),
    Case(
        "auth-method",
        (*G, "status"),
        _set("backfill.client_metadata.confidential_auth_method", "x"),
    ),
    Case("routing-unknown-db", (*G, "status"), _set("routing.token", ["control", "nosuch"])),
    Case("routing-empty", (*G, "status"), _set("routing.grant", []), expect="routing.grant"),
    Case("table-name-sql", (*G, "status"), _set("tables.application", "apps; drop")),
    Case("audit-ignore-code", (*G, "audit-redirects"), _set("audit.ignore", ["XX1"])),
    # ---- URLs (the password must never be printed)
    Case("url-mysql", (*G, "status"), _database_url("shard", f"mysql://u:{SECRET}@h/db")),
    Case("url-garbage", (*G, "status"), _database_url("shard", f"::{SECRET}::")),
    Case(
        "url-pg-no-database", (*G, "status"), _database_url("shard", f"postgresql://u:{SECRET}@h")
    ),
    Case(
        "url-unreachable",
        (*G, "-d", "shard", "upgrade"),
        _database_url("shard", f"postgresql+psycopg://u:{SECRET}@127.0.0.1:1/db?connect_timeout=2"),
    ),
    Case("url-env-unset", (*G, "status"), _set("databases.shard", {"url_env": "H10_UNSET_URL"})),
    # ---- database states
    Case("gated-finalize", (*G, "-d", "control", "upgrade", "--to", "0004"), expect="backfill -d"),
    Case("gated-finalize-one-db", (*G, "upgrade", "-d", "shard", "--to", "0004")),
    Case(
        "routed-table-missing-upgrade",
        (*G, "upgrade"),
        _set("routing.application", ["control", "shard"]),
        expect="does not exist",
    ),
    Case(
        "routed-table-missing-backfill",
        (*G, "-d", "shard", "backfill", "client-metadata"),
        _set("routing.application", ["control", "shard"]),
        expect="[routing]",
    ),
    Case(
        "routed-table-missing-status",
        (*G, "status", "-d", "shard"),
        _set("routing.grant", ["control", "shard"]),
    ),
    Case(
        "routed-table-missing-report",
        (*G, "report", "--html", "{dir}/r.html"),
        _set("routing.grant", ["control", "shard"]),
        expect="does not exist",
    ),
    Case(
        "routed-table-missing-audit",
        (*G, "audit-redirects", "--format", "json"),
        _set("routing.application", ["control", "shard"]),
    ),
]
assert len(CASES) >= 60


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def demo(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Demo]:
    """One demo installation per backend, shared by the cases (which must not write)."""
    yield from demo_installation(request, request.param, tmp_path_factory.mktemp("contract"))


def _base_config(demo: Demo) -> dict[str, Any]:
    from tests.helpers.databases import routed_config

    s = demo.settings
    return routed_config(s.databases["control"].url or "", s.databases["shard"].url or "")


def _prepare(case: Case, demo: Demo, folder: Path) -> tuple[str, ...]:
    folder.mkdir()
    cfg = folder / "oauthmig.toml"
    if case.raw_config is not None:
        cfg.write_text(case.raw_config)
    elif case.config is not None:
        data = copy.deepcopy(_base_config(demo))
        case.config(data)
        write_config(cfg, data)
    else:
        cfg = Path(demo.config)
    return tuple(a.replace("{cfg}", str(cfg)).replace("{dir}", str(folder)) for a in case.args)


def test_every_bad_input_is_one_line_exit_2_and_writes_nothing(demo: Demo, tmp_path: Path) -> None:
    before = fingerprint(demo.settings)
    jobs = [(_prepare(c, demo, tmp_path / c.name), tmp_path, cli_env()) for c in CASES]
    results = run_forked(jobs, tmp_path / "streams")
    problems: list[str] = []
    for case, proc in zip(CASES, results, strict=True):
        lines = proc.err.splitlines()
        why = []
        if proc.code != 2:
            why.append(f"exit {proc.code}")
        if len(lines) != 1:
            why.append(f"{len(lines)} stderr lines")
        if "Traceback" in proc.err or "Traceback" in proc.out:
            why.append("traceback")
        if SECRET in proc.err or SECRET in proc.out:
            why.append("secret printed")
        if lines and not lines[0].startswith("error: "):
            why.append("no 'error: ' prefix")
        if case.expect and case.expect not in proc.err:
            why.append(f"{case.expect!r} not named")
        if why:
            problems.append(f"{case.name}: {', '.join(why)}: {proc.err!r}")
    assert not problems, "\n".join(problems)
    assert fingerprint(demo.settings) == before, "a bad input wrote to a database"


def test_usage_errors_name_the_command_help_and_bare_oauthmig_prints_help(
    demo: Demo, tmp_path: Path
) -> None:
    cfg = demo.config
    bare, late, early, pipe = run_forked(
        [
            ((), tmp_path, cli_env()),
            (
                ("upgrade", "--config", cfg, "-d", "control", "--to", "0002", "--dry-run"),
                tmp_path,
                None,
            ),
            (
                ("--config", cfg, "-d", "control", "upgrade", "--to", "0002", "--dry-run"),
                tmp_path,
                None,
            ),
            (("--config", cfg, "upgrade", "--sql", "--from", "7777"), tmp_path, None),
        ],
        tmp_path / "streams",
    )
    assert bare.code == 0 and bare.err == ""
    assert bare.out.startswith("Usage: ") and "Commands:" in bare.out
    # Global options work after the subcommand exactly as before it.
    assert late.code == 0, late.err
    assert late.out == early.out and "control" in late.out and "shard" not in late.out
    assert pipe.err == (
        "error: --from 7777: unknown revision (known: base, head, 0001, 0002, 0003, 0004, 0005, "
        "0006, 0007); no database was touched; see 'oauthmig upgrade --help'\n"
    )


def test_broken_pipe_exits_with_the_code_of_the_work(demo: Demo, tmp_path: Path) -> None:
    """``oauthmig status --check | head -1``: quiet, and still exit 1 (work outstanding)."""
    for args, code in ((("status", "--check"), 1), (("history",), 0)):
        proc = subprocess.Popen(
            [*OAUTHMIG, "--config", demo.config, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=cli_env(),
            cwd=tmp_path,
        )
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.readline()
        proc.stdout.close()  # the reader goes away, as `head -1` does
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == code, err
        assert "Traceback" not in err and "BrokenPipe" not in err and "Exception" not in err
        assert err == (
            "outstanding work: pending, waiting or failed revisions or backfills\n"
            if code == 1
            else ""
        )


def test_json_interrupted_by_ctrl_c_is_one_document(demo: Demo, tmp_path: Path) -> None:
    """Runs last for its backend: it leaves a paused backfill on control."""
    slow = subprocess.Popen(
        [
            *OAUTHMIG,
            "--config",
            demo.config,
            "-d",
            "control",
            "backfill",
            "token-families",
            "--batch",
            "1",
            # Parked after its first batch (an hour's pause): still running at Ctrl-C however fast.
            "--sleep",
            "3600",
            "--format",
            "json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
        cwd=tmp_path,
        # A background job's shell ignores SIGINT, and children inherit that: restore it, as a
        # terminal would have it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # Wait until the job has started (its row exists), then press Ctrl-C.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = fingerprint(demo.settings)["control"].get("oauthmig_backfill_job")
        if state and state["rows"][0] > 0:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the backfill job did not start")
    slow.send_signal(signal.SIGINT)
    out, err = slow.communicate(timeout=60)
    assert slow.returncode == 130, err
    document = json.loads(out)
    assert_matches_schema("interrupted", document)
    assert document["interrupted"] is True and document["command"] == "backfill"
    assert err.decode().strip().endswith("interrupted; state is saved, rerun to resume")
    assert "Traceback" not in err.decode()
