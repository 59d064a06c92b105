"""Probe (issue 23, session 48): offline rules for the engine's lesion evidence (Engine._scorer_with_image) on the
rounds `lesion_count.py` stored: the product's rule at other spot and count-penalty settings, an oracle that knows
each candidate's true count of the asked lesion, and why the product's rule misses (both candidates fit the
wording, or the finder misses what is there).

    .venv/bin/python runs/probe/lesion_count.py --split hard --seed 1 --n 300 --out /work/probe/lc_hard1.pkl
    .venv/bin/python runs/probe/lesion_count_rules.py /work/probe/lc_hard1.pkl
"""

import pickle
import sys
from collections import Counter

import numpy as np

from MediRoundCore.engine import EVEN_EVIDENCE, EVIDENCE_FLOOR
from MediRoundCore.lesion_finder import (COUNT_MISMATCH, SPOT_CELLS, SPOT_P, container_weights, lesion_kinds_asked,
                                         lesion_named_by_size, names_a_lesion)


def product_evidence(candidate, query, spot_p=SPOT_P, spot_cells=SPOT_CELLS, mismatch=COUNT_MISMATCH):
    """The engine's weight of one candidate round (Engine._scorer_with_image), from its cells as lesion_count.py
    stored them ((y, x, probability) rows)."""
    cells = candidate["cells"]
    if candidate["lesion_round"] or names_a_lesion(candidate["entity"]) or not len(cells):
        return EVEN_EVIDENCE
    cell_probabilities = [(cells[:, :2].astype(int), cells[:, 2])]
    return float(container_weights(cell_probabilities, lesion_kinds_asked(query), query, mismatch, spot_p,
                                   spot_cells)[0])


def fits_wording(candidate, query):
    return candidate["count"] >= (2 if lesion_named_by_size(query) else 1)


def oracle_evidence(candidate, query):
    return 1.0 if fits_wording(candidate, query) else EVIDENCE_FLOOR


def choose(row, evidence, **settings):
    weights = [c["p"] * np.clip(evidence(c, row["query"], **settings), EVIDENCE_FLOOR, 1.0) for c in row["candidates"]]
    return row["candidates"][int(np.argmax(weights))]


def accuracy(rows, evidence, **settings):
    return 100 * np.mean([choose(r, evidence, **settings)["round"] == r["truth"] for r in rows])


def main():
    rows = pickle.load(open(sys.argv[1], "rb"))
    print(f"{len(rows)} lesion rounds that name no round; the dataset's round chosen:")
    print(f"  product rule {accuracy(rows, product_evidence):.1f} %, oracle counts {accuracy(rows, oracle_evidence):.1f} %")
    for spot_p in (0.5, 0.7):
        for spot_cells in (1, 2):
            print(f"  spot > {spot_p}, {spot_cells}+ cells: " + ", ".join(
                f"penalty {m}: {accuracy(rows, product_evidence, spot_p=spot_p, spot_cells=spot_cells, mismatch=m):.1f} %"
                for m in (0.3, 0.15, 0.1, 0.05)))
    why = Counter()
    for r in rows:
        picked = choose(r, product_evidence)
        if picked["round"] == r["truth"]:
            continue
        truth = next(c for c in r["candidates"] if c["round"] == r["truth"])
        why["both fit the wording (a draw)" if fits_wording(picked, r["query"]) and fits_wording(truth, r["query"])
            else "the finder misses what is there" if fits_wording(truth, r["query"])
            else "the dataset's round does not fit (a model or label slip)"] += 1
    print("misses:", dict(why))


if __name__ == "__main__":
    main()
