#!/usr/bin/env bash
# Cached stage 2 (JCM) on the shipped stage-1 weights: collect the frozen model's rounds once, train the JCM
# for many steps on them, rank the variants offline on val rounds, then sweep β on val with the multi-round protocol.
#   bash runs/jcm_cached.sh collect   # on-policy rounds of 2000 train-long dialogues (two shards; N per shard) + 200
#                                     # val ones (N_VAL per shard); INIT: the frozen stage-1 model, OUT: the folder
#   bash runs/jcm_cached.sh images    # add the segmenter images to feature files collected without them
#   bash runs/jcm_cached.sh train     # the variants (resumable), each with its offline table on the val rounds
#                                     # (VARIANTS, STEPS, LR, BATCH, DICE: the correction's Dice weight; TAG: folder suffix;
#                                     #  FOCUS= for the plain, unweighted correction loss; PRECISION: auto, bf16 or fp32;
#                                     #  batches of whole dialogues, each image decoded once for its rounds)
#   bash runs/jcm_cached.sh sweep V   # β on val (80 dialogues, multi-round) for variant V
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
PY=.venv/bin/python
INIT=${INIT:-MediRoundCore/weights/mediround-tiny}
OUT=${OUT:-runs/jcm}
FEATURES=${FEATURES:-$OUT/pred_0.safetensors,$OUT/pred_1.safetensors}
VAL=$OUT/val_0.safetensors,$OUT/val_1.safetensors
STEPS=${STEPS:-3000}
declare -A FLAGS=([plain]="" [context]="--correction-context" [attention]="--correction-context --correction-attention"
                 [refiner]="--correction-refiner")
case "${1:-}" in
  collect)
    N=${N:-1000}  # train-long dialogues per shard (two shards, one per core)
    for i in 0 1; do  # a shard whose file is there is done (files are written whole, at the end)
      [ -f "$OUT/pred_$i.safetensors" ] && continue
      $PY -m MediRoundCore.train.jcm_features --checkpoint "$INIT" --split train-long --start $((i * N)) \
        --dialogues "$N" --out "$OUT/pred_$i.safetensors" > "$OUT/collect_$i.log" 2>&1 &
    done
    wait
    for i in 0 1; do  # val dialogues 100-299: the β sweep uses 0-79
      [ -f "$OUT/val_$i.safetensors" ] && continue
      $PY -m MediRoundCore.train.jcm_features --checkpoint "$INIT" --split val --start $((100 + i * 100)) \
        --dialogues "${N_VAL:-100}" --out "$OUT/val_$i.safetensors" > "$OUT/collect_val_$i.log" 2>&1 &
    done
    wait ;;
  images)  # two at a time (dialogue generation is CPU work)
    for f in ${FILES:-$OUT/val_0 $OUT/val_1 $OUT/pred_0 $OUT/pred_1}; do
      $PY -m MediRoundCore.train.jcm_features --add-images "$f.safetensors" &
      (( $(jobs -r | wc -l) >= 2 )) && wait -n
    done
    wait ;;
  train)
    for v in ${VARIANTS:-plain context attention}; do
      # one process on the cores: OpenMP's default (active) wait, not PASSIVE, which doubled a step's time
      env -u OMP_WAIT_POLICY .venv/bin/mediround train --out "$OUT/$v${TAG:-}" --stage 2 --init "$INIT" --features "$FEATURES" --steps "$STEPS" \
        --batch-size "${BATCH:-32}" --lr "${LR:-1e-3}" --save-every 250 --residual-correction ${FOCUS---correction-focus} \
        --dice-weight "${DICE:-2.0}" --precision "${PRECISION:-auto}" ${FLAGS[$v]} 2> "$OUT/$v${TAG:-}.train.log"
      $PY -m MediRoundCore.evaluate.jcm_offline --checkpoint "$OUT/$v${TAG:-}/stage2/checkpoint" --features "$VAL" \
        | tee "$OUT/$v${TAG:-}.offline.md.tmp"
      mv "$OUT/$v${TAG:-}.offline.md.tmp" "$OUT/$v${TAG:-}.offline.md"  # whole: a rerun skips only a finished table
    done ;;
  sweep)
    $PY -m MediRoundCore.evaluate.select_beta --checkpoint "$OUT/$2/stage2/checkpoint" --limit "${BETA_LIMIT:-80}" \
      --out "${SWEEP_OUT:-benchmarks/jcm_beta_val_cached_$2.md}" | tee "$OUT/beta_$2.log.tmp"
    tail -1 "$OUT/beta_$2.log.tmp" | grep -q "^chosen beta " && mv "$OUT/beta_$2.log.tmp" "$OUT/beta_$2.log" ;;
  *) echo "usage: $0 collect | train | sweep VARIANT" >&2; exit 2 ;;
esac
