#!/usr/bin/env bash
# After stage 1 of MediRound-Tiny: stage 2 (JCM), β on val, export (to weights/mediround-tiny), then quality and
# speed measurements. RUN names the training folder (phase E, tiny as shipped until issue 23: runs/tiny5); stage 2 there trains a residual correction on the same
# mixture and reference noise as stage 1.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
M=.venv/bin/mediround
RUN=${RUN:-runs/tiny5}
# Stage 2 three ways on the same stage-1 weights: the plain correction loss; --correction-focus (loss weighted by
# 1 - IoU of the unrefined mask); and focus with --correction-context (the correction also sees the first decode).
# Each gets its β on val; the one whose JCM gains most on val is shipped.
S2="--stage 2 --init $RUN/stage1/checkpoint --batch-size 8 --save-every 50 \
  --residual-correction --reference-noise 0.3 --data train+train-long"
declare -A FLAGS=([plain]="" [focus]="--correction-focus" [context]="--correction-focus --correction-context")
declare -A STEPS=([plain]=250 [focus]=250 [context]=500)  # the context projection starts from zero: more steps
declare -A DIRS=([plain]="$RUN" [focus]="$RUN/focus" [context]="$RUN/context")
VARIANTS=${VARIANTS:-plain focus context}
for v in $VARIANTS; do $M train --out "${DIRS[$v]}" $S2 --steps "${STAGE2_STEPS:-${STEPS[$v]}}" ${FLAGS[$v]}; done
SEL=".venv/bin/python -m MediRoundCore.evaluate.select_beta --limit ${BETA_LIMIT:-80}"
for v in $VARIANTS; do
  $SEL --checkpoint "${DIRS[$v]}/stage2/checkpoint" --out "benchmarks/jcm_beta_val_$v.md" | tee "runs/beta_$v.log"
done
gain() { grep "^beta $(tail -1 "$1" | awk '{print $3}')" "$1" | sed -E 's/.*Dice ([0-9.]+) \(JCM off ([0-9.]+)\)/\1 \2/' | awk '{print $1 - $2}'; }
CHOSEN=""; BEST=""; GAINS=""
for v in $VARIANTS; do
  g=$(gain "runs/beta_$v.log"); GAINS="$GAINS $v $g"
  if [ -z "$BEST" ] || awk -v a="$g" -v b="$BEST" 'BEGIN{exit !(a > b)}'; then CHOSEN=$v; BEST=$g; fi
done
echo "chosen: $CHOSEN (JCM gain on val:$GAINS)"
bash runs/ship.sh "${DIRS[$CHOSEN]}/stage2/checkpoint" "$CHOSEN"
