#!/usr/bin/env bash
# Stage 1 of MediRound-Lite continued on a lent GPU (session 46; runs/probe/gpu_stage1.py says why and how).
# The device takes 64 MiB a call: the tracked weights stay behind (`git rm --cached` the three model.safetensors of
# weights/mediround-lite, weights/mediround-tiny and runs/lite-snapshot for the calls, list the first two in
# .git/info/exclude, `git reset` them after), the float16 base weights go in two calls, and the machine keeps what a
# call left in /root/stash while it is warm (30 s between calls).
#   bash runs/probe/gpu_stage1.sh pack     # here: .gpu/ (float16 base weights, segment_anything's code)
#   bash runs/probe/gpu_stage1.sh stash    # device call 1 (carry .gpu/minilm .gpu/site; runs/lite-snapshot's
#                                          # weights moved aside: .gitignore lets them travel): MiniLM kept, smoke test
#   bash runs/probe/gpu_stage1.sh train    # device call 2 (carry .gpu/lms .gpu/site; the snapshot back in place)
#   bash runs/probe/gpu_stage1.sh unpack D # here: the returned parts in D -> runs/lite-gpu/snapshot
# Session 48: `merge` (here, after `pack`, which empties .gpu/) writes .gpu/start, session 46's continuation with
# step 5150's image side; then
# `FROM=.gpu/start FREEZE="vision_tower mm_projector" ... train` (carry .gpu/start too; both snapshots' weights moved
# aside) trains the rest against that image side.
# Then here: `python -m MediRoundCore.train.snapshot restore runs/lite-gpu/snapshot runs/lite-gpu/stage1`,
# `train.carry_jcm runs/lite-gpu/stage1 MediRoundCore/weights/mediround-lite runs/lite-gpu/jcm`, copy the bundled
# lesion_finder.* beside it, and gate on real slices first (runs/probe/real_lung_slices.py), then the hard split.
# Session 46 (DEADLINE=560, one H200): 748 steps of 32 dialogues (5150 -> 5898) in 501 s; better on every generated
# set, but it answered "not on this slice" for both lungs on two of lung1's slices: not shipped (design notes);
# kept in runs/lite-gpu-snapshot; a quarter of it ships, blended with step 5150 (runs/blend_lite.sh).
# Session 48 (merge, FREEZE="vision_tower mm_projector", DEADLINE=530, PEAK=1e-4): 732 steps (5898 -> 6630);
# real lungs 73.5, hard seed 1 85.7 / 90.1: no better than the shipped blend, not kept (design notes).
set -euo pipefail
cd "$(dirname "$0")/../.."
STASH=${STASH:-/root/stash} PY=${PY:-python3}
export STASH
case "${1:-}" in
  pack)
    rm -rf .gpu && mkdir -p .gpu/minilm .gpu/lms .gpu/site
    .venv/bin/python - <<'EOF'
import shutil, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
from MediRoundCore.checkpoints import base_weights
from MediRoundCore.checkpoints.safety import load_tensors
m = base_weights.locate("minilm"); d = Path(".gpu/minilm") / m.name; d.mkdir()
save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(m / "model.safetensors").items()},
          str(d / "model.safetensors"))
for f in ("config.json", "tokenizer.json"):
    shutil.copy2(m / f, d / f)
l = base_weights.locate("lite_medsam"); d = Path(".gpu/lms") / l.name; d.mkdir()
torch.save({k: v.half() if v.is_floating_point() else v for k, v in load_tensors(l / "lite_medsam.pth").items()},
           d / "lite_medsam.pth")
