"""oauthmig: safe OAuth 2.0 schema rollout toolkit.

The code below is the one thing this package does on import, and only when the process *is*
the ``oauthmig`` command: Ctrl-C while the command line loads exits 130 quietly, never with a
``KeyboardInterrupt`` traceback. Importing :mod:`oauthmig.cli` loads SQLAlchemy, Alembic,
psycopg and rich, which takes a good part of a second, and Python's default SIGINT handler
would raise ``KeyboardInterrupt`` somewhere inside those imports, before the CLI's own
handling exists. This ``__init__`` is the first of oauthmig's code to run, for the console
script and for ``python -m oauthmig`` alike; when ``sys.argv[0]`` names the ``oauthmig``
script (or is ``-m`` while Python locates the package), in the main thread, with Python's
default handler in place, SIGINT ends the process at once with exit 130, as an interrupted run
does: nothing has started, so nothing is left to save (with ``--format json`` it prints the
usual ``{"interrupted": true, ...}`` document first). Any other program importing oauthmig (the
provider's web process, a test runner) keeps its signal handling untouched. The last line of
:mod:`oauthmig.cli` calls :func:`cli_loaded`, which puts Python's handler back; from then on
Ctrl-C raises ``KeyboardInterrupt`` and the CLI turns it into exit 130 itself.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import threading
from importlib import metadata
from types import FrameType

_EXIT_INTERRUPTED = 130
_MESSAGE = "interrupted while loading; nothing was started"


def wants_json(argv: list[str]) -> bool:
    """Whether the command line asks for ``--format json``."""
    return "--format=json" in argv or any(
        a == "--format" and b == "json" for a, b in itertools.pairwise(argv)
    )


# The shape of docs/schemas/interrupted.schema.json (oauthmig.output.json), written out here:
# the handler may run in the middle of any import, that of ``json`` included, so it imports
# nothing (a half-imported module would fail it before its message is out).
INTERRUPTED_DOCUMENT = (
    "{\n"
    '  "interrupted": true,\n'
    '  "command": null,\n'
    f'  "exit_code": {_EXIT_INTERRUPTED},\n'
    f'  "message": "{_MESSAGE}"\n'
    "}\n"
)


def _exit_interrupted(_signum: int, _frame: FrameType | None) -> None:
    try:
        if wants_json(sys.argv[1:]):
            os.write(1, INTERRUPTED_DOCUMENT.encode())
        os.write(2, (_MESSAGE + "\n").encode())
    except BaseException:  # whatever failed, the process still ends as interrupted
        pass
    finally:
        os._exit(_EXIT_INTERRUPTED)


def _started_as_cli() -> bool:
    argv0 = sys.argv[0] if sys.argv else ""
    return argv0 == "-m" or os.path.basename(argv0).removesuffix(".exe") == "oauthmig"


_installed = False


def _guard_if_cli() -> None:
    """Make SIGINT exit 130 until :func:`cli_loaded`, if this process is the oauthmig command."""
    global _installed
    if not _started_as_cli() or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return  # Ctrl-C is already handled some other way (or ignored): leave it alone
    signal.signal(signal.SIGINT, _exit_interrupted)
    _installed = True


def cli_loaded() -> None:
    """The CLI is loaded: give SIGINT back to Python's default handler (``KeyboardInterrupt``)."""
    if _installed and signal.getsignal(signal.SIGINT) is _exit_interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)


_guard_if_cli()


def tool_version() -> str:
    """The installed oauthmig version."""
    try:
        return metadata.version("oauthmig")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0+unknown"
