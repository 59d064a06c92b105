"""A command's output files, all or nothing: written into a hidden staging folder inside the output folder,
checked, and moved into place only once the command has done the rest of its job (e.g. committed its round).

    staged = StagedOutputs(out)          # refuses a file, an unwritable folder… before any work
    write files into staged.folder
    session.commit()
    staged.publish()                     # renames into `out`; `discard()` (or an error) leaves `out` as it was
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from .errors import MediRoundError


STAGING_PREFIX = ".mediround-out."


def _lock_folder(folder: Path) -> int | None:
    """An exclusive flock on `folder` held while it is staged (POSIX); the kernel drops it if we are killed."""
    if os.name == "nt":
        return None
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def remove_orphans(out: Path) -> None:
    """Remove staging folders that no running command holds (left by a command that was killed)."""
    if os.name == "nt":
        return
    import fcntl

    for folder in out.glob(STAGING_PREFIX + "*"):
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # in use
            os.close(fd)
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(fd)


class OutputError(MediRoundError):
    """An output folder or file cannot be written."""


def describe_output_error(path: Path, exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"{path}: no space left to write the outputs ({exc.strerror}); nothing was saved"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{path}: the output folder is not writable ({exc.strerror}); choose another --out folder"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"{path}: a file is in the way of the output folder ({exc.strerror}); --out needs a folder"
    return f"{path}: cannot write the outputs ({exc.strerror or exc})"


class StagedOutputs:
    """Files destined for `out`, staged in `out/.mediround-out.*` until `publish()`."""

    def __init__(self, out: str | Path, replace_folders: bool = False):
        self.out = Path(out)
        self.replace_folders = replace_folders  # a staged folder may replace an existing one (an explicit flag)
        self._lock = None
        if self.out.exists() and not self.out.is_dir():
            raise OutputError(f"{self.out}: is a file; --out needs a folder (it is created when missing)")
        self._created = []
        p = self.out
        while not os.path.lexists(p) and p != p.parent:
            self._created.append(p)
            p = p.parent
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_orphans(self.out)
            self.folder = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.out))
        except OSError as exc:
            self._remove_created()
            raise OutputError(describe_output_error(self.out, exc)) from None
        self._lock = _lock_folder(self.folder)  # marks it in use: another command's cleanup leaves it alone

    def __enter__(self) -> "StagedOutputs":
        return self

    def __exit__(self, *exc_info) -> None:
        self.discard()

    def targets(self) -> list[tuple[Path, Path]]:
        return [(p, self.out / p.name) for p in sorted(self.folder.iterdir())]

    def check(self) -> None:
        """Refuse targets that cannot be replaced (a folder where a file goes, and a folder without the flag)."""
        for staged, target in self.targets():
            if target.is_dir() and not target.is_symlink():
                if not (staged.is_dir() and self.replace_folders):
                    raise OutputError(f"{target}: a folder is in the way of an output; move it or choose another "
                                      f"--out folder")
            elif staged.is_dir() and os.path.lexists(target):
                raise OutputError(f"{target}: a file is in the way of an output folder")

    def publish(self) -> list[Path]:
        """Move every staged file into `out` (renames in one file system)."""
        self.check()
        done = []
        for staged, target in self.targets():
            if staged.is_dir() and target.is_dir():
                aside = self.folder / f".replaced-{target.name}"
                os.replace(target, aside)
            os.replace(staged, target)
            done.append(target)
        self.discard()
        return done

    def discard(self) -> None:
        if self.folder.exists():
            shutil.rmtree(self.folder, ignore_errors=True)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
        self._remove_created()

    def _remove_created(self) -> None:
        for p in self._created:  # deepest first
            try:
                p.rmdir()
            except OSError:
                return
        self._created = []
