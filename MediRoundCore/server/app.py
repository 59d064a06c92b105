"""`mediround serve`'s HTTP API (FastAPI): server info, sessions per user and volume, slice upload, ask (queued on
the device), undo, rounds and masks, and the sync operations a reconnecting client uses. The protocol is
`remote/protocol.py`'s; FastAPI's OpenAPI at /openapi.json (and /docs) documents every endpoint.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..engine import DEFAULT_CHECKPOINT, MAX_QUERY_CHARS, checkpoint_beta
from ..errors import MediRoundError
from ..imaging import MAX_SLICE_PIXELS, SliceImage, as_slice_pixels
from ..remote.protocol import (DEFAULT_MAX_REQUEST_BYTES, FINGERPRINT_RE, MAX_WAIT_S, NPY_TYPE, PROTOCOL_HEADER,
                               PROTOCOL_VERSION, VIEWS, array_to_npy, npy_to_array,
                               round_digest, round_from_wire, round_to_wire)
from .auth import Auth
from .gate import USER_SCOPE_KEY, Gate
from .jobs import MAX_QUEUED_PER_OWNER, DeviceQueue, Job, QueueFull
from .store import Refused, ServerSession, SessionStore


THREADS = 256  # request threads (most of them wait for the device queue)


# -- request bodies (they are the OpenAPI's schemas) ------------------------------------------------------------
class OpenSession(BaseModel):
    fingerprint: str = Field(description="the volume's fingerprint (imaging.Volume.fingerprint())", max_length=64)
    volume_name: str = Field("", max_length=256)


class AskRequest(BaseModel):
    query: str = Field(max_length=MAX_QUERY_CHARS)
    view: str = Field("axial", max_length=16)
    index: int = Field(ge=0, le=100000, description="slice index along the view (uploaded before)")
    reference: int | None = Field(None, ge=1, le=100000, description="round this query refers to (default: auto)")
    use_jcm: bool = True
    beta: float | None = Field(None, ge=0.0, le=1.0)
    history: list[str] = Field(default_factory=list, max_length=10000,
                               description="digests of the client's rounds; they must equal the server's")
    wait: float = Field(10.0, ge=0.0, le=MAX_WAIT_S, description="seconds to wait before answering 202")


class UndoRequest(BaseModel):
    history: list[str] = Field(default_factory=list, max_length=10000)


class TruncateRequest(BaseModel):
    keep: int = Field(ge=0, le=100000)


def current_user(request: Request) -> str:
    """The caller, as `gate.Gate` identified it from the headers (`auth.Auth`) before the body was read."""
    return request.scope[USER_SCOPE_KEY]


def model_info(engine, checkpoint: str | None, random_model: bool) -> dict:
    model = engine.model
    return {"model": "random-tiny (untrained)" if random_model else Path(checkpoint or DEFAULT_CHECKPOINT).name,
            "size": getattr(model.config, "size", "?"),
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "device": engine.device_description,
            "beta": None if random_model else checkpoint_beta(checkpoint)}


def create_app(engine, sessions_dir: str | Path, tokens: dict[str, str] | None = None, *, replica: str = "",
               checkpoint: str | None = None, random_model: bool = False,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, max_loaded_sessions: int = 128,
               max_slices: int = 64) -> FastAPI:
    store = SessionStore(sessions_dir, max_loaded=max_loaded_sessions, max_slices=max_slices)
    queue = DeviceQueue(str(engine.model.device))
    auth = Auth(tokens)
    info = {"server": "mediround", "version": __version__, "protocol": PROTOCOL_VERSION, "replica": replica,
            "auth": auth.mode, "max_request_bytes": max_request_bytes,
            "slice_placement": True,  # an uploaded slice's place in patient coordinates is used (centre_*_mm)
            **model_info(engine, checkpoint, random_model)}

    app = FastAPI(title="MediRound server", version=f"{__version__} (protocol {PROTOCOL_VERSION})",
                  description="Multi-round segmentation sessions over HTTP. Every /v1 request carries "
                              f"`{PROTOCOL_HEADER}: {PROTOCOL_VERSION}`; errors are "
                              "`{\"error\": {\"code\", \"message\"}}`. See docs/server.md.",
                  lifespan=_lifespan(queue))
    app.state.queue, app.state.store = queue, store

    # -- errors: one clear line for the user, never a traceback ---------------------------------------------
    @app.exception_handler(Refused)
    async def refused(request, exc: Refused):
        return _error(exc.status, exc.code, exc.message, **exc.extra)

    @app.exception_handler(MediRoundError)
    async def user_error(request, exc: MediRoundError):
        return _error(400, type(exc).__name__, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):  # unknown path, wrong method, unparsable body
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        return _error(exc.status_code, code, f"{exc.detail} ({request.method} {request.url.path[:200]})")

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return _error(422, "invalid_request", "; ".join(parts) or "invalid request")

    # -- server ------------------------------------------------------------------------------------------------
    @app.get("/healthz", summary="liveness for load balancers (no token needed)")
    def healthz():
        return {"ok": True, "replica": replica}

    @app.get("/v1/info", summary="version, protocol, model, size, device, β, queue length")
    def get_info(user: str = Depends(current_user)):
        return {**info, "user": user, "queue_length": queue.length, "rounds_completed": queue.completed}

    # -- sessions ----------------------------------------------------------------------------------------------
    @app.post("/v1/sessions", summary="open (or resume) the caller's session of a volume, by fingerprint")
    def open_session(body: OpenSession, user: str = Depends(current_user)):
        if not FINGERPRINT_RE.fullmatch(body.fingerprint):
            raise Refused(400, "bad_fingerprint", "a volume fingerprint is 8–64 lowercase hex digits")
        session, created = store.open(user, body.fingerprint, body.volume_name)
        with store.hold(session):
            return {"session": session.sid, "created": created, "rounds": _summaries(session)}

    @app.get("/v1/sessions/{sid}/rounds", summary="the session's rounds (without masks)")
    def list_rounds(sid: str, user: str = Depends(current_user)):
        with store.hold(store.get(sid, user)) as session:
            return {"rounds": _summaries(session)}

    @app.get("/v1/sessions/{sid}/rounds/{number}", summary="one round with its mask (packed bits)")
    def get_round(sid: str, number: int, user: str = Depends(current_user)):
        with store.hold(store.get(sid, user)) as session:
            return {"round": round_to_wire(_round(session, number))}

    @app.get("/v1/sessions/{sid}/rounds/{number}/mask", summary="one round's mask as .npy (bool, display orientation)",
             response_class=Response)
    def get_mask(sid: str, number: int, user: str = Depends(current_user)):
        with store.hold(store.get(sid, user)) as session:
            return Response(array_to_npy(_round(session, number).mask), media_type=NPY_TYPE)

    @app.put("/v1/sessions/{sid}/rounds/{number}", summary="sync: store a round the client has and the server lacks")
    async def put_round(sid: str, number: int, request: Request, user: str = Depends(current_user)):
        try:
            payload = await request.json()
            round_ = round_from_wire(payload.get("round", {}) if isinstance(payload, dict) else {})
        except (ValueError, RecursionError) as exc:  # not JSON (too deep), or not a round
            raise Refused(400, "bad_round", str(exc)) from None

        def store_round():
            with store.hold(store.get(sid, user)) as session:
                if round_.number != number or number != len(session.rounds) + 1:
                    raise Refused(409, "out_of_sync", f"round {number} does not follow the server's "
                                                      f"{len(session.rounds)} round(s)", rounds=_summaries(session))
                session.add_round(round_)
                return {"rounds": _summaries(session)}

        return await run_in_threadpool(store_round)

    @app.post("/v1/sessions/{sid}/truncate", summary="sync: drop the server's rounds after `keep`")
    def truncate(sid: str, body: TruncateRequest, user: str = Depends(current_user)):
        with store.hold(store.get(sid, user)) as session:
            while len(session.rounds) > body.keep:
                session.undo()
            return {"rounds": _summaries(session)}

    @app.post("/v1/sessions/{sid}/undo", summary="undo the last round (the client's history must match)")
    def undo(sid: str, body: UndoRequest, user: str = Depends(current_user)):
        with store.hold(store.get(sid, user)) as session:
            _check_history(session, body.history)
            return {"undone": round_to_wire(session.undo(), with_mask=False), "rounds": _summaries(session)}

    @app.put("/v1/sessions/{sid}/slices/{view}/{index}", summary="upload a slice (.npy float32, display orientation)")
    async def put_slice(sid: str, view: str, index: int, request: Request, axis: int = Query(ge=0, le=2),
                        transpose: bool = False, flip_rows: bool = False, flip_cols: bool = False,
                        modality: str = Query("CT", pattern="^(CT|MR|normalized)$"),
                        spacing_row: float = Query(1.0, gt=0, lt=1e4), spacing_col: float = Query(1.0, gt=0, lt=1e4),
                        region: str | None = Query(None, pattern="^(abdomen|chest|brain)$"),
                        window_level: float | None = Query(None, ge=-1e5, le=1e5),
                        window_width: float | None = Query(None, gt=0, le=1e5),
                        centre_row_mm: float | None = Query(None, ge=-1e6, le=1e6),
                        centre_col_mm: float | None = Query(None, ge=-1e6, le=1e6),
                        user: str = Depends(current_user)):
        if view not in VIEWS or not 0 <= index <= 100000:
            raise Refused(400, "bad_slice", f"unknown view {view!r} or slice index {index}")
        body = await request.body()
        try:
            pixels = npy_to_array(body, max_items=MAX_SLICE_PIXELS, ndim=2)
        except ValueError as exc:
            raise Refused(400, "bad_slice", f"the slice is {exc}; a slice is a 2D numeric array of at most "
                                            f"{MAX_SLICE_PIXELS} pixels") from None
        if pixels.size == 0:
            raise Refused(400, "bad_slice", f"a slice is a 2D numeric array of at most {MAX_SLICE_PIXELS} pixels, "
                                            f"got {pixels.dtype} {pixels.shape}")
        if (window_level is None) != (window_width is None):
            raise Refused(400, "bad_slice", "a CT window needs both window_level and window_width")
        window = None if window_level is None else (window_level, window_width)
        if (centre_row_mm is None) != (centre_col_mm is None):
            raise Refused(400, "bad_slice", "a slice centre needs both centre_row_mm and centre_col_mm")
        centre = None if centre_row_mm is None else (centre_row_mm, centre_col_mm)
        image = SliceImage(as_slice_pixels(pixels), view, index, axis, transpose, flip_rows, flip_cols, modality,
                           (spacing_row, spacing_col), region, window, centre)

        def store_slice():
            session = store.get(sid, user)
            session.store_slice(image)
            return {"stored": [view, index]}

        return await run_in_threadpool(store_slice)

    # -- rounds ------------------------------------------------------------------------------------------------
    @app.post("/v1/sessions/{sid}/ask", summary="ask a round: 200 with the round, or 202 with the queue position",
              responses={202: {"description": "queued: `job`, `position` (0 = running), poll /v1/jobs/{job}"},
                         409: {"description": "`slices_needed` (upload them) or `out_of_sync` (sync, then ask)"}})
    def ask(sid: str, body: AskRequest, user: str = Depends(current_user)):
        if body.view not in VIEWS:
            raise Refused(400, "bad_slice", f"unknown view {body.view!r}")
        session = store.get(sid, user)
        with store.hold(session):
            _check_history(session, body.history)
            references = (engine.possible_references(session, body.query, body.reference)
                          if body.query.strip() else [])  # the engine may try each in turn
            missing = _missing_slices(session, body.view, body.index, references)
        if missing:
            raise Refused(409, "slices_needed", f"upload {len(missing)} slice(s) first",
                          slices=[{"view": v, "index": i} for v, i in missing])

        def run_round():
            with store.hold(session):
                _check_history(session, body.history)  # nothing changed while the job waited
                image = session.slice_image(body.view, body.index)
                result = engine.ask(session, body.query, image, reference=body.reference, use_jcm=body.use_jcm,
                                    beta=body.beta)
                return round_to_wire(result.round)

        try:
            job = queue.submit(user, run_round)
        except QueueFull:
            raise Refused(429, "busy", f"you have {MAX_QUEUED_PER_OWNER} rounds waiting on this server already; "
                                       "ask again when one of them has finished") from None
        return _answer(job, body.wait)

    @app.get("/v1/jobs/{job_id}", summary="a queued round: 200 with the round when done, else 202 with its position")
    def get_job(job_id: str, wait: float = Query(10.0, ge=0.0, le=MAX_WAIT_S), user: str = Depends(current_user)):
        job = queue.get(job_id)
        if job is None:
            raise Refused(404, "no_job", "no such job on this server (finished jobs are kept 10 minutes, the latest "
                                         "256; after a restart the client syncs the session instead)")
        if job.owner != user:
            raise Refused(403, "not_your_job", "this job belongs to another user")
        return _answer(job, wait)

    def _answer(job: Job, wait: float):
        if not queue.wait(job, min(wait, MAX_WAIT_S)):
            return JSONResponse({"job": job.id, "state": job.state, "position": queue.position(job),
                                 "queue_length": queue.length}, status_code=202)
        if job.error is not None:
            raise job.error if isinstance(job.error, (Refused, MediRoundError)) else Refused(
                500, "round_failed", f"the round failed on the server ({type(job.error).__name__}: "
                                     f"{str(job.error)[:300]}); the session is unchanged")
        return {"round": job.result}

    return Gate(app, auth, max_request_bytes=max_request_bytes, replica=replica)


def _lifespan(queue: DeviceQueue):
    @asynccontextmanager
    async def lifespan(app):
        import anyio.to_thread

        # requests that wait for their round hold a worker thread each (≤ 30 s): room for many waiting clients
        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
        queue.start()
        yield
        queue.stop()

    return lifespan


def _error(status: int, code: str, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status_code=status)


def _summaries(session: ServerSession) -> list[dict]:
    return [round_to_wire(r, with_mask=False) for r in session.rounds]


def _round(session: ServerSession, number: int):
    if not 1 <= number <= len(session.rounds):
        raise Refused(404, "no_round", f"round {number} does not exist (the session has {len(session.rounds)})")
    return session.rounds[number - 1]


def _check_history(session: ServerSession, history: list[str]) -> None:
    if list(history) != [round_digest(r) for r in session.rounds]:
        raise Refused(409, "out_of_sync", f"the client's {len(history)} round(s) differ from the server's "
                                          f"{len(session.rounds)}", rounds=_summaries(session))


def _missing_slices(session: ServerSession, view: str, index: int, references: list[int]) -> list[tuple[str, int]]:
    """Slices the round needs that the server lacks: its own, and the slice of every round that a round of the
    session refers to or this one may (the engine re-reads them when it rebuilds a cache)."""
    needed = [(view, index)]
    refs = [r.reference for r in session.rounds if r.reference is not None] + list(references)
    for number in refs:
        if 1 <= number <= len(session.rounds):
            ref = session.rounds[number - 1]
            needed.append((ref.view, ref.slice_index))
    return [s for s in dict.fromkeys(needed) if not session.has_slice(*s)]
