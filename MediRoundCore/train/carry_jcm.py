"""Carry a trained JCM onto a stage-1 model that went on training after the JCM was trained on it.

Stage 2 trains only the JCM (`jcm.*`) on a frozen stage-1 model's rounds; everything else of a shipped model is
its stage 1. A short continuation of stage 1 (a few hundred steps at a small learning rate, e.g. to teach one
more kind of answer) moves the masks the JCM judges very little, so its JCM can be carried over instead of
collected and trained again: the result has the continued model's weights, config and tokenizer, and the JCM
weights and settings (β included) of the model it came from. Measure the result as any model to ship
(runs/ship.sh); retrain the JCM (runs/finish_lite.sh) after a longer continuation.

    python -m MediRoundCore.train.carry_jcm runs/lite-ft/checkpoint MediRoundCore/weights/mediround-lite \\
        runs/lite-ft-jcm        # then: python -m MediRoundCore.train.export runs/lite-ft-jcm
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import CheckpointError
from ..model.answer_drafts import DRAFTS_FILE
from ..model.modeling import MediRound
from ..reference_scorer import CONFIG_FILE, WEIGHTS_FILE
from .folders import check_destination, copy_file_groups, write_folder

JCM_PREFIX = "jcm."
KEPT_FILES = ((CONFIG_FILE, WEIGHTS_FILE), (DRAFTS_FILE,))  # beside a model's weights, each group from one folder:
# stage 1's where it has it, else the JCM donor's


def config_differences(first: MediRound, second: MediRound, ignore=()) -> list[str]:
    """The config fields two models differ in (sorted), beside `ignore` and whether LoRA was applied."""
    skip = {*ignore, "lora_applied"}
    mine, theirs = ({k: v for k, v in m.config.to_dict().items() if k not in skip} for m in (first, second))
    return sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))


def carry_jcm(stage1: str | Path, jcm_from: str | Path, out: str | Path) -> Path:
    """Write to `out` the model of folder `stage1` with the JCM of folder `jcm_from`; returns `out`."""
    check_destination(out, inputs=(stage1, jcm_from))  # before loading two models
    model, tokenizer = MediRound.from_pretrained(stage1)
    donor, _ = MediRound.from_pretrained(jcm_from)
    differ = config_differences(model, donor, ignore=("jcm",))
    if differ:
        raise CheckpointError(f"{stage1} and {jcm_from} are not the same model beyond the JCM (they differ in "
                              f"{', '.join(differ)})")
    if not any(k.startswith(JCM_PREFIX) for k in donor.state_dict()):
        raise CheckpointError(f"{jcm_from} has no JCM weights to carry")
    model.config.jcm = donor.config.jcm
    model.jcm = donor.jcm  # its weights and its layout (a refiner the stage-1 config may not have)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, tokenizer)
        copy_file_groups(KEPT_FILES, (stage1, jcm_from), tmp)

    return write_folder(out, write, inputs=(stage1, jcm_from))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m MediRoundCore.train.carry_jcm", description=__doc__.split("\n")[0])
    p.add_argument("stage1", help="the continued stage-1 model folder (e.g. a run's checkpoint)")
    p.add_argument("jcm_from", help="the model folder whose JCM to carry (e.g. the shipped model)")
    p.add_argument("out")
    args = p.parse_args(argv)
    try:
        print(carry_jcm(args.stage1, args.jcm_from, args.out))
    except (CheckpointError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
