"""The Slicer module inside the real PythonQt of Slicer 5.8 (../shared/pythonqt), as real processes: `qt` is
PythonQt's, `slicer` is slicer-core's MRML and slicer.util plus tests/pythonqt/slicer_shim.py. The Qt event loop
runs and the main thread holds the GIL while it idles, as in Slicer."""

import sys

import pytest

from MediRoundCore.checkpoint_info import default_model_name  # no torch import
from pythonqt_host import MISSING, BUILD, describe, run_script

if not BUILD.is_file():
    pytest.skip(MISSING, allow_module_level=True)
if sys.version_info[:2] != (3, 11):
    pytest.skip("PythonQt host tests skipped: the host embeds Python 3.11, this venv runs another",
                allow_module_level=True)
# Guards against starvation: "a few seconds" for a later Ask, with room for a machine doing other work. Measured here (2 cores shared with other jobs):
# quiet, first Ask ~6 s (it loads the model: imports torch and transformers), later Asks 0.3-0.7 s; at load 9,
# 28 s and 3-16 s (median 7), about what the same host gives with the GIL released while Qt idles
# (PQ_THREADS=1: 25 s and 11-14 s). The old 50 ms poll without lending the GIL: 133-139 s, later 20-37 s.
FIRST_ASK_S = 60.0
LATER_ASK_MEDIAN_S = 5.0
# One Ask on a slice encoded ahead (a single sample, so with room): 0.2-0.4 s quiet, up to 3.5 s at load 3-4.
AHEAD_ASK_S = 10.0


def test_multi_round_session_through_the_panel(tmp_path):
    done, result = run_script("host_panel_session.py", tmp_path, exec_ms=240000, timeout=400)
    assert done.returncode == 0 and result is not None, describe(done)
    assert result["errors"] == [] and result["left_steps"] == 0, result
    asks = result["asks"]
    assert [a["entity"] for a in asks] == ["left kidney", "lesion in the left kidney", "gallbladder", "left kidney"]
    assert all(a["slice"] == ["axial", 12] for a in asks)
    assert asks[0]["seconds"] < FIRST_ASK_S, asks
    assert sorted(a["seconds"] for a in asks[1:])[1] < LATER_ASK_MEDIAN_S, asks
    # the interface stays responsive: each poll lends the GIL for up to 15 ms (+ up to Python's 5 ms switch
    # interval to get it back), then Qt runs again. Measured: median 20 ms, p99 48 ms (the worst, 0.46 s, while
    # the worker imports torch and loads the model, which hold the GIL)
    # scrolled to slice 14 and asked at once: the Ask encodes; scrolled to slice 10 and waited: the panel encoded
    # it ahead (the worker got the GIL through the same poll), and the Ask ran no encoder
    slice_asks, scrolls = result["slice_asks"], result["scrolls"]
    assert [a["slice"] for a in slice_asks] == [["axial", 14], ["axial", 10]], slice_asks
    assert [s["ahead"] for s in scrolls] == [False, True]
    assert scrolls[0]["prepare_seconds"] is None and scrolls[1]["prepare_seconds"] is not None, scrolls
    assert scrolls[1]["prepare_seconds"] < FIRST_ASK_S, scrolls
    assert "segmenter_encoder_ms" in slice_asks[0]["encoders"] and slice_asks[1]["encoders"] == [], slice_asks
    assert slice_asks[1]["seconds"] < AHEAD_ASK_S, slice_asks
    assert result["poll_calls"] > 10 and result["poll_ms_median"] <= 40, result
    assert result["poll_ms_p99"] <= 500, result
    assert result["after_undo"] == [2, ["MediRound_R1", "MediRound_R2"]]
    assert result["saved_file"] and result["saved_status"].startswith("Saved demo.seg.nrrd")
    assert result["saved_segments"] == ["R1: left kidney", "R2: lesion in the left kidney"]  # after the undo
    assert result["after_new"] == [0, "MediRound: demo_abdomen (earlier session)", True]
    # model combo: index 1 asks for a folder, index 0 is the bundled model again; JCM off disables beta
    bundled = f"Bundled {default_model_name()}"  # named as its folder is (tests/test_slicer_panel.py pins it)
    assert result["controls"] == [str(tmp_path / "checkpoint"), None, False, True, bundled]
    assert (tmp_path / "saved" / "demo.mediround" / "session.json").is_file()


def test_panel_without_torch_offers_install_then_answers_without_restart(tmp_path):
    done, result = run_script("host_panel_install.py", tmp_path, exec_ms=120000, block="torch,transformers",
                              timeout=300)
    assert done.returncode == 0 and result is not None, describe(done)
    setup = result["setup"]
    assert not setup["torch_imported"] and not setup["transformers_imported"]
    assert setup["has_selector"] and setup["beta"] == setup["shipped_beta"] == 0.9
    assert "press Ask to install" in setup["status"] and "PyTorch" in setup["status"]
    assert len(result["offers"]) == 1 and "Install now?" in result["offers"][0]
    assert result["installed"] == ["torch>=2.1", "transformers>=4.57"]
    assert result["rounds"] == [["Segment the liver.", "liver"]], result
    assert result["status"].startswith("R1 done"), result


@pytest.mark.parametrize("block", ["torch,transformers", ""], ids=["build-tree-without-torch", "with-torch"])
def test_module_self_test_runs_in_the_host(tmp_path, block):
    """MediRoundTest, as Slicer's Reload and Test and slicer_add_python_unittest run it (the generic tests of a
    Slicer build tree have no torch: the self-test then uses the threshold stand-in engine)."""
    done, result = run_script("host_module_selftest.py", tmp_path, block=block, timeout=300)
    assert done.returncode == 0 and result is not None, describe(done)
    assert result["run"] == 1 and result["failures"] == [], result["failures"]
    assert result["torch_imported"] == (block == "")
    assert ("stand-in" in result["engine"]) == (block != "")
