"""The server's sessions: one per (user, volume fingerprint), in `<root>/<user>/<fingerprint>/` with the same atomic
storage as a local session (`session.json` + `masks.npz`), plus `server.json` (owner and session id) and the
slices the client uploaded (`slices/<view>-<index>.npz`, so a restart or a rebuilt cache never asks for them again).

Sessions in memory and decoded slices are bounded and evicted least-recently-used; evicted sessions reload
from disk on their next request.
"""

from __future__ import annotations

import io
import json
import secrets
import threading
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import SessionError
from ..imaging import SliceImage, as_slice_pixels
from ..session import Session, atomic_write

SERVER_FILE = "server.json"
MAX_SLICES_PER_SESSION = 1024  # uploaded slices kept per session (a round needs its own and its references')


class Refused(Exception):
    """A request the server refuses: HTTP status, a machine-readable code and a message for the user."""

    def __init__(self, status: int, code: str, message: str, **extra):
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


class ServerSession(Session):
    """A session on the server: the rounds, and the slices its rounds were asked on (read by the engine for
    references to another slice through `slice_image`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sid = ""
        self.owner = ""
        self.lock = threading.RLock()  # one change at a time (the ask worker, undo, sync)
        self.slice_cache: "SliceCache | None" = None
        self.loaded = True

    def slice_path(self, view: str, index: int) -> Path:
        return self.folder / "slices" / f"{view}-{int(index)}.npz"

    def has_slice(self, view: str, index: int) -> bool:
        """Whether the slice is stored, with everything the engine needs: a slice stored by a server that did not
        keep its place in patient coordinates counts as missing, so the client uploads it again."""
        path = self.slice_path(view, index)
        if not path.is_file():
            return False
        if self.slice_cache is not None and self.slice_cache.get((self.sid, view, int(index))) is not None:
            return True
        try:
            with np.load(path, allow_pickle=False) as data:
                return "centre_mm" in json.loads(str(data["meta"]))
        except (OSError, ValueError, KeyError):
            return False

    def store_slice(self, image: SliceImage, limit: int = MAX_SLICES_PER_SESSION) -> None:
        """Keep an uploaded slice (replacing one of the same view and index); a new one beyond `limit` is refused."""
        path = self.slice_path(image.view, image.index)
        if not path.is_file() and path.parent.is_dir() and sum(1 for _ in path.parent.glob("*.npz")) >= limit:
            raise Refused(507, "too_many_slices", f"this session holds {limit} slices already, the most a session "
                                                  "may keep on this server; start a new session for this volume")
        buffer = io.BytesIO()
        meta = json.dumps({"axis": image.axis, "transpose": image.transpose, "flip_rows": image.flip_rows,
                           "flip_cols": image.flip_cols, "modality": image.modality,
                           "spacing": list(image.spacing), "region": image.region,
                           "window": None if image.window is None else list(image.window),
                           "centre_mm": None if image.centre_mm is None else list(image.centre_mm)})
        np.savez(buffer, pixels=as_slice_pixels(image.pixels), meta=np.array(meta))
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, buffer.getvalue())
        if self.slice_cache is not None:
            self.slice_cache.put((self.sid, image.view, image.index), image)

    def slice_image(self, view: str, index: int) -> SliceImage:
        key = (self.sid, view, int(index))
        if self.slice_cache is not None and (hit := self.slice_cache.get(key)) is not None:
            return hit
        path = self.slice_path(view, index)
        try:
            with np.load(path, allow_pickle=False) as data:
                pixels, meta = data["pixels"], json.loads(str(data["meta"]))
        except FileNotFoundError:
            raise SessionError(f"the server has no {view} slice {index} of this volume (upload it first)") from None
        image = SliceImage(pixels, view, int(index), int(meta["axis"]), bool(meta["transpose"]),
                           bool(meta["flip_rows"]), bool(meta["flip_cols"]), meta["modality"],
                           tuple(meta["spacing"]), meta.get("region"),
                           None if meta.get("window") is None else tuple(meta["window"]),
                           None if meta.get("centre_mm") is None else tuple(meta["centre_mm"]))
        if self.slice_cache is not None:
            self.slice_cache.put(key, image)
        return image


class SliceCache:
    """Decoded slices of all sessions, at most `capacity`, least-recently-used evicted (thread-safe)."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


