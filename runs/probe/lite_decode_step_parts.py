"""Probe: one lite answer token: DecodeStep vs its parts (issue 23 latency)."""
import time, sys
import torch
from transformers import DynamicCache
from MediRoundCore.model.modeling import MediRound
from MediRoundCore.model.decode_step import DecodeStep
from MediRoundCore.model.decoder_image_side import two_way_forward

torch.set_num_threads(2)
model = MediRound.from_pretrained(sys.argv[1] if len(sys.argv) > 1 else "runs/lite/eval/step350")[0].eval()
lm = model.language_model

def t(fn, n=30, warm=5):
    for _ in range(warm): fn()
    ts = []
    for _ in range(n):
        a = time.perf_counter(); fn(); ts.append((time.perf_counter() - a) * 1000)
    ts.sort(); return ts[len(ts) // 2]

with torch.inference_mode():
    step = DecodeStep.for_model(lm)
    x = torch.randn(1, 200, 384)
    c = DynamicCache(); lm(inputs_embeds=x, use_cache=True, past_key_values=c)
    pos = [200]
    e = torch.randn(1, 1, 384)
    def one():
        step(e, c, pos[0]); pos[0] += 1
    print("DecodeStep (2 threads)", t(one, 40))
    torch.set_num_threads(1)
    print("DecodeStep (1 thread)", t(one, 40))
    torch.set_num_threads(2)
    print("embed_inputs one token", t(lambda: model.embed_inputs(torch.tensor([[1000]])), 40))
    W = [p for n, p in lm.named_parameters() if "layers" in n and p.dim() == 2]
    h = torch.randn(1, 384)
    def layers_gemv():
        for w in W: torch.nn.functional.linear(h if w.shape[1] == 384 else torch.randn(1, w.shape[1]), w)
    print("layer GEMVs only", t(layers_gemv, 40), sum(w.numel() for w in W) / 1e6, "M params")
    emb = torch.randn(1, 256, 64, 64); prompts = torch.randn(1, 256)
    dec = model.segmenter.mask_decoder
    side = model.cached_image_side(emb)
    out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], 0)
    tokens = torch.cat([out_tokens[None], prompts[:, None]], 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        print("two_way_forward bf16 autocast", t(lambda: two_way_forward(dec.transformer, side, tokens)))
