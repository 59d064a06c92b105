"""Who is asking the server, decided from the request's headers before any body is read (`gate.Gate` calls it).

With tokens (`{token: user}`), the bearer token decides, compared in constant time against every token. Without
(a server that listens on loopback only), the user header does (default `local`), and only for requests
addressed to this machine: a `Host` that is not loopback means a web page that rebound its domain name to
127.0.0.1 (DNS rebinding), or a reverse proxy that exposes the server to the network; both are refused.
"""

from __future__ import annotations

import hmac

from ..remote.protocol import USER_HEADER, USER_RE, is_loopback
from .store import Refused


def host_name(host_header: str) -> str:
    """The host of a `Host` header: `[::1]:8765` → `::1`, `localhost:8765` → `localhost`."""
    host = host_header.strip()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Auth:
    """`identify(headers)` → the user, or `Refused` (401 without a valid token, 400/403 without one)."""

    def __init__(self, tokens: dict[str, str] | None):
        self.tokens = [(t.encode(), u) for t, u in tokens.items()] if tokens else None

    @property
    def mode(self) -> str:
        return "token" if self.tokens else "none (loopback only)"

    def identify(self, headers: dict[str, str]) -> str:
        """`headers`: lower-case names → values, as the request carries them."""
        if self.tokens is None:
            return self._local_user(headers)
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise Refused(401, "token_missing", "this server needs a token: give it to the client (--token-file or "
                                                "MEDIROUND_TOKEN; in Slicer, the Server token field)")
        given_bytes, user = given.strip().encode("utf-8", "surrogateescape"), None
        for known, owner in self.tokens:  # every token is compared, so the time says nothing about which matched
            if hmac.compare_digest(known, given_bytes):
                user = owner
        if user is None:
            raise Refused(401, "token_wrong", "the server did not accept this token (check it with the server's "
                                              "administrator)")
        return user

    @staticmethod
    def _local_user(headers: dict[str, str]) -> str:
        host = headers.get("host", "")
        if not is_loopback(host_name(host)):
            raise Refused(403, "not_local", f"this server has no tokens, so it answers only requests addressed to "
                                            f"this machine (127.0.0.1, ::1 or localhost), not to {host[:80]!r}; "
                                            f"behind a proxy or on a network, start it with --token-file")
        user = headers.get(USER_HEADER.lower(), "local")
        if not USER_RE.fullmatch(user):
            raise Refused(400, "bad_user", f"user name {user[:80]!r} must be 1–64 letters, digits or ._@-")
        return user
