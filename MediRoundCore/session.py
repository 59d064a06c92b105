"""A session: the rounds of one conversation on one volume, with atomic save/restore and one writer at a time.

On disk, in the session's folder: `masks.npz` (one boolean mask per round, key `round_<n>`) and
`session.json` (everything else). A save writes both to temporary files (fsynced) first, so a full disk or a
write error changes nothing; then renames them, the masks first when rounds are added and the JSON first when
rounds are removed, so a crash between the renames leaves a folder whose JSON lists only rounds whose masks
are there (load ignores extra masks). `session.json` is the commit point.

Writers hold the folder's lock (`session_lock`): each save does, and a command's whole load → ask → commit
runs under it with `Session.writing(...)`. A save also refuses when `session.json` changed on disk since this
object read or wrote it (another program wrote the session meanwhile), so a round is never silently lost.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import SessionError
from .references import GUESS_TRIES, close_alternatives, is_guess, reference_candidates, resolve_reference
from .session_lock import clean_if_free, hold

SESSION_FILE = "session.json"
MASKS_FILE = "masks.npz"
FORMAT_VERSION = 1
_ANY = object()  # "save as": overwrite whatever the folder holds


@dataclass
class Round:
    number: int  # 1-based
    view: str
    slice_index: int
    query: str
    answer: str
    entity: str | None
    reference: int | None
    mask: np.ndarray  # bool (rows, cols) in display orientation
    jcm_score: float | None = None
    corrected: bool = False
    seg_forced: bool = False
    absent: bool = False  # the model said the structure is not on this slice: no segment (empty mask)
    reference_guessed: bool = False  # the reference is the resolver's guess: no round picked or named in the query
    reference_alternatives: list = field(default_factory=list)  # other earlier rounds the guess nearly was
    # (`references.close_alternatives`): the panel offers them
    lm_tokens: int = 0
    timings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("mask")
        data["mask_shape"] = list(self.mask.shape)
        return data


class Session:
    """Rounds of one conversation on one volume (identified by its fingerprint)."""

    def __init__(self, volume_fingerprint: str, folder: str | Path | None = None, volume_name: str = ""):
        self.volume_fingerprint = volume_fingerprint
        self.volume_name = volume_name
        self.folder = Path(folder) if folder is not None else None
        self.rounds: list[Round] = []
        self.volume = None  # the imaging.Volume in memory (not saved), for references to other slices
        self._saved: list[Round] = []  # the rounds as on disk (last load or save)
        self._disk_digest = None  # sha256 of session.json as last read or written (None: no file expected)
        self._deferred = False  # inside `writing`: rounds change in memory until commit()

    # -- rounds ----------------------------------------------------------------------------------------
    @property
    def entities(self) -> list[str | None]:
        return [r.entity for r in self.rounds]

    def resolve_reference(self, query: str, explicit: int | None = None, scorer=None) -> int | None:
        return resolve_reference(query, self.entities, explicit, scorer, [not r.absent for r in self.rounds])

    def reference_candidates(self, query: str, explicit: int | None = None, scorer=None,
                             tries: int = GUESS_TRIES) -> list[int]:
        """The rounds an Ask on `query` may refer to, in the order it tries them (`references.reference_candidates`)."""
        return reference_candidates(query, self.entities, explicit, scorer, [not r.absent for r in self.rounds],
                                    tries)

    def reference_guess(self, query: str, explicit: int | None, chosen: int | None, scorer=None,
                        tried=()) -> tuple[bool, list[int]]:
        """(whether a new round's reference `chosen` is a guess, the other rounds that fit about as well but for the
        guesses `tried` and given up: `references.is_guess`, `references.close_alternatives`)."""
        referable = [not r.absent and r.number not in tried for r in self.rounds]
        visible = [e if not r.absent else None for e, r in zip(self.entities, self.rounds)]
        if chosen is None or not is_guess(query, visible, explicit):
            return False, []
        return True, close_alternatives(query, self.entities, chosen, scorer, referable)

    def add_round(self, round_: Round) -> None:
        if round_.number != len(self.rounds) + 1:
            raise SessionError(f"round number {round_.number} does not follow the {len(self.rounds)} round(s) so far")
        self.rounds.append(round_)
        if self._deferred:
            return
        try:
            self.save()
        except BaseException:
            self.rounds.pop()
            raise

    def undo(self) -> Round:
        if not self.rounds:
            raise SessionError("nothing to undo: the session has no rounds")
        last = self.rounds.pop()
        if self._deferred:
            return last
        try:
            self.save()
        except BaseException:
            self.rounds.append(last)
            raise
        return last

    def round(self, number: int) -> Round:
        if not 1 <= number <= len(self.rounds):
            raise SessionError(f"round {number} does not exist (the session has {len(self.rounds)} round(s))")
        return self.rounds[number - 1]

    # -- persistence -------------------------------------------------------------------------------------
    def to_json(self, rounds: list[Round] | None = None) -> dict:
        rounds = self.rounds if rounds is None else rounds
        return {"format": FORMAT_VERSION, "volume_fingerprint": self.volume_fingerprint,
                "volume_name": self.volume_name, "rounds": [r.to_json() for r in rounds]}

    def save(self, folder: str | Path | None = None, masks_first: bool | None = None) -> None:
        """Write the session atomically under the folder's lock; without a folder (in-memory session) this does
        nothing. A new `folder` is a "save as": it overwrites what is there. (`masks_first` is ignored: the
        order follows from what changed.)"""
        if folder is not None and (self.folder is None or Path(folder) != self.folder):
            self.folder = Path(folder)
            self._disk_digest = _ANY
            self._saved = []
        if self.folder is None:
            return
        created = ensure_folder(self.folder)
        try:
            with _os_errors(self.folder), hold(self.folder):
                self._check_unchanged()
                self._write()
        except BaseException:
            _remove_created(created)
            raise

    def commit(self) -> None:
        """Inside `writing`: save what changed in memory (the command's one commit point)."""
        self.save()

    def _check_unchanged(self) -> None:
        if self._disk_digest is _ANY:
            return
        current = _digest(self.folder / SESSION_FILE)
        if current != self._disk_digest:
            try:
                n = len(json.loads((self.folder / SESSION_FILE).read_text())["rounds"])
                now = f"it now has {n} round(s)"
            except (OSError, ValueError, KeyError, TypeError):
                now = "it was replaced or removed"
            raise SessionError(f"{self.folder}: the session was changed by another program since it was opened "
                               f"here ({now}); this change was not saved: open the session again to continue "
                               f"from its current state")

    def _write(self) -> None:
        saved, new = self._saved, list(self.rounds)
        common = 0
        while common < min(len(saved), len(new)) and saved[common] is new[common]:
            common += 1
        if common < len(saved) and common < len(new):  # rounds removed and others added: drop first
            self._write_files(new[:common], masks_first=False)
        self._write_files(new, masks_first=common == len(self._saved))

    def _write_files(self, rounds: list[Round], masks_first: bool) -> None:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **{f"round_{r.number}": r.mask.astype(bool) for r in rounds})
        text = (json.dumps(self.to_json(rounds), indent=1) + "\n").encode()
        staged = []
        try:
            for name, payload in ((MASKS_FILE, buffer.getvalue()), (SESSION_FILE, text)):
                staged.append((write_temporary(self.folder / name, payload), self.folder / name))
            for tmp, target in (staged if masks_first else staged[::-1]):
                os.replace(tmp, target)
        finally:
            for tmp, _ in staged:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        fsync_folder(self.folder)
        self._disk_digest = hashlib.sha256(text).hexdigest()
        self._saved = list(rounds)

    def reload(self) -> None:
        """Take the rounds as they are in this session's folder now (after they were dropped from memory): the
        folder is the truth, and later saves compare against what was read here."""
        saved = Session.load(self.folder, self.volume_fingerprint)
        self.rounds, self.volume_name = saved.rounds, saved.volume_name
        self._saved, self._disk_digest = saved._saved, saved._disk_digest

    # -- opening ---------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | Path, expected_fingerprint: str, volume_name: str = "") -> "Session":
        """The session in `folder` (which must belong to the volume), or a new one when the folder holds none."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise SessionError(f"{folder}: is a file, not a session folder; give a folder (it is created when "
                               f"missing)")
        if os.path.lexists(folder / SESSION_FILE):
            return cls.load(folder, expected_fingerprint)
        return cls(expected_fingerprint, folder, volume_name)

    @classmethod
    @contextmanager
    def writing(cls, folder: str | Path, expected_fingerprint: str, volume_name: str = "",
                wait: float | None = None, command: str | None = None):
        """The session of `folder` opened for one writer: the folder's lock is held (waiting up to `wait` s)
        from the load to the end of the block; rounds added or undone change the file only at `commit()`.
        Without a commit (an error, an interrupt) the folder is left as it was (a folder this created is
        removed again)."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise SessionError(f"{folder}: is a file, not a session folder; give a folder (it is created when "
                               f"missing)")
        created = ensure_folder(folder)
        try:
            with hold(folder, wait, command):
                check_writable(folder)
                session = cls.open(folder, expected_fingerprint, volume_name)
                session._deferred = True
                try:
                    yield session
                finally:
                    session._deferred = False
                    session.rounds = list(session._saved)  # what was not committed is dropped
        finally:
            _remove_created(created)

    @classmethod
    def load(cls, folder: str | Path, expected_fingerprint: str | None = None) -> "Session":
        folder = Path(folder)
        path = folder / SESSION_FILE
        if folder.exists() and not folder.is_dir():
            raise SessionError(f"{folder}: is a file, not a session folder")
        if os.path.lexists(path) and not path.is_file():
            raise SessionError(f"{path}: is not a regular file (a folder?); a session folder holds a "
                               f"{SESSION_FILE} file: move it away or choose another session folder")
        if not path.is_file():
            raise SessionError(f"{folder}: no {SESSION_FILE}, not a MediRound session folder")
        clean_if_free(folder)  # temporary files of a killed writer
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise SessionError(f"{path}: cannot read the session file ({exc.strerror})") from None
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise TypeError(f"expected a JSON object, got {type(data).__name__}")
            if data.get("format") != FORMAT_VERSION:
                raise SessionError(f"{path}: unsupported session format {data.get('format')!r}")
            session = cls(data["volume_fingerprint"], folder, data.get("volume_name", ""))
            if not isinstance(session.volume_fingerprint, str):
                raise TypeError("'volume_fingerprint' is not text")
            rounds = data["rounds"]
            if not isinstance(rounds, list):
                raise TypeError(f"'rounds' is a {type(rounds).__name__}, not a list")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise SessionError(f"{path}: corrupt session file ({type(exc).__name__}: {exc})") from None
        if expected_fingerprint is not None and session.volume_fingerprint != expected_fingerprint:
            raise SessionError(f"{folder}: this session belongs to another volume (fingerprint "
                               f"{session.volume_fingerprint}, the loaded volume is {expected_fingerprint})")
        masks = _read_masks(folder / MASKS_FILE) if rounds else {}
        for position, item in enumerate(rounds, start=1):
            try:
                item = dict(item)
                _check_round_entry(item, position)
                shape = tuple(item.pop("mask_shape"))
                key = f"round_{item['number']}"
                if key not in masks:
                    raise SessionError(f"{folder / MASKS_FILE}: no mask for round {item['number']}")
                mask = masks[key]
                if mask.shape != shape:
                    raise SessionError(f"{folder / MASKS_FILE}: mask of round {item['number']} has shape {mask.shape}, "
                                       f"expected {shape}")
                session.rounds.append(Round(mask=mask, **item))
            except (TypeError, KeyError, ValueError, AttributeError) as exc:
                raise SessionError(f"{path}: corrupt round entry ({type(exc).__name__}: {exc})") from None
        session._saved = list(session.rounds)
        session._disk_digest = hashlib.sha256(raw).hexdigest()
        return session


