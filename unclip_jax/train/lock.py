"""One run per work directory: ``WORKDIR/run.lock``, held for the life of a training run.

Two runs writing one work directory interleave their checkpoints, metrics and export (or one dies inside Orbax),
so the second one must stop before it builds anything. The lock is a file holding its holder
(``{"host", "pid", "started", "heartbeat"}``):

- on the holder's host it is also an advisory ``flock``, which the kernel releases when the process dies (so a
  ``kill -9`` leaves no lock behind there), and
- for hosts that share the folder over a network file system, where ``flock`` may not reach, the heartbeat (rewritten
  every :data:`HEARTBEAT_SECONDS`) tells a live holder from a dead one: a lock whose heartbeat is older than
  :data:`STALE_SECONDS`, or whose pid is dead on this host, is stale and taken over with a warning.

A multi-host run is one run: process 0 holds the lock, the other processes trust it (``primary=False``).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from typing import Any

log = logging.getLogger("unclip_jax.train")

LOCK_FILE = "run.lock"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 600.0  # no heartbeat for 10 minutes: the holder is gone


class WorkdirLocked(RuntimeError):
    """Another live run holds the work directory (the message names its host, pid and start time)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fmt(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def read_holder(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The holder recorded in ``WORKDIR/run.lock`` (``None`` when there is none or it is unreadable)."""
    try:
        with open(os.path.join(workdir, LOCK_FILE)) as f:
            holder = json.loads(f.read() or "null")
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and "pid" in holder else None


def describe(holder: dict[str, Any]) -> str:
    """``host H, pid P, started T`` of a lock holder."""
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {_fmt(float(holder.get('started', 0)))}"


class WorkdirLock:
    """Context manager holding ``WORKDIR/run.lock`` (see the module docstring).

    Args:
      workdir: the run's work directory (created by the caller).
      primary: whether this process holds the lock (process 0 of a multi-host run); others do nothing.
      stale_seconds: a heartbeat older than this marks a holder on another host as gone.
      heartbeat_seconds: how often the holder rewrites its heartbeat.

    Raises:
      WorkdirLocked: on entry, when a live run holds the directory.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        primary: bool = True,
        stale_seconds: float = STALE_SECONDS,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
    ):
        self.path = os.path.join(os.fspath(workdir), LOCK_FILE)
        self.primary = primary
        self.stale_seconds, self.heartbeat_seconds = stale_seconds, heartbeat_seconds
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}

    def __enter__(self) -> WorkdirLock:
        if self.primary:
            self.acquire()
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False

    def _refuse(self, holder: dict[str, Any] | None) -> WorkdirLocked:
        who = describe(holder) if holder else "a process that has not written its name yet"
        return WorkdirLocked(
            f"{os.path.dirname(self.path)} is in use by another run ({who}); wait for it to finish, stop it, "
            f"or use another --workdir (the lock is {self.path})"
        )

    def acquire(self) -> None:
        """Takes the lock or raises :class:`WorkdirLocked`."""
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise self._refuse(read_holder(os.path.dirname(self.path))) from None
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # no flock here: the content decides
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # the previous holder removed the file between our open and flock: retry
                os.close(fd)
                continue
            self._fd = fd
            break
        else:
            raise self._refuse(None)
        holder = read_holder(os.path.dirname(self.path))
        if holder and holder.get("pid") != os.getpid():
            if self._alive(holder):
                self.release()
                raise self._refuse(holder)
            log.warning("taking over the stale lock %s of a run that is gone (%s)", self.path, describe(holder))
        self._write()
        self._thread = threading.Thread(target=self._beat, name="unclip-workdir-lock", daemon=True)
        self._thread.start()

    def _alive(self, holder: dict[str, Any]) -> bool:
        """Whether the recorded holder may still run (we hold the flock, so on this host it cannot)."""
        if holder.get("host") == socket.gethostname():
            return _pid_alive(int(holder.get("pid", -1))) and not self._flock_works()
        return time.time() - float(holder.get("heartbeat", holder.get("started", 0))) < self.stale_seconds

    def _flock_works(self) -> bool:
        return self._fd is not None and _has_flock(self._fd)

    def _write(self) -> None:
        self.holder["heartbeat"] = time.time()
        data = json.dumps(self.holder).encode()
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.ftruncate(self._fd, 0)
        os.write(self._fd, data)
        os.fsync(self._fd)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            with contextlib.suppress(OSError, TypeError):
                self._write()

    def release(self) -> None:
        """Removes the lock file and lets go (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._fd is not None:
            if (read_holder(os.path.dirname(self.path)) or {}).get("pid") == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            os.close(self._fd)
            self._fd = None


def _has_flock(fd: int) -> bool:
    """Whether ``fd`` holds an exclusive flock (re-locking one's own lock succeeds; without flock support it fails)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True
