"""Runs Python scripts inside the PythonQt host that ../shared/pythonqt/build.sh builds (the PythonQt of
Slicer 5.8, initialised as CTK does, without thread support), as real processes. Used by the real-host tests
and benchmarks/bench_slicer_host.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "pythonqt"


def _build_script() -> Path:
    """../shared/pythonqt/build.sh beside the repository (for a git worktree: beside its main checkout);
    PYTHONQT_BUILD_SH overrides."""
    if os.environ.get("PYTHONQT_BUILD_SH"):
        return Path(os.environ["PYTHONQT_BUILD_SH"])
    candidates = [ROOT.parent / "shared" / "pythonqt" / "build.sh"]
    try:
        common = subprocess.run(["git", "rev-parse", "--path-format=absolute", "--git-common-dir"], cwd=ROOT,
                                capture_output=True, text=True, timeout=30).stdout.strip()
        if common:
            candidates.append(Path(common).parent.parent / "shared" / "pythonqt" / "build.sh")
    except (OSError, subprocess.SubprocessError):
        pass
    return next((c for c in candidates if c.is_file()), candidates[0])


BUILD = _build_script()
MISSING = f"PythonQt host not available: {BUILD} is absent (the real-host Slicer tests need ../shared)"


class HostUnavailable(RuntimeError):
    pass


def host_env() -> dict:
    """PQHOST, PQ_PYLIB, XDG_RUNTIME_DIR from build.sh --env (which builds the host once per machine)."""
    if not BUILD.is_file():
        raise HostUnavailable(MISSING)
    done = subprocess.run(["bash", str(BUILD), "--env"], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"building the PythonQt host failed:\n{done.stderr[-3000:]}")
    env = {}
    for word in done.stdout.split():  # export PQHOST='...' PQ_PYLIB='...' XDG_RUNTIME_DIR='...'
        if "=" in word:
            key, value = word.split("=", 1)
            env[key] = value.strip("'")
    return env


def run_script(script: str, out_dir: Path, exec_ms: int | None = None, block: str = "", timeout: float = 300,
               extra_env: dict | None = None, site_packages: str | None = None) -> tuple[subprocess.CompletedProcess, dict | None]:
    """Run tests/pythonqt/<script> in the host; returns (process, the PQRESULT json or None)."""
    env = dict(os.environ)
    env.update(host_env())
    env.update(QT_QPA_PLATFORM="offscreen", MEDIROUND_ROOT=str(ROOT), MEDIROUND_OUT=str(out_dir),
               MEDIROUND_SITE=site_packages or sysconfig.get_paths()["purelib"], MEDIROUND_BLOCK=block,
               PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPATH", None)
    env.update(extra_env or {})
    cmd = [env["PQHOST"], str(SCRIPTS / script)] + (["--exec", str(exec_ms)] if exec_ms else [])
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=str(out_dir))
    result = None
    for line in done.stdout.splitlines():
        if line.startswith("PQRESULT "):
            result = json.loads(line[len("PQRESULT "):])
    return done, result


def describe(done: subprocess.CompletedProcess) -> str:
    return f"rc={done.returncode}\n--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}"


if __name__ == "__main__":  # python tests/pythonqt_host.py SCRIPT [EXEC_MS]
    import tempfile
    proc, res = run_script(sys.argv[1], Path(tempfile.mkdtemp()), int(sys.argv[2]) if len(sys.argv) > 2 else None)
    print(describe(proc))
