"""The door of the HTTP API (plain ASGI, before any route): request bodies larger than the bound are refused
before they are read (413), requests under /v1 must speak this protocol version (400 otherwise), and every
response says the server's protocol version and replica name."""

from __future__ import annotations

import json

from ..remote.protocol import PROTOCOL_HEADER, PROTOCOL_VERSION, REPLICA_HEADER
from .store import Refused


class Gate:
    def __init__(self, app, max_request_bytes: int, replica: str = ""):
        self.app = app
        self.max_request_bytes = int(max_request_bytes)
        self.replica = replica
        self.state = getattr(app, "state", None)

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

        limit = self.max_request_bytes
        length = headers.get("content-length", "")
        if length and (not length.isdigit() or int(length) > limit):
            return await _refuse(send_with_headers, 413, "too_large",
                                 f"the request holds {length} bytes; this server accepts at most {limit} bytes "
                                 f"({limit / 2**20:.0f} MiB) per request")
        if scope["path"].startswith("/v1/") or scope["path"] == "/v1":
            spoken = headers.get(PROTOCOL_HEADER.lower())
            if spoken != str(PROTOCOL_VERSION):
                said = f"protocol {spoken}" if spoken else "no protocol version (not a MediRound client?)"
                return await _refuse(send_with_headers, 400, "protocol_mismatch",
                                     f"this server speaks MediRound protocol {PROTOCOL_VERSION} and the client "
                                     f"{said}: use a client and server of the same MediRound release",
                                     server_protocol=PROTOCOL_VERSION)
        seen = 0

        async def bounded_receive():  # a body without Content-Length (chunked) is counted as it arrives
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise Refused(413, "too_large", f"the request is larger than the {limit} bytes this server "
                                                    "accepts per request")
            return message

        await self.app(scope, bounded_receive, send_with_headers)


async def _refuse(send, status: int, code: str, message: str, **extra) -> None:
    body = json.dumps({"error": {"code": code, "message": message, **extra}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
