"""Train the reference scorer (MediRoundCore/reference_scorer.py) on generated dialogues.

    python -m MediRoundCore.train.reference_scorer --out runs/refscorer [--dialogues 6000] [--into WEIGHTS_FOLDER]

Examples are the later rounds of training dialogues (train and train-long splits, each with its template
queries and once re-worded by the paraphrase grammar) whose query names no round (the rules decide the
others); the label is the round the generator referred to. Rounds are collected once into `<out>/rounds.jsonl`
(generating a dialogue draws its slice: about 0.1 s each) and extended when more are asked for. The model is a
softmax over the earlier rounds of linear scores; the report gives agreement on the val split (never test).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def dialogue_rounds(split: str, seed: int, index: int) -> list[dict]:
    """Training rounds of one generated dialogue: template and paraphrased wordings."""
    from ..data.paraphrase import rephrase_dialogue
    from ..data.splits import make_dialogue
    from ..references import named_round

    dlg = make_dialogue(split, seed, index)
    entities = [r.entity for r in dlg.rounds]
    wordings = [[r.query for r in dlg.rounds]]
    if split in ("train", "train-long"):
        wordings.append(rephrase_dialogue(dlg, np.random.default_rng([seed, index, 43]), p=1.0))
    out = []
    for queries in wordings:
        for k in range(1, len(dlg.rounds)):
            ref = dlg.rounds[k].ref
            if ref is None or named_round(queries[k], entities[:k]) is not None:
                continue
            out.append({"query": queries[k], "entities": entities[:k], "ref": ref})
    return out


def collect(path: Path, splits: list[str], dialogues: int, seed: int = 0, progress: bool = True) -> list[dict]:
    """Rounds of `dialogues` dialogues per split, read from `path` and extended there as needed."""
    from tqdm import tqdm

    done: dict[tuple[str, int], list[dict]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            done[(row["split"], row["index"])] = row["rounds"]
    todo = [(s, i) for s in splits for i in range(dialogues) if (s, i) not in done]
    with path.open("a") as f:
        for split, index in tqdm(todo, disable=not progress, desc="dialogues", unit="dlg"):
            rounds = dialogue_rounds(split, seed, index)
            f.write(json.dumps({"split": split, "index": index, "rounds": rounds}) + "\n")
            f.flush()
            done[(split, index)] = rounds
    return [r for s in splits for i in range(dialogues) for r in done[(s, i)]]


def _batch_tensors(examples):
    """Flat feature ids, their candidate index, and a (B, C) candidate table (-1 = none) of some examples."""
    import torch

    ids, owner, table = [], [], torch.full((len(examples), max(len(c) for c, _ in examples)), -1)
    n = 0
    for b, (candidates, _) in enumerate(examples):
        for j, c in enumerate(candidates):
            ids.append(c)
            owner.append(np.full(len(c), n))
            table[b, j] = n
            n += 1
    return torch.as_tensor(np.concatenate(ids)), torch.as_tensor(np.concatenate(owner)), table, n


def fit(rounds: list[dict], config=None, epochs: int = 4, lr: float = 0.05, batch: int = 256, seed: int = 0,
        progress: bool = True):
    """A ReferenceScorer trained by softmax cross-entropy over each round's earlier rounds (Adagrad)."""
    import torch
    from tqdm import tqdm

    from ..reference_scorer import ReferenceScorer, ReferenceScorerConfig

    scorer = ReferenceScorer(config or ReferenceScorerConfig())
    examples = [(scorer.candidate_ids(r["query"], r["entities"]), r["ref"])
                for r in tqdm(rounds, disable=not progress, desc="features", unit="round")]
    weights = torch.zeros(scorer.config.buckets, requires_grad=True)
    optimiser = torch.optim.Adagrad([weights], lr=lr)
    rng = np.random.default_rng(seed)
    for _ in tqdm(range(epochs), disable=not progress, desc="epochs"):
        order = rng.permutation(len(examples))
        for start in range(0, len(examples), batch):
            chunk = [examples[i] for i in order[start:start + batch]]
            ids, owner, table, n = _batch_tensors(chunk)
            scores = torch.zeros(n + 1).index_add(0, owner, weights[ids])  # slot n: the padding candidate
            logits = scores[table.where(table >= 0, n)].masked_fill(table < 0, float("-inf"))
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor([ref for _, ref in chunk]))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    scorer.weights = weights.detach().numpy().astype(np.float32)
    return scorer


def agreement(scorer, rounds: list[dict]) -> float:
    """Share of rounds where the scorer picks the generator's reference."""
    return float(np.mean([scorer.choose(r["query"], r["entities"]) == r["ref"] + 1 for r in rounds]))


def previous_round_agreement(rounds: list[dict]) -> float:
    return float(np.mean([len(r["entities"]) == r["ref"] + 1 for r in rounds]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MediRoundCore.train.reference_scorer",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for collected rounds and the trained scorer")
    parser.add_argument("--dialogues", type=int, default=6000, help="per training split")
    parser.add_argument("--val-dialogues", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--into", help="also store the scorer in this model folder")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train = collect(out / "rounds.jsonl", ["train", "train-long"], args.dialogues)
    val = collect(out / "val_rounds.jsonl", ["val"], args.val_dialogues)
    scorer = fit(train, epochs=args.epochs)
    print(f"{len(train)} training rounds; val ({len(val)} rounds that name no round): reference = generator's "
          f"{100 * agreement(scorer, val):.1f} % (previous round {100 * previous_round_agreement(val):.1f} %)")
    scorer.save_pretrained(out)
    if args.into:
        scorer.save_pretrained(args.into)
        print(f"stored in {args.into}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
