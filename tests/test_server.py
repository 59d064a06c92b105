"""`mediround serve` as a real process on loopback, reached by real HTTP clients (ours on urllib, and plain urllib
requests): rounds through the server equal the local engine's; undo, rounds and masks; the queue's position; and
a clear refusal for a missing or wrong token, another user's session, an oversized request, an over-long query
and a protocol mismatch either way."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from MediRoundCore.checkpoint_info import DEFAULT_CHECKPOINT, checkpoint_beta
from MediRoundCore.cli import BUNDLED, open_session
from MediRoundCore.imaging import Volume, extract_slice, load_volume
from MediRoundCore.remote.client import ProtocolMismatch, RemoteEngine, RemoteError, ServerClient
from MediRoundCore.remote.protocol import PROTOCOL_HEADER, round_digest
from MediRoundCore.session import Session
from server_helpers import ALICE, BOB, REPO, ServerProcess, StandIn, free_port, raw_request, write_tokens
from conftest import needs_shipped_model

pytest.importorskip("fastapi")

DIALOGUE = [  # (slice, query, reference): the demo's four rounds, then one on another slice referring to round 1
    (12, "Segment the left kidney.", None),
    (12, "Now the lesion inside it.", 1),
    (12, "Segment the organ that stores bile.", 2),
    (12, "Now segment the organ that removes old red blood cells on the same side as it.", 1),
    (14, "Now the lesion inside it.", 1),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    proc = ServerProcess(folder / "sessions", tokens=write_tokens(folder), name="test-replica",
                         extra=["--max-request-mb", "1"])
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def volume():
    return load_volume(BUNDLED / "demo_abdomen.nrrd")


def other_volume(volume: Volume, seed: int) -> Volume:
    """The demo volume with one voxel changed: same anatomy, another fingerprint (another session)."""
    array = volume.array.copy()
    array[0, 0, seed % array.shape[2]] += 1 + seed
    return Volume(array, volume.spacing, volume.origin, volume.direction, name=f"demo-{seed}")


def test_rounds_through_the_server_equal_the_local_engine(server, volume, tmp_path, one_torch_thread):
    from MediRoundCore.engine import Engine

    local_engine = Engine.load()
    local = open_session(None, volume)
    remote = open_session(tmp_path / "client", volume)
    engine = RemoteEngine.connect(server.url, token=ALICE)
    assert engine.info["model"] == DEFAULT_CHECKPOINT.name and engine.info["size"] == local_engine.model.config.size
    assert engine.info["beta"] == pytest.approx(checkpoint_beta()) and "CPU" in engine.info["device"]
    assert engine.info["protocol"] == 1 and engine.info["user"] == "alice"
    for index, query, reference in DIALOGUE:
        image = extract_slice(volume, "axial", index)
        mine = local_engine.ask(local, query, image, reference=reference).round
        theirs = engine.ask(remote, query, image, reference=reference).round
        assert (theirs.number, theirs.answer, theirs.entity, theirs.reference) == (
            mine.number, mine.answer, mine.entity, mine.reference)
        np.testing.assert_array_equal(theirs.mask, mine.mask)
        assert theirs.jcm_score == pytest.approx(mine.jcm_score, abs=1e-5)
    assert [r.reference for r in remote.rounds] == [None, 1, 2, 1, 1]
    assert any(r.mask.any() for r in remote.rounds)
    # the client's copy is on disk, and equals the server's rounds and masks
    saved = Session.load(tmp_path / "client", volume.fingerprint())
    assert [round_digest(r) for r in saved.rounds] == [round_digest(r) for r in local.rounds]
    sid = engine._sids[volume.fingerprint()]
    client = engine.client
    listed = client.call("GET", f"/v1/sessions/{sid}/rounds")[1]["rounds"]
    assert [r["digest"] for r in listed] == [round_digest(r) for r in local.rounds]
    status, headers, payload = client.raw("GET", f"/v1/sessions/{sid}/rounds/5/mask")
    assert status == 200 and headers["Content-Type"] == "application/x-npy"
    np.testing.assert_array_equal(np.load(__import__("io").BytesIO(payload)), local.rounds[4].mask)
    assert headers["X-MediRound-Replica"] == "test-replica" and headers[PROTOCOL_HEADER] == "1"
    # the protocol's documentation is the server's OpenAPI
    status, _, spec = raw_request(f"{server.url}/openapi.json")
    assert status == 200 and "protocol 1" in spec["info"]["version"]
    for path in ("/v1/info", "/v1/sessions", "/v1/sessions/{sid}/ask", "/v1/jobs/{job_id}", "/v1/sessions/{sid}/undo",
                 "/v1/sessions/{sid}/rounds", "/v1/sessions/{sid}/rounds/{number}/mask",
                 "/v1/sessions/{sid}/slices/{view}/{index}"):
        assert path in spec["paths"], path


@pytest.mark.parametrize("region, window", [("chest", None), (None, (60.0, 300.0))])
def test_a_slice_is_seen_through_the_same_ct_window_as_locally(server, volume, tmp_path, region, window):
    """The CT window a local Ask shows the model (the volume's body region, or an explicit window) travels with
    the uploaded slice: the server's rounds equal the local engine's, referenced slice included."""
    from MediRoundCore.engine import Engine

    vol = Volume(other_volume(volume, 7 if region else 8).array, volume.spacing, volume.origin, volume.direction,
                 name="demo-windowed", region=region, window=window)
    local_engine = Engine.load()
    local = open_session(None, vol)
    remote = open_session(tmp_path / "client", vol)
    engine = RemoteEngine.connect(server.url, token=ALICE)
    for index, query, reference in [(12, "Segment the left kidney.", None), (11, "Now the lesion inside it.", 1)]:
        image = extract_slice(vol, "axial", index)
        assert (image.region, image.window) == (region, window)
        mine = local_engine.ask(local, query, image, reference=reference).round
        theirs = engine.ask(remote, query, image, reference=reference).round
        assert (theirs.answer, theirs.reference) == (mine.answer, mine.reference)
        np.testing.assert_array_equal(theirs.mask, mine.mask)
    if region is None:
        return
    # and the window matters: through the abdominal window the first round's mask differs
    plain = Volume(vol.array, vol.spacing, vol.origin, vol.direction, name="demo-plain", region="abdomen")
    other = local_engine.ask(open_session(None, plain), DIALOGUE[0][1], extract_slice(plain, "axial", 12)).round
    assert not np.array_equal(other.mask, local.rounds[0].mask)


@needs_shipped_model
def test_a_cropped_scan_lies_in_the_field_as_locally(server, tmp_path):
    """A field of view cut out of the demo scan, off the patient origin: the slice's place in patient coordinates
    travels with the upload, so the server pads it into the model's field as the local engine does (the same
    masks), and a server that lost it would answer otherwise (the place changes the answer)."""
    from MediRoundCore.engine import Engine
    from MediRoundCore.evaluate.demo_variants import demo_variant

    vol, _, index, dialogue = demo_variant("cut_200x160_offcentre")
    image = extract_slice(vol, "axial", index)
    assert image.centre_mm is not None and abs(image.centre_mm[1]) > 10
    local_engine = Engine.load()
    local, remote = open_session(None, vol), open_session(tmp_path / "client", vol)
    engine = RemoteEngine.connect(server.url, token=ALICE)
    for step in dialogue[:2]:
        reference = None if step.get("refers_to") is None else step["refers_to"] + 1
        mine = local_engine.ask(local, step["query"], image, reference=reference).round
        theirs = engine.ask(remote, step["query"], image, reference=reference).round
        assert theirs.answer == mine.answer
        np.testing.assert_array_equal(theirs.mask, mine.mask)
    import dataclasses

    centred = dataclasses.replace(image, centre_mm=None)
    other = local_engine.ask(open_session(None, vol), dialogue[0]["query"], centred).round
    assert not np.array_equal(other.mask, local.rounds[0].mask)
    # a server that does not use the place is refused by the client, not silently answered otherwise
    older = RemoteEngine.connect(server.url, token=ALICE)
    del older.info["slice_placement"]
    with pytest.raises(RemoteError, match="older than the MediRound client") as caught:
        older.ask(open_session(None, other_volume(vol, 3)), dialogue[0]["query"], image)
    assert caught.value.code == "server_too_old"


@needs_shipped_model
def test_a_slice_stored_without_its_place_is_uploaded_again(tmp_path):
    """A server upgraded over sessions whose slices were stored without their place in patient coordinates
    treats those slices as missing: the client uploads them again, and the answer is the local engine's."""
    from MediRoundCore.engine import Engine
    from MediRoundCore.evaluate.demo_variants import demo_variant

    vol, _, index, dialogue = demo_variant("cut_200x160_offcentre")
    image = extract_slice(vol, "axial", index)
    sessions, tokens = tmp_path / "sessions", write_tokens(tmp_path)
    first = ServerProcess(sessions, tokens=tokens)
    try:
        RemoteEngine.connect(first.url, token=ALICE).ask(open_session(tmp_path / "client", vol),
                                                         dialogue[0]["query"], image)
    finally:
        first.stop()
    (stored,) = sessions.rglob("slices/*.npz")
    with np.load(stored, allow_pickle=False) as data:
        pixels, meta = data["pixels"], json.loads(str(data["meta"]))
    del meta["centre_mm"]  # as a server before placement stored it
    with open(stored, "wb") as handle:
        np.savez(handle, pixels=pixels, meta=np.array(json.dumps(meta)))
    upgraded = ServerProcess(sessions, tokens=tokens)
    try:
        resumed = open_session(tmp_path / "client", vol)
        theirs = RemoteEngine.connect(upgraded.url, token=ALICE).ask(resumed, dialogue[1]["query"], image,
                                                                     reference=1).round
    finally:
        upgraded.stop()
    local = open_session(None, vol)
    engine = Engine.load()
    engine.ask(local, dialogue[0]["query"], image)
    mine = engine.ask(local, dialogue[1]["query"], image, reference=1).round
    np.testing.assert_array_equal(theirs.mask, mine.mask)
    with np.load(stored, allow_pickle=False) as data:
        assert json.loads(str(data["meta"]))["centre_mm"] == list(image.centre_mm)


