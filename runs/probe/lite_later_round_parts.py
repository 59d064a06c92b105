"""Probe: where lite's later-round time goes, and what exact or near-exact changes buy (issue 23 latency)."""
import time, sys
import torch
from MediRoundCore.model.modeling import MediRound

torch.set_num_threads(2)
ck = sys.argv[1] if len(sys.argv) > 1 else "runs/lite/eval/step350"
model = MediRound.from_pretrained(ck)[0].eval()
lm = model.language_model

def t(fn, n=20, warm=3):
    for _ in range(warm): fn()
    ts = []
    for _ in range(n):
        a = time.perf_counter(); fn(); ts.append((time.perf_counter() - a) * 1000)
    ts.sort(); return ts[len(ts) // 2]

with torch.inference_mode():
    emb = torch.randn(1, 256, 64, 64)
    prompts = torch.randn(1, 256)
    model.forget_image_side()
    print("decode_masks fp32 (cached side)", t(lambda: model.decode_masks(emb, prompts)))
    dec = model.segmenter.mask_decoder
    src = torch.randn(1, 256, 64, 64)
    print("output_upscaling fp32", t(lambda: dec.output_upscaling(src)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        print("output_upscaling bf16 autocast", t(lambda: dec.output_upscaling(src)))
    side = model.cached_image_side(emb)
    from MediRoundCore.model.decoder_image_side import two_way_forward
    out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], 0)
    tokens = torch.cat([out_tokens[None], prompts[:, None]], 1)
    print("two_way_forward fp32", t(lambda: two_way_forward(dec.transformer, side, tokens)))
    # language model
    from transformers import DynamicCache
    x = torch.randn(1, 100, 384)
    def prompt(n, keep):
        c = DynamicCache()
        lm(inputs_embeds=x[:, :80], use_cache=True, past_key_values=c)
        a = time.perf_counter()
        kw = {"logits_to_keep": 1} if keep else {}
        lm(inputs_embeds=x[:, 80:80 + n], use_cache=True, past_key_values=c, output_hidden_states=True, **kw)
        return (time.perf_counter() - a) * 1000
    for keep in (False, True):
        ts = sorted(prompt(21, keep) for _ in range(15))
        print("prompt forward 21 tok, logits_to_keep=1" if keep else "prompt forward 21 tok, all logits", ts[7])
    W = lm.lm_head.weight
    h = torch.randn(1, 384)
    print("head full GEMV", t(lambda: torch.nn.functional.linear(h, W), 50))
    sub = W[:1000].clone()
    print("head 1000 rows GEMV", t(lambda: torch.nn.functional.linear(h, sub), 50))
    Wb = W.to(torch.bfloat16); hb = h.to(torch.bfloat16)
    print("head full GEMV bf16", t(lambda: torch.nn.functional.linear(hb, Wb), 50))
    # query encoder
    if model.query_encoder is not None:
        ids = torch.randint(1000, 2000, (1, 21))
        print("query encoder 21 tok", t(lambda: model.query_encoder(input_ids=ids)))
