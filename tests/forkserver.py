"""Real CLI processes without paying the imports each time: a fork server for the tests.

A server process (``python -m tests.forkserver``, a fresh interpreter that inherits nothing
of pytest) imports the CLI once, then forks one child per request. Each child is a real
process of its own: its own pid, working directory, environment, file descriptors 0-2
(stdin from /dev/null, stdout and stderr to files), Python's default signal handling, and an
ordinary interpreter exit (atexit handlers, stream flushes and anything printed while the
interpreter shuts down reach its stderr). It runs a module as ``python -m MODULE ARGS`` would
(``oauthmig``, or a test wrapper such as ``tests.kill_after_ddl``) and can be signalled,
stopped or killed by its pid like any subprocess. What it saves is ~1 s of imports per command
on a loaded machine.

The server reports each child's exit status (it is the child's parent: ``os.waitpid`` on a
pidfd) over its stdout; :class:`ForkServer` is the client, :class:`ForkedProcess` a
``subprocess.Popen``-like handle. Only the standard library is imported here, so that the
server starts from a clean interpreter.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# Imported by the server before it forks (what the children would otherwise import each time).
PRELOAD = (
    "oauthmig.cli",
    "oauthmig.redirects.audit",
    "oauthmig.rollout.backfill",
    "oauthmig.output.text",
    "oauthmig.demo.data",
    "oauthmig.rollout.runner",
    "oauthmig.rollout.status",
    "psycopg",
    "sqlalchemy.dialects.postgresql.psycopg",
    "sqlalchemy.dialects.sqlite",
    "alembic.runtime.migration",
    "tests.kill_after_ddl",
)


# ------------------------------------------------------------------------------- the server


def _child(job: dict[str, Any], inherited: set[int]) -> None:
    """In the forked child: become the requested process, then run its module as __main__.

    Never returns normally: the module's ``sys.exit`` (or the SystemExit raised at the end)
    unwinds to the top of the server's interpreter, which exits as any process would."""
    import random
    import runpy
    import signal

    for fd in inherited:
        os.close(fd)
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update(job["env"])
    # sys.stdin/stdout/stderr stay the interpreter's own objects on fds 0-2 (the server never
    # used them, their buffers are empty); the fds now point at /dev/null and the two files.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    for fd, path in ((1, job["out"]), (2, job["err"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(f, fd)
        os.close(f)
    # What a fresh interpreter has: SIGINT -> KeyboardInterrupt, everything else default
    # (SIGPIPE stays ignored, as CPython sets it at startup).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    random.seed()  # the server's random state would otherwise repeat in every child
    sys.argv = [job["module"], *job["args"]]
    runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
    raise SystemExit(0)


def _serve() -> None:
    """Read one JSON request per line on stdin; answer with the child's pid, then its exit."""
    import importlib
    import pkgutil

    for name in PRELOAD:
        importlib.import_module(name)
    # The CLI imports each command's services when the command runs: import every module of
    # the package here (not the revision files, which Alembic loads by path, nor __main__).
    import oauthmig

    for module in pkgutil.walk_packages(oauthmig.__path__, "oauthmig."):
        if not module.name.startswith(("oauthmig.revisions", "oauthmig.docs", "oauthmig.__main__")):
            importlib.import_module(module.name)
    # Raw descriptors only: no buffered bytes or file objects for a child to inherit.
    requests, replies = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)

    def reply(message: dict[str, Any]) -> None:
        os.write(replies, (json.dumps(message) + "\n").encode())

    children: dict[int, tuple[int, int]] = {}  # pidfd -> (pid, request id)
    pending = b""
    reading = True
    while reading or children:
        ready, _, _ = select.select([requests, *children] if reading else [*children], [], [])
        for fd in ready:
            if fd in children:
                pid, ident = children.pop(fd)
                os.close(fd)
                _, status = os.waitpid(pid, 0)
                reply({"id": ident, "exit": os.waitstatus_to_exitcode(status)})
                continue
            chunk = os.read(requests, 65536)
            if not chunk:
                reading = False
                for pid, _ident in children.values():  # the client is gone: end its children
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, 9)
                continue
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                job = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(job, {requests, replies, *children})
                children[os.pidfd_open(pid)] = (pid, job["id"])
                reply({"id": job["id"], "pid": pid})