def guess_fields_problem(number: int, guessed, alternatives) -> str | None:
    """What is wrong with round `number`'s `reference_guessed` and `reference_alternatives` as read from a file or
    the wire (a bool; a list of earlier round numbers), or None."""
    if type(guessed) is not bool:
        return f"'reference_guessed' is {guessed!r}"
    if not (isinstance(alternatives, list) and all(type(n) is int and 1 <= n < number for n in alternatives)):
        return f"'reference_alternatives' is {alternatives!r}, not earlier rounds"
    return None


def _check_round_entry(item: dict, position: int) -> None:
    """Round `position` of session.json: numbered `position` (whole numbers, in order, no repeats), and its
    fields of the right kinds."""
    number = item.get("number")
    if type(number) is not int:
        raise TypeError(f"round {position}: 'number' is {number!r}, not a whole number")
    if number != position:
        raise ValueError(f"round {position} is numbered {number}: rounds must be numbered 1, 2, 3, … in order "
                         f"(a repeated or missing number)")
    for name, kinds in (("view", (str,)), ("slice_index", (int,)), ("query", (str,)), ("answer", (str,)),
                        ("entity", (str, type(None))), ("reference", (int, type(None)))):
        value = item.get(name)
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise TypeError(f"round {number}: {name!r} is {value!r}")
    if item["reference"] is not None and not 1 <= item["reference"] < number:
        raise ValueError(f"round {number}: refers to round {item['reference']}, not an earlier round")
    problem = guess_fields_problem(number, item.get("reference_guessed", False), item.get("reference_alternatives", []))
    if problem:
        raise TypeError(f"round {number}: {problem}")
    shape = item.get("mask_shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(n) is int and n > 0 for n in shape)):
        raise TypeError(f"round {number}: 'mask_shape' is {shape!r}, not two positive whole numbers")


def _read_masks(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k].astype(bool) for k in data.files}
    except FileNotFoundError:
        raise SessionError(f"{path}: masks file missing") from None
    except IsADirectoryError:
        raise SessionError(f"{path}: is a folder, not the session's masks file") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise SessionError(f"{path}: corrupt masks file ({type(exc).__name__}: {exc})") from None


