"""stdout and stderr that survive what the shell connects them to: a reader that goes away
(``oauthmig ... | head -1``), a full device (``> /dev/full``)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from typing import IO, Any


def to_devnull(fileno: Callable[[], int]) -> None:
    """Point the file descriptor ``fileno()`` at /dev/null (what the Python docs recommend on
    a broken pipe); a stream without one, or a failure, is ignored."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fileno())
        os.close(devnull)


def flush_standard_streams() -> None:
    """Flush stdout and stderr now, so that a full device fails here rather than as an
    "Exception ignored" message at interpreter exit (the failing stream is pointed at
    /dev/null; stdout's failure was already reported by the CLI)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            to_devnull(stream.fileno)


class PipeSafeStdout:
    """stdout that survives its reader going away (``oauthmig ... | head -1``).

    On the first broken pipe the file descriptor is pointed at /dev/null, as the Python docs
    recommend, and the command carries on, so that it exits with the code its work has. It
    also records whether anything was written (to know if a JSON document was started).
    """

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self.written = False
        self.broken = False
        #: Why a write failed for another reason than a closed pipe (disk full, I/O error).
        self.failed: str | None = None

    def _devnull(self) -> None:
        self.broken = True
        to_devnull(self._stream.fileno)

    def write(self, text: str) -> int:
        if text:
            self.written = True
        if self.broken:
            return len(text)
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._devnull()
        except OSError as exc:
            self._lost(exc)
        return len(text)

    def flush(self) -> None:
        if self.broken:
            return
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._devnull()
        except OSError as exc:
            self._lost(exc)

    def _lost(self, exc: OSError) -> None:
        """stdout cannot take the output (``> /dev/full``): the command carries on, as on a
        broken pipe, and the CLI reports the loss in one line and exits 2."""
        self.failed = self.failed or (exc.strerror or str(exc))
        self._devnull()
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()  # drop what is still buffered, into /dev/null

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)
