"""What ``oauthmig demo`` shows while it works: the :class:`~oauthmig.demo.run.DemoHooks` that
print each step and its result on the CLI's consoles.

It lives here rather than in :mod:`oauthmig.output`, because the renderers may not import the
demo (output sits below it in the layer table) and the hooks read the demo's own types.
"""

from __future__ import annotations

from oauthmig.config import Settings
from oauthmig.demo.old_code import LegacyWrite
from oauthmig.demo.run import DemoHooks, DemoRun, DemoStep
from oauthmig.output.consoles import Consoles, escape
from oauthmig.output.outcomes import Failures, backfill_failures, run_failures
from oauthmig.output.text import progress_bar, render_backfill, render_run, render_status
from oauthmig.output.uri_text import render_audit_brief


def console_hooks(c: Consoles, settings: Settings, command: str) -> DemoHooks:
    """Hooks printing each step on ``c`` (a progress bar while the legacy rows load);
    ``command`` prefixes the advice printed (``oauthmig --config FILE``)."""

    def starting(step: DemoStep) -> None:
        if step is DemoStep.SETUP:
            c.info(
                f"demo: creating legacy tables on {', '.join(settings.database_names())} "
                f"({settings.source})"
            )
        elif step is not DemoStep.STATUS:
            c.info(f"demo: {step}")

    def finished(step: DemoStep, run: DemoRun) -> None:
        if step is DemoStep.SETUP:
            for d in run.setup.databases:
                c.info(
                    f"  {d.database}: {d.applications:,} applications, {d.grants:,} grants "
                    f"({d.live_grants:,} live), {d.tokens:,} tokens ({d.refreshable_tokens:,} "
                    "refreshable)"
                )
        elif c.quiet:
            return
        elif step is DemoStep.EXPAND and run.expand is not None:
            render_run(c.out, run.expand, command)
        elif step is DemoStep.BACKFILL and run.backfill is not None:
            render_backfill(c.out, run.backfill)
        elif step is DemoStep.FINALIZE and run.finalize is not None:
            render_run(c.out, run.finalize, command)
        elif step is DemoStep.LEGACY_WRITES and run.legacy_writes is not None:
            for w in run.legacy_writes:
                c.out.print(escape(legacy_write_line(w)))
        elif step is DemoStep.STATUS and run.status is not None:
            render_status(c.out, run.status)
        elif step is DemoStep.AUDIT and run.audit is not None:
            # The demo data holds every kind of redirect-URI mess on purpose: findings are
            # expected and never fail the demo (`oauthmig audit-redirects` gates CI).
            render_audit_brief(c.out, run.audit)
        elif step is DemoStep.REPORT and run.report is not None:
            c.out.print(
                f"demo: wrote the report to {escape(str(run.report))} (open it in a browser)"
            )

    return DemoHooks(
        loading=lambda: progress_bar(c.err, enabled=not c.quiet),
        starting=starting,
        finished=finished,
    )


def failures(run: DemoRun) -> Failures:
    """The failures of the step the demo stopped after (none: it did not stop early)."""
    if run.failed is DemoStep.BACKFILL and run.backfill is not None:
        return backfill_failures(run.backfill)
    result = run.expand if run.failed is DemoStep.EXPAND else run.finalize
    if run.failed is not None and result is not None:
        return run_failures(result)
    return Failures((), "")


def legacy_write_line(w: LegacyWrite) -> str:
    """One line: the rows the unchanged code created on a database and what the layer filled
    (ids, metadata and the family uuid; never a secret)."""
    made = [
        f"{what} {row_id}"
        for what, row_id in (("application", w.application_id), ("token", w.token_id))
        if row_id is not None
    ]
    filled: list[str] = []
    if w.application_id is not None:
        filled.append(f"auth method {w.token_endpoint_auth_method}")
        filled.append(f"grant types {' '.join(w.grant_types or ())}")
        filled.append(f"application type {w.application_type}")
    if w.token_id is not None:
        filled.append(f"family {w.token_family_id}")
    return (
        f"  {w.database}: the provider's unchanged code created {' and '.join(made)} "
        f"(legacy columns only): the compatibility layer filled {', '.join(filled)}"
    )
