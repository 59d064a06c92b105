"""Probe: how often the product's resolver (MediRoundCore.references) picks the dataset's reference on the
generated splits, with the shipped model's reference scorer, compared with main's resolver (git show main:MediRoundCore/references.py)
without one.

    PYTHONPATH=$PWD python runs/probe/reference_agreement.py [--n 300] [--splits hard regular val]
"""

import argparse
import subprocess
import types

from MediRoundCore.data.splits import make_dialogue, to_sample
from MediRoundCore.engine import DEFAULT_CHECKPOINT
from MediRoundCore.reference_scorer import ReferenceScorer
from MediRoundCore.references import resolve_reference


def main_resolver():
    source = subprocess.run(["git", "show", "main:MediRoundCore/references.py"], capture_output=True, text=True,
                            check=True).stdout.replace("from .errors", "from MediRoundCore.errors")
    module = types.ModuleType("main_references")
    exec(compile(source, "main:references.py", "exec"), module.__dict__)
    return module.resolve_reference


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--splits", nargs="*", default=["hard", "regular", "val"])
    parser.add_argument("--heldout", action="store_true", help="the held-out paraphrase wording of the same rounds")
    args = parser.parse_args()
    old = main_resolver()
    scorer = ReferenceScorer.from_pretrained(DEFAULT_CHECKPOINT)  # the shipped model's (None: rules only)
    for split in args.splits:
        total = agree_new = agree_old = 0
        changed = []
        for i in range(args.n):
            if args.heldout:
                from MediRoundCore.data.paraphrase_test import paraphrase_sample

                sample = paraphrase_sample(split, 0, i)
            else:
                sample = to_sample(make_dialogue(split, 0, i))
            for k in range(1, sample.num_rounds):
                truth = sample.ref_indices[k]
                truth = None if truth is None else truth + 1
                new = resolve_reference(sample.queries[k], sample.entities[:k], scorer=scorer)
                before = old(sample.queries[k], sample.entities[:k])
                total += 1
                agree_new += new == truth
                agree_old += before == truth
                if new != before:
                    changed.append((sample.queries[k], sample.entities[:k], truth, before, new))
        print(f"{split}: {total} later rounds; resolver = dataset reference: main {100 * agree_old / total:.1f} %, "
              f"now {100 * agree_new / total:.1f} %; {len(changed)} rounds resolved differently")
        for query, entities, truth, before, new in changed[:8]:
            print(f"   {query!r} entities {entities}: dataset {truth}, main {before}, now {new}")


if __name__ == "__main__":
    main()
