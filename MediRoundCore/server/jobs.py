"""One queue per device: every round of every session runs on a single worker thread, in arrival order, so the
model and its per-slice caches are used by one thread only. Requests wait for their job up to a bound and are
otherwise answered with the job's place in the queue (the client polls); finished jobs are kept a while for that.

The engine decodes one session's round at a time (its KV cache and greedy decoding are per slice and session),
so rounds of different sessions are not batched together: they queue.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

KEEP_FINISHED_S = 600.0
KEEP_FINISHED_MAX = 256  # finished jobs kept for their clients (a result holds a mask: up to 3 MiB for 4096²)
MAX_QUEUED_PER_OWNER = 8  # one user's rounds waiting at once (a client asks one round at a time per session)


class QueueFull(Exception):
    """The owner has `MAX_QUEUED_PER_OWNER` rounds waiting already."""


@dataclass
class Job:
    id: str
    owner: str
    run: Callable[[], object]
    state: str = "queued"  # queued | running | done | failed
    result: object = None
    error: BaseException | None = None
    created: float = field(default_factory=time.monotonic)
    finished: float | None = None
    done_event: threading.Event = field(default_factory=threading.Event)


class DeviceQueue:
    """A FIFO of jobs run by one thread (`start()` it; `stop()` waits for the running job)."""

    def __init__(self, name: str = "device"):
        self.name = name
        self._pending: deque[Job] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._running: Job | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"mediround-{name}", daemon=True)
        self.completed = 0

    def start(self) -> "DeviceQueue":
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def submit(self, owner: str, run: Callable[[], object], max_queued: int = MAX_QUEUED_PER_OWNER) -> Job:
        """Queue a job; `QueueFull` when its owner has `max_queued` jobs waiting (one user cannot fill the queue)."""
        job = Job(secrets.token_urlsafe(12), owner, run)
        with self._cond:
            if sum(1 for j in self._pending if j.owner == owner) >= max_queued:
                raise QueueFull(f"{owner} has {max_queued} rounds waiting in the queue already")
            self._forget_old()
            self._jobs[job.id] = job
            self._pending.append(job)
            self._cond.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def position(self, job: Job) -> int:
        """0 while the job runs (or is done), n when n jobs are ahead of it in the queue (the running one counts)."""
        with self._cond:
            if job.state != "queued":
                return 0
            try:
                ahead = self._pending.index(job)
            except ValueError:
                return 0
            return ahead + (1 if self._running is not None else 0)

    @property
    def length(self) -> int:
        with self._cond:
            return len(self._pending) + (1 if self._running is not None else 0)

    def wait(self, job: Job, seconds: float) -> bool:
        return job.done_event.wait(max(0.0, seconds))

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._pending.popleft()
                job.state, self._running = "running", job
            try:
                job.result, job.state = job.run(), "done"
            except BaseException as exc:  # noqa: BLE001 - reported to the client that waits for the job
                job.error, job.state = exc, "failed"
            finally:
                job.finished = time.monotonic()
                with self._cond:
                    self._running = None
                    self.completed += 1
                job.done_event.set()

    def _forget_old(self) -> None:
        now = time.monotonic()
        for job_id in list(self._jobs):
            job = self._jobs[job_id]
            old = job.finished is not None and now - job.finished > KEEP_FINISHED_S
            if old or (job.finished is not None and len(self._jobs) > KEEP_FINISHED_MAX):
                del self._jobs[job_id]
