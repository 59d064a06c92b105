#!/usr/bin/env bash
# The shipped MediRound-Lite from the two stage-1 runs the repository carries, blended in weight space
# (MediRoundCore/train/weight_blend.py): (1 − ALPHA) · runs/lite-snapshot (5,150 steps on two CPU cores) +
# ALPHA · runs/lite-gpu-snapshot (its continuation on a lent H200, to step 5898), each part in PARTS at its own α,
# with the bundled model's JCM carried (train/carry_jcm.py). Session 47 shipped ALPHA 0.25 with the mask decoder
# all the way (the defaults; design notes: "What ships: a blend by part").
#   bash runs/blend_lite.sh                  # -> runs/lite-blend/model; gate it, then:
#   BETA=0.9 CONFIGS=ind+jcm,ind-nojcm,resolver+jcm bash runs/ship.sh runs/lite-blend/model
#   ALPHA=0.5 PARTS="--part vision_tower=0" bash runs/blend_lite.sh   # other blends, for probes (PARTS replaces
#                                                                      # the default part, it does not add to it)
# The JCM is the bundled model's: after a retrained JCM is exported, this makes that model's blend, not session
# 47's. Gate a blend on real lungs first (.venv/bin/python runs/probe/real_lung_slices.py runs/lite-blend/model).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/lite-blend} ALPHA=${ALPHA:-0.25} PY=${PY:-.venv/bin/python}
PARTS=${PARTS-"--part segmenter.mask_decoder=1"}  # set PARTS= (empty) for one α everywhere
BUNDLED=MediRoundCore/weights/mediround-lite
$PY -m MediRoundCore.train.snapshot restore runs/lite-snapshot "$OUT/a"
$PY -m MediRoundCore.train.snapshot restore runs/lite-gpu-snapshot "$OUT/b"
# shellcheck disable=SC2086  # PARTS is a list of options
$PY -m MediRoundCore.train.weight_blend "$OUT/a" "$OUT/b" "$ALPHA" "$OUT/stage1" $PARTS
$PY -m MediRoundCore.train.carry_jcm "$OUT/stage1" "$BUNDLED" "$OUT/model"
for f in lesion_finder.json lesion_finder.safetensors; do  # export keeps the bundled one; this is for a gate first
  [ -f "$OUT/model/$f" ] || cp "$BUNDLED/$f" "$OUT/model/$f"
done
echo "$OUT/model"
