#!/usr/bin/env bash
# Ship a stage-2 checkpoint as the default model: β on val (never test), export (to the bundled folder of its
# size, which must be DEFAULT_CHECKPOINT's), then the speed and quality
# measurements, the panel screenshot and the README overlays.
#   bash runs/ship.sh CHECKPOINT NAME   # NAME labels the β sweep: benchmarks/jcm_beta_val_NAME.md
#   BETA=0.9 bash runs/ship.sh CHECKPOINT  # keep a β chosen before (the JCM was not retrained)
#   CONFIGS=ind+jcm,ind-nojcm,resolver+jcm  # the hard-split configs (default: all, with the ablations)
#   MEASURE_ONLY=1 SWEEP=lite bash runs/ship.sh  # only the measurements, of the default model as exported
#                                                # (SWEEP: its β sweep becomes benchmarks/jcm_beta_val.md)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
if [ -n "${MEASURE_ONLY:-}" ]; then  # the default model as already exported (e.g. by runs/finish_lite.sh)
  [ $# -eq 0 ] || { echo "MEASURE_ONLY takes no arguments (the sweep's NAME, if any, as SWEEP=NAME)" >&2; exit 2; }
  if [ -n "${SWEEP:-}" ]; then cp "benchmarks/jcm_beta_val_$SWEEP.md" benchmarks/jcm_beta_val.md; fi
else
CKPT=${1:?usage: $0 CHECKPOINT NAME}
if [ -z "${BETA:-}" ]; then
  NAME=${2:?usage: $0 CHECKPOINT NAME}
  if [ ! -f "runs/beta_$NAME.log" ] || [ -n "${RESWEEP:-}" ]; then
    .venv/bin/python -m MediRoundCore.evaluate.select_beta --checkpoint "$CKPT" --limit "${BETA_LIMIT:-80}" \
      --out "benchmarks/jcm_beta_val_$NAME.md" | tee "runs/beta_$NAME.log"
  fi
  cp "runs/beta_$NAME.log" runs/beta.log
  cp "benchmarks/jcm_beta_val_$NAME.md" benchmarks/jcm_beta_val.md  # the shipped model's sweep
  BETA=$(tail -1 runs/beta.log | awk '{print $3}')
fi
echo "shipping $CKPT with beta $BETA"
DEST=$(.venv/bin/python -m MediRoundCore.train.export "$CKPT" --beta "$BETA" | tail -1)  # weights/mediround-<size>
DEFAULT=$(.venv/bin/python -c "from MediRoundCore.checkpoint_info import DEFAULT_CHECKPOINT as d; print(d)")
if [ "$(realpath "$DEST")" != "$(realpath "$DEFAULT")" ]; then
  echo "exported to $DEST, which is not the default model ($DEFAULT): the measurements below are of the" \
       "default; switch DEFAULT_CHECKPOINT (checkpoint_info.py) first, then MEASURE_ONLY=1 bash runs/ship.sh" >&2
  exit 1
fi
fi
env -u OMP_WAIT_POLICY .venv/bin/mediround bench  # timed as a user runs it (PASSIVE slows small steps 2-3x)
.venv/bin/mediround eval --split hard --limit "${EVAL_LIMIT:-500}" --threads 2 --out benchmarks \
  --configs "${CONFIGS:-ind+jcm,ind-nojcm,resolver+jcm,noref,nohistory,prevround}"
.venv/bin/mediround eval --sets paraphrase,absent,real,variants --set-limit 40 --split hard --threads 2 --out benchmarks
.venv/bin/mediround eval --split regular --limit "${REGULAR_LIMIT:-150}" --threads 2 --configs ind+jcm,ind-nojcm,resolver+jcm --out benchmarks/regular
QT_QPA_PLATFORM=offscreen .venv/bin/python MediRoundSlicer/make_screenshot.py
.venv/bin/mediround demo --out demo_output --overwrite
cp demo_output/round_0*.png docs/demo/  # the README overlays
