"""The client of `mediround serve`, on the standard library's urllib only (it runs in Slicer's Python, where torch
may be missing). `RemoteEngine` answers like `engine.Engine` — `ask(session, query, image, …)` adds the round to
the caller's local session — so the CLI and the Slicer panel use a server exactly as they use a local model.

The local session (its folder) is the client's copy of every finished round. Before a round the client and the
server compare round digests; when they differ (a crash or a restart on either side, another replica, an undo
done while offline) the client syncs: it recovers a round the server finished for an ask whose answer never
arrived (`remote.json` in the session folder remembers the ask in flight), drops server rounds it does not
have, and re-sends rounds the server lacks. A finished round is never lost.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import MediRoundError, SessionError
from .protocol import (MAX_WAIT_S, NPY_TYPE, PROTOCOL_HEADER, PROTOCOL_VERSION, REPLICA_HEADER, TOKEN_RE,
                       USER_HEADER, VOLUME_HEADER, array_to_npy, is_loopback, round_digest, round_from_wire,
                       round_to_wire, slice_meta)

TOKEN_ENV = "MEDIROUND_TOKEN"
PENDING_FILE = "remote.json"


class RemoteError(MediRoundError):
    """The server refused a request or answered wrongly; the message is the server's or says what happened."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None, detail: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.detail = status, code, detail or {}


class ServerUnavailable(RemoteError):
    """The server cannot be reached or stopped answering."""


class ProtocolMismatch(RemoteError):
    """Client and server speak different protocol versions."""


class _Restarted(ServerUnavailable):
    """The server no longer knows the job of a round in flight (it restarted, or another replica answers)."""


@dataclass
class RemoteRoundResult:
    """What `RemoteEngine.ask` returns: the round added to the local session (as `engine.RoundResult.round`)."""

    round: object
    replica: str = ""
    recovered: bool = False  # the server had finished this round before a failure; it was fetched, not re-run

    @property
    def mask(self):
        return self.round.mask


def read_token(token_file: str | None = None) -> str | None:
    """The client's token: from a file (first line), else $MEDIROUND_TOKEN, else None."""
    if token_file:
        try:
            return Path(token_file).read_text().strip().splitlines()[0].strip()
        except (OSError, IndexError) as exc:
            raise MediRoundError(f"{token_file}: cannot read a token from it ({exc})") from None
    return os.environ.get(TOKEN_ENV) or None


