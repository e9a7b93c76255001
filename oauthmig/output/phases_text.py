"""``oauthmig verify`` and ``oauthmig contract``: the text summaries and the JSON documents."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console

from oauthmig.output.consoles import escape
from oauthmig.rollout.verify import DatabaseContract, DatabaseVerify


def verify_to_list(results: Sequence[DatabaseVerify]) -> list[dict[str, Any]]:
    """JSON shape of ``verify``: one object per database."""
    return [
        {
            "database": d.database,
            "passed": d.passed,
            "error": d.error,
            "tables": [
                {
                    "table": t.table,
                    "status": t.status.value,
                    "rows_checked": t.rows_checked,
                    "problem": t.problem,
                }
                for t in d.tables
            ],
        }
        for d in results
    ]


def render_verify(console: Console, results: Sequence[DatabaseVerify]) -> None:
    """One line per database and table."""
    if not results:
        console.print("verify: no selected database hosts the token or application table")
    for d in results:
        if d.error:
            console.print(f"{escape(d.database)}: [bold red]not verified[/]: {escape(d.error)}")
            continue
        for t in d.tables:
            mark = "passed" if t.status.value == "passed" else f"[bold red]{t.status.value}[/]"
            extra = f": {escape(t.problem)}" if t.problem else ""
            console.print(
                f"{escape(d.database)}.{t.table}: {mark} ({t.rows_checked:,} rows checked){extra}"
            )


def contract_to_list(results: Sequence[DatabaseContract]) -> list[dict[str, Any]]:
    """JSON shape of ``contract``: the tables the layer was removed from, per database."""
    return [{"database": d.database, "removed": list(d.removed)} for d in results]


def render_contract(console: Console, results: Sequence[DatabaseContract]) -> None:
    """One line per database."""
    for d in results:
        what = ", ".join(d.removed) if d.removed else "nothing was installed"
        console.print(f"{escape(d.database)}: compatibility layer removed ({what}): contracted")
