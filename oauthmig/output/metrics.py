"""``oauthmig backfill --metrics-file PATH``: backfill progress as OpenMetrics text.

The file follows the node_exporter textfile-collector convention: it is rewritten whole, into a
temporary file beside it that is then renamed over it (:func:`oauthmig.output.files.output_file`),
so a scrape never reads half a file. It is rewritten when each job's run starts, after every
batch, on every health check while a job holds, and when each job's run ends. Point the
collector's ``--collector.textfile.directory`` at the file's directory and name the file
``*.prom``.

Every family is a gauge named ``oauthmig_backfill_*`` with labels ``job`` and ``database``
(see :data:`FAMILIES`); ``oauthmig_backfill_state`` adds ``state`` (one series per value of
:data:`STATES`, 1 for the current one: the enum-as-gauges convention), written on every way a
run ends (finished, paused by request or ``--max-runtime``, interrupted, cancelled, failed,
an unexpected error); ``oauthmig_backfill_held`` adds ``probe`` (the health probe that
failed: ``replica-lag``, ``autovacuum``, ``check-sql``, or empty). The hold's one-line reason
is not a label: its figures change with every check, and each value would be a new series; it
is in the job row and ``status``. "Held" is a health hold; "paused" is what an operator's
``backfill pause`` or ``--max-runtime`` does (a value of ``state``). Label values are
escaped as both the Prometheus text format and OpenMetrics require (backslash, double quote,
newline), and the file ends with ``# EOF``. Only gauges are used, so the Prometheus text
format parser (node_exporter) and OpenMetrics parsers read the file alike.
"""

from __future__ import annotations

import os
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from oauthmig.errors import OutputError, UsageError
from oauthmig.output.files import output_file
from oauthmig.rollout.backfill import JobSample

PREFIX = "oauthmig_backfill_"
#: Every value of the ``state`` label: while a run goes on, then how it ended.
STATES = (
    "running",
    "held",
    "finished",
    "up-to-date",
    "paused",
    "interrupted",
    "cancelled",
    "failed",
)
OPTION = "--metrics-file"

#: (name without prefix, help text) of every family, in file order.
FAMILIES: tuple[tuple[str, str], ...] = (
    ("rows_done", "Rows the backfill job has changed on the database so far."),
    ("rows_left", "Rows the job has still to change: rows to do when it started minus done."),
    ("batches", "Batches the job has committed on the database."),
    ("batch_seconds", "Duration of the job's last batch in this run, in seconds."),
    ("running", "1 while a backfill process runs the job (holds included), 0 once it ended."),
    ("finished", "1 once the job has nothing left to do on the database, else 0."),
    ("held", "1 while the job holds because a health check failed (see probe)."),
    ("failed", "1 once the job's run ended failed or cancelled (see the error it printed)."),
    (
        "state",
        "1 for the job's current state, 0 for the others (label state: " + ", ".join(STATES) + ").",
    ),
    ("held_seconds", "How long the current hold has lasted, in seconds (0 when not held)."),
    (
        "pace",
        "Latency pacing's pace: 1 at full speed, less while the application's statements or "
        "the probe are slower than max_latency_ratio x their baselines (absent when pacing is "
        "off).",
    ),
    ("updated_timestamp_seconds", "Unix time at which this job's figures were taken."),
)


def escape_label(value: str) -> str:
    """A label value escaped for the text formats: ``\\`` ``"`` and newlines."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float | int) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(round(float(value), 6))


@dataclass(frozen=True, slots=True)
class _Entry:
    sample: JobSample
    at: float


def render(samples: list[tuple[JobSample, float]]) -> str:
    """The OpenMetrics text for ``(sample, unix time)`` pairs, one series set per job and
    database."""
    lines: list[str] = []
    for name, help_text in FAMILIES:
        family = PREFIX + name
        lines.append(f"# HELP {family} {help_text}")
        lines.append(f"# TYPE {family} gauge")
        for sample, at in samples:
            labels = f'job="{escape_label(sample.job)}",database="{escape_label(sample.database)}"'
            held = sample.state == "held"
            values: dict[str, float | int | None] = {
                "rows_done": sample.rows_done,
                "rows_left": None if sample.rows_left < 0 else sample.rows_left,
                "batches": sample.batches,
                "batch_seconds": sample.batch_seconds,
                "running": int(sample.state in ("running", "held")),
                "finished": int(sample.state in ("finished", "up-to-date")),
                "held": int(held),
                "failed": int(sample.state in ("failed", "cancelled")),
                "state": 0,
                "held_seconds": sample.held_seconds if held else 0.0,
                "pace": sample.pace,
                "updated_timestamp_seconds": at,
            }
            value = values[name]
            if value is None:
                continue  # no batch ran yet: no sample rather than a made-up 0
            if name == "state":
                for state in STATES:
                    current = int(sample.state == state)
                    lines.append(f'{family}{{{labels},state="{state}"}} {current}')
                continue
            if name == "held":
                probe = escape_label(sample.held_probe if held else "")
                labels += f',probe="{probe}"'
            lines.append(f"{family}{{{labels}}} {_number(value)}")
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


class MetricsFile:
    """The ``--metrics-file`` writer: keeps the latest sample of every job and database and
    rewrites the whole file on each :meth:`update` (thread-safe: jobs may run in parallel).

    The path is checked when this is created (before the backfill starts): a directory, a
    missing parent directory, or anything but a regular file is a :class:`UsageError`. A write
    that fails later (disk full) does not stop the backfill: the first such error is kept in
    :attr:`error` for the caller to report, and later updates try again.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.error: str | None = None
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], _Entry] = {}
        _check_path(path)

    def update(self, sample: JobSample) -> None:
        """Record ``sample`` and rewrite the file."""
        with self._lock:
            self._entries[(sample.job, sample.database)] = _Entry(sample, time.time())
            self._write()

    def write(self) -> None:
        """Rewrite the file with what is known (also when nothing is yet)."""
        with self._lock:
            self._write()

    def _write(self) -> None:
        text = render([(e.sample, e.at) for e in self._entries.values()])
        try:
            with output_file(self.path, OPTION, durable=False) as fh:
                fh.write(text)
        except (UsageError, OutputError) as exc:
            self.error = self.error or exc.message


def _check_path(path: str) -> None:
    if not path.strip():
        raise UsageError(
            f"{OPTION}: the file name is empty; give a file name such as backfill.prom"
        )
    target = Path(os.path.realpath(path))
    try:
        st: os.stat_result | None = target.stat()
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise UsageError(f"{OPTION} {path}: {exc.strerror or exc}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{OPTION} {path}: is a directory; give a file name inside it")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{OPTION} {path}: not a regular file; it is rewritten after every batch")
    if not target.parent.is_dir():
        raise UsageError(f"{OPTION} {path}: directory {target.parent} does not exist")
    # A real attempt (os.access says yes to root everywhere, /proc and read-only mounts too).
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(
            f"{OPTION} {path}: cannot write in {target.parent}: {exc.strerror or exc} (the file "
            "is replaced by renaming a new one over it, so its directory must take new files)"
        ) from None