def _digest(path: Path):
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None
    except OSError:
        return "unreadable"


# -- folders and files ------------------------------------------------------------------------------------------
def ensure_folder(folder: Path) -> list[Path]:
    """Create `folder` (and missing parents); returns the folders created, deepest last."""
    missing = []
    p = folder
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    with _os_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def _remove_created(created: list[Path]) -> None:
    """Remove folders `ensure_folder` created, when still empty (a failed command leaves no new folder)."""
    for p in reversed(created):
        try:
            p.rmdir()
        except OSError:
            return


def check_writable(folder: Path) -> None:
    """Refuse a read-only session folder before any work is done."""
    probe = None
    try:
        fd, probe = tempfile.mkstemp(prefix=".mediround-probe.", suffix=".tmp", dir=folder)
        os.close(fd)
    except OSError as exc:
        raise SessionError(_describe_os_error(folder, exc)) from None
    finally:
        if probe is not None:
            os.unlink(probe)


def _describe_os_error(folder: Path, exc: OSError) -> str:
    code = exc.errno
    if code == errno.ENOSPC or code == errno.EDQUOT or code == errno.EFBIG:
        return (f"{folder}: no space left to save the session ({exc.strerror}); the session was not changed: "
                f"free some disk space and try again")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"{folder}: the session folder is not writable ({exc.strerror}); choose a writable --session "
                f"folder (or copy this one) and try again")
    if code in (errno.ENOTDIR, errno.EEXIST):
        return f"{folder}: a file is in the way of the session folder ({exc.strerror}); give a folder"
    if code == errno.EISDIR:
        return f"{exc.filename or folder}: is a folder where the session expects a file"
    return f"{folder}: cannot save the session ({exc.strerror or exc}); the session was not changed"


@contextmanager
def _os_errors(folder: Path):
    try:
        yield
    except OSError as exc:
        raise SessionError(_describe_os_error(folder, exc)) from None


def current_umask() -> int:
    """The process umask, without changing it (from /proc where there is one)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_temporary(path: Path, payload: bytes) -> str:
    """`payload` in a fsynced temporary file beside `path` (mode 0666 less the umask); returns its name."""
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return tmp


def fsync_folder(folder: Path) -> None:
    if os.name == "nt":
        return
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: Path, payload: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, rename over `path`, fsync the folder."""
    tmp = write_temporary(path, payload)
    try:
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_folder(path.parent)
