"""Whatever fails, one line and a documented exit code, never a traceback (issue 22 §2).

* Output that cannot be written: every file writer (``--output``, ``--html``, ``--output-dir``,
  ``--metrics-file``) and stdout itself, onto ``/dev/full``, past a file-size limit (a "full
  disk" for one process: RLIMIT_FSIZE, which holds for root too), under a regular file, in a
  directory that does not take files (``/proc``), or onto a directory: one ``error:`` line,
  exit 2, and no file or temporary file left behind.
* Ctrl-C at any moment of a real process's life, the CLI's loading included: exit 130, no
  traceback.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest

from oauthmig.config import settings_from_mapping
from oauthmig.resources import revisions_dir
from tests.cli_demo import OAUTHMIG, cli_env
from tests.forkserver import ForkServer
from tests.helpers import seed_legacy, write_config
from tests.helpers.databases import DatabaseFactory, create_legacy, routed_config

OAUTHMIG_SCRIPT = str(Path(sys.executable).with_name("oauthmig"))


@pytest.fixture
def legacy_config(make_database: DatabaseFactory, tmp_path: Path) -> Path:
    """A config file over two legacy databases (not upgraded), in its own directory."""
    data = routed_config(make_database("control"), make_database("shard"))
    settings = settings_from_mapping(data, {}, "test")
    create_legacy(settings)
    seed_legacy(settings, rows=200)  # reports of several kilobytes
    work = tmp_path / "work"
    work.mkdir()
    return Path(write_config(work / "oauthmig.toml", data))


def _run(
    server: ForkServer,
    args: list[str],
    cwd: Path,
    *,
    fsize: int | None = None,
    stdout: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """A real CLI process: forked from the pre-imported server, or with a file-size limit (a
    "full disk" for one process: RLIMIT_FSIZE, which would also cut the fork server's stderr
    file) a fresh one whose stderr is a pipe."""
    if fsize is None:
        code, out, err = server.run(args, cwd=cwd, env=cli_env(), stdout=stdout)
        return subprocess.CompletedProcess(args, code, out, err)

    def limit() -> None:
        # Past the limit write() fails with EFBIG instead of killing the process.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run(
        [*OAUTHMIG, *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        preexec_fn=limit,
    )


def _assert_one_error(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def _leftovers(folder: Path, before: set[str]) -> set[str]:
    return set(os.listdir(folder)) - before


FILE_COMMANDS = {
    "audit-text": ["audit-redirects", "--output", "{path}"],
    "audit-sarif": ["audit-redirects", "--format", "sarif", "--output", "{path}"],
    "audit-json": ["audit-redirects", "--format", "json", "--output", "{path}"],
    "audit-csv": ["audit-redirects", "--format", "csv", "--output", "{path}"],
    "report-html": ["report", "--html", "{path}"],
}


@pytest.mark.parametrize("command", list(FILE_COMMANDS), ids=list(FILE_COMMANDS))
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_file_outputs_that_cannot_be_written(
    legacy_config: Path, command: str, forkserver: ForkServer
) -> None:
    work = legacy_config.parent
    option = FILE_COMMANDS[command][-2]
    plain = Path("/etc/hostname") if Path("/etc/hostname").is_file() else legacy_config
    cases: dict[str, tuple[str, int | None, str]] = {
        "device full": ("/dev/full", None, "No space left on device"),
        "file too large": (str(work / "out.file"), 10, "File too large"),
        "parent is a file": (f"{plain}/out.file", None, "Not a directory"),
        "directory takes no files": ("/proc/out.file", None, "cannot write in /proc"),
        "a directory": (str(work), None, "is a directory"),
    }
    if command not in ("report-html", "audit-sarif"):
        # The audit's other formats share the writer: the failures while writing are theirs to
        # show; the path checks before writing are the same code, shown by the two above.
        cases = {k: v for k, v in cases.items() if k in ("device full", "file too large")}
    for name, (path, fsize, needle) in cases.items():
        before = set(os.listdir(work))
        args = [a.replace("{path}", path) for a in FILE_COMMANDS[command]]
        done = _run(forkserver, ["--config", str(legacy_config), *args], work, fsize=fsize)
        _assert_one_error(done, f"{option} {path}", needle)
        assert _leftovers(work, before) == set(), name


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_full_disk_keeps_the_old_report(legacy_config: Path, forkserver: ForkServer) -> None:
    work = legacy_config.parent
    old = work / "report.html"
    old.write_text("the previous report\n")
    done = _run(
        forkserver, ["--config", str(legacy_config), "report", "--html", str(old)], work, fsize=8192
    )
    _assert_one_error(done, "the file was left as it was")
    assert old.read_text() == "the previous report\n"
    assert sorted(os.listdir(work)) == ["oauthmig.toml", "report.html"]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_offline_scripts_and_metrics_that_cannot_be_written(
    legacy_config: Path, forkserver: ForkServer
) -> None:
    work = legacy_config.parent
    cfg = ["--config", str(legacy_config)]
    before = set(os.listdir(work))
    done = _run(
        forkserver, [*cfg, "upgrade", "--sql", "--output-dir", str(work / "sql")], work, fsize=512
    )
    _assert_one_error(done, "--output-dir", "File too large")
    assert list((work / "sql").iterdir()) == []  # the directory is made, no script is half there
    done = _run(forkserver, [*cfg, "upgrade", "--sql", "--output-dir", "/proc/sql"], work)
    _assert_one_error(done, "--output-dir /proc/sql")
    done = _run(forkserver, [*cfg, "upgrade", "--sql", "--output-dir", "/dev/full"], work)
    _assert_one_error(done, "--output-dir /dev/full")
    done = _run(forkserver, [*cfg, "backfill", "--metrics-file", "/dev/full"], work)
    _assert_one_error(done, "--metrics-file /dev/full")
    done = _run(forkserver, [*cfg, "backfill", "--metrics-file", "/proc/m.prom"], work)
    _assert_one_error(done, "--metrics-file /proc/m.prom")
    assert _leftovers(work, before) == {"sql"}


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["status", "--format", "json"],
        ["history"],
        ["history", "--format", "json"],
        ["audit-redirects", "--fail-on", "never"],
        ["audit-redirects", "--format", "sarif", "--fail-on", "never"],
        ["upgrade", "--sql"],
        ["upgrade", "--dry-run", "--format", "json"],
        ["check-redirect", "https://app.example.com/cb"],
        ["--help"],
    ],
    ids=lambda a: " ".join(a),
)
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_stdout_on_a_full_device(
    legacy_config: Path, args: list[str], forkserver: ForkServer
) -> None:
    done = _run(
        forkserver, ["--config", str(legacy_config), *args], legacy_config.parent,
        stdout=Path("/dev/full"),
    )  # fmt: skip
    _assert_one_error(done, "cannot write to stdout", "No space left on device")
    assert "Exception ignored" not in done.stderr


# --------------------------------------------------------------------------- Ctrl-C


def _wait_until(condition: object, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _assert_interrupted(proc: subprocess.Popen[str]) -> tuple[str, str]:
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    assert "Exception ignored" not in err, err
    assert proc.returncode == 130, (proc.returncode, err)
    return out, err


# `python -m oauthmig`, except that the child reports, on a pipe of its own, the moment the
# first line of oauthmig's code has run (the package's __init__): from there on every moment
# is the program's. Before it the interpreter is starting and its import system is locating
# the package (an editable install's finder makes that tens of milliseconds on a loaded
# machine), which no program can handle; an installed wheel spends a few milliseconds there.
_AS_MAIN = (
    "import os, runpy, sys\n"
    "ready = int(sys.argv.pop(1))\n"
    "sys.argv[0] = '-m'  # as python -m sets it while it locates the package\n"
    "import oauthmig\n"
    "os.write(ready, b'ready')\n"
    "runpy._run_module_as_main('oauthmig')  # what python -m runs\n"
)


# Ctrl-C lands while ``json`` itself is being imported: it is in sys.modules, without dumps yet.
_HALF_IMPORTED_JSON = (
    "import os, signal, sys, time, types\n"
    "sys.argv[0] = '-m'  # as python -m sets it while it locates the package\n"
    "import oauthmig\n"
    "sys.modules['json'] = types.ModuleType('json')\n"
    "os.kill(os.getpid(), signal.SIGINT)\n"
    "time.sleep(60)\n"
)


def test_ctrl_c_in_the_middle_of_any_import_still_says_so(tmp_path: Path) -> None:
    """The loading guard imports nothing when it fires (the signal may land in the middle of
    importing ``json`` itself): the JSON document and the message still come out, and the
    document is what ``json.dumps`` prints, valid against its schema."""
    done = subprocess.run(
        [sys.executable, "-c", _HALF_IMPORTED_JSON, "status", "--format", "json"],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 130, done.stderr
    assert done.stderr == "interrupted while loading; nothing was started\n"
    document = json.loads(done.stdout)
    assert done.stdout == json.dumps(document, indent=2) + "\n"
    schemas = Path(__file__).resolve().parent.parent / "docs" / "schemas"
    jsonschema.validate(document, json.loads((schemas / "interrupted.schema.json").read_text()))
    assert document["exit_code"] == 130 and document["interrupted"] is True


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_ctrl_c_while_the_cli_loads(tmp_path: Path, fmt: str) -> None:
    """Ctrl-C at delays from 0 to 1 s after start: whatever the child was doing then
    (importing, parsing the arguments, loading the config, importing the command's services,
    blocked opening a FIFO nobody reads), exit 130, and with --format json the document."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    write_config(tmp_path / "oauthmig.toml", {"databases": {"db": {"url": "sqlite:///db.sqlite3"}}})
    args = ["report", "--html", str(fifo)]
    if fmt == "json":
        args = ["audit-redirects", "--format", "json", "--output", str(fifo)]
    for delay in (0.0, 0.03, 0.06, 0.1, 0.15, 0.2, 0.3, 0.45, 0.7, 1.0):
        read_end, write_end = os.pipe()
        proc = subprocess.Popen(
            [sys.executable, "-c", _AS_MAIN, str(write_end), *args],
            cwd=tmp_path,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            pass_fds=(write_end,),
        )
        os.close(write_end)
        with os.fdopen(read_end, "rb") as ready:
            assert ready.read(5) == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = _assert_interrupted(proc)
        assert err.strip().startswith("interrupted"), err
        if fmt == "json":
            document = json.loads(out)
            assert document["interrupted"] is True and document["exit_code"] == 130