class ServerClient:
    """HTTP to one server (or load balancer): protocol header, token, errors as RemoteError."""

    def __init__(self, url: str, token: str | None = None, user: str | None = None, insecure: bool = False,
                 timeout: float = 60.0, protocol: int = PROTOCOL_VERSION):
        parts = urllib.parse.urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc or "\\" in url:
            # (user@host and backslashes are refused: urllib and urlsplit would disagree on which host is meant)
            raise MediRoundError(f"server address {url!r} must look like http://HOST:PORT or https://HOST")
        if token and not TOKEN_RE.fullmatch(token):
            raise MediRoundError("the token holds characters other than printable ASCII (spaces, accents or line "
                                 "breaks from a copy and paste?); an HTTP header cannot carry them")
        if token and parts.scheme == "http" and not is_loopback(parts.hostname) and not insecure:
            raise RemoteError(f"refusing to send the token over plain HTTP to {parts.hostname}: anyone on the "
                                 f"network could read it. Use https:// (a TLS reverse proxy, see docs/server.md), "
                                 f"or allow it explicitly (--insecure)")
        self.url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        self.token, self.user, self.timeout, self.protocol = token, user, timeout, protocol
        self.last_replica = ""
        # redirects are not followed (urllib would re-send the token, even to plain http); a loopback server is
        # reached directly, never through the environment's http_proxy
        handlers = [_NoRedirect()] + ([urllib.request.ProxyHandler({})] if is_loopback(parts.hostname) else [])
        self._opener = urllib.request.build_opener(*handlers)

    def call(self, method: str, path: str, body: dict | None = None, data: bytes | None = None,
             params: dict | None = None, volume: str | None = None, timeout: float | None = None,
             accept: tuple[int, ...] = (200,)) -> tuple[int, dict]:
        """One request; (status, JSON) for an accepted status, else RemoteError with the server's message."""
        status, headers, payload = self.raw(method, path, body, data, params, volume, timeout)
        try:
            answer = json.loads(payload) if payload else {}
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise RemoteError(f"the server at {self.url} answered {status} with something other than MediRound JSON "
                              f"({payload[:80]!r})", status)
        if status in accept:
            return status, answer
        error = answer.get("error") if isinstance(answer.get("error"), dict) else {}
        message = error.get("message") or f"HTTP {status}"
        kind = ProtocolMismatch if error.get("code") == "protocol_mismatch" else RemoteError
        raise kind(f"the server refused: {message}" if kind is RemoteError else message, status, error.get("code"),
                   error)

    def raw(self, method, path, body=None, data=None, params=None, volume=None, timeout=None):
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        headers = {PROTOCOL_HEADER: str(self.protocol), "Accept": "application/json"}
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        elif data is not None:
            headers["Content-Type"] = NPY_TYPE
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.user:
            headers[USER_HEADER] = self.user
        if volume:
            headers[VOLUME_HEADER] = volume
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with self._opener.open(request, timeout=timeout or self.timeout) as response:
                status, got, payload = response.status, response.headers, response.read()
        except urllib.error.HTTPError as exc:
            status, got = exc.code, exc.headers
            try:
                payload = exc.read()
            except (OSError, http.client.HTTPException):
                payload = b""
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ServerUnavailable(f"the server at {self.url} does not answer ({_reason(reason)})") from None
        if 300 <= status < 400:
            where = got.get("Location", "?") if got is not None else "?"
            raise RemoteError(f"the server at {self.url} redirects to {where[:200]}; the client does not follow "
                              f"redirects (they could carry the token elsewhere): use that address if you trust it",
                              status, "redirect")
        spoken = got.get(PROTOCOL_HEADER) if got is not None else None
        if spoken is None and status in (502, 503, 504):  # a proxy in front of a server that is down
            raise ServerUnavailable(f"the server behind {self.url} does not answer (HTTP {status} from the proxy)",
                                    status)
        if spoken != str(self.protocol):
            said = f"MediRound protocol {spoken}" if spoken else "no MediRound protocol (is it a MediRound server?)"
            raise ProtocolMismatch(f"the server at {self.url} speaks {said}; this client speaks protocol "
                                   f"{self.protocol}: use a client and server of the same MediRound release",
                                   status, "protocol_mismatch")
        self.last_replica = got.get(REPLICA_HEADER, "")
        return status, got, payload


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Hands a redirect back as the response it is, instead of following it."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def _reason(reason) -> str:
    if isinstance(reason, socket.timeout) or "timed out" in str(reason):
        return "timed out"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused: is `mediround serve` running there?"
    if isinstance(reason, (ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError)):
        return "the connection was cut"
    return str(reason)[:200]


