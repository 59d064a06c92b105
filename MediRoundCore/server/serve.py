"""`mediround serve`: load the engine, check the security settings, and run the API under uvicorn."""

from __future__ import annotations

import os
import socket
import stat
import sys
from pathlib import Path

from ..errors import MediRoundError
from ..remote.protocol import is_loopback, read_tokens

TOKENS_ENV = "MEDIROUND_TOKENS"
MAX_HEADER_BYTES = 16 * 1024  # request line + headers (URL and query length included)
MAX_CONNECTIONS = 1024  # open connections at once; more are answered 503 (each may buffer a body up to the bound)


def load_tokens(token_file: str | None) -> dict[str, str] | None:
    """{token: user} from --token-file, else from $MEDIROUND_TOKENS; None when neither is given."""
    if token_file:
        path = Path(token_file)
        try:
            text = path.read_text()
        except OSError as exc:
            raise MediRoundError(f"{path}: cannot read the token file ({exc.strerror or exc})") from None
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            print(f"WARNING: {path} is readable by other users of this machine; chmod 600 it", file=sys.stderr)
        source = str(path)
    elif os.environ.get(TOKENS_ENV):
        text, source = os.environ[TOKENS_ENV].replace(",", "\n"), f"${TOKENS_ENV}"
    else:
        return None
    try:
        return read_tokens(text, source)
    except ValueError as exc:
        raise MediRoundError(str(exc)) from None


def default_cache_slices(size: str) -> int:
    """Slices whose encodings and KV caches a server keeps: 32 for our small models (a few MB each; with fewer
    than the sessions asking, every round re-encodes its slice, about 1 s with LiteMedSAM on a CPU), 8 for the
    full model (its 7B language model's KV cache of a dialogue takes hundreds of MB)."""
    return 8 if size == "full" else 32


def serve(host: str = "127.0.0.1", port: int = 8765, checkpoint: str | None = None, device: str | None = None,
          random_model: bool = False, sessions_dir: str | None = None, token_file: str | None = None,
          max_request_mb: float = 80, cache_slices: int | None = None, replica: str | None = None,
          threads: int | None = None) -> int:
    tokens = load_tokens(token_file)
    if not is_loopback(host) and not tokens:
        raise MediRoundError(f"serving on {host} makes the server reachable from other machines, which needs "
                             f"tokens: --token-file FILE (lines `user:token`) or ${TOKENS_ENV}; see docs/server.md")
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        raise MediRoundError(f"the server needs FastAPI and uvicorn ({exc}): pip install 'mediround[server]'") from None
    from ..checkpoint_info import checkpoint_size
    from ..engine import DEFAULT_CHECKPOINT, Engine, set_cpu_threads

    set_cpu_threads(threads)
    if cache_slices is None:
        cache_slices = default_cache_slices("tiny" if random_model else checkpoint_size(checkpoint))
    if random_model or checkpoint is None and not (DEFAULT_CHECKPOINT / "model.safetensors").is_file():
        print("NOTE: serving an UNTRAINED random tiny model (no trained weights found); masks are meaningless.")
        engine = Engine.random_tiny(max_slices=cache_slices)
        random_model = True
    else:
        engine = Engine.load(checkpoint, device=device, max_slices=cache_slices)
    sessions = Path(sessions_dir or Path.home() / ".cache" / "mediround" / "server-sessions")
    replica = replica or f"{socket.gethostname()}:{port}"
    app = create_app(engine, sessions, tokens, replica=replica, checkpoint=checkpoint, random_model=random_model,
                     max_request_bytes=int(max_request_mb * 2**20), max_slices=max(16, cache_slices * 4))
    auth = f"{len(tokens)} token(s)" if tokens else "no token (loopback only)"
    print(f"MediRound server {replica}: http://{host}:{port} | model "
          f"{'random-tiny' if random_model else Path(checkpoint or DEFAULT_CHECKPOINT).name} on "
          f"{engine.device_description} | sessions in {sessions} | {auth}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                limit_concurrency=MAX_CONNECTIONS,
                timeout_graceful_shutdown=5)
    return 0
