"""Choose the JCM threshold β on the validation split (never on test), as the paper's Figure 7 sweeps it.

    python -m MediRoundCore.evaluate.select_beta --checkpoint runs/tiny2/stage2/checkpoint --limit 60

Runs the multi-round protocol (dataset references, predicted masks fed forward) once without JCM and once per
β, and writes the sweep to `benchmarks/jcm_beta_val.md`; prints the chosen β (best overall Dice; ties go to
the paper's 0.6, then to the larger β).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .protocol import EvalEngine, parse_configs
from .report import group
from .run import default_cache, ensure_split, evaluate, load_samples

BETAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def sweep(predictor, samples, ids, betas=BETAS) -> tuple[float, dict]:
    rows = {}
    off = evaluate(predictor, samples, ids, parse_configs(["ind-nojcm"]), progress=False)
    rows["off"] = group(off, "ind-nojcm")
    for beta in betas:
        records = evaluate(predictor, samples, ids, parse_configs(["ind+jcm"]), beta=beta, progress=False)
        rows[beta] = group(records, "ind+jcm")
        print(f"beta {beta:.2f}: Dice {rows[beta].dice:.2f} (JCM off {rows['off'].dice:.2f})", flush=True)
    best = max(betas, key=lambda b: (round(rows[b].dice, 2), b == 0.6, b))
    return best, rows


def main(argv=None) -> int:
    import torch

    from ..cli import unit_interval
    from ..engine import DEFAULT_CHECKPOINT, Engine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--limit", type=int, default=60)
    p.add_argument("--out", default="benchmarks/jcm_beta_val.md")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--betas", type=unit_interval, nargs="+", default=list(BETAS),
                   help="the β values to try (each costs one multi-round pass over the dialogues)")
    args = p.parse_args(argv)
    args.betas = sorted(set(args.betas))  # each value once, in order: one pass and one table row each
    torch.set_num_threads(args.threads)
    folder = ensure_split("val", 0, args.limit, default_cache())
    samples, ids = load_samples(folder, args.limit)
    engine = Engine.load(args.checkpoint)
    if not engine.model.jcm_usable:
        p.error(f"{args.checkpoint}: its JCM is untrained (config.jcm.trained false: a stage-1 checkpoint); train "
                "stage 2 first, then choose β for that checkpoint")
    predictor = EvalEngine.from_engine(engine)
    best, rows = sweep(predictor, samples, ids, tuple(args.betas))
    lines = ["# JCM threshold β on the validation split", "",
             f"Written by `python -m MediRoundCore.evaluate.select_beta {' '.join(argv or sys.argv[1:])}`: "
             f"{len(samples)} val dialogues ({sum(s.num_rounds for s in samples)} rounds), dataset references, "
             "predicted masks fed forward.", "", "| β | Dice | gIoU | cIoU |", "|---|---|---|---|",
             f"| JCM off | {rows['off'].dice:.2f} | {rows['off'].giou:.2f} | {rows['off'].ciou:.2f} |"]
    lines += [f"| {b:g}{' (chosen)' if b == best else ''} | {rows[b].dice:.2f} | {rows[b].giou:.2f} | "
              f"{rows[b].ciou:.2f} |" for b in args.betas]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"chosen beta {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
