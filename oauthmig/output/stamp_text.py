"""``oauthmig stamp``: the text summary and the JSON document."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from oauthmig.output.text import escape
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


def stamp_to_dict(result: StampResult) -> dict[str, Any]:
    """JSON shape of ``stamp``."""
    return {
        "target": result.target,
        "databases": [
            {
                "database": d.database,
                "dialect": d.dialect,
                "url": d.display_url,
                "from": d.current,
                "to": d.target,
                "stamped": [
                    {
                        "revision": s.revision,
                        "outcome": s.outcome,
                        "tables": list(s.tables),
                        "adopted": list(s.adopted),
                    }
                    for s in d.steps
                ],
            }
            for d in result.databases
        ],
    }
