"""The demo variants (MediRoundCore/evaluate/demo_variants.py) and what the shipped model measured on them: the
floors of the behaviour tests."""

from MediRoundCore.evaluate.demo_variants import (DEMO_VARIANTS, KINDS, demo_variant, dice,  # noqa: F401
                                                  run_demo_dialogue)

# Measured on the bundled volume (float32, CPU, 2026-12-04, the model shipped for issue 23: MediRound-Lite, stage 1
# a blend of step 5150 and its GPU continuation, runs/blend_lite.sh, + the refining JCM at beta 0.9): Dice per round
# 0.844 / 0.939 / 0.987 / 0.995 (left kidney, lesion in it, gallbladder, spleen); the same to the third decimal on
# every permuted and flipped copy and on the 176x256 crop. Floors: the measured values minus 0.05.
MEASURED = (0.844, 0.939, 0.987, 0.995)


def _floors(measured: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(round(m - 0.05, 3) for m in measured)


FLOORS = _floors(MEASURED)

# Variants the shipped model does not yet answer within 0.05 of the original (QUALITY.md, "Same anatomy, other
# field of view or orientation"): what it measured on each, round by round. The behaviour test holds them to their
# own floors (measured minus 0.05) and expects the difference to the original to stay over 0.05, so a drop is
# caught and a model that fixes one makes the test say so. None since session 47: the blend's mask decoder keeps
# the lesion round of the two tightest cuts into the body (200x160 off-centre, 136x144) within 0.05 (0.907, 0.894).
NOT_YET: dict[str, tuple[float, ...]] = {}


def floors_of(name: str) -> tuple[float, ...]:
    """The per-round floors a variant is held to: its own where it is not yet the original's."""
    return _floors(NOT_YET[name]) if name in NOT_YET else FLOORS
