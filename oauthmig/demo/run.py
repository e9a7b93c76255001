"""``oauthmig demo``: legacy tables with realistic data, then the whole rollout on them.

The steps (:class:`DemoStep`) run in order on the configured databases: the legacy tables
(:func:`oauthmig.demo.data.setup_legacy`), ``upgrade`` (expand), ``backfill``, ``upgrade``
(finalize), the provider's unchanged code writing (:mod:`oauthmig.demo.old_code`: the
compatibility layer fills its rows), ``status``, the redirect audit and the HTML report
(``report.html`` in the embedded default's directory, ``.oauthmig/`` beside the configuration
file otherwise). The demo stops after the first step that fails; :class:`DemoRun` holds what
every step that ran returned.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path

from oauthmig.config import EMBEDDED_DIR, Settings
from oauthmig.demo.data import DemoSetup, Progress, setup_legacy
from oauthmig.demo.old_code import LegacyWrite, legacy_writes
from oauthmig.html_report import gather_report
from oauthmig.output.files import output_file
from oauthmig.output.html import render_html
from oauthmig.redirects.audit import AuditSummary, audit
from oauthmig.rollout import runner
from oauthmig.rollout.backfill import BackfillResult, backfill
from oauthmig.rollout.revisions import Catalogue
from oauthmig.rollout.runner import RunResult
from oauthmig.rollout.status import StatusReport, status
from oauthmig.same_database import check_distinct

__all__ = ["DemoHooks", "DemoRun", "DemoStep", "run_demo"]


class DemoStep(StrEnum):
    """The steps of the demo, in the order they run."""

    SETUP = "setup"
    EXPAND = "upgrade (expand)"
    BACKFILL = "backfill"
    FINALIZE = "upgrade (finalize)"
    LEGACY_WRITES = "the provider's unchanged code writes"
    STATUS = "status"
    AUDIT = "audit-redirects"
    REPORT = "report"


@dataclass(frozen=True, slots=True)
class DemoRun:
    """What the demo did: one field per step, ``None`` for the steps that did not run."""

    setup: DemoSetup
    expand: RunResult | None = None
    backfill: BackfillResult | None = None
    finalize: RunResult | None = None
    legacy_writes: tuple[LegacyWrite, ...] | None = None  # one per database hosting the tables
    status: StatusReport | None = None
    audit: AuditSummary | None = None
    report: Path | None = None  # where the HTML report was written

    @property
    def failed(self) -> DemoStep | None:
        """The step that failed (the demo stopped after it), if any."""
        if self.expand is not None and self.expand.failed:
            return DemoStep.EXPAND
        if self.backfill is not None and self.backfill.failed:
            return DemoStep.BACKFILL
        if self.finalize is not None and self.finalize.failed:
            return DemoStep.FINALIZE
        return None


@contextlib.contextmanager
def _no_progress() -> Iterator[Progress]:
    yield lambda _label, _done, _total: None


def _ignore(*_args: object) -> None:
    return None


@dataclass(frozen=True, slots=True)
class DemoHooks:
    """How :func:`run_demo` reports while it works (every hook is optional).

    ``loading()`` is entered while the legacy rows are loaded and yields
    ``progress(label, done, total)``; ``starting(step)`` is called before each step and
    ``finished(step, run)`` after it, ``run`` holding every result so far.
    """

    loading: Callable[[], AbstractContextManager[Progress]] = field(default=_no_progress)
    starting: Callable[[DemoStep], None] = field(default=_ignore)
    finished: Callable[[DemoStep, DemoRun], None] = field(default=_ignore)


def run_demo(
    settings: Settings,
    *,
    apps: int = 2000,
    tokens: int = 20000,
    seed: int = 42,
    setup_only: bool = False,
    hooks: DemoHooks | None = None,
) -> DemoRun:
    """Create and fill the legacy tables, then (unless ``setup_only``) run the rollout on them.

    Raises, before any table is created, when the revisions cannot be read (a broken
    install), when two configured names reach one database, or when a database holds tables
    the demo did not create. The redirect audit's findings are expected (the demo data holds
    every kind of bad redirect URI on purpose) and are only counted.
    """
    hooks = hooks or DemoHooks()
    catalogue = None if setup_only else Catalogue.load()
    check_distinct(settings)
    hooks.starting(DemoStep.SETUP)
    with hooks.loading() as progress:
        setup = setup_legacy(settings, apps=apps, tokens=tokens, seed=seed, progress=progress)
    run = DemoRun(setup)
    hooks.finished(DemoStep.SETUP, run)
    if catalogue is None:
        return run

    hooks.starting(DemoStep.EXPAND)
    run = replace(run, expand=runner.upgrade(settings, catalogue=catalogue))
    hooks.finished(DemoStep.EXPAND, run)
    if run.failed:
        return run
    hooks.starting(DemoStep.BACKFILL)
    run = replace(run, backfill=backfill(settings, revisions=catalogue.revisions))
    hooks.finished(DemoStep.BACKFILL, run)
    if run.failed:
        return run
    hooks.starting(DemoStep.FINALIZE)
    run = replace(run, finalize=runner.upgrade(settings, catalogue=catalogue))
    hooks.finished(DemoStep.FINALIZE, run)
    if run.failed:
        return run
    # Where a provider whose code never learned the new columns broke (finalize's NOT NULL):
    # it writes, and the compatibility layer fills what it left out.
    hooks.starting(DemoStep.LEGACY_WRITES)
    run = replace(run, legacy_writes=legacy_writes(settings))
    hooks.finished(DemoStep.LEGACY_WRITES, run)
    hooks.starting(DemoStep.STATUS)
    run = replace(run, status=status(settings, catalogue.revisions))
    hooks.finished(DemoStep.STATUS, run)
    hooks.starting(DemoStep.AUDIT)
    findings = audit(settings, revisions=catalogue.revisions)
    for _finding in findings:
        pass
    run = replace(run, audit=findings.summary())
    hooks.finished(DemoStep.AUDIT, run)
    hooks.starting(DemoStep.REPORT)
    run = replace(run, report=write_report(settings, catalogue))
    hooks.finished(DemoStep.REPORT, run)
    return run


def report_path(settings: Settings) -> Path:
    """Where the demo writes its HTML report: ``.oauthmig/report.html`` in the current
    directory with the embedded default, else beside the configuration file."""
    embedded = settings.source.startswith("embedded default")
    base = Path.cwd() if embedded else Path(settings.source).resolve().parent
    return base / EMBEDDED_DIR / "report.html"


def write_report(settings: Settings, catalogue: Catalogue) -> Path:
    """Write the demo's HTML report (:func:`oauthmig.html_report.gather_report`); its path."""
    path = report_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    with output_file(path, "report") as sink:
        sink.write(render_html(gather_report(settings, catalogue=catalogue)))
    return path