def test_undo_on_both_sides_and_a_reconnect_resumes(server, volume, tmp_path):
    vol = other_volume(volume, 1)
    session = open_session(tmp_path / "client", vol)
    engine = RemoteEngine.connect(server.url, token=ALICE)
    image = extract_slice(vol, "axial", 12)
    engine.ask(session, "Segment the left kidney.", image)
    engine.ask(session, "Now the lesion inside it.", image)
    assert engine.undo(session).number == 2
    assert len(Session.load(tmp_path / "client").rounds) == 1
    # a new client (Slicer restarted) with the saved folder resumes the same server session
    again = RemoteEngine.connect(server.url, token=ALICE)
    resumed = open_session(tmp_path / "client", vol)
    r2 = again.ask(resumed, "Now the lesion inside it.", image).round
    assert r2.number == 2 and r2.reference == 1
    sid = again._sids[vol.fingerprint()]
    assert len(again.client.call("GET", f"/v1/sessions/{sid}/rounds")[1]["rounds"]) == 2
    # an undo done only locally (the Slicer panel undoes its own session) is carried to the server next time
    resumed.undo()
    third = RemoteEngine.connect(server.url, token=ALICE)
    r2b = third.ask(resumed, "Segment the organ that stores bile.", image).round
    assert r2b.number == 2 and len(third.client.call("GET", f"/v1/sessions/{sid}/rounds")[1]["rounds"]) == 2


