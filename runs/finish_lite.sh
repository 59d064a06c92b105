#!/usr/bin/env bash
# After lite stage 1 (runs/train_lite.sh): the JCM on cached on-policy rounds of the frozen stage-1 model (the
# shipped tiny model's recipe: residual correction + refiner, runs/jcm_cached.sh with lite's folders), β on val,
# and the export to MediRoundCore/weights/mediround-lite (int8 word-embedding deltas: ~37 MB). Then switch
# DEFAULT_CHECKPOINT (checkpoint_info.py) and run runs/ship.sh's measurements on it.
#   bash runs/finish_lite.sh freeze     # runs/lite/checkpoint -> $STAGE1, with the reference scorer and drafts
#   bash runs/finish_lite.sh collect    # ~2.3 MB a dialogue (its segmenter embedding and image); N, N_VAL per shard
#   bash runs/finish_lite.sh train      # VARIANTS (default refiner), STEPS, BATCH, LR as in jcm_cached.sh
#   bash runs/finish_lite.sh sweep      # β on val for VARIANT (default refiner)
#   bash runs/finish_lite.sh export
#   bash runs/finish_lite.sh all        # the five in order, each skipped when its output is there (rerun after a
#                                       # session ends: collect restarts a shard whose file is missing, train resumes)
set -euo pipefail
cd "$(dirname "$0")/.."
export INIT=${STAGE1:-runs/lite-stage1} OUT=${OUT:-runs/lite-jcm}
VARIANT=${VARIANT:-refiner}
case "${1:-}" in
  freeze)
    mkdir -p "$INIT"
    cp runs/lite/checkpoint/{config.json,model.safetensors,tokenizer.json,tokenizer_config.json} "$INIT"/
    cp MediRoundCore/weights/mediround-tiny/reference_scorer.* "$INIT"/  # model-independent (reference_scorer.py)
    [ -f runs/lite/answer_drafts.json ] || .venv/bin/python -m MediRoundCore.model.answer_drafts "$INIT"
    [ -f runs/lite/answer_drafts.json ] && cp runs/lite/answer_drafts.json "$INIT"/
    echo "$INIT" ;;
  collect|train) mkdir -p "$OUT"; VARIANTS=${VARIANTS:-$VARIANT} bash runs/jcm_cached.sh "$1" ;;
  sweep) SWEEP_OUT=${SWEEP_OUT:-benchmarks/jcm_beta_val_lite.md} bash runs/jcm_cached.sh sweep "$VARIANT" ;;
  export)
    BETA=$(tail -1 "$OUT/beta_$VARIANT.log" | awk '{print $3}')
    cp "$INIT"/reference_scorer.* "$INIT"/answer_drafts.json "$OUT/$VARIANT/stage2/checkpoint"/  # kept by export
    .venv/bin/python -m MediRoundCore.train.export "$OUT/$VARIANT/stage2/checkpoint" --beta "$BETA" \
      --dest MediRoundCore/weights/mediround-lite ;;
  all)
    stamp() { echo "== $(date -u +%H:%M) $*"; }
    [ -f "$INIT/model.safetensors" ] || { stamp freeze; bash "$0" freeze; }
    [ -f "$OUT/pred_0.safetensors" ] && [ -f "$OUT/pred_1.safetensors" ] && [ -f "$OUT/val_0.safetensors" ] \
      && [ -f "$OUT/val_1.safetensors" ] || { stamp collect; bash "$0" collect; }
    [ -f "$OUT/$VARIANT.offline.md" ] || { stamp train; bash "$0" train; }
    [ -f "$OUT/beta_$VARIANT.log" ] || { stamp sweep; bash "$0" sweep; }
    stamp export; bash "$0" export; stamp done ;;
  *) echo "usage: $0 freeze | collect | train | sweep | export | all" >&2; exit 2 ;;
esac
