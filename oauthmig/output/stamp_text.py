"""``oauthmig stamp``: the text summary and the JSON document."""

from __future__ import annotations

from rich.console import Console

from oauthmig.output.consoles import escape
from oauthmig.rollout.stamp import StampResult


def render_stamp(console: Console, result: StampResult) -> None:
    """One line per database: what was recorded, or that it was already there."""
    for d in result.databases:
        if not d.steps:
            console.print(f"{escape(d.database)}: already at {d.target}, nothing recorded")
            continue
        parts = ", ".join(
            s.revision if s.outcome == "applied" else f"{s.revision} (skipped: not routed)"
            for s in d.steps
        )
        console.print(
            f"{escape(d.database)}: stamped {parts} (not run; columns recorded as adopted, "
            f"kept by a downgrade) -> now at {d.target}"
        )
