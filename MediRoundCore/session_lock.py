"""One writer per session folder, across processes (CLI, Slicer) and threads.

The lock is an exclusive `flock` on the session folder itself (POSIX; where a folder cannot be flocked, as on
some network file systems, and on Windows, a lock on `.mediround.lock` in it). The kernel drops it when its
holder dies, so a killed writer never blocks the next. While held, `.mediround-writer` in the folder names the
holder (pid, host, command, since) for the message a second writer gets; it is removed on release (and, left by
a killed holder, on the next acquisition).

Within one process a folder's lock is re-entrant (a registry keyed by the folder's real path), so a session
saved while a command's transaction holds its folder does not wait for itself.

    with hold(folder, wait=30, command="mediround ask"):
        ...  # load, change and save the session
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import SessionBusyError, SessionError

HOLDER_FILE = ".mediround-writer"
LOCK_FILE = ".mediround.lock"
ORPHAN_PATTERNS = (".session.json.*.tmp", ".masks.npz.*.tmp", ".mediround-probe.*.tmp")  # temporary files
DEFAULT_WAIT_S = float(os.environ.get("MEDIROUND_SESSION_WAIT", "30"))
_POLL_S = 0.05

_registry: dict[str, "_Held"] = {}
_registry_lock = threading.Lock()


class _Held:
    """A folder this process holds: the OS handle, the thread-level lock and its depth."""

    def __init__(self):
        self.thread_lock = threading.RLock()
        self.fd: int | None = None
        self.depth = 0


def _command_line() -> str:
    argv = [Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"] + sys.argv[1:]
    text = " ".join(argv)
    return text if len(text) <= 120 else text[:117] + "..."


def describe_holder(folder: Path) -> str:
    """Who holds `folder`, as written in its holder file ("another program" when unknown)."""
    try:
        info = json.loads((folder / HOLDER_FILE).read_text())
        return (f"process {info['pid']} on {info['host']} ({info['command']}, since "
                f"{time.strftime('%H:%M:%S', time.localtime(info['since']))})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another program"


def _os_lock(folder: Path) -> int:
    """An open handle of `folder` (or its Windows lock file) to lock."""
    if os.name == "nt":
        return os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    return os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _try_lock(fd: int) -> bool:
    if os.name == "nt":
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _unlock(fd: int) -> None:
    try:
        if os.name == "nt":
            import msvcrt

            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


_NO_LOCKING = {errno.EBADF, errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", -1)}


def _acquire(folder: Path, deadline: float) -> int | None:
    """The locked handle of `folder`. Where a folder cannot be flocked (some network file systems), a lock file
    in it is; where nothing can be locked, None (the save's check of session.json still refuses to overwrite
    another writer's rounds)."""
    for use_file in ((False, True) if os.name != "nt" else (True,)):
        try:
            fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666) if use_file \
                else _os_lock(folder)
        except OSError as exc:
            raise SessionError(f"{folder}: cannot open the session folder ({exc.strerror})") from None
        try:
            while not _try_lock(fd):
                if time.monotonic() >= deadline:
                    raise SessionBusyError(
                        f"{folder}: session in use by {describe_holder(folder)}; one program at a time writes a "
                        f"session: wait for it to finish (or close the session there), then try again")
                time.sleep(_POLL_S)
            return fd
        except OSError as exc:
            os.close(fd)
            if exc.errno not in _NO_LOCKING:
                raise SessionError(f"{folder}: cannot lock the session folder ({exc.strerror})") from None
        except BaseException:
            os.close(fd)
            raise
    return None


def clean_orphans(folder: Path) -> list[str]:
    """Remove what killed writers left (temporary files of interrupted writes, a stale holder file). Only
    call with the lock held."""
    removed = []
    for pattern in ORPHAN_PATTERNS + (HOLDER_FILE,):
        for path in folder.glob(pattern):
            try:
                path.unlink()
                removed.append(path.name)
            except OSError:  # a read-only folder: harmless leftovers
                pass
    return removed


def _write_holder(folder: Path, command: str | None) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command or _command_line(),
            "since": time.time()}
    try:
        (folder / HOLDER_FILE).write_text(json.dumps(info))
    except OSError:  # a read-only folder can still be locked; a waiter then says "another program"
        pass


def _remove_holder(folder: Path) -> None:
    try:
        (folder / HOLDER_FILE).unlink()
    except OSError:
        pass


@contextmanager
def hold(folder: str | Path, wait: float | None = None, command: str | None = None):
    """Hold the writer lock of the existing folder `folder`; waits up to `wait` seconds (default
    MEDIROUND_SESSION_WAIT or 30), then raises SessionBusyError naming the holder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SessionError(f"{folder}: not a folder, cannot hold its session")
    key = os.path.realpath(folder)
    with _registry_lock:
        held = _registry.setdefault(key, _Held())
    wait = DEFAULT_WAIT_S if wait is None else wait
    deadline = time.monotonic() + max(wait, 0.0)
    acquired = held.thread_lock.acquire(timeout=wait) if wait > 0 else held.thread_lock.acquire(blocking=False)
    if not acquired:
        raise SessionBusyError(f"{folder}: session in use by another task of this program; "
                               f"wait for it to finish, then try again")
    try:
        if held.depth == 0:
            held.fd = _acquire(folder, deadline)
            clean_orphans(folder)
            _write_holder(folder, command)
        held.depth += 1
        try:
            yield folder
        finally:
            held.depth -= 1
            if held.depth == 0:
                _remove_holder(folder)
                fd, held.fd = held.fd, None
                if fd is not None:
                    _unlock(fd)
    finally:
        held.thread_lock.release()


def clean_if_free(folder: str | Path) -> None:
    """Remove orphans of killed writers when no writer holds `folder` (never waits)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    try:
        with hold(folder, wait=0):
            pass
    except (SessionError, OSError):
        pass
