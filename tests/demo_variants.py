"""The demo variants (MediRoundCore/evaluate/demo_variants.py) and what the shipped model measured on them: the
floors of the behaviour tests."""

from MediRoundCore.evaluate.demo_variants import (DEMO_VARIANTS, KINDS, demo_variant, dice,  # noqa: F401
                                                  run_demo_dialogue)

# Measured on the bundled volume (float32, CPU, 2026-12-02, the model shipped for issues 26 and 23: phase P,
# runs/train_tiny.sh): Dice per round 0.848 / 0.921 / 0.961 / 0.973 (left kidney, lesion in it, gallbladder,
# spleen); the same to the third decimal on every permuted and flipped copy and on the 176x256 crop. Floors: the
# measured values minus 0.05.
MEASURED = (0.848, 0.921, 0.961, 0.973)
FLOORS = tuple(round(m - 0.05, 3) for m in MEASURED)

# Variants the shipped model does not yet answer within 0.05 of the original (QUALITY.md, "Same anatomy, other
# field of view or orientation"): the largest per-round difference measured. The behaviour test expects them to
# fail, strictly, so a model that fixes one makes it say so. Phase P answers every variant within 0.029.
NOT_YET: dict[str, str] = {}