def test_tokens_users_and_sizes_are_refused_clearly(server, volume):
    alice = RemoteEngine.connect(server.url, token=ALICE)
    vol = other_volume(volume, 2)
    session = open_session(None, vol)
    alice.ask(session, "Segment the left kidney.", extract_slice(vol, "axial", 12))
    sid = alice._sids[vol.fingerprint()]
    headers = {PROTOCOL_HEADER: "1"}
    status, _, body = raw_request(f"{server.url}/v1/sessions/{sid}/rounds", headers=headers)
    assert status == 401 and body["error"]["code"] == "token_missing" and "needs a token" in body["error"]["message"]
    status, _, body = raw_request(f"{server.url}/v1/info", headers={**headers, "Authorization": "Bearer wrong-" + ALICE})
    assert status == 401 and "did not accept this token" in body["error"]["message"]
    with pytest.raises(RemoteError, match="did not accept this token"):
        RemoteEngine.connect(server.url, token=ALICE[:-1] + "x")
    # bob cannot read, change or ask in alice's session
    bob = ServerClient(server.url, token=BOB)
    for method, path, payload in (("GET", f"/v1/sessions/{sid}/rounds", None),
                                  ("GET", f"/v1/sessions/{sid}/rounds/1/mask", None),
                                  ("POST", f"/v1/sessions/{sid}/undo", {"history": []}),
                                  ("POST", f"/v1/sessions/{sid}/ask", {"query": "Segment the liver.", "index": 12})):
        with pytest.raises(RemoteError, match="belongs to another user") as info:
            bob.call(method, path, body=payload)
        assert info.value.status == 403
    # bob's own session of the same volume is his, empty
    assert bob.call("POST", "/v1/sessions", body={"fingerprint": vol.fingerprint()})[1]["rounds"] == []
    assert len(alice.client.call("GET", f"/v1/sessions/{sid}/rounds")[1]["rounds"]) == 1
    # an oversized request is refused before it is read (the server answers at the headers) ...
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.putrequest("PUT", f"/v1/sessions/{sid}/slices/axial/3?axis=2")
    for key, value in ((PROTOCOL_HEADER, "1"), ("Authorization", f"Bearer {ALICE}"),
                       ("Content-Length", str(4 * 2**20))):
        connection.putheader(key, value)
    connection.endheaders()
    response = connection.getresponse()
    body = json.loads(response.read())
    assert response.status == 413 and "accepts at most 1048576 bytes (1 MiB) per request" in body["error"]["message"]
    connection.close()
    # ... and our client does not send it
    big = extract_slice(Volume(np.zeros((2, 1024, 1024), np.int16), (1, 1, 1), (0, 0, 0)), "axial", 1)
    with pytest.raises(RemoteError, match="is 4.0 MiB; the server accepts at most 1.0 MiB") as info:
        alice.ask(session, "Segment the liver.", big)
    assert info.value.status == 413 and len(session.rounds) == 1
    # so is an over-long query
    with pytest.raises(RemoteError, match="query: String should have at most 2000 characters"):
        alice.client.call("POST", f"/v1/sessions/{sid}/ask", body={"query": "liver " * 400, "index": 12,
                                                                   "history": []})


