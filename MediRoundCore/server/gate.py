"""The door of the HTTP API (plain ASGI, before any route and before any body is read): requests under /v1 must
speak this protocol version (400) and say who they are (`auth.Auth`: 401/403); bodies larger than the bound are
refused (413) from their `Content-Length`, or, sent chunked without one, as they arrive and before a route sees
them. Only slice uploads may use the full bound; JSON bodies get a smaller one (a parsed JSON body takes many
times its size in memory). Every response says the server's protocol version and replica name."""

from __future__ import annotations

import json
import re

from ..remote.protocol import PROTOCOL_HEADER, PROTOCOL_VERSION, REPLICA_HEADER
from .auth import Auth
from .store import Refused

USER_SCOPE_KEY = "mediround.user"  # where the gate leaves the caller's user name for the routes
MAX_JSON_BYTES = 8 * 2**20  # the largest JSON body: a round with a 4096² mask is about 3 MiB
SLICE_PATH = re.compile(r"^/v1/sessions/[^/]+/slices/")


class Gate:
    def __init__(self, app, auth: Auth, max_request_bytes: int, replica: str = ""):
        self.app = app
        self.auth = auth
        self.max_request_bytes = int(max_request_bytes)
        self.replica = replica
        self.state = getattr(app, "state", None)

    def limit(self, path: str) -> int:
        """The largest body a request to `path` may carry."""
        return self.max_request_bytes if SLICE_PATH.match(path) else min(self.max_request_bytes, MAX_JSON_BYTES)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        extra = [(PROTOCOL_HEADER.lower().encode(), str(PROTOCOL_VERSION).encode())]
        if self.replica:
            extra.append((REPLICA_HEADER.lower().encode(), self.replica.encode()))

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        limit = self.limit(scope["path"])
        length = headers.get("content-length", "")
        if length and (not length.isdigit() or int(length) > limit):
            return await _refuse(send_with_headers, Refused(
                413, "too_large", f"the request holds {length} bytes; this server accepts at most {limit} bytes "
                                  f"({limit / 2**20:.0f} MiB) per request of this kind"))
        if scope["path"].startswith("/v1/") or scope["path"] == "/v1":
            spoken = headers.get(PROTOCOL_HEADER.lower())
            if spoken != str(PROTOCOL_VERSION):
                said = f"protocol {spoken}" if spoken else "no protocol version (not a MediRound client?)"
                return await _refuse(send_with_headers, Refused(
                    400, "protocol_mismatch", f"this server speaks MediRound protocol {PROTOCOL_VERSION} and the "
                                              f"client {said}: use a client and server of the same MediRound release",
                    server_protocol=PROTOCOL_VERSION))
            try:
                scope[USER_SCOPE_KEY] = self.auth.identify(headers)
            except Refused as refused:
                return await _refuse(send_with_headers, refused)
        if not length and "chunked" in headers.get("transfer-encoding", "").lower():
            try:
                body = await _read_bounded(receive, limit)
            except _Disconnected:
                return
            if body is None:
                return await _refuse(send_with_headers, Refused(
                    413, "too_large", f"the request is larger than the {limit} bytes ({limit / 2**20:.0f} MiB) this "
                                      "server accepts per request of this kind"))
            receive = _replay(body, receive)
        await self.app(scope, receive, send_with_headers)


class _Disconnected(Exception):
    """The client went away while it sent the body."""


async def _read_bounded(receive, limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes `limit` bytes (the rest is never read)."""
    parts, seen = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise _Disconnected
        chunk = message.get("body", b"")
        seen += len(chunk)
        if seen > limit:
            return None
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def _replay(body: bytes, receive):
    """A `receive` that hands the app the body read already, then the server's later messages (a disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _refuse(send, refused: Refused) -> None:
    body = json.dumps({"error": {"code": refused.code, "message": refused.message, **refused.extra}}).encode()
    await send({"type": "http.response.start", "status": refused.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
