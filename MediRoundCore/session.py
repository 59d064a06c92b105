"""A session: the rounds of one conversation on one volume, with atomic save/restore.

On disk, in the session's folder: `masks.npz` (one boolean mask per round, key `round_<n>`) and
`session.json` (everything else). Each is written to a temporary file, fsynced and renamed; the masks first
when a round is added and the JSON first when one is undone, so a crash at any point leaves a folder whose
JSON lists only rounds whose masks are there.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import SessionError
from .references import resolve_reference

SESSION_FILE = "session.json"
MASKS_FILE = "masks.npz"
FORMAT_VERSION = 1


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

    # -- rounds ----------------------------------------------------------------------------------------
    @property
    def entities(self) -> list[str | None]:
        return [r.entity for r in self.rounds]

    def resolve_reference(self, query: str, explicit: int | None = None) -> int | None:
        return resolve_reference(query, self.entities, explicit)

    def add_round(self, round_: Round) -> None:
        if round_.number != len(self.rounds) + 1:
            raise SessionError(f"round number {round_.number} does not follow the {len(self.rounds)} round(s) so far")
        self.rounds.append(round_)
        try:
            self.save(masks_first=True)
        except Exception:
            self.rounds.pop()
            raise

    def undo(self) -> Round:
        if not self.rounds:
            raise SessionError("nothing to undo: the session has no rounds")
        last = self.rounds.pop()
        try:
            self.save(masks_first=False)
        except Exception:
            self.rounds.append(last)
            raise
        return last

    def round(self, number: int) -> Round:
        if not 1 <= number <= len(self.rounds):
            raise SessionError(f"round {number} does not exist (the session has {len(self.rounds)} round(s))")
        return self.rounds[number - 1]

    # -- persistence -------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format": FORMAT_VERSION, "volume_fingerprint": self.volume_fingerprint,
                "volume_name": self.volume_name, "rounds": [r.to_json() for r in self.rounds]}

    def save(self, folder: str | Path | None = None, masks_first: bool = True) -> None:
        """Write the session atomically; without a folder (in-memory session) this does nothing."""
        if folder is not None:
            self.folder = Path(folder)
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **{f"round_{r.number}": r.mask.astype(bool) for r in self.rounds})
        text = (json.dumps(self.to_json(), indent=1) + "\n").encode()
        writes = [(MASKS_FILE, buffer.getvalue()), (SESSION_FILE, text)]
        for name, payload in (writes if masks_first else writes[::-1]):
            atomic_write(self.folder / name, payload)

    @classmethod
    def load(cls, folder: str | Path, expected_fingerprint: str | None = None) -> "Session":
        folder = Path(folder)
        path = folder / SESSION_FILE
        if not path.is_file():
            raise SessionError(f"{folder}: no {SESSION_FILE}, not a MediRound session folder")
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT_VERSION:
                raise SessionError(f"{path}: unsupported session format {data.get('format')!r}")
            session = cls(data["volume_fingerprint"], folder, data.get("volume_name", ""))
            rounds = data["rounds"]
            if not isinstance(rounds, list):
                raise TypeError(f"'rounds' is a {type(rounds).__name__}, not a list")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise SessionError(f"{path}: corrupt session file ({type(exc).__name__}: {exc})") from None
        if expected_fingerprint is not None and session.volume_fingerprint != expected_fingerprint:
            raise SessionError(f"{folder}: this session belongs to another volume (fingerprint "
                               f"{session.volume_fingerprint}, the loaded volume is {expected_fingerprint})")
        masks = _read_masks(folder / MASKS_FILE) if rounds else {}
        for item in rounds:
            try:
                item = dict(item)
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
        return session


def _read_masks(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k].astype(bool) for k in data.files}
    except FileNotFoundError:
        raise SessionError(f"{path}: masks file missing") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise SessionError(f"{path}: corrupt masks file ({type(exc).__name__}: {exc})") from None


def atomic_write(path: Path, payload: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, rename over `path`, fsync the folder."""
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