def test_a_protocol_mismatch_is_refused_by_both_sides(server):
    status, headers, body = raw_request(f"{server.url}/v1/info", headers={PROTOCOL_HEADER: "2",
                                                                          "Authorization": f"Bearer {ALICE}"})
    assert status == 400 and body["error"]["code"] == "protocol_mismatch" and headers[PROTOCOL_HEADER] == "1"
    assert "this server speaks MediRound protocol 1 and the client protocol 2" in body["error"]["message"]
    with pytest.raises(ProtocolMismatch, match="speaks MediRound protocol 1; this client speaks protocol 2"):
        RemoteEngine(ServerClient(server.url, token=ALICE, protocol=2))

    other = StandIn(protocol=2)  # a server of a later release
    try:
        with pytest.raises(ProtocolMismatch, match="speaks MediRound protocol 2; this client speaks protocol 1"):
            RemoteEngine.connect(other.url)
    finally:
        other.stop()


def test_the_client_keeps_tokens_off_plain_http_to_other_hosts():
    with pytest.raises(RemoteError, match="refusing to send the token over plain HTTP to gpu.example.org"):
        ServerClient("http://gpu.example.org:8765", token=ALICE)
    assert ServerClient("http://gpu.example.org:8765", token=ALICE, insecure=True).url.startswith("http://")
    assert ServerClient("https://gpu.example.org", token=ALICE).url == "https://gpu.example.org"
    assert ServerClient("http://localhost:8765", token=ALICE).token == ALICE


