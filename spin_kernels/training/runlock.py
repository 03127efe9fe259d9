"""One writer per run directory (or output file): an exclusive lock held for the whole run.

Two processes writing one run directory (a double launch, or a ``--resume`` while the ranks of a
killed ``torchrun`` launcher still run) append duplicate rows and metrics. ``RunLock`` takes an
advisory ``flock`` on a lock file beside what it protects and writes who holds it (pid, host,
command, start time) into that file; a second writer is refused with a message naming the
holder. The kernel releases a ``flock`` when its process dies, ``kill -9`` included, so a killed
run never leaves a stale lock behind. Under torchrun only rank 0 (the one that writes files)
holds it; the other ranks follow rank 0 and end with their launcher (``end_with_parent``).
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import socket
import sys
import time

from .config import ConfigError


class RunLock:
    """``with RunLock(path, what="--output-dir"):`` holds ``path`` (a lock file) exclusively.

    Raises ConfigError naming ``what`` and the holder when another process holds it.
    """

    def __init__(self, path: str, *, what: str):
        self.path, self.what = path, what
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise ConfigError(f"{self.what}: {os.path.dirname(os.path.abspath(self.path))!r} is in use by another "
                                  f"run ({holder}); wait for it to end or stop it (a killed run releases it at "
                                  f"once)") from None
            # The holder before us may have removed the file between our open and our lock: then
            # we hold a lock on a deleted file, which protects nothing. Try again on the new one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # before unlocking: a waiting writer then sees a new file (see acquire)
        except FileNotFoundError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown"
    return f"pid {info.get('pid')} on host {info.get('host')}, since {info.get('since')}: {info.get('command')}"


def end_with_parent() -> None:
    """Make this process receive SIGKILL when its parent dies (Linux ``PR_SET_PDEATHSIG``).

    torchrun's ranks otherwise outlive a launcher killed with ``kill -9`` and keep writing the
    run directory. Called by every rank of a multi-process job (the launcher starts the ranks
    from its main thread, which lives as long as the launcher); a no-op where prctl is
    unavailable.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
