"""Probe (session 36): where a lite trainer step's time goes beyond the forward and backward (batch making,
gradient clipping, the optimiser), on the run's cached pool views (training paused), bf16 autocast.
  python runs/probe/lite_trainer_step_parts.py [STEPS] [PRECISION]"""
import sys, tempfile, time
from pathlib import Path
import numpy as np, torch
from MediRoundCore.model.lite import build_lite
from MediRoundCore.checkpoints.safety import load_tensors
from MediRoundCore.train.batching import make_batch
from MediRoundCore.train.lite import make_trainer
from MediRoundCore.train.lite_data import PoolConfig
from MediRoundCore.train.trainer import TrainConfig, stream_seed

torch.set_num_threads(2)
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 12
model, tok = build_lite()
model.config.round_tags = True
model.load_state_dict(load_tensors("runs/lite/checkpoint/model.safetensors"), strict=False)
out = Path(tempfile.mkdtemp())
(out / "embeddings").symlink_to(Path("runs/lite/embeddings").resolve())
precision = sys.argv[2] if len(sys.argv) > 2 else "bf16"
cfg = TrainConfig(output_dir=str(out), steps=steps, batch_size=4, save_every=10**6, warmup_steps=1, precision=precision,
                  reference_noise=0.3, loss_weights={"ce": 1.0, "bce": 2.0, "dice": 2.0})
tr = make_trainer(model, tok, out, PoolConfig(slices=1000, views=2), cfg, new_views=1)
samples = tr._batches()
rng = np.random.default_rng(stream_seed(cfg.seed, 0))
parts = {k: [] for k in ("samples", "make_batch", "forward", "backward", "clip", "optimizer", "scalars")}
n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
print(f"trainable parameters {n_params / 1e6:.1f} M")
for step in range(steps):
    t0 = time.perf_counter(); s = next(samples); t1 = time.perf_counter()
    batch = make_batch(s, tr.builder, model.config, 0.3, rng); t2 = time.perf_counter()
    with tr.autocast():
        terms = tr._losses(batch)
    t3 = time.perf_counter()
    tr.optimizer.zero_grad(set_to_none=True)
    tr.accelerator.backward(terms["loss"]); t4 = time.perf_counter()
    tr.accelerator.clip_grad_norm_(tr.model.parameters(), cfg.grad_clip); t5 = time.perf_counter()
    tr.optimizer.step(); tr.scheduler.step(); t6 = time.perf_counter()
    row = {k: float(v.detach()) for k, v in terms.items() if k != "logits"}; t7 = time.perf_counter()
    for k, a, b in (("samples", t0, t1), ("make_batch", t1, t2), ("forward", t2, t3), ("backward", t3, t4),
                    ("clip", t4, t5), ("optimizer", t5, t6), ("scalars", t6, t7)):
        parts[k].append(b - a)
print(precision, " ".join(f"{k} {np.median(v[2:]):.2f}" for k, v in parts.items()),
      f"total {sum(np.median(v[2:]) for v in parts.values()):.2f} s (medians, steps 3..{steps})")
