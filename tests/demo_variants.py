"""The demo variants (MediRoundCore/evaluate/demo_variants.py) and what the shipped model measured on them: the
floors of the behaviour tests."""

from MediRoundCore.evaluate.demo_variants import (DEMO_VARIANTS, KINDS, demo_variant, dice,  # noqa: F401
                                                  run_demo_dialogue)

# Measured on the bundled volume (float32, CPU, 2026-12-03, the model shipped for issue 23: MediRound-Lite, stage 1
# step 5150 + the refining JCM at beta 0.9, runs/train_lite.sh and runs/finish_lite.sh): Dice per round 0.844 /
# 0.915 / 0.988 / 0.994 (left kidney, lesion in it, gallbladder, spleen); the same to the third decimal on every
# permuted and flipped copy and on the 176x256 crop. Floors: the measured values minus 0.05.
MEASURED = (0.844, 0.915, 0.988, 0.994)
FLOORS = tuple(round(m - 0.05, 3) for m in MEASURED)

# Variants the shipped model does not yet answer within 0.05 of the original (QUALITY.md, "Same anatomy, other
# field of view or orientation"): the largest per-round difference measured. The behaviour test expects them to
# fail, strictly, so a model that fixes one makes it say so. Both are the tightest cuts into the body: the lesion
# in the kidney (round 2) loses Dice when little of the abdomen around it is on the slice.
NOT_YET: dict[str, str] = {
    "cut_200x160_offcentre": "round 2 (the lesion) 0.828 against 0.915 on the whole slice (difference 0.086)",
    "cut_136x144_tight": "round 2 (the lesion) 0.798 against 0.915 on the whole slice (difference 0.117)",
}
