"""What a running ``oauthmig backfill`` shows and writes while it works: the progress bar on
stderr and the ``--metrics-file`` (OpenMetrics) that each batch updates."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from oauthmig.output.consoles import Consoles, escape
from oauthmig.output.metrics import MetricsFile
from oauthmig.output.text import ProgressUpdate, progress_bar
from oauthmig.rollout.backfill import Observer


@dataclass(frozen=True, slots=True)
class BackfillWatch:
    """The callbacks the backfill service reports to."""

    progress: ProgressUpdate
    observe: Observer | None


@contextmanager
def watch_backfill(c: Consoles, metrics_file: str | None, dry_run: bool) -> Iterator[BackfillWatch]:
    """A progress bar (not with ``--quiet`` or ``--dry-run``) and the metrics file (not
    written by ``--dry-run``). A metrics file that could not be written is one warning once
    the run is over: the backfill itself goes on."""
    metrics = None if metrics_file is None or dry_run else MetricsFile(metrics_file)
    with progress_bar(c.err, enabled=not c.quiet and not dry_run) as update:
        yield BackfillWatch(update, metrics.update if metrics is not None else None)
    if metrics is not None and metrics.error:
        c.err.print(f"warning: {escape(metrics.error)} (the backfill itself went on)")
