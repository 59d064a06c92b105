"""Probe: how much of a demo crop's per-round Dice is the patch grid's phase? (issue 26, notes of 2026-12-02)

The tiny model's encoders cut the 256² frame into 16-px patches. A crop smaller than the field is padded and
centred, so the same anatomy lands at another offset from the patch grid than in the full slice. Here the tight
136×144 crop is placed at every offset (dy, dx) in 0..15 from its centred position (every consumer moves with it:
`processing.pad_offsets` is the one placement) and the demo dialogue's Dice per round is printed, with the
original's. If the spread over offsets is as large as the crop-vs-original differences, placing slices on a
phase fixed in patient coordinates would make crops answer as the full slice does.

    .venv/bin/python runs/probe/frame_phase.py [variant]
"""

import sys

import numpy as np

import MediRoundCore.model.processing as processing
from MediRoundCore.engine import Engine
from MediRoundCore.evaluate.demo_variants import run_demo_dialogue

name = sys.argv[1] if len(sys.argv) > 1 else "cut_136x144_tight"
engine = Engine.load(device="cpu")
centred = processing.pad_offsets
print("original", [round(d, 3) for d in run_demo_dialogue(engine, "original")])
rows = []
for dy in range(0, 16, 3):
    for dx in range(0, 16, 3):
        def shifted(input_hw, size, dy=dy, dx=dx):
            top, left = centred(input_hw, size)
            room_y, room_x = size - int(input_hw[0]), size - int(input_hw[1])
            return min(top + dy, room_y), min(left + dx, room_x)
        processing.pad_offsets = shifted
        engine.forget()
        rows.append(run_demo_dialogue(engine, name))
        print(name, (dy, dx), [round(d, 3) for d in rows[-1]])
processing.pad_offsets = centred
rows = np.array(rows)
print("per round min / max over offsets:", rows.min(0).round(3), rows.max(0).round(3))
