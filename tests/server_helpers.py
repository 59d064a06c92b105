"""Real `mediround serve` processes on loopback for the server tests (started with the CLI, as a user would)."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef01"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tokens(folder: Path) -> Path:
    path = folder / "tokens"
    path.write_text(f"# user:token\nalice:{ALICE}\nbob:{BOB}\n")
    path.chmod(0o600)
    return path


class ServerProcess:
    """`python -m MediRoundCore.cli serve …` on 127.0.0.1:port; `url`, `stop()`, `kill9()`."""

    def __init__(self, sessions: Path, port: int | None = None, tokens: Path | None = None, name: str = "",
                 extra: list[str] | None = None, log: Path | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "MediRoundCore.cli", "serve", "--port", str(self.port), "--sessions",
               str(sessions), "--threads", "1"] + (["--token-file", str(tokens)] if tokens else []) \
            + (["--name", name] if name else []) + (extra or [])
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.log = log or sessions.parent / f"server-{self.port}.log"
        self._log_handle = open(self.log, "ab")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log_handle, stderr=subprocess.STDOUT)
        self.wait_ready()

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                    if json.loads(r.read()).get("ok"):
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"server did not start in {timeout} s: {self.log.read_text()[-2000:]}")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill9()
        self._log_handle.close()


def raw_request(url: str, method: str = "GET", headers: dict | None = None, data: bytes | None = None):
    """(status, headers, JSON body) of one plain urllib request: what any HTTP client would see."""
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.headers, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, json.loads(exc.read() or b"{}")


class StandIn:
    """A plain http.server on loopback that stands in for a MediRound server of protocol `protocol` (it answers
    GET as `server/app.py`'s /v1/info does), or, with `redirect_to`, for a server that redirects there. `seen`
    records (path, Authorization header) of every request; `url`, `stop()`."""

    def __init__(self, protocol: int = 1, redirect_to: str = ""):
        seen: list[tuple[str, str | None]] = []
        self.seen = seen

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                seen.append((self.path, self.headers.get("Authorization")))
                if redirect_to:
                    self.send_response(307)
                    self.send_header("Location", redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps({"server": "mediround", "protocol": protocol}).encode()
                self.send_response(200)
                self.send_header("X-MediRound-Protocol", str(protocol))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
