"""kill -9 of a real server process in the middle of a round: no finished round is lost on either side, the client
says what happened, and after a restart the same ask resumes — re-run when the server had not finished it,
recovered (not re-run, not doubled) when it had; a restart while the client waits is taken in its stride."""

from __future__ import annotations

import json
import time

import pytest

from MediRoundCore.cli import BUNDLED, open_session
from MediRoundCore.imaging import extract_slice, load_volume
from MediRoundCore.remote.client import PENDING_FILE, RemoteEngine, ServerUnavailable
from MediRoundCore.remote.protocol import round_digest
from MediRoundCore.session import Session
from server_helpers import ServerProcess, free_port

pytest.importorskip("fastapi")


def server_rounds(sessions_dir, fingerprint) -> int:
    try:
        return len(json.loads((sessions_dir / "local" / fingerprint / "session.json").read_text())["rounds"])
    except (OSError, ValueError, KeyError):
        return -1


def test_kill_9_mid_round_loses_nothing_and_the_client_resumes(tmp_path):
    volume = load_volume(BUNDLED / "demo_abdomen.nrrd")
    fp = volume.fingerprint()
    image = extract_slice(volume, "axial", 12)
    sessions, port = tmp_path / "sessions", free_port()
    server = ServerProcess(sessions, port=port)
    try:
        folder = tmp_path / "client"
        session = open_session(folder, volume)
        engine = RemoteEngine.connect(server.url, poll_s=0)  # every ask answers 202 at once, then is polled
        engine.ask(session, "Segment the left kidney.", image)
        engine.ask(session, "Now the lesion inside it.", image)

        # 1. killed while round 3 runs (right after the server queued it)
        def kill_when_queued(message, fraction):
            if "on the server" in message and server.proc.poll() is None:
                server.kill9()

        with pytest.raises(ServerUnavailable) as info:
            engine.ask(session, "Segment the organ that stores bile.", image, progress=kill_when_queued)
        message = str(info.value)
        assert "does not answer" in message and "during round 3" in message
        assert f"Your 2 finished round(s) are saved in {folder}" in message and "ask again when the server is back" in message
        assert len(Session.load(folder).rounds) == 2 and (folder / PENDING_FILE).is_file()
        assert server_rounds(sessions, fp) in (2, 3)  # whatever the server had finished is on its disk

        server = ServerProcess(sessions, port=port)
        restarted = RemoteEngine.connect(server.url, poll_s=0)
        resumed = open_session(folder, volume)  # as after a restart of the client too
        r3 = restarted.ask(resumed, "Segment the organ that stores bile.", image)
        assert r3.round.number == 3 and [r.number for r in resumed.rounds] == [1, 2, 3]
        assert not (folder / PENDING_FILE).exists()

        # 2. killed after the server saved round 4, before its answer reached the client
        def kill_when_saved(message, fraction):
            if "on the server" in message and server.proc.poll() is None:
                deadline = time.monotonic() + 60
                while server_rounds(sessions, fp) < 4 and time.monotonic() < deadline:
                    time.sleep(0.005)
                server.kill9()

        query = "Now segment the organ that removes old red blood cells on the same side as it."
        with pytest.raises(ServerUnavailable, match="during round 4"):
            restarted.ask(resumed, query, image, reference=1, progress=kill_when_saved)
        assert len(Session.load(folder).rounds) == 3 and server_rounds(sessions, fp) == 4

        server = ServerProcess(sessions, port=port)
        again = RemoteEngine.connect(server.url)
        r4 = again.ask(open_session(folder, volume), query, image, reference=1)
        assert r4.recovered and r4.round.number == 4 and r4.round.reference == 1
        assert again.client.call("GET", "/v1/info")[1]["rounds_completed"] == 0  # recovered, not run again
        saved = Session.load(folder)
        sid = again._sids[fp]
        listed = again.client.call("GET", f"/v1/sessions/{sid}/rounds")[1]["rounds"]
        assert [r["digest"] for r in listed] == [round_digest(r) for r in saved.rounds]
        assert [r.query for r in saved.rounds] == ["Segment the left kidney.", "Now the lesion inside it.",
                                                   "Segment the organ that stores bile.", query]

        # 3. killed and restarted while the client waits for round 5: it notices and goes on by itself
        servers = [server]
        polling = RemoteEngine.connect(server.url, poll_s=0)
        session = open_session(folder, volume)

        def restart_when_queued(message, fraction):
            if "on the server" in message and len(servers) == 1:
                servers[0].kill9()
                servers.append(ServerProcess(sessions, port=port))

        r5 = polling.ask(session, "Segment the liver.", image, progress=restart_when_queued)
        server = servers[-1]
        assert len(servers) == 2 and r5.round.number == 5 and [r.number for r in session.rounds] == [1, 2, 3, 4, 5]
        listed = polling.client.call("GET", f"/v1/sessions/{sid}/rounds")[1]["rounds"]
        assert [r["digest"] for r in listed] == [round_digest(r) for r in Session.load(folder).rounds]
    finally:
        server.stop()