class SessionStore:
    """Open, find and owner-check sessions. One object per session for the server's life (so its lock and the
    engine's memory of it stay put); at most `max_loaded` hold their rounds in memory, the least recently used
    others are unloaded (when idle) and reload from disk inside `hold`."""

    def __init__(self, root: str | Path, max_loaded: int = 128, max_slices: int = 64):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_loaded = max_loaded
        self.slices = SliceCache(max_slices)
        self._sessions: dict[str, ServerSession] = {}
        self._loaded: OrderedDict[str, None] = OrderedDict()
        self._index: dict[str, Path] = {}  # session id -> folder
        self._lock = threading.Lock()
        for meta in self.root.glob(f"*/*/{SERVER_FILE}"):
            try:
                self._index[json.loads(meta.read_text())["sid"]] = meta.parent
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a damaged meta file: that session gets a new id on its next open

    def folder(self, user: str, fingerprint: str) -> Path:
        return self.root / user / fingerprint

    def open(self, user: str, fingerprint: str, volume_name: str = "") -> tuple[ServerSession, bool]:
        """The user's session of this volume, created when there is none; (session, created)."""
        folder = self.folder(user, fingerprint)
        with self._lock:
            meta = self._read_meta(folder)
            if meta is not None and meta.get("owner") != user:  # two names, one folder (a case-insensitive disk)
                raise Refused(403, "not_your_session", f"the folder of this session belongs to user "
                                                       f"{meta.get('owner')!r}, not {user!r}; a user can reach only "
                                                       f"their own sessions")
            if meta is not None and meta.get("sid") in self._index:
                return self._object(meta["sid"]), False
            sid = secrets.token_urlsafe(18)
            folder.mkdir(parents=True, exist_ok=True)
            created = not (folder / "session.json").is_file()  # else rounds saved before the meta (a crash)
            if created:
                ServerSession(fingerprint, folder, volume_name).save()
            atomic_write(folder / SERVER_FILE, (json.dumps({"sid": sid, "owner": user,
                                                            "fingerprint": fingerprint}) + "\n").encode())
            self._index[sid] = folder
            return self._object(sid), created

    def get(self, sid: str, user: str) -> ServerSession:
        """The session with this id, if it belongs to `user`; else a refusal that says why."""
        with self._lock:
            if sid not in self._index:
                raise Refused(404, "no_session", f"there is no session {sid[:12]}… on this server (open the "
                                                 "volume's session again)")
            session = self._object(sid)
        if session.owner != user:
            raise Refused(403, "not_your_session", f"session {sid[:12]}… belongs to another user; a user can "
                                                   "reach only their own sessions")
        return session

    @contextmanager
    def hold(self, session: ServerSession):
        """Use a session's rounds: its lock held, its rounds loaded (from disk if they were unloaded)."""
        with session.lock:
            if not session.loaded:
                try:
                    session.reload()
                except SessionError as exc:
                    raise Refused(500, "session_damaged", f"the server's copy of this session cannot be read "
                                                          f"({exc})") from None
                session.loaded = True
            self._touch(session.sid)
            yield session

    def _object(self, sid: str) -> ServerSession:
        session = self._sessions.get(sid)
        if session is None:
            folder = self._index[sid]
            meta = self._read_meta(folder) or {}
            session = ServerSession(meta.get("fingerprint", folder.name), folder)
            session.sid, session.owner, session.slice_cache = sid, meta.get("owner", ""), self.slices
            session.loaded = False
            self._sessions[sid] = session
        return session

    def _touch(self, sid: str) -> None:
        with self._lock:
            self._loaded[sid] = None
            self._loaded.move_to_end(sid)
            for other in list(self._loaded)[: max(0, len(self._loaded) - self.max_loaded)]:
                session = self._sessions[other]
                if session.lock.acquire(blocking=False):  # idle: drop its rounds (they are on disk)
                    try:
                        session.rounds, session.loaded = [], False
                        del self._loaded[other]
                    finally:
                        session.lock.release()

    @staticmethod
    def _read_meta(folder: Path) -> dict | None:
        try:
            return json.loads((folder / SERVER_FILE).read_text())
        except (OSError, ValueError):
            return None
