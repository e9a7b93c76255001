"""``history``: the revisions for people (light: the consoles and rich's table only)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.table import Table

from oauthmig.output.consoles import escape, print_table

if TYPE_CHECKING:
    from rich.console import Console

    from oauthmig.revision_types import RevisionInfo


def render_history(console: Console, revisions: Sequence[RevisionInfo]) -> None:
    """Revisions with the tables they touch and the backfills they require."""
    table = Table(title="revisions (oldest first)", title_justify="left")
    for name in ("revision", "description", "touches", "columns", "requires backfill"):
        table.add_column(name, no_wrap=name == "revision")
    for rev in revisions:
        cols = ", ".join(f"{c.table}.{c.name}" for c in rev.columns)
        table.add_row(
            rev.revision,
            escape(rev.message),
            ", ".join(rev.tables),
            cols,
            ", ".join(rev.requires_backfills) or "-",
        )
    print_table(console, table)
