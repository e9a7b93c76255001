"""The command line's own start (issue 24): how long a command takes before it does anything.

Each case is a fresh process of the installed console script (``<venv>/bin/oauthmig``), run
``--runs`` times after one warm-up run (the ``.pyc`` files exist, the page cache is warm);
the figure is the median wall time and the spread (min, max). The yardsticks are a bare
interpreter (``python -c pass``) and the bare import of the libraries a command line of this
kind needs (``import sqlalchemy, alembic, click, rich.console``).

* ``--help``, ``check-redirect URI`` (no database) and ``history`` (reads the revision
  scripts: Alembic) are the issue's three;
* ``status`` on an embedded SQLite database (the demo's default configuration, set up once
  with ``demo --setup-only``) is a command that reads a database.

Target: ``--help`` and ``check-redirect`` at most half the bare import of the libraries
(they need none of SQLAlchemy and Alembic); ``history`` at most the bare import plus 25 %.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.bench_common import load, machine, pass_fail

BIN = Path(sys.executable).parent
LIBRARIES = "import sqlalchemy, alembic, click, rich.console"


def _time(cmd: list[str], runs: int, cwd: Path) -> list[float]:
    subprocess.run(cmd, cwd=cwd, capture_output=True, check=True)  # warm-up
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, check=False)
        times.append(time.perf_counter() - started)
        if done.returncode not in (0, 1):
            raise SystemExit(f"{cmd}: exit {done.returncode}: {done.stderr.decode()[-500:]}")
    return times


def _cases(oauthmig: str) -> list[tuple[str, list[str]]]:
    return [
        ("python -c pass", [sys.executable, "-c", "pass"]),
        (f"python -c '{LIBRARIES}'", [sys.executable, "-c", LIBRARIES]),
        ("oauthmig --help", [oauthmig, "--help"]),
        (
            "oauthmig check-redirect URI",
            [oauthmig, "check-redirect", "https://app.example.com/cb"],
        ),
        ("oauthmig history", [oauthmig, "history"]),
        ("oauthmig status (SQLite)", [oauthmig, "status"]),
    ]


def main(runs: int = 15) -> bool:
    oauthmig = shutil.which("oauthmig", path=str(BIN))
    if oauthmig is None:
        raise SystemExit(f"no oauthmig console script in {BIN}: run `make .venv/.installed`")
    print(f"== the command line's start: {runs} runs each after a warm-up; {machine()}")
    with tempfile.TemporaryDirectory(prefix="oauthmig-bench-startup-") as tmp:
        cwd = Path(tmp)
        subprocess.run(
            [oauthmig, "demo", "--setup-only", "--apps", "20", "--tokens", "50"],
            cwd=cwd,
            capture_output=True,
            check=True,
        )
        medians: dict[str, float] = {}
        print(f"{'case':<34} {'median':>8} {'min':>8} {'max':>8}  load before")
        for name, cmd in _cases(oauthmig):
            before = load()
            times = _time(cmd, runs, cwd)
            medians[name] = statistics.median(times)
            print(
                f"{name:<34} {medians[name] * 1000:7.0f}ms {min(times) * 1000:7.0f}ms "
                f"{max(times) * 1000:7.0f}ms  {before}",
                flush=True,
            )
    libraries = medians[f"python -c '{LIBRARIES}'"]
    light = max(medians["oauthmig --help"], medians["oauthmig check-redirect URI"])
    history = medians["oauthmig history"]
    ok_light = light <= 0.5 * libraries
    ok_history = history <= 1.25 * libraries
    print(
        f"--help / check-redirect: {light / libraries:.2f}x the bare import of the libraries "
        f"(target <= 0.5x): {pass_fail(ok_light)}"
    )
    print(
        f"history: {history / libraries:.2f}x the bare import of the libraries "
        f"(target <= 1.25x): {pass_fail(ok_history)}"
    )
    return ok_light and ok_history
