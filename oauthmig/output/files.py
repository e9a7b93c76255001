"""The one writer behind every file output option (``--output FILE``).

What the path names decides how it is written:

* a **regular file**, or a path that does not exist yet: written to a temporary file beside it,
  flushed to disk, then renamed over it, so that a reader never sees half a report and a failed
  run leaves the old file as it was. An existing file keeps its permission bits (and, when run
  as root, its owner);
* a **symlink**: resolved first, and the file it points to is written as above (the link stays a
  link, pointing at the new content);
* a **character device or FIFO** (``/dev/null``, ``/dev/stdout``, a named pipe a reader
  waits on): opened and written directly, never replaced;
* a **directory**, a socket, or an empty path: refused with a one-line :class:`UsageError`
  before anything is written.

A write that fails midway (disk full, ``/dev/full``, an I/O error) raises a one-line
:class:`OutputError` naming the option and the path; a regular file's temporary file is removed,
so nothing half-written is left behind.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, cast

from oauthmig.errors import OutputError, UsageError


def _existing_mode(st: os.stat_result | None) -> int:
    """The permission bits the written file gets: the old file's, or 0666 minus the umask."""
    if st is not None:
        return st.st_mode & 0o777
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def _write_failed(option: str, raw: str, exc: OSError, *, atomic: bool) -> OutputError:
    outcome = "the file was left as it was" if atomic else "what it received is incomplete"
    return OutputError(f"{option} {raw}: cannot write: {exc.strerror or exc}; {outcome}")


class _Guarded:
    """A text stream whose write and flush failures become one :class:`OutputError`."""

    def __init__(self, stream: IO[str], option: str, raw: str, *, atomic: bool) -> None:
        self._stream = stream
        self._option = option
        self._raw = raw
        self._atomic = atomic

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            raise _write_failed(self._option, self._raw, exc, atomic=self._atomic) from None

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            raise _write_failed(self._option, self._raw, exc, atomic=self._atomic) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def output_file(
    path: str | os.PathLike[str], option: str = "--output", *, durable: bool = True
) -> Iterator[IO[str]]:
    """A text stream writing ``path`` safely (see the module docstring); ``option`` names the
    command-line option in error messages. ``durable=False`` skips the ``fsync`` before the
    rename (readers still see the old or the new file whole; only a power loss can lose the
    new one): for files rewritten often, such as ``--metrics-file``."""
    raw = os.fspath(path)
    if not raw.strip():
        raise UsageError(
            f"{option}: the file name is empty; give a file name, or leave {option} out to "
            "print to stdout"
        )
    target = Path(os.path.realpath(raw))
    try:
        st = _stat(target)
    except OSError as exc:
        raise UsageError(f"{option} {raw}: {exc.strerror or exc}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{option} {raw}: is a directory; give a file name inside it")
    if st is not None and not stat.S_ISREG(st.st_mode):
        if not (stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
            raise UsageError(f"{option} {raw}: not a regular file, device or FIFO")
        with _direct(target, raw, option) as fh:
            yield fh
        return
    with _atomic(target, raw, option, st, durable) as fh:
        yield fh


@contextlib.contextmanager
def _direct(target: Path, raw: str, option: str) -> Iterator[IO[str]]:
    """Write a device or FIFO in place (a FIFO's open waits for its reader, as a shell does)."""
    try:
        fh = open(target, "w", encoding="utf-8", newline="")  # noqa: SIM115
    except OSError as exc:
        raise UsageError(f"{option} {raw}: {exc.strerror or exc}") from None
    try:
        yield cast(IO[str], _Guarded(fh, option, raw, atomic=False))
        try:
            fh.close()
        except OSError as exc:  # the last buffered text, flushed on close
            raise _write_failed(option, raw, exc, atomic=False) from None
    finally:
        with contextlib.suppress(OSError):
            fh.close()


@contextlib.contextmanager
def _atomic(
    target: Path, raw: str, option: str, st: os.stat_result | None, durable: bool = True
) -> Iterator[IO[str]]:
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise UsageError(
            f"{option} {raw}: cannot write in {target.parent}: {exc.strerror or exc}"
        ) from None
    try:
        fh = os.fdopen(fd, "w", encoding="utf-8", newline="")
        try:
            yield cast(IO[str], _Guarded(fh, option, raw, atomic=True))
            try:
                fh.flush()
                if durable:
                    os.fsync(fh.fileno())
                fh.close()
            except OSError as exc:
                raise _write_failed(option, raw, exc, atomic=True) from None
        finally:
            with contextlib.suppress(OSError):
                fh.close()  # after a failed write: the buffer cannot be flushed, the fd closes
        os.chmod(tmp, _existing_mode(st))
        if st is not None and os.geteuid() == 0:
            with contextlib.suppress(OSError):
                os.chown(tmp, st.st_uid, st.st_gid)
        try:
            os.replace(tmp, target)
        except OSError as exc:
            raise UsageError(f"{option} {raw}: {exc.strerror or exc}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_scripts(directory: str, scripts: Mapping[str, str]) -> list[str]:
    """Write ``<directory>/<database>.sql`` for each ``--sql`` script (created or replaced
    atomically)."""
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise UsageError(f"--output-dir {directory}: exists and is not a directory")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--output-dir {directory}: {exc.strerror or exc}") from None
    written: list[str] = []
    for database, sql in scripts.items():
        path = target / f"{database}.sql"
        with output_file(path, "--output-dir") as fh:
            fh.write(sql)
        written.append(str(path))
    return written
