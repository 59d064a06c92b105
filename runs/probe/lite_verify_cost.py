"""Probe: cost of a k-token forward over a KV cache (speculative verification) vs one DecodeStep (issue 23)."""
import time, sys
import torch
from transformers import DynamicCache
from MediRoundCore.model.modeling import MediRound

torch.set_num_threads(2)
model = MediRound.from_pretrained(sys.argv[1] if len(sys.argv) > 1 else "runs/lite/eval/step350")[0].eval()
lm = model.language_model
with torch.inference_mode():
    x = torch.randn(1, 300, 384)
    c = DynamicCache(); lm(inputs_embeds=x[:, :200], use_cache=True, past_key_values=c)
    for k in (1, 2, 4, 6, 8, 12):
        ts = []
        for rep in range(25):
            a = time.perf_counter()
            out = lm(inputs_embeds=x[:, 200:200 + k], use_cache=True, past_key_values=c,
                     position_ids=torch.arange(200, 200 + k)[None])
            ts.append((time.perf_counter() - a) * 1000)
            c.crop(-k)
        ts.sort(); print(f"transformers forward of {k} tokens: {ts[12]:.2f} ms")
