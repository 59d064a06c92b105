"""The Slicer panel (offscreen under PySide6: the real .ui, real logic and MRML) on a real `mediround serve`:
"Server: URL + token" sends the Red view's slice to the server, the round becomes a segment here and stays in
the local autosaved session, the panel shows the server's model and device; emptying the field goes back to
the local model."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "MediRoundSlicer"), str(ROOT)]

slicer = pytest.importorskip("slicer")
pytest.importorskip("PySide6.QtUiTools")
pytest.importorskip("fastapi")

import MediRound  # noqa: E402
from MediRoundCore.checkpoint_info import DEFAULT_CHECKPOINT, checkpoint_beta, checkpoint_size  # noqa: E402
from MediRoundCore.remote.client import RemoteError, ServerClient  # noqa: E402
from MediRoundCore.remote.protocol import round_digest  # noqa: E402
from MediRoundCore.session import Session  # noqa: E402
from MediRoundLib import qt, segments  # noqa: E402
from MediRoundLib.panel import ChatPanel  # noqa: E402
from MediRoundLib.testing import add_slice_node, add_volume, show_plane  # noqa: E402
from PySide6.QtCore import Qt  # noqa: E402
from PySide6.QtTest import QTest  # noqa: E402
from server_helpers import ALICE, ServerProcess, write_tokens  # noqa: E402

UI = ROOT / "MediRoundSlicer" / "Resources" / "UI" / "MediRound.ui"


def test_panel_asks_a_server_and_goes_back_to_local(tmp_path):
    server = ServerProcess(tmp_path / "server-sessions", tokens=write_tokens(tmp_path))
    app = qt.app_instance()
    scene = slicer.vtkMRMLScene()
    array = np.full((10, 48, 40), -1000, np.int16)
    array[2:8, 10:36, 8:30] = 60
    node = add_volume(scene, array, (0.9, 0.9, 2.0), (0, 0, 0), np.eye(3), name="phantom")
    show_plane(add_slice_node(scene), "axial", [5.0, 5.0, 2.0 * 4])

    def no_local_model(checkpoint):
        raise AssertionError("the local model must not load while a server is set")

    logic = MediRound.MediRoundLogic(scene=scene, sessions_dir=tmp_path / "sessions", engine_factory=no_local_model)
    root = qt.load_ui(UI)
    chat = ChatPanel(root, logic)
    root.show()
    try:
        chat.set_volume(node)
        chat.ui.serverEdit.setText(server.url)
        chat.ui.tokenEdit.setText(ALICE)
        QTest.keyClick(chat.ui.tokenEdit, Qt.Key_Return)
        assert logic.server_url == server.url and "connects on the next Ask" in chat.ui.deviceLabel.text()
        assert not chat.ui.modelCombo.isEnabled()
        chat.ui.queryEdit.setText("Segment the liver.")
        QTest.mouseClick(chat.ui.askButton, Qt.LeftButton)
        assert chat.wait(60), chat.ui.statusLabel.text()
        assert "R1 done" in chat.ui.statusLabel.text(), chat.ui.statusLabel.text()
        assert chat.ui.deviceLabel.text() == f"server {server.url}: {DEFAULT_CHECKPOINT.name} ({checkpoint_size()}) on CPU (1 threads)"
        assert chat.ui.betaSpinBox.value() == pytest.approx(checkpoint_beta())  # the shipped model's
        (r1,) = logic.session.rounds
        assert (r1.view, r1.slice_index) == ("axial", 4)
        assert segments.segment_ids(logic.segmentation_node) == ["MediRound_R1"]
        saved = Session.load(logic.session.folder)  # the local autosave holds the round
        client = ServerClient(server.url, token=ALICE)
        sid = client.call("POST", "/v1/sessions", body={"fingerprint": logic.session.volume_fingerprint})[1]
        assert [r["digest"] for r in sid["rounds"]] == [round_digest(r) for r in saved.rounds]
        # back to local: the field emptied
        chat.ui.serverEdit.setText("")
        QTest.keyClick(chat.ui.serverEdit, Qt.Key_Return)
        assert logic.server_url is None and logic.engine is None and chat.ui.modelCombo.isEnabled()
        assert "model not loaded yet" in chat.ui.deviceLabel.text()
        # a token is never sent over plain http to another machine
        with pytest.raises(RemoteError, match="refusing to send the token over plain HTTP"):
            logic.set_server("http://gpu.example.org:8765", ALICE)
        assert logic.server_url is None
    finally:
        chat.shutdown()
        logic.shutdown()
        root.close()
        server.stop()
