#!/usr/bin/env bash
# Background training of MediRound-Tiny stage 1 (resumable): what produced the previous default model.
# Phase A (runs/tiny, 450 steps, paper loss weights) collapsed to empty masks: from scratch the segmenter
# needs a stronger overlap term. Phase B (runs/tiny2, 1700 steps) continued from phase A's weights with Dice
# weight 2.0. Phase C (runs/tiny3) continues from phase B on the train+train-long mixture (long dialogues,
# reach-backs and distractors as often as in the hard split, train templates only), with 30 % of reference
# masks perturbed like predictions (grown, shrunk, shifted, cut) so later rounds learn to live with imperfect ones.
# Phase D (runs/tiny4, 2000 steps from phase C, lr 1.5e-4) is phase C for longer. Phase E (runs/tiny5,
# resumable: rerun to continue) continues phase D at lr 1e-4 for 3000 steps: the shipped model
# (`RUN=runs/tiny5 bash runs/finish.sh`) until issue 26. Phase F (runs/tiny6, from the shipped model, JCM kept
# frozen) adds random field-of-view crops to half the dialogues (`--fov-crop 0.5`: mostly non-square, off-centre,
# cutting into the body, every target whole); stopped at step 700 (runs/tiny6_700). Phase G (runs/tiny7, from
# phase F's step 700) adds absent-target rounds and paraphrased queries. Phase H (runs/tiny8) continues phase G
# with more crops (60 %) at a lower rate. Phases G and H answered "Segment the spleen." in round 2 with "not on
# this slice": their absent rounds were the only later direct requests. Phase I (runs/tiny9, from phase H) adds
# present direct requests beside the absent ones, every inserted round referring to the one before: the model
# shipped for issues 26 and 23 (`BETA=0.9 CONFIGS=ind+jcm,ind-nojcm,resolver+jcm bash runs/ship.sh
# runs/tiny9/stage1/checkpoint`; the JCM is the one of phase E's model, frozen since). Phase J (runs/tiny10, from
# the shipped phase I model) is phase I with the crops shown at the training scale and padded
# (`field_of_view_mm` in the config: a crop keeps the size of its anatomy, as a real scan's slice does). Phase K
# (runs/tiny11, from J) adds absent first rounds, rounds that ask again for an earlier structure (`--repeat`), and
# references that skip rounds answered absent, as the product's resolver now does, and tighter crops (sides
# from 0.35 of the slice's: J still lost part of the gallbladder 12 px from the tight demo crop's cut). Phase L
# (runs/tiny12, from K) has more crops (60 %) and repeats (25 %): K had not learnt to answer a repeated request.
# Phase M (runs/tiny13, from L) trains on inserted rounds that renumber the rounds they follow
# (data/inserted_rounds.py; J-L's answers still cited stale round numbers), with more and tighter crops (70 %,
# sides from 0.3): L still lost 0.05 of the gallbladder next to the 256 x 176 demo crop's cut; stopped at step 300
# (runs/tiny13_300; not shipped: two cut demo crops now differ by more than 0.05, upwards, and no hard-split gain)
# for phase N (runs/tiny14, from M's step 300), which adds the references a user gets: half of the dialogues refer
# where the product's resolver reads them from the text (`--product-references 0.5`, targets unchanged), as the
# hard split with the product's references scored 81.7 against 88.2 with the dataset's. N's steps 1-250 ran before
# repeated-structure rounds kept their reference under --product-references (2d36077); it was resumed from step 250.
# N was not shipped: no gain with the product's references, and a reach-back of the demo answered with its reference.
# Phase O (runs/tiny15, from L, L's data) shows every crop where it lay in the whole slice, as the engine now shows
# a cropped scan at its place in patient coordinates (model/field_placement.py) instead of centring it.
# Phase P (runs/tiny16, from L, 200 steps at lr 3e-5) is phase O shorter and slower: the least change to L that
# adapts it to the placement (O moved further from L than the placement needs: see the design notes).
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
PHASE=${PHASE:-C}
case $PHASE in
  B) exec nice -n -10 .venv/bin/mediround train --out runs/tiny2 --stage 1 --init runs/tiny/stage1/checkpoint \
       --steps "${STEPS:-1700}" --batch-size 8 --save-every 50 --dice-weight 2.0 ;;
  C) exec nice -n -10 .venv/bin/mediround train --out runs/tiny3 --stage 1 --init runs/tiny2/stage1/checkpoint \
       --steps "${STEPS:-2500}" --lr 2e-4 --batch-size 8 --save-every 50 --dice-weight 2.0 --data train+train-long \
       --reference-noise 0.3 ;;
  D) exec nice -n -10 .venv/bin/mediround train --out runs/tiny4 --stage 1 --init runs/tiny3/stage1/checkpoint \
       --steps "${STEPS:-2000}" --lr 1.5e-4 --batch-size 8 --save-every 50 --dice-weight 2.0 --data train+train-long \
       --reference-noise 0.3 ;;
  E) exec nice -n -10 .venv/bin/mediround train --out runs/tiny5 --stage 1 --init runs/tiny4/stage1/checkpoint \
       --steps "${STEPS:-3000}" --lr 1e-4 --batch-size 8 --save-every 50 --dice-weight 2.0 --data train+train-long \
       --reference-noise 0.3 ;;
  F) exec nice -n -5 .venv/bin/mediround train --out runs/tiny6 --stage 1 --init MediRoundCore/weights/mediround-tiny \
       --steps "${STEPS:-1200}" --lr 1e-4 --batch-size 8 --save-every 50 --dice-weight 2.0 --data train+train-long \
       --reference-noise 0.3 --fov-crop 0.5 ;;
  G) exec nice -n -5 .venv/bin/mediround train --out runs/tiny7 --stage 1 --init runs/tiny6_700 \
       --steps "${STEPS:-800}" --lr 1e-4 --batch-size 8 --save-every 50 --dice-weight 2.0 --data train+train-long \
       --reference-noise 0.3 --fov-crop 0.5 --absent 0.1 --paraphrase 0.3 ;;
  H) exec nice -n -5 .venv/bin/mediround train --out runs/tiny8 --stage 1 --init runs/tiny7/stage1/checkpoint \
       --steps "${STEPS:-600}" --lr 7e-5 --batch-size 8 --save-every 50 --dice-weight 2.0 --data train+train-long \
       --reference-noise 0.3 --fov-crop 0.6 --absent 0.1 --paraphrase 0.3 ;;
  I) exec nice -n -5 .venv/bin/mediround train --out runs/tiny9 --stage 1 --init runs/tiny8/stage1/checkpoint \
       --steps "${STEPS:-400}" --lr 5e-5 --batch-size 8 --save-every 50 --dice-weight 2.0 --data train+train-long \
       --reference-noise 0.3 --fov-crop 0.5 --absent 0.1 --paraphrase 0.3 ;;
  J) exec nice -n -5 .venv/bin/mediround train --out runs/tiny10 --stage 1 --init MediRoundCore/weights/mediround-tiny \
       --steps "${STEPS:-600}" --lr 5e-5 --batch-size 8 --save-every 50 --dice-weight 2.0 --data train+train-long \
       --reference-noise 0.3 --fov-crop 0.5 --absent 0.1 --paraphrase 0.3 ;;
  K) exec nice -n -5 .venv/bin/mediround train --out runs/tiny11 --stage 1 --init runs/tiny10/stage1/checkpoint \
       --steps "${STEPS:-600}" --lr 5e-5 --batch-size 8 --save-every 50 --dice-weight 2.0 --data train+train-long \
       --reference-noise 0.3 --fov-crop 0.5 --fov-min-side 0.35 --absent 0.12 --paraphrase 0.3 --repeat 0.1 ;;
  L) exec nice -n -5 .venv/bin/mediround train --out runs/tiny12 --stage 1 --init runs/tiny11/stage1/checkpoint \
       --steps "${STEPS:-600}" --lr 5e-5 --batch-size 8 --save-every 50 --dice-weight 2.0 --data train+train-long \
       --reference-noise 0.3 --fov-crop 0.6 --fov-min-side 0.35 --absent 0.12 --paraphrase 0.3 --repeat 0.25 ;;
  M) exec nice -n -5 .venv/bin/mediround train --out runs/tiny13 --stage 1 --init runs/tiny12/stage1/checkpoint \
       --steps "${STEPS:-800}" --lr 5e-5 --batch-size 8 --save-every 50 --dice-weight 2.0 --data train+train-long \
       --reference-noise 0.3 --fov-crop 0.7 --fov-min-side 0.3 --absent 0.12 --paraphrase 0.3 --repeat 0.25 ;;
  N) exec nice -n -5 .venv/bin/mediround train --out runs/tiny14 --stage 1 --init runs/tiny13/stage1/checkpoint \
       --steps "${STEPS:-600}" --lr 5e-5 --batch-size 8 --save-every 50 --dice-weight 2.0 --data train+train-long \
       --reference-noise 0.3 --fov-crop 0.6 --fov-min-side 0.3 --absent 0.12 --paraphrase 0.3 --repeat 0.25 \
       --product-references 0.5 ;;
  O) exec nice -n -5 .venv/bin/mediround train --out runs/tiny15 --stage 1 --init runs/tiny12/stage1/checkpoint \
       --steps "${STEPS:-400}" --lr 5e-5 --batch-size 8 --save-every 50 --dice-weight 2.0 --data train+train-long \
       --reference-noise 0.3 --fov-crop 0.6 --fov-min-side 0.35 --absent 0.12 --paraphrase 0.3 --repeat 0.25 ;;
  P) exec nice -n -5 .venv/bin/mediround train --out runs/tiny16 --stage 1 --init runs/tiny12/stage1/checkpoint \
       --steps "${STEPS:-200}" --lr 3e-5 --batch-size 8 --save-every 50 --dice-weight 2.0 --data train+train-long \
       --reference-noise 0.3 --fov-crop 0.6 --fov-min-side 0.35 --absent 0.12 --paraphrase 0.3 --repeat 0.25 ;;
esac
