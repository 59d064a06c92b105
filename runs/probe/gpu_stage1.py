"""Stage 1 of MediRound-Lite continued on a lent GPU for a fixed wall-clock budget (session 46).

    python runs/probe/gpu_stage1.py --base DIR --deadline SECONDS --peak-lr LR -- <train.lite arguments>

The device machine takes 64 MiB of files a call, so the frozen base weights travel as float16 copies
(`runs/probe/gpu_stage1.sh pack` makes them here from the hash-checked files); their sha256 is therefore not the
published one and the check is skipped in this process only. Training itself is `MediRoundCore.train.lite`'s,
with one change: the learning-rate schedule is fitted to the time left. The run starts at `--peak-lr` (after the
trainer's re-warm), measures its step rate, and moves the schedule's end (where the rate reaches 0) to the step
the deadline allows, refitting every `--refit` steps; the rate stays continuous at each refit.

Session 48: `--freeze PREFIX ...` keeps the parameters under those prefixes where the snapshot left them (no
gradient, out of the optimiser): the continuation of session 46 lost real lungs in its image side (vision tower and
projector), so this run starts from a snapshot whose image side is step 5150's (`runs/probe/gpu_stage1.sh merge`)
and trains the rest against it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

STARTED = time.time()
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


class FittedSchedule:
    """Batches from `batches_in_workers`, made when training starts, while the trainer's schedule end is refitted
    to the deadline."""

    def __init__(self, trainer, workers: int, deadline: float, peak_lr: float, calibrate: int = 40,
                 refit: int = 150, reserve: float = 25.0):
        self.trainer, self.workers, self.deadline, self.peak = trainer, workers, deadline, peak_lr
        self.calibrate, self.refit_every, self.reserve = calibrate, refit, reserve
        self.inner = None
        self.start = None  # the step training starts at, once it does
        self.marks: list[tuple[int, float]] = []

    def __iter__(self):
        return self

    def _scheduler(self):
        return getattr(self.trainer.scheduler, "scheduler", self.trainer.scheduler)

    def _set_end(self, end: int) -> None:
        """Move the schedule's end to `end`, keeping this step's undecayed rate."""
        from MediRoundCore.train.trainer import warmup_linear

        cfg, step, inner = self.trainer.cfg, self.trainer.step, self._scheduler()
        now = [base * warmup_linear(step, cfg.warmup_steps, cfg.steps) for base in inner.base_lrs]
        cfg.steps = max(end, step + 1)
        inner.base_lrs = [rate / max(1e-9, warmup_linear(step, cfg.warmup_steps, cfg.steps)) for rate in now]

    def __next__(self):
        from MediRoundCore.train.batching import batches_in_workers
        from MediRoundCore.train.trainer import stream_seed, warmup_linear

        trainer, cfg = self.trainer, self.trainer.cfg
        if self.inner is None:
            self.start = trainer.step
            cfg.steps = self.start + 100_000  # refitted once the rate is measured
            inner = self._scheduler()
            inner.base_lrs = [self.peak / warmup_linear(self.start, cfg.warmup_steps, cfg.steps)
                              for _ in inner.base_lrs]
            self.inner = batches_in_workers(trainer.sample_stream, stream_seed(cfg.seed, trainer.step),
                                            cfg.batch_size, trainer.builder, trainer.raw_model.config,
                                            cfg.reference_noise, self.workers)
        done = trainer.step - self.start
        now = time.time()
        if done in (10, self.calibrate) or (done > self.calibrate and done % self.refit_every == 0):
            self.marks.append((trainer.step, now))
        if done >= self.calibrate and (done == self.calibrate or done % self.refit_every == 0):
            (s0, t0), (s1, t1) = self.marks[0], self.marks[-1]
            rate = (s1 - s0) / max(1e-6, t1 - t0)
            end = trainer.step + int(rate * (self.deadline - (now - STARTED) - self.reserve))
            self._set_end(end)
            print(f"[fit] step {trainer.step}: {rate:.2f} steps/s, {now - STARTED:.0f} s in; schedule ends at "
                  f"{cfg.steps}, rate now {self._scheduler().get_last_lr()[0]:.2e}", flush=True)
        return next(self.inner)


def freeze(trainer, prefixes: tuple[str, ...]) -> None:
    """No gradient for parameters under `prefixes`, and none of them in the optimiser (no weight decay either)."""
    held = {id(p) for name, p in trainer.raw_model.named_parameters() if name.startswith(prefixes)}
    if not held:
        raise SystemExit(f"--freeze {' '.join(prefixes)}: no parameter has such a name")
    for p in trainer.raw_model.parameters():
        if id(p) in held:
            p.requires_grad = False
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in held]
    print(f"frozen: {len(held)} tensors under {', '.join(prefixes)}; "
          f"{sum(len(g['params']) for g in optimizer.param_groups)} train", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="folder of the float16 base weights (gpu_stage1.sh pack)")
    parser.add_argument("--deadline", type=float, required=True, help="seconds from start the training may use")
    parser.add_argument("--peak-lr", type=float, required=True)
    parser.add_argument("--workers", type=int, default=13)
    parser.add_argument("--freeze", nargs="*", default=[], metavar="PREFIX",
                        help="parameter-name prefixes kept as the snapshot has them (e.g. vision_tower mm_projector)")
    parser.add_argument("train", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    os.environ["MEDIROUND_BASE_WEIGHTS"] = args.base
    from MediRoundCore.checkpoints import base_weights
    from MediRoundCore.train import lite

    base_weights.verify = lambda path, expected: Path(path)  # float16 copies of checked files (module doc)
    made = lite.make_trainer

    def make_fitted(model, tokenizer, out, pool, config, new_views=0, workers=0):
        trainer = made(model, tokenizer, out, pool, config, new_views, 0)
        trainer.batch_source = FittedSchedule(trainer, args.workers, args.deadline, args.peak_lr)
        if args.freeze:
            freeze(trainer, tuple(args.freeze))
        return trainer

    lite.make_trainer = make_fitted
    train_args = args.train[1:] if args.train[:1] == ["--"] else args.train
    return lite.main(train_args)


if __name__ == "__main__":
    raise SystemExit(main())
