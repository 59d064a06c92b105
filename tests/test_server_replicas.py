"""Two server replicas behind nginx (Debian's nginx-light) on loopback, with session affinity on the volume
header: every request of a session reaches one replica, sessions spread over both, and when a replica dies its
sessions move to the other one with their rounds (the client re-sends them) and go on."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from MediRoundCore.cli import BUNDLED, open_session
from MediRoundCore.imaging import Volume, extract_slice, load_volume
from MediRoundCore.remote.client import RemoteEngine
from MediRoundCore.remote.protocol import round_digest
from server_helpers import REPO, ServerProcess, free_port

pytest.importorskip("fastapi")
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
CONFIG = REPO / "docs" / "nginx-mediround.conf"


def nginx_config(folder: Path, port: int, upstreams: list[int]) -> str:
    """docs/nginx-mediround.conf's upstream and location, in a self-contained config for a foreground nginx."""
    text = CONFIG.read_text()
    upstream = text[text.index("upstream mediround"):text.index("server {")]
    for i, p in enumerate(upstreams, start=1):
        upstream = upstream.replace(f"127.0.0.1:{8765 + i - 1} ", f"127.0.0.1:{p} ")
    location = text[text.index("    location / {"):text.rindex("}")]
    temp = "\n".join(f"  {kind}_temp_path {folder}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                           "scgi"))
    return (("user root;\n" if os.geteuid() == 0 else "") + f"daemon off;\nworker_processes 1;\npid {folder}/nginx.pid;\n"
            f"error_log {folder}/error.log;\nevents {{ worker_connections 256; }}\nhttp {{\n  access_log off;\n{temp}\n"
            f"  client_max_body_size 80m;\n  {upstream}\n  server {{\n    listen 127.0.0.1:{port};\n{location}  }}\n}}\n")


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light; .ci/run does it)")
def test_two_replicas_behind_nginx_keep_sessions_on_one_replica(tmp_path):
    volume = load_volume(BUNDLED / "demo_abdomen.nrrd")
    replicas = [ServerProcess(tmp_path / f"sessions-{name}", name=name) for name in ("gpu0", "gpu1")]
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_config(tmp_path, port, [r.port for r in replicas]))
    proxy = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(tmp_path)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/healthz", timeout=2).read()
                break
            except OSError:
                time.sleep(0.1)
        sessions = []
        # nginx places the replicas on its hash ring by address (random ports here): open sessions until both
        # replicas hold some (at least four sessions; 24 all on one replica would be a broken hash, p ≈ 1e-7)
        for seed in range(24):
            if len(sessions) >= 4 and len({s[3] for s in sessions}) == 2:
                break
            array = volume.array.copy()
            array[0, 0, seed] += 7 + seed
            vol = Volume(array, volume.spacing, volume.origin, volume.direction, name=f"v{seed}")
            engine = RemoteEngine.connect(url)
            session = open_session(None, vol)
            image = extract_slice(vol, "axial", 12)
            seen = {engine.ask(session, "Segment the left kidney.", image).replica,
                    engine.ask(session, "Now the lesion inside it.", image).replica}
            assert len(seen) == 1, f"session {seed} was served by {seen}"
            sessions.append((engine, session, vol, seen.pop()))
        assert {s[3] for s in sessions} == {"gpu0", "gpu1"}  # the hash spreads the volumes over both

        # one replica dies: its sessions go on at the other, with their rounds re-sent by the clients
        engine, session, vol, home = sessions[0]
        dead = next(r for r in replicas if r.proc.args[-1] == home)
        dead.kill9()
        result = engine.ask(session, "Segment the organ that stores bile.", extract_slice(vol, "axial", 12))
        assert result.round.number == 3 and result.replica != home
        sid = engine._sids[vol.fingerprint()]
        listed = engine.client.call("GET", f"/v1/sessions/{sid}/rounds", volume=vol.fingerprint())[1]["rounds"]
        assert [r["digest"] for r in listed] == [round_digest(r) for r in session.rounds]
    finally:
        proxy.terminate()
        proxy.wait(20)
        for r in replicas:
            r.stop()