EOF
    cp -r "$(.venv/bin/python -c 'import importlib.util as u; print(u.find_spec("segment_anything").submodule_search_locations[0])')" \
      .gpu/site/
    du -sh .gpu/* ;;
  merge)  # here: runs/lite-gpu-snapshot with runs/lite-snapshot's image side -> .gpu/start
    rm -rf .gpu/start .gpu/merged && mkdir -p .gpu/merged
    .venv/bin/python - <<'EOF'
import torch
from safetensors.torch import save_file
from MediRoundCore.train.snapshot import load_snapshot, save_snapshot
from MediRoundCore.train.trainer import STATE_FILE
late, step = load_snapshot("runs/lite-gpu-snapshot")
early, _ = load_snapshot("runs/lite-snapshot")
image = ("vision_tower.", "mm_projector.")
merged = {k: (early[k] if k.startswith(image) else v).float().contiguous() for k, v in late.items()}
print("image-side tensors from step 5150:", sum(k.startswith(image) for k in merged), "of", len(merged))
save_file(merged, ".gpu/merged/model.safetensors")
torch.save({"optimizer": {}, "scheduler": {}, "step": step}, ".gpu/merged/" + STATE_FILE)
print(save_snapshot(".gpu/merged", ".gpu/start"))
EOF
    cp runs/lite-gpu-snapshot/config.json .gpu/start/ && rm -rf .gpu/merged && du -sh .gpu/start ;;
  stash)  # on the device
    mkdir -p $STASH/base && cp -r .gpu/minilm/* $STASH/base/
    nvidia-smi --query-gpu=name,memory.used --format=csv || true
    PYTHONPATH=.gpu/site:. MEDIROUND_BASE_WEIGHTS=$STASH/base $PY - <<'EOF'
import torch, transformers, accelerate, numpy
from pathlib import Path
from MediRoundCore.checkpoints import base_weights
base_weights.verify = lambda path, expected: Path(path)
from MediRoundCore.model.lite import lite_tokenizer, lite_config
from MediRoundCore.model.modeling import MediRound
from MediRoundCore.model.text_encoder import load_minilm_weights
from MediRoundCore.model.tokenizer import TokenIds
tok = lite_tokenizer(); m = MediRound(lite_config(len(tok)), TokenIds.from_tokenizer(tok))
load_minilm_weights(m.query_encoder, base_weights.locate("minilm") / "model.safetensors")
m = m.to("cuda" if torch.cuda.is_available() else "cpu"); print("built", sum(p.numel() for p in m.parameters()))
print("torch", torch.__version__, torch.cuda.is_available(), "transformers", transformers.__version__,
      "accelerate", accelerate.__version__, "numpy", numpy.__version__, "vocab", len(lite_tokenizer()))
EOF
    ;;
  train)  # on the device: DEADLINE seconds of training, then the snapshot, in parts, to $OUT
    cp -r .gpu/lms/* $STASH/base/
    rm -rf $STASH/run $STASH/snap  # a run left by an earlier call would be resumed, ahead of the snapshot
    export PYTHONPATH=.gpu/site:. PYTHONUNBUFFERED=1
    # shellcheck disable=SC2086  # FREEZE is a list of prefixes
    $PY runs/probe/gpu_stage1.py --base $STASH/base --deadline "${DEADLINE:-400}" --peak-lr "${PEAK:-1.2e-4}" \
      ${FREEZE:+--freeze $FREEZE} --workers "${WORKERS:-13}" -- --out $STASH/run --steps 100000 --lr 1e-4 --batch-size "${BATCH:-32}" \
      --pool-slices "${SLICES:-6000}" --views 2 --save-every 300 --threads 2 --long-share 0.5 --dice-weight 2.0 \
      --new-views 100000 --from-snapshot "${FROM:-runs/lite-snapshot}" > $STASH/train.log 2>&1 || failed=1
    tr "\r" "\n" < $STASH/train.log | grep -v "^stage 1:" | tail -60  # without tqdm's bar
    cp $STASH/run/log_stage1.csv "$OUT"/
    [ -z "${failed:-}" ] || { echo "training failed: no snapshot made" >&2; exit 1; }
    MEDIROUND_BASE_WEIGHTS=$STASH/base $PY - <<'EOF'
import os
from pathlib import Path
from MediRoundCore.checkpoints import base_weights
base_weights.verify = lambda path, expected: Path(path)
from MediRoundCore.train.snapshot import save_snapshot
print(save_snapshot(os.environ["STASH"] + "/run/checkpoint", os.environ["STASH"] + "/snap"))
EOF
    cp $STASH/snap/snapshot.json "$OUT"/
    split -b 15M -d $STASH/snap/model.safetensors "$OUT"/part ;;
  unpack)
    mkdir -p runs/lite-gpu/snapshot
    cat "$2"/part* > runs/lite-gpu/snapshot/model.safetensors
    cp "$2"/snapshot.json runs/lite-gpu/snapshot/ && cp "$2"/log_stage1.csv runs/lite-gpu/ || true
    cp runs/lite-snapshot/config.json runs/lite-gpu/snapshot/ ;;
  *) echo "usage: $0 pack | stash | train | unpack DIR" >&2; exit 2 ;;
esac