class RemoteEngine:
    """`engine.Engine`'s interface over a server: ask, undo, device_description."""

    def __init__(self, client: ServerClient, poll_s: float = 10.0):
        self.client = client
        self.poll_s = min(poll_s, MAX_WAIT_S)
        self.info = client.call("GET", "/v1/info")[1]
        self._sids: dict[str, str] = {}  # volume fingerprint -> session id on the server
        self._synced: set[str] = set()
        self._pending: dict[str, dict] = {}  # fingerprint -> the ask in flight (also in the session's folder)

    @classmethod
    def connect(cls, url: str, token: str | None = None, user: str | None = None, insecure: bool = False,
                **kwargs) -> "RemoteEngine":
        return cls(ServerClient(url, token=token, user=user, insecure=insecure), **kwargs)

    @property
    def device_description(self) -> str:
        i = self.info
        return f"server {self.client.url}: {i.get('model')} ({i.get('size')}) on {i.get('device')}"

    # -- rounds ------------------------------------------------------------------------------------------------
    def ask(self, session, query: str, image, reference: int | None = None, use_jcm: bool = True,
            beta: float | None = None, progress=None) -> RemoteRoundResult:
        """One round on the server; the round is added to `session` (saved in its folder) when it arrives."""
        say = progress or (lambda message, fraction: None)
        fp = session.volume_fingerprint
        say("connecting to the server", 0.05)
        recovered = self.resume(session)
        if recovered is not None and (recovered.query, recovered.view, recovered.slice_index) == (
                query, image.view, image.index) and recovered.number == len(session.rounds):
            say(f"round {recovered.number} had finished on the server before the connection broke; recovered", 1.0)
            return RemoteRoundResult(recovered, self.client.last_replica, recovered=True)
        number = len(session.rounds) + 1
        self._set_pending(session, {"number": number, "query": query, "view": image.view, "index": int(image.index)})
        body = {"query": query, "view": image.view, "index": int(image.index), "reference": reference,
                "use_jcm": use_jcm, "beta": beta, "wait": self.poll_s}
        try:
            try:
                data = self._ask(session, body, image, say)
            except _Restarted:  # the server restarted while the round was queued: take it over or ask again
                self._synced.discard(fp)
                recovered = self.resume(session)
                if recovered is not None and recovered.number == number:
                    return RemoteRoundResult(recovered, self.client.last_replica, recovered=True)
                self._set_pending(session, {"number": number, "query": query, "view": image.view,
                                            "index": int(image.index)})
                data = self._ask(session, body, image, say)
        except (ServerUnavailable, _Restarted) as exc:
            self._synced.discard(fp)
            saved = f" in {session.folder}" if session.folder is not None else ""
            raise ServerUnavailable(f"{exc} during round {number}. Your {number - 1} finished round(s) are saved"
                                    f"{saved}; ask again when the server is back: round {number} is recovered from "
                                    f"the server if it finished there, else asked anew") from None
        except RemoteError:
            self._set_pending(session, None)
            raise
        try:
            round_ = round_from_wire(data.get("round", {}))
        except ValueError as exc:
            raise RemoteError(f"the server's answer to round {number} is unusable ({exc}); ask again") from None
        if round_.number != number:
            raise RemoteError(f"the server answered round {round_.number} where round {number} was asked; "
                              "the session is resynced on the next ask")
        session.add_round(round_)
        self._set_pending(session, None)
        say("done", 1.0)
        return RemoteRoundResult(round_, self.client.last_replica)

    def prepare(self, session, image, progress=None) -> dict:
        """`Engine.prepare`'s place over a server: nothing is done ahead. The server encodes a slice when the first
        round on it arrives (and keeps it in its slice cache); sending the slice ahead would save only its upload,
        a fraction of the encoding, and a server has no call to encode without a round. Returns no timings."""
        return {}

    def _ask(self, session, body: dict, image, say) -> dict:
        fp = session.volume_fingerprint
        for _ in range(5):
            sid = self._sids[fp]
            body["history"] = [round_digest(r) for r in session.rounds]
            status, data = self.client.call("POST", f"/v1/sessions/{sid}/ask", body=body, volume=fp,
                                            timeout=self.poll_s + 60, accept=(200, 202, 404, 409))
            if status not in (404, 409):
                break
            error = data.get("error", {})
            if error.get("code") == "slices_needed":
                for item in error.get("slices", []):
                    say(f"sending {item['view']} slice {item['index']}", 0.1)
                    self._upload(session, sid, item["view"], int(item["index"]), image)
            elif error.get("code") == "out_of_sync":
                self._sync(session, sid, error.get("rounds", []), recover=False)
            elif error.get("code") == "no_session":  # another replica answers now (the first one is down)
                say("the session moved to another server replica; re-sending its rounds", 0.1)
                self._synced.discard(fp)
                self.resume(session, recover=False)
            else:
                raise RemoteError(f"the server refused: {error.get('message')}", status, error.get("code"))
        else:
            raise RemoteError("the server kept refusing the round (slices or rounds out of step); try again")
        while status == 202:
            position = data.get("position", 0)
            say("running on the server" if position == 0 else
                f"waiting on the server: {position} round(s) ahead in the queue", 0.2)
            status, data = self.client.call("GET", f"/v1/jobs/{data['job']}", params={"wait": self.poll_s},
                                            volume=fp, timeout=self.poll_s + 60, accept=(200, 202, 404))
            if status == 404:
                raise _Restarted(f"the server at {self.client.url} restarted (or another replica answers)")
        return data

    def undo(self, session):
        """Undo the last round on the server and in the local session; returns the local round undone."""
        if not session.rounds:
            raise SessionError("nothing to undo: the session has no rounds")
        self.resume(session)
        sid, fp = self._sids[session.volume_fingerprint], session.volume_fingerprint
        self.client.call("POST", f"/v1/sessions/{sid}/undo", body={"history": [round_digest(r) for r in session.rounds]},
                         volume=fp)
        return session.undo()

    # -- sessions and sync ---------------------------------------------------------------------------------------
    def resume(self, session, recover: bool = True):
        """Open the session on the server and bring both copies in step (see the module's docstring); returns the
        round recovered from the server, if any."""
        fp = session.volume_fingerprint
        if fp in self._synced:
            return None
        status, data = self.client.call("POST", "/v1/sessions", body={"fingerprint": fp,
                                                                      "volume_name": session.volume_name}, volume=fp)
        self._sids[fp] = data["session"]
        recovered = self._sync(session, data["session"], data.get("rounds", []), recover)
        self._synced.add(fp)
        return recovered

    def _sync(self, session, sid: str, server_rounds: list[dict], recover: bool = True):
        """Make the server's rounds equal the local ones; with `recover`, first take over a round the server
        finished for the remembered ask in flight (and forget that ask)."""
        fp = session.volume_fingerprint
        local = [round_digest(r) for r in session.rounds]
        remote = [r.get("digest") for r in server_rounds]
        k = 0
        while k < min(len(local), len(remote)) and local[k] == remote[k]:
            k += 1
        recovered = None
        pending = self._get_pending(session) if recover else None
        if len(remote) > k == len(local) and pending and pending.get("number") == k + 1:
            theirs = server_rounds[k]
            if (theirs.get("query"), theirs.get("view"), theirs.get("slice_index")) == (
                    pending.get("query"), pending.get("view"), pending.get("index")):
                data = self.client.call("GET", f"/v1/sessions/{sid}/rounds/{k + 1}", volume=fp)[1]
                recovered = round_from_wire(data["round"])
                session.add_round(recovered)
                k += 1
        if recover:
            self._set_pending(session, None)
        if len(remote) > k:  # rounds this client never received (or undid while away)
            self.client.call("POST", f"/v1/sessions/{sid}/truncate", body={"keep": k}, volume=fp)
        for r in session.rounds[k:]:  # rounds the server lost or never had (another replica, a lost disk)
            self.client.call("PUT", f"/v1/sessions/{sid}/rounds/{r.number}", body={"round": round_to_wire(r)},
                             volume=fp)
        return recovered

    def _upload(self, session, sid: str, view: str, index: int, image) -> None:
        if (view, index) == (image.view, int(image.index)):
            piece = image
        elif session.volume is not None:
            from ..imaging import extract_slice

            piece = extract_slice(session.volume, view, index)
        else:
            raise SessionError(f"the server needs {view} slice {index} (a referenced round lies there); attach the "
                               f"volume to the session (session.volume) to send it")
        meta = slice_meta(piece)
        if meta["centre_mm"] is not None and meta["region"] is not None and not self.info.get("slice_placement"):
            raise RemoteError("this server is older than the MediRound client: it would show the model this slice "
                              "at another place in its field than a local Ask does (other masks); update the "
                              "server", None, "server_too_old")
        params = {"axis": meta["axis"], "transpose": meta["transpose"], "flip_rows": meta["flip_rows"],
                  "flip_cols": meta["flip_cols"], "modality": meta["modality"],
                  "spacing_row": meta["spacing"][0], "spacing_col": meta["spacing"][1]}
        if meta["region"] is not None:  # the CT window the model sees this slice through, as in a local Ask
            params["region"] = meta["region"]
        if meta["window"] is not None:
            params["window_level"], params["window_width"] = meta["window"]
        if meta["centre_mm"] is not None:  # where the slice lies in the model's field, as in a local Ask
            params["centre_row_mm"], params["centre_col_mm"] = meta["centre_mm"]
        payload = array_to_npy(piece.pixels)
        limit = int(self.info.get("max_request_bytes") or 0)
        if limit and len(payload) > limit:  # the server would refuse it unread (and cut the connection)
            raise RemoteError(f"{view} slice {index} is {len(payload) / 2**20:.1f} MiB; the server accepts at most "
                              f"{limit / 2**20:.1f} MiB per request (its --max-request-mb)", 413, "too_large")
        self.client.call("PUT", f"/v1/sessions/{sid}/slices/{view}/{index}", data=payload,
                         params=params, volume=session.volume_fingerprint, timeout=120)

    # -- the ask in flight, remembered beside the local session ---------------------------------------------------
    def _get_pending(self, session) -> dict | None:
        pending = self._pending.get(session.volume_fingerprint)
        if pending is None and session.folder is not None:
            try:
                pending = json.loads((Path(session.folder) / PENDING_FILE).read_text()).get("pending")
            except (OSError, ValueError, AttributeError):
                pending = None
        return pending

    def _set_pending(self, session, pending: dict | None) -> None:
        fp = session.volume_fingerprint
        if pending is None:
            self._pending.pop(fp, None)
        else:
            self._pending[fp] = pending
        if session.folder is not None:
            from ..session import atomic_write

            path = Path(session.folder) / PENDING_FILE
            if pending is None:
                if path.exists():
                    path.unlink()
            else:
                Path(session.folder).mkdir(parents=True, exist_ok=True)
                atomic_write(path, (json.dumps({"server": self.client.url, "pending": pending}) + "\n").encode())
