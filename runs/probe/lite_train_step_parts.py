"""Probe: where a lite training step's time goes (forward parts, backward), on real pool batches (issue 23)."""
import time
import numpy as np
import torch
from MediRoundCore.model.lite import build_lite
from MediRoundCore.checkpoints.safety import load_tensors
from MediRoundCore.model.modeling import stage1_losses, seg_hidden_states
from MediRoundCore.model.processing import PromptBuilder
from MediRoundCore.train.batching import make_batch
from MediRoundCore.train.embedding_cache import EmbeddingCache
from MediRoundCore.train.lite_data import PoolConfig, pool_stream
from MediRoundCore.train.trainer import set_trainable
from pathlib import Path

torch.set_num_threads(2)
model, tok = build_lite()
state = load_tensors("runs/lite/checkpoint/model.safetensors")
model.load_state_dict(state, strict=False)
model.embedding_cache = EmbeddingCache(Path("runs/lite/embeddings"), model)
set_trainable(model, 1, False)
model.train()
builder = PromptBuilder.for_model(tok, model)
stream = pool_stream(PoolConfig(slices=1000, views=2, paraphrase=0.7, long_share=0.5))(12345)
rng = np.random.default_rng(0)
t = time.perf_counter()
batches = [make_batch([next(stream) for _ in range(4)], builder, model.config, 0.3, rng) for _ in range(4)]
print(f"4 batches built in {time.perf_counter() - t:.1f} s (cold view cache)")
for b in batches:
    print("input_ids", tuple(b.input_ids.shape), "labelled", int((b.labels != -100).sum()), "seg rounds", len(b.seg_positions))
def step(b):
    t0 = time.perf_counter()
    terms = stage1_losses(model, b, 1.0, 2.0, 2.0)
    t1 = time.perf_counter()
    terms["loss"].backward()
    t2 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    return t1 - t0, t2 - t1
step(batches[0])
for b in batches:
    f, bw = step(b); print(f"forward {f:.2f} s backward {bw:.2f} s")
b = batches[1]
t0 = time.perf_counter(); ce, hidden = seg_hidden_states(model, b); t1 = time.perf_counter()
print(f"LM pass (with all-position logits) {t1 - t0:.2f} s")
from torch.profiler import profile
with profile() as p:
    step(b)
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))

_encode = model.encode_segmenter_image
def _encode_fp32(pixels):
    with torch.autocast("cpu", enabled=False):
        return _encode(pixels)
def step_bf16(b):
    model.encode_segmenter_image = _encode_fp32
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = stage1_losses(model, b, 1.0, 2.0, 2.0)
    t1 = time.perf_counter()
    terms["loss"].backward()
    t2 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    return t1 - t0, t2 - t1, {k: float(v) for k, v in terms.items() if k != "logits"}
step_bf16(batches[0])
for b in batches:
    f, bw, terms = step_bf16(b)
    with torch.no_grad():
        ref = {k: float(v) for k, v in stage1_losses(model, b, 1.0, 2.0, 2.0).items() if k != "logits"}
    print(f"bf16 autocast: forward {f:.2f} s backward {bw:.2f} s; loss {terms['loss']:.4f} vs fp32 {ref['loss']:.4f}")
