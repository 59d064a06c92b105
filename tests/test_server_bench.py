"""benchmarks/bench_server.py end to end with a real server process, tiny counts and the random model: it
writes its own RESULTS.md section with a row per client count and the lost / mixed-up check. No timing asserts."""

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
pytest.importorskip("fastapi")

import _bench  # noqa: E402
import bench_server  # noqa: E402


def test_server_benchmark_writes_its_section(tmp_path):
    (tmp_path / "RESULTS.md").write_text(_bench.HEADER + "\n<!-- cpu -->\nkept\n<!-- /cpu -->\n")
    result = bench_server.run(["--clients", "1,2", "--rounds", "2", "--random", "--threads", "1",
                               "--out", str(tmp_path)])
    assert [p["clients"] for p in result["passes"]] == [1, 2]
    assert all(p["rounds"] == 2 * p["clients"] and p["lost"] == 0 and p["mixed"] == 0 for p in result["passes"])
    section = _bench.read_section(tmp_path / "RESULTS.md", "server")
    assert "| 1 | 2 |" in section and "| 2 | 4 |" in section and "No lost or mixed-up rounds: **PASS**" in section
    assert "kept" in (tmp_path / "RESULTS.md").read_text()
