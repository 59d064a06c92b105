"""An attacker's requests to a real `mediround serve` on loopback, and a client that keeps its token to itself:
a tokenless server answers only requests addressed to this machine (DNS rebinding, an exposing proxy); requests
without a valid token are refused before their body is read; chunked bodies are bounded like any other and JSON
bodies more tightly; a .npy header that promises a huge array is refused unread; user names that share a folder
are refused; the client follows no redirect and reaches a loopback server without the environment's proxy."""

from __future__ import annotations

import http.client
import io
import json

import numpy as np
import pytest

from MediRoundCore.errors import MediRoundError
from MediRoundCore.remote.client import RemoteError, ServerClient
from MediRoundCore.remote.protocol import PROTOCOL_HEADER, is_loopback, read_tokens
from MediRoundCore.server.store import Refused, SessionStore
from server_helpers import ALICE, ServerProcess, StandIn, write_tokens

pytest.importorskip("fastapi")
FINGERPRINT = "0123456789abcdef"


@pytest.fixture(scope="module")
def open_server(tmp_path_factory):
    """A server without tokens (loopback only), default request bound (80 MiB)."""
    folder = tmp_path_factory.mktemp("open")
    proc = ServerProcess(folder / "sessions", extra=["--random"])
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokens")
    proc = ServerProcess(folder / "sessions", tokens=write_tokens(folder), extra=["--random", "--max-request-mb", "1"])
    yield proc
    proc.stop()


