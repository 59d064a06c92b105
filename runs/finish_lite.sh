#!/usr/bin/env bash
# After lite stage 1 (runs/train_lite.sh): the JCM on cached on-policy rounds of the frozen stage-1 model (the
# shipped tiny model's recipe: residual correction + refiner, runs/jcm_cached.sh with lite's folders), β on val,
# and the export to MediRoundCore/weights/mediround-lite (int8 word-embedding deltas: ~37 MB). Then switch
# DEFAULT_CHECKPOINT (checkpoint_info.py) and run runs/ship.sh's measurements on it.
#   bash runs/finish_lite.sh freeze     # runs/lite/checkpoint -> $STAGE1, with the reference scorer and drafts, once
#                                       # stage 1 reached STAGE1_STEPS (5150) and stopped (FORCE=1: at any step);
#                                       # on a fresh clone, from the committed runs/lite-snapshot
#   bash runs/finish_lite.sh collect    # ~2.3 MB a dialogue (its segmenter embedding and image); N, N_VAL per shard
#   bash runs/finish_lite.sh train      # VARIANTS (default refiner), STEPS, BATCH, LR as in jcm_cached.sh
#   bash runs/finish_lite.sh sweep      # β on val for VARIANT (default refiner)
#   bash runs/finish_lite.sh export
#   bash runs/finish_lite.sh all        # the five in order, each skipped when its output is there (rerun after a
#                                       # session ends: collect restarts a shard whose file is missing, train resumes)
# (A fresh clone's runs/lite-snapshot holds step 5800 since session 40: runs/finetune_lite.sh, then
# train/carry_jcm.py, replaces freeze-collect-train for a short continuation.)
set -euo pipefail
SELF=$(realpath "$0")
cd "$(dirname "$SELF")/.."
export INIT=${STAGE1:-runs/lite-stage1} OUT=${OUT:-runs/lite-jcm}
VARIANT=${VARIANT:-refiner}
case "${1:-}" in
  freeze)
    if [ -f runs/lite/checkpoint/trainer_state.pt ]; then  # this machine's run
      step=$(.venv/bin/python -c "from MediRoundCore.train.trainer import load_trainer_state as l
print(l('runs/lite/checkpoint/trainer_state.pt')['step'])")
    else  # a fresh clone: the run as committed (runs/lite-snapshot)
      step=$(.venv/bin/python -c "from MediRoundCore.train.snapshot import snapshot_step as s
print(s('runs/lite-snapshot'))")
    fi
    if [ "$step" -lt "${STAGE1_STEPS:-5150}" ] || pgrep -f "MediRoundCore.train.lite" > /dev/null; then
      [ -n "${FORCE:-}" ] || { echo "stage 1 is at step $step of ${STAGE1_STEPS:-5150} or still running: let it" \
        "finish (bash runs/train_lite.sh), or FORCE=1" >&2; exit 1; }
    fi
    tmp=$(mktemp -d "$INIT.tmp.XXXX")
    if [ -f runs/lite/checkpoint/trainer_state.pt ]; then
      cp runs/lite/checkpoint/{config.json,model.safetensors,tokenizer.json,tokenizer_config.json} "$tmp"/
    else
      .venv/bin/python -m MediRoundCore.train.snapshot restore runs/lite-snapshot "$tmp"
    fi
    # the stage-1 JCM is untrained: recorded so (a run started before config.jcm.trained existed did not)
    .venv/bin/python -c "import json, sys; p = sys.argv[1]; c = json.load(open(p)); c['jcm']['trained'] = False
open(p, 'w').write(json.dumps(c, indent=2) + '\\n')" "$tmp/config.json"
    cp MediRoundCore/weights/mediround-tiny/reference_scorer.* "$tmp"/  # model-independent (reference_scorer.py)
    mkdir -p runs/lite
    [ -f runs/lite/answer_drafts.json ] || { .venv/bin/python -m MediRoundCore.model.answer_drafts "$tmp" \
      && cp "$tmp/answer_drafts.json" runs/lite/; }
    cp runs/lite/answer_drafts.json "$tmp"/
    rm -rf "$INIT" && mv "$tmp" "$INIT"
    echo "$INIT (stage 1 step $step)" ;;
  # FOCUS empty: the refiner learns from the plain correction loss (design notes: with the 1 - IoU weighting it
  # learned almost nothing)
  collect|train) mkdir -p "$OUT"; FOCUS=${FOCUS-} VARIANTS=${VARIANTS:-$VARIANT} bash runs/jcm_cached.sh "$1" ;;
  sweep) SWEEP_OUT=${SWEEP_OUT:-benchmarks/jcm_beta_val_lite.md} bash runs/jcm_cached.sh sweep "$VARIANT" ;;
  export)
    BETA=$(tail -1 "$OUT/beta_$VARIANT.log" | awk '{print $3}')
    cp "$INIT"/reference_scorer.* "$INIT"/answer_drafts.json "$OUT/$VARIANT/stage2/checkpoint"/  # kept by export
    .venv/bin/python -m MediRoundCore.train.export "$OUT/$VARIANT/stage2/checkpoint" --beta "$BETA" \
      --dest MediRoundCore/weights/mediround-lite ;;
  all)
    stamp() { echo "== $(date -u +%H:%M) $*"; }
    [ -f "$INIT/model.safetensors" ] || { stamp freeze; bash "$SELF" freeze; }
    [ -f "$OUT/pred_0.safetensors" ] && [ -f "$OUT/pred_1.safetensors" ] && [ -f "$OUT/val_0.safetensors" ] \
      && [ -f "$OUT/val_1.safetensors" ] || { stamp collect; bash "$SELF" collect; }
    [ -f "$OUT/$VARIANT.offline.md" ] || { stamp train; bash "$SELF" train; }
    [ -f "$OUT/beta_$VARIANT.log" ] || { stamp sweep; bash "$SELF" sweep; }  # written whole, ending "chosen beta"
    stamp export; bash "$SELF" export; stamp done ;;
  *) echo "usage: $0 freeze | collect | train | sweep | export | all" >&2; exit 2 ;;
esac