def test_ctrl_c_once_loaded_console_script(tmp_path: Path) -> None:
    """The installed console script, interrupted once it is loaded and waiting (on a FIFO's
    reader): the CLI's own handling, exit 130."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [OAUTHMIG_SCRIPT, "report", "--html", str(fifo)],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wchan = Path(f"/proc/{proc.pid}/wchan")
    _wait_until(
        lambda: proc.poll() is not None or wchan.read_text() == "wait_for_partner",
        "the CLI to block opening the FIFO",
    )
    proc.send_signal(signal.SIGINT)
    _, err = _assert_interrupted(proc)
    assert "interrupted" in err


# --------------------------------------------------------------------------- stock alembic


@pytest.mark.parametrize(
    "command",
    [
        ["current"],
        ["check"],
        ["stamp", "head"],
        ["upgrade", "head"],
        ["upgrade", "head", "--sql"],
        ["downgrade", "base"],
        ["downgrade", "0006:0003", "--sql"],
    ],
    ids=lambda c: " ".join(c),
)
def test_stock_alembic_on_the_revisions_refuses_in_one_line(
    tmp_path: Path, command: list[str]
) -> None:
    """The stock ``alembic`` command over oauthmig's scripts names the oauthmig command to use
    (they need oauthmig's routing), and touches nothing."""
    database = tmp_path / "db.sqlite3"
    ini = tmp_path / "alembic.ini"
    ini.write_text(
        f"[alembic]\nscript_location = {revisions_dir()}\nsqlalchemy.url = sqlite:///{database}\n"
    )
    done = subprocess.run(
        [str(Path(sys.executable).with_name("alembic")), "-c", str(ini), *command],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and "KeyError" not in done.stderr, done.stderr
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("FAILED: oauthmig's revisions run only through oauthmig"), lines
    assert "`oauthmig status`" in lines[0] and "`oauthmig stamp REV`" in lines[0]
    assert not database.exists() or database.stat().st_size == 0