# ------------------------------------------------------------------------------- the client


class ForkedProcess:
    """One child of the fork server, used like a ``subprocess.Popen`` with piped text output."""

    def __init__(self, args: Sequence[str], out: Path, err: Path, *, keep_out: bool) -> None:
        self.args = list(args)
        self._keep_out = keep_out
        self.pid = 0
        self.returncode: int | None = None
        self._out = out
        self._err = err
        self._started = threading.Event()
        self._exited = threading.Event()

    def poll(self) -> int | None:
        """The exit code (negative: killed by that signal), or None while it runs."""
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit; ``subprocess.TimeoutExpired`` if it takes longer than timeout."""
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        if self.returncode is None:
            raise RuntimeError(f"the fork server died while {self.args!r} ran")
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait for the exit, then return (stdout, stderr)."""
        self.wait(timeout)
        out = "" if self._keep_out else self._out.read_text(encoding="utf-8", errors="replace")
        err = self._err.read_text(encoding="utf-8", errors="replace")
        self._err.unlink(missing_ok=True)
        if not self._keep_out:  # (a stdout of the caller's, such as /dev/full, is not ours)
            self._out.unlink(missing_ok=True)
        return out, err

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the child (nothing if it has exited and been reaped)."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL the child."""
        self.send_signal(9)


class ForkServer:
    """The client side: start the server, spawn children, learn their exits."""

    def __init__(self, scratch: Path) -> None:
        scratch.mkdir(parents=True, exist_ok=True)
        self._scratch = scratch
        self._lock = threading.Lock()
        self._next = 0
        self._procs: dict[int, ForkedProcess] = {}
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self._server = subprocess.Popen(
            [sys.executable, "-m", "tests.forkserver"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._server.stdout is not None
        for line in self._server.stdout:
            reply = json.loads(line)
            with self._lock:
                proc = self._procs[reply["id"]]
            if "pid" in reply:
                proc.pid = int(reply["pid"])
                proc._started.set()
            else:
                proc.returncode = int(reply["exit"])
                with self._lock:
                    del self._procs[reply["id"]]
                proc._exited.set()
        with self._lock:  # the server died: nothing it ran can be waited for any more
            for proc in self._procs.values():
                proc._started.set()
                proc._exited.set()

    def spawn(
        self,
        args: Sequence[str],
        *,
        cwd: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        module: str = "oauthmig",
        stdout: Path | None = None,
    ) -> ForkedProcess:
        """Start ``python -m MODULE ARGS`` (as a forked child) and return its handle.

        ``stdout``: a file (or device) its stdout is opened on instead of a scratch file."""
        with self._lock:
            ident = self._next
            self._next += 1
            out = stdout or self._scratch / f"{ident}.out"
            err = self._scratch / f"{ident}.err"
            proc = ForkedProcess([module, *args], out, err, keep_out=stdout is not None)
            self._procs[ident] = proc
        job = {
            "id": ident,
            "module": module,
            "args": list(args),
            "cwd": str(cwd or Path.cwd()),
            "env": dict(os.environ if env is None else env),
            "out": str(out),
            "err": str(err),
        }
        assert self._server.stdin is not None
        with self._lock:
            self._server.stdin.write(json.dumps(job) + "\n")
            self._server.stdin.flush()
        if not proc._started.wait(60) or not proc.pid:
            raise RuntimeError(f"the fork server did not start {args!r}")
        return proc

    def run(
        self,
        args: Sequence[str],
        *,
        cwd: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        module: str = "oauthmig",
        timeout: float = 600,
        stdout: Path | None = None,
    ) -> tuple[int, str, str]:
        """Run to completion: (exit code, stdout, stderr)."""
        proc = self.spawn(args, cwd=cwd, env=env, module=module, stdout=stdout)
        try:
            out, err = proc.communicate(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(60)
            raise
        return proc.wait(0), out, err

    def close(self) -> None:
        """Stop the server (children still running are killed)."""
        assert self._server.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self._server.stdin.close()
        try:
            self._server.wait(60)
        except subprocess.TimeoutExpired:
            self._server.kill()
            self._server.wait(60)
        self._reader.join(60)


if __name__ == "__main__":
    _serve()
