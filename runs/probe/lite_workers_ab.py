"""Probe (session 36): lite training steps with the batches made by the trainer itself or by one worker process
(`train.lite --workers 1`), on the run's cached pool views (training paused), bf16 autocast as the run uses.
  python runs/probe/lite_workers_ab.py [STEPS]"""
import sys, tempfile, time
from pathlib import Path
import numpy as np, torch
from MediRoundCore.model.lite import build_lite
from MediRoundCore.checkpoints.safety import load_tensors
from MediRoundCore.train.lite import make_trainer
from MediRoundCore.train.lite_data import PoolConfig
from MediRoundCore.train.trainer import TrainConfig

torch.set_num_threads(2)
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 15
pool = PoolConfig(slices=1000, views=2, paraphrase=0.7, long_share=0.5)
for round_ in range(2):
    for workers in (0, 1):
        model, tok = build_lite()
        model.config.round_tags = True
        model.load_state_dict(load_tensors("runs/lite/checkpoint/model.safetensors"), strict=False)
        out = Path(tempfile.mkdtemp())
        (out / "embeddings").symlink_to(Path("runs/lite/embeddings").resolve())
        cfg = TrainConfig(output_dir=str(out), steps=steps, batch_size=4, save_every=10**6, warmup_steps=1,
                          precision="bf16", reference_noise=0.3, loss_weights={"ce": 1.0, "bce": 2.0, "dice": 2.0})
        trainer = make_trainer(model, tok, out, pool, cfg, new_views=1, workers=workers)
        trainer.cfg.seed = 100 + round_
        history = trainer.train(progress=False)
        secs = np.diff([0.0] + [h["seconds"] for h in history])
        print(f"workers {workers}: steps 3..{steps} median {np.median(secs[2:]):.2f} s, mean {np.mean(secs[2:]):.2f} s;"
              f" cache misses {model.embedding_cache.misses}", flush=True)