def test_serve_refuses_an_open_address_without_tokens(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MEDIROUND_TOKENS", None)
    done = subprocess.run([sys.executable, "-m", "MediRoundCore.cli", "serve", "--host", "0.0.0.0", "--port",
                           str(free_port()), "--sessions", str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 2 and "needs tokens" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("options, words", [
    (["--cache-slices", "0"], "must be above 0"),
    (["--threads", "-2"], "must be above 0"),
    (["--max-request-mb", "nan"], "must be above 0"),
    (["--device", "gpu"], "gpu"),
])
def test_serve_refuses_bad_options_in_one_line(tmp_path, options, words):
    """Options a server cannot run with are refused before anything loads: one line, exit 2."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "MediRoundCore.cli", "serve", "--port", str(free_port()),
                           "--sessions", str(tmp_path), *options], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 2 and words in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr


def test_cli_ask_and_chat_with_server(server, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "MEDIROUND_TOKEN": BOB}
    volume = str(BUNDLED / "demo_abdomen.nrrd")
    ask = [sys.executable, "-m", "MediRoundCore.cli", "ask", volume, "--slice", "12", "--session",
           str(tmp_path / "s"), "--query", "Segment the left kidney.", "--server", server.url]
    done = subprocess.run(ask, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "connected to server" in done.stdout and "round 1: left kidney" in done.stdout
    chat = [sys.executable, "-m", "MediRoundCore.cli", "chat", volume, "--slice", "12", "--session",
            str(tmp_path / "s"), "--server", server.url]
    done = subprocess.run(chat, input="Now the lesion inside it.\n:undo\n:quit\n", capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "R2 (ref 1" in done.stdout and "undid round 2" in done.stdout
    assert len(Session.load(tmp_path / "s").rounds) == 1
    wrong = subprocess.run(ask, capture_output=True, text=True, env={**env, "MEDIROUND_TOKEN": "x" * 20}, timeout=120)
    assert wrong.returncode == 2 and "did not accept this token" in wrong.stderr and "Traceback" not in wrong.stderr


def test_a_busy_server_answers_with_the_queue_position(server, volume):
    """Four users ask at once: the server answers 202 with their place in the one device queue, each gets
    their own round."""
    clients = []
    for seed in range(3, 7):
        vol = other_volume(volume, seed)
        engine = RemoteEngine.connect(server.url, token=ALICE if seed % 2 else BOB, poll_s=0)
        session = open_session(None, vol)
        engine.ask(session, "Segment the left kidney.", extract_slice(vol, "axial", 12))  # slice sent, cache warm
        clients.append((engine, session, vol))
    seen: list[str] = []
    barrier = threading.Barrier(len(clients))
    results = {}

    def dialogue(i, engine, session, vol):
        barrier.wait()
        results[i] = engine.ask(session, "Now the lesion inside it.", extract_slice(vol, "axial", 12),
                                progress=lambda message, fraction: seen.append(message)).round

    threads = [threading.Thread(target=dialogue, args=(i, *c)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == [0, 1, 2, 3]
    assert all(r.number == 2 and r.reference == 1 for r in results.values())
    assert any("round(s) ahead in the queue" in m for m in seen), seen
    for engine, session, vol in clients:  # each server session holds exactly its client's rounds
        sid = engine._sids[vol.fingerprint()]
        listed = engine.client.call("GET", f"/v1/sessions/{sid}/rounds")[1]["rounds"]
        assert [r["digest"] for r in listed] == [round_digest(r) for r in session.rounds]
