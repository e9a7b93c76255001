"""The CLI's consoles and the small text helpers every renderer shares.

Light on purpose: it imports only ``rich.console`` (``rich.table`` when a table is printed),
so a command that prints a line does not load the renderers of every other command.
"""

from __future__ import annotations

import sys
import unicodedata
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:
    from rich.table import Table


@dataclass(frozen=True, slots=True)
class Consoles:
    """The stdout and stderr consoles of one CLI invocation."""

    out: Console
    err: Console
    quiet: bool = False
    verbose: bool = False

    @classmethod
    def create(cls, *, quiet: bool = False, verbose: bool = False) -> Consoles:
        """Consoles on the real streams (colour only on terminals)."""
        return cls(
            Console(file=sys.stdout, highlight=False, soft_wrap=True),
            Console(file=sys.stderr, highlight=False, soft_wrap=True),
            quiet,
            verbose,
        )

    def human(self, json_on_stdout: bool) -> Console:
        """Where human-readable text goes: stderr when stdout carries JSON."""
        return self.err if json_on_stdout else self.out

    def info(self, message: str, json_on_stdout: bool = False) -> None:
        """A human line, unless ``--quiet``."""
        if not self.quiet:
            self.human(json_on_stdout).print(message)

    def error(self, message: str) -> None:
        """A one-line error on stderr."""
        self.err.print(f"[bold red]error:[/] {escape(message)}")


def plain_console(file: IO[str], width: int = 120) -> Console:
    """A console that writes plain text (no colour, no terminal codes) to a file."""
    return Console(file=file, width=width, highlight=False, no_color=True, color_system=None)


def escape(text: str) -> str:
    """Escape rich markup in text that comes from data or errors."""
    from rich.markup import escape as _escape

    return _escape(text)


_PLAIN_MIN_COLUMN = 4  # narrowest a wrapping column may get before the plain layout is used


def _cell_width(cell: object) -> int:
    if isinstance(cell, str):
        from rich.text import Text

        return max((Text.from_markup(line).cell_len for line in cell.split("\n")), default=0)
    return 0


def print_table(console: Console, table: Table) -> None:
    """Print ``table`` without ever cutting the columns marked ``no_wrap`` (identifiers,
    database names, statuses, rule codes).

    Not a terminal (a pipe, a CI log, a file): the table is as wide as its content, nothing
    is wrapped or cut. A terminal: other columns wrap to make room; if even the ``no_wrap``
    columns do not fit, every row is printed as plain ``header: value`` lines instead.
    """
    if not console.is_terminal:
        natural = console.measure(table, options=console.options.update_width(100_000))
        saved = console.width
        console.width = max(saved, natural.maximum)
        try:
            console.print(table)
        finally:
            console.width = saved
        return
    needed = 1  # left border
    for column in table.columns:
        if column.no_wrap:
            width = max([_cell_width(column.header), *map(_cell_width, column.cells)])
        else:
            width = _PLAIN_MIN_COLUMN
        needed += max(width, column.min_width or 0) + 3  # padding and border
    if needed <= console.width:
        for column in table.columns:
            if not column.no_wrap:
                column.overflow = "fold"  # a long word is folded onto the next line, not cut
        console.print(table)
        return
    _print_plain(console, table)


def _print_plain(console: Console, table: Table) -> None:
    if table.title:
        console.print(table.title)
    headers = [str(c.header) for c in table.columns]
    columns = [list(c.cells) for c in table.columns]
    for i in range(table.row_count):
        for header, cells in zip(headers, columns, strict=True):
            cell = cells[i]
            if isinstance(cell, str) and cell:
                value = cell.replace("\n", " ")
                if not header:
                    console.print(value)
                elif len(header) + 2 + _cell_width(value) <= console.width:
                    console.print(f"{header}: {value}")
                else:  # the value on a line of its own, so that short values stay whole
                    console.print(f"{header}:")
                    console.print(f"  {value}")
        console.print()


def duration_text(seconds: float) -> str:
    """``42s``, ``4m12s``, ``3h05m``: a duration as an operator reads it."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


_NAMED_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _visible_char(ch: str) -> str:
    if ch in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[ch]
    if ch == " " or unicodedata.category(ch) not in ("Cc", "Cf", "Zs", "Zl", "Zp", "Cs", "Cn"):
        return ch
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def show(value: str) -> str:
    """Stored data made safe for a terminal: control, format (bidi) and unusual space
    characters spelled as escapes (so a URI with a tab or an ANSI escape can neither hide the
    problem nor drive the terminal), then rich markup escaped."""
    if value.isprintable() and value.isascii():
        return escape(value)
    return escape("".join(_visible_char(ch) for ch in value))
