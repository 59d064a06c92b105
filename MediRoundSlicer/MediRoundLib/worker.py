"""One persistent inference thread. It runs jobs (model loading, `engine.ask`) and never touches Qt or MRML;
the main thread submits jobs and polls events (a QTimer in the panel), so Slicer stays responsive.

Events, in order, per job: zero or more ("progress", job_id, (message, fraction)), then exactly one of
("done", job_id, result) or ("error", job_id, exception).
"""

from __future__ import annotations

import itertools
import queue
import threading
import traceback
from dataclasses import dataclass


@dataclass
class Event:
    kind: str  # "progress" | "done" | "error"
    job_id: int
    payload: object
    name: str = ""
    traceback: str = ""


class InferenceWorker:
    def __init__(self, name: str = "MediRound-inference"):
        self._jobs: queue.Queue = queue.Queue()
        self._events: queue.Queue = queue.Queue()
        self._ids = itertools.count(1)
        self._pending: set[int] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- main thread ---------------------------------------------------------------------------------------
    def submit(self, function, *args, name: str = "", with_progress: bool = False, **kwargs) -> int:
        """Queue `function(*args, **kwargs)`; with `with_progress` it also gets `progress=callable(msg, frac)`."""
        if not self._thread.is_alive():
            raise RuntimeError("the inference worker has stopped")
        job_id = next(self._ids)
        with self._lock:
            self._pending.add(job_id)
        self._jobs.put((job_id, name, function, args, kwargs, with_progress))
        return job_id

    def poll(self, wait: float = 0.0) -> list[Event]:
        """Every event so far; with `wait` > 0 and none yet, first block up to `wait` seconds for one.

        Blocking here releases the GIL, and inside Slicer that is the only time this thread gets it: Slicer's
        PythonQt runs without thread support, so the main thread holds the GIL while Qt's event loop idles."""
        out = []
        if wait > 0:
            try:
                out.append(self._events.get(timeout=wait))
            except queue.Empty:
                return out
        while True:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                return out

    def wait(self, job_id: int, timeout: float | None = None) -> list[Event]:
        """Block until `job_id` ends (for scripts and tests); returns the events seen meanwhile."""
        out = []
        while True:
            event = self._events.get(timeout=timeout)
            out.append(event)
            if event.job_id == job_id and event.kind in ("done", "error"):
                return out

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._pending)

    def stop(self, timeout: float = 5.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)

    # -- worker thread ----------------------------------------------------------------------------------------
    def _run(self):
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job_id, name, function, args, kwargs, with_progress = job
            if with_progress:
                kwargs = dict(kwargs, progress=lambda message, fraction, _id=job_id, _n=name: self._events.put(
                    Event("progress", _id, (str(message), float(fraction)), _n)))
            try:
                result = function(*args, **kwargs)
                event = Event("done", job_id, result, name)
            except BaseException as exc:  # reported to the main thread, never raised here
                event = Event("error", job_id, exc, name, traceback.format_exc())
            with self._lock:
                self._pending.discard(job_id)
            self._events.put(event)
