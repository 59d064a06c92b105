"""Probe: hard-split Dice with the Bayes reference choice of runs/probe/reference_ceiling.py (the round the
generator most probably referred to, knowing the whole scene and the split's policy) in place of the product's.
Writes a copy of a generated split whose guessed rounds ('ind' and their MASK-ENCODE/BOX-ENCODE tags) point to
that round; rounds the rules decide keep the dataset's. Evaluate it with the dataset-reference config:

    PYTHONPATH=$PWD python runs/probe/reference_ceiling_dice.py ~/.cache/mediround/splits/hard-seed1 /work/bayes1
    python -m MediRoundCore.evaluate.run --data /work/bayes1 --limit 0 --configs ind+jcm --records --no-plot
"""

import json
import re
import sys
from pathlib import Path

from MediRoundCore.data.dialogues import _Geometry
from MediRoundCore.data.splits import _params, make_dialogue
from MediRoundCore.references import named_round

sys.path.insert(0, str(Path(__file__).parent))
from reference_ceiling import bayes_reference, generator_posterior  # noqa: E402


def main():
    source, dest = Path(sys.argv[1]), Path(sys.argv[2])
    split, seed = re.fullmatch(r"(\w+)-seed(\d+)", source.name).groups()
    params = _params(split)
    dest.mkdir(parents=True, exist_ok=True)
    for sub in ("images", "masks"):
        if not (dest / sub).exists():
            (dest / sub).symlink_to(source / sub)
    data = json.loads((source / f"{split}.json").read_text())
    changed = 0
    for index, obj in enumerate(data):
        dlg = make_dialogue(split, int(seed), index)
        geo = _Geometry(dlg.slice)
        entities = [r.entity for r in dlg.rounds]
        turns = obj["conversations"]
        masks = [re.search(r"\[MASK-DECODE:([^\]]+)\]", turns[2 * r + 1]["value"]).group(1)
                 for r in range(len(dlg.rounds))]
        for k in range(1, len(dlg.rounds)):
            if dlg.rounds[k].ref is None or named_round(dlg.rounds[k].query, entities[:k]) is not None:
                continue
            ref = bayes_reference(generator_posterior(dlg, geo, k, params)[0])
            human = turns[2 * k]
            assert human["ind"] == dlg.rounds[k].ref
            if ref != human["ind"]:
                changed += 1
                human["ind"] = ref
                human["value"] = re.sub(r"\[MASK-ENCODE:[^\]]+\]\[BOX-ENCODE:[^\]]+\]",
                                        f"[MASK-ENCODE:{masks[ref]}][BOX-ENCODE:{masks[ref]}]", human["value"])
    (dest / f"{split}.json").write_text(json.dumps(data))
    print(f"{len(data)} dialogues, {changed} guessed rounds refer to the Bayes choice instead of the dataset's")


if __name__ == "__main__":
    main()
