"""Render the panel offscreen (PySide6) after a real 3-round session → Resources/Screenshots/panel.png.

    QT_QPA_PLATFORM=offscreen python MediRoundSlicer/make_screenshot.py

Uses the bundled default model when its weights exist, else an untrained random tiny model (the caption says
which). The volume is the bundled demo abdomen; the Red view is set on its middle axial slice.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

import numpy as np  # noqa: E402

import MediRound  # noqa: E402
from MediRoundCore.checkpoint_info import default_model_name  # noqa: E402
from MediRoundCore.engine import DEFAULT_CHECKPOINT, Engine  # noqa: E402
from MediRoundCore.imaging import load_volume  # noqa: E402
from MediRoundLib import qt  # noqa: E402
from MediRoundLib.panel import ChatPanel  # noqa: E402
from MediRoundLib.testing import add_slice_node, add_volume, show_plane  # noqa: E402

QUERIES = ["Segment the left kidney.", "Now the lesion inside it.", "Segment the organ that stores bile."]  # the demo dialogue


def main(out=ROOT / "Resources" / "Screenshots" / "panel.png"):
    import slicer

    app = qt.app_instance()
    trained = (DEFAULT_CHECKPOINT / "config.json").is_file() or any(DEFAULT_CHECKPOINT.glob("*.safetensors"))
    engine = Engine.load() if trained else Engine.random_tiny(seed=0)
    caption = (f"Bundled {default_model_name()} weights." if trained else
               "Untrained random tiny model (trained weights not bundled yet): the answers are noise.")
    volume = load_volume(ROOT / "MediRoundCore" / "data" / "bundled" / "demo_abdomen.nrrd")
    scene = slicer.vtkMRMLScene()
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    node = add_volume(scene, volume.array, volume.spacing, lps_to_ras @ np.asarray(volume.origin),
                      lps_to_ras @ volume.direction, name="demo_abdomen")
    red = add_slice_node(scene)
    k = volume.array.shape[0] // 2
    m = volume.ijk_to_lps()
    show_plane(red, "axial", lps_to_ras @ (m @ np.r_[0, 0, k, 1.0])[:3])
    with tempfile.TemporaryDirectory() as tmp:
        logic = MediRound.MediRoundLogic(scene=scene, sessions_dir=tmp, engine_factory=lambda c: engine)
        container = qt.QWidget()
        layout = qt.QVBoxLayout(container)
        root = qt.load_ui(HERE / "Resources" / "UI" / "MediRound.ui")
        root.volumeLabel.setText("Volume:  demo_abdomen")
        layout.addWidget(root)
        note = qt.QLabel(f"<small><i>Rendered offscreen from a real 3-round session. {caption}</i></small>")
        note.setWordWrap(True)
        layout.addWidget(note)
        chat = ChatPanel(root, logic)
        chat.set_volume(node)
        container.resize(440, 720)
        container.show()
        for query in QUERIES:
            chat.ui.queryEdit.setText(query)
            chat.on_ask()
            chat.wait(600)
        chat.ui.queryEdit.setText("Now segment the spleen.")
        app.processEvents()
        out.parent.mkdir(parents=True, exist_ok=True)
        container.grab().save(str(out))
        logic.shutdown()
    print(f"wrote {out} ({caption})")


if __name__ == "__main__":
    main()
