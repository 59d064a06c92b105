"""Probe: a stage-1 checkpoint blended from two of the same model, (1 − α)·A + α·B tensor by tensor (weight-space
ensembling of a model and its fine-tuned continuation, as WiSE-FT does), then the shipped JCM carried onto it.

    .venv/bin/python runs/probe/weight_blend.py A_STAGE1 B_STAGE1 ALPHA OUT

A and B are checkpoint folders (`python -m MediRoundCore.train.snapshot restore SNAPSHOT FOLDER`); OUT gets the
blend's stage 1 in OUT/stage1 and, with the bundled model's JCM, reference scorer, lesion finder and answer drafts,
a folder `Engine.load` and `mediround eval --checkpoint` take in OUT/model. Session 46: A the shipped step 5150,
B the GPU continuation (runs/probe/gpu_stage1.sh, runs/lite-gpu-snapshot), α 0.25 (design notes).
"""

import shutil
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from MediRoundCore.engine import DEFAULT_CHECKPOINT

a_folder, b_folder, alpha, out = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4])
a, b = load_file(str(a_folder / "model.safetensors")), load_file(str(b_folder / "model.safetensors"))
if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
    raise SystemExit(f"{a_folder} and {b_folder} are not checkpoints of the same model")
stage1 = out / "stage1"
shutil.rmtree(stage1, ignore_errors=True)
shutil.copytree(b_folder, stage1)
save_file({k: ((1 - alpha) * a[k].float() + alpha * b[k].float()).to(a[k].dtype) if a[k].is_floating_point() else b[k]
           for k in a}, str(stage1 / "model.safetensors"))
model = out / "model"
subprocess.run([sys.executable, "-m", "MediRoundCore.train.carry_jcm", str(stage1), str(DEFAULT_CHECKPOINT), str(model)],
               check=True)
for extra in ("lesion_finder.json", "lesion_finder.safetensors", "answer_drafts.json"):
    if (DEFAULT_CHECKPOINT / extra).is_file() and not (model / extra).is_file():
        shutil.copy2(DEFAULT_CHECKPOINT / extra, model / extra)
print(model)