def send(port: int, method: str, path: str, headers: dict, body: bytes | None = None, chunks: list[bytes] = (),
         timeout: float = 30):
    """One request on a raw connection: `body` with its Content-Length, else `chunks` chunked, else headers only
    (declared but unsent bodies show whether the server answers before reading them). (status, JSON)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    connection.putrequest(method, path, skip_host="Host" in headers)
    if body is not None:
        headers = {"Content-Length": str(len(body)), **headers}
    for key, value in headers.items():
        connection.putheader(key, value)
    if chunks:
        connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()
    try:
        if body is not None:
            connection.send(body)
        for chunk in chunks:
            connection.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        if chunks:
            connection.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed before the whole body was sent
    response = connection.getresponse()
    answer = response.status, json.loads(response.read() or b"{}")
    connection.close()
    return answer


def test_a_tokenless_server_answers_only_requests_addressed_to_this_machine(open_server):
    v1 = {PROTOCOL_HEADER: "1"}
    for host in (f"127.0.0.1:{open_server.port}", f"localhost:{open_server.port}", "[::1]"):
        assert send(open_server.port, "GET", "/v1/info", {**v1, "Host": host})[0] == 200, host
    # a web page whose name was rebound to 127.0.0.1, or a reverse proxy that passes its public name
    for host in ("evil.example.org:8765", "localhost.evil.example.org", "mediround.localhost", ""):
        status, body = send(open_server.port, "POST", "/v1/sessions", {**v1, "Host": host,
                                                                       "Content-Type": "application/json"},
                            body=json.dumps({"fingerprint": FINGERPRINT}).encode())
        assert status == 403 and body["error"]["code"] == "not_local", host
        assert "--token-file" in body["error"]["message"]


def test_requests_without_a_valid_token_are_refused_before_their_body(token_server):
    """The body is declared but never sent: the server must answer from the headers alone."""
    for method, path in (("PUT", f"/v1/sessions/{'x' * 24}/slices/axial/1?axis=2"), ("POST", "/v1/sessions")):
        for auth, code in (({}, "token_missing"), ({"Authorization": "Bearer " + "x" * 30}, "token_wrong")):
            status, body = send(token_server.port, method, path, {PROTOCOL_HEADER: "1", "Content-Length": "900000",
                                                                  "Content-Type": "application/json", **auth},
                                timeout=10)
            assert status == 401 and body["error"]["code"] == code


def test_chunked_bodies_are_bounded_and_json_bodies_more_tightly(open_server, token_server):
    v1 = {PROTOCOL_HEADER: "1", "Content-Type": "application/json"}
    too_big = [b" " * 2**20] * 9  # 9 MiB of JSON white space, chunked: more than any JSON request needs
    status, body = send(open_server.port, "POST", "/v1/sessions", v1, chunks=too_big)
    assert status == 413 and body["error"]["code"] == "too_large" and "8388608 bytes" in body["error"]["message"]
    status, body = send(open_server.port, "POST", "/v1/sessions", {**v1, "Content-Length": str(9 * 2**20)})
    assert status == 413 and body["error"]["code"] == "too_large"
    # a chunked body within the bound arrives whole
    status, body = send(open_server.port, "POST", "/v1/sessions", v1,
                        chunks=[b'{"fingerprint": ', json.dumps(FINGERPRINT).encode(), b"}"])
    assert status == 200 and body["rounds"] == []
    # a chunked slice over the server's --max-request-mb 1
    token = {PROTOCOL_HEADER: "1", "Authorization": f"Bearer {ALICE}"}
    sid = send(token_server.port, "POST", "/v1/sessions", {**token, "Content-Type": "application/json"},
               body=json.dumps({"fingerprint": FINGERPRINT}).encode())[1]["session"]
    status, body = send(token_server.port, "PUT", f"/v1/sessions/{sid}/slices/axial/1?axis=2", token,
                        chunks=[b"\0" * 2**19] * 3)
    assert status == 413 and body["error"]["code"] == "too_large"


def test_a_npy_header_that_promises_a_huge_slice_is_refused_unread(token_server):
    token = {PROTOCOL_HEADER: "1", "Authorization": f"Bearer {ALICE}"}
    sid = send(token_server.port, "POST", "/v1/sessions", {**token, "Content-Type": "application/json"},
               body=json.dumps({"fingerprint": FINGERPRINT}).encode())[1]["session"]

    def npy(shape, descr="<f4", data=b"\0" * 64):
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
        return header.getvalue() + data

    for payload, said in ((npy((100000, 100000)), "100000×100000"), (npy((4, 4, 4)), "4×4×4"),
                          (npy((4, 4), data=b"\0" * 10), "truncated"), (npy((2, 2), "<c16"), "complex128"),
                          (b"\x93NUMPY" + b"\0" * 100, "not a .npy")):
        status, body = send(token_server.port, "PUT", f"/v1/sessions/{sid}/slices/axial/1?axis=2", token,
                            body=payload)
        assert status == 400 and body["error"]["code"] == "bad_slice" and said in body["error"]["message"], body
    assert send(token_server.port, "GET", "/v1/info", token)[0] == 200  # and the server is well


def test_user_names_that_would_share_a_folder_are_refused(tmp_path):
    with pytest.raises(ValueError, match="'alice' and 'Alice' differ only by case"):
        read_tokens(f"alice:{ALICE}\nAlice:{ALICE[::-1]}\n", "tokens")
    # On a case-insensitive disk (macOS, Windows) `Alice/` is `alice/`: a session folder whose owner is another
    # user is never taken over. Here the shared folder is made by copying alice's meta file into Alice's folder.
    store = SessionStore(tmp_path)
    mine, _ = store.open("alice", FINGERPRINT)
    (tmp_path / "Alice" / FINGERPRINT).mkdir(parents=True)
    (tmp_path / "Alice" / FINGERPRINT / "server.json").write_bytes((mine.folder / "server.json").read_bytes())
    with pytest.raises(Refused, match="belongs to user 'alice', not 'Alice'"):
        store.open("Alice", FINGERPRINT)
    assert store.open("alice", FINGERPRINT)[0] is mine


def test_the_client_follows_no_redirect_and_no_proxy_to_loopback(monkeypatch):
    elsewhere = StandIn()  # an attacker's host, or the environment's proxy
    redirecting = StandIn(redirect_to=elsewhere.url + "/v1/info")
    target = StandIn()
    try:
        with pytest.raises(RemoteError, match="redirects to http://127.0.0.1:.*does not follow redirects"):
            ServerClient(redirecting.url, token=ALICE).call("GET", "/v1/info")
        assert elsewhere.seen == []  # the token never went there
        # with an http_proxy in the environment, a loopback server is still reached directly
        monkeypatch.setenv("http_proxy", elsewhere.url)
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        assert ServerClient(target.url, token=ALICE).call("GET", "/v1/info")[1]["protocol"] == 1
        assert target.seen == [("/v1/info", f"Bearer {ALICE}")] and elsewhere.seen == []
    finally:
        for server in (elsewhere, redirecting, target):
            server.stop()


def test_only_loopback_itself_counts_as_local():
    assert all(is_loopback(h) for h in ("localhost", "127.0.0.1", "127.8.9.1", "::1", "[::1]", "LOCALHOST"))
    assert not any(is_loopback(h) for h in ("localhost.evil.com", "gpu.localhost", "0.0.0.0", "10.0.0.1", "",
                                            "127.0.0.1.nip.io", "::"))
    with pytest.raises(RemoteError, match="refusing to send the token over plain HTTP to gpu.localhost"):
        ServerClient("http://gpu.localhost:8765", token=ALICE)
    for tricky in ("http://evil.com\\@127.0.0.1/", "http://127.0.0.1:8765@evil.com", "http://u:p@127.0.0.1"):
        with pytest.raises(MediRoundError, match="must look like http://HOST:PORT"):
            ServerClient(tricky, token=ALICE)


def test_one_user_cannot_fill_the_device_queue_nor_the_disk(tmp_path):
    from MediRoundCore.imaging import SliceImage
    from MediRoundCore.server.jobs import DeviceQueue, QueueFull

    queue = DeviceQueue("test")  # not started: every job stays waiting
    for _ in range(8):
        queue.submit("mallory", lambda: None)
    with pytest.raises(QueueFull):
        queue.submit("mallory", lambda: None)
    assert queue.submit("alice", lambda: None).owner == "alice" and queue.length == 9

    session, _ = SessionStore(tmp_path).open("mallory", FINGERPRINT)
    pixels = np.zeros((4, 4), np.float32)
    for index in range(3):
        session.store_slice(SliceImage(pixels, "axial", index, 2, False, False, False), limit=3)
    session.store_slice(SliceImage(pixels + 1, "axial", 2, 2, False, False, False), limit=3)  # a replacement
    with pytest.raises(Refused, match="holds 3 slices already") as info:
        session.store_slice(SliceImage(pixels, "axial", 3, 2, False, False, False), limit=3)
    assert info.value.status == 507 and not session.has_slice("axial", 3)


def test_a_malformed_round_upload_gets_a_clear_refusal(open_server):
    v1 = {PROTOCOL_HEADER: "1", "Content-Type": "application/json"}
    sid = send(open_server.port, "POST", "/v1/sessions", v1,
               body=json.dumps({"fingerprint": FINGERPRINT[::-1]}).encode())[1]["session"]
    for payload in (b"{not json", b"[]", b'{"round": 5}', b'{"round": {"number": 1}}', b"[" * 100000):
        status, body = send(open_server.port, "PUT", f"/v1/sessions/{sid}/rounds/1", v1, body=payload)
        assert status == 400 and body["error"]["code"] == "bad_round", (payload, body)
    # every refusal speaks the protocol's error form, also FastAPI's own (a body too deep to parse, a wrong path)
    status, body = send(open_server.port, "POST", "/v1/sessions", v1, body=b"[" * 100000)
    assert status == 400 and body["error"]["code"] == "bad_request"
    status, body = send(open_server.port, "GET", "/v1/nothing-here", v1)
    assert status == 404 and body["error"]["code"] == "not_found" and "/v1/nothing-here" in body["error"]["message"]


def test_tokens_are_printable_ascii_on_both_sides():
    """A token an HTTP header cannot carry intact never matches; both sides say so instead."""
    with pytest.raises(ValueError, match="the token of alice holds characters other than printable ASCII"):
        read_tokens("alice:pässwörd-0123456789abcdef\n", "tokens")
    with pytest.raises(MediRoundError, match="other than printable ASCII"):
        ServerClient("https://gpu.example.org", token=ALICE + " é")


def test_finished_rounds_kept_for_polling_are_bounded():
    """Each finished job holds its round (a mask of up to 3 MiB) until its client fetches it: at most 256 are kept;
    a client whose job was forgotten recovers the round from the session (the crash tests cover it)."""
    from MediRoundCore.server.jobs import KEEP_FINISHED_MAX, DeviceQueue

    queue = DeviceQueue("test").start()
    try:
        jobs = [queue.submit(f"user{i}", lambda i=i: i) for i in range(300)]
        assert all(queue.wait(job, 30) for job in jobs)
        last = queue.submit("late", lambda: "late")
        assert queue.wait(last, 30) and last.result == "late"
        assert queue.get(jobs[0].id) is None and queue.get(jobs[-1].id).result == 299
        assert sum(queue.get(job.id) is not None for job in jobs) <= KEEP_FINISHED_MAX <= 256
    finally:
        queue.stop()
