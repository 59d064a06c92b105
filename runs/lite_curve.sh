#!/usr/bin/env bash
# A point of the lite run's learning curve: snapshot runs/lite/checkpoint (with the shipped reference scorer, which
# is model-independent, and answer drafts) and evaluate it on small sets; reports land in runs/lite/eval/step<N>/.
#   bash runs/lite_curve.sh            # hard split 20 dialogues (JCM off: lite's JCM is not trained yet; with a
#                                      # blank reference too: does the model read the reference? with round tags
#                                      # the blank also leaves the round unnamed),
#                                      # paraphrase and absent sets 10 dialogues each, the real set
set -euo pipefail
cd "$(dirname "$0")/.."
SNAP=$(mktemp -d runs/lite/eval/snapshot.XXXX)  # copied first: the run may save a newer checkpoint meanwhile
cp runs/lite/checkpoint/{config.json,model.safetensors,tokenizer.json,tokenizer_config.json,trainer_state.pt} "$SNAP"/
STEP=$(.venv/bin/python -c "from MediRoundCore.train.trainer import load_trainer_state as l; print(l('$SNAP/trainer_state.pt')['step'])")
DIR=runs/lite/eval/step$STEP
rm -rf "$DIR" && rm "$SNAP/trainer_state.pt" && mv "$SNAP" "$DIR"
cp MediRoundCore/weights/mediround-tiny/reference_scorer.* "$DIR"/
# answer drafts depend on the tokenizer alone (MiniLM's, every step): made once, copied into each snapshot
[ -f runs/lite/answer_drafts.json ] || { .venv/bin/python -m MediRoundCore.model.answer_drafts "$DIR" \
  && cp "$DIR/answer_drafts.json" runs/lite/; }
cp runs/lite/answer_drafts.json "$DIR"/
.venv/bin/mediround eval --checkpoint "$DIR" --split hard --limit "${HARD:-20}" --configs ind-nojcm,resolver-nojcm,noref-nojcm \
  --threads 2 --out "$DIR/hard" --quiet --records
# the sets run the ind+jcm protocol; β 0 leaves every mask uncorrected (the untrained JCM scores above 0)
.venv/bin/mediround eval --checkpoint "$DIR" --sets paraphrase,absent,real --set-limit "${SETS:-10}" --split hard \
  --threads 2 --out "$DIR/sets" --quiet --beta 0
echo "$DIR"
