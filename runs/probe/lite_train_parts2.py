"""Probe: forward+backward time of the lite training step's parts: LM pass, mask decoder transformer, upscaling
and losses (issue 23 training speed)."""
import time
import numpy as np
import torch
from pathlib import Path
from MediRoundCore.model.lite import build_lite
from MediRoundCore.checkpoints.safety import load_tensors
from MediRoundCore.model.modeling import seg_hidden_states, masked_bce, masked_dice, valid_region_mask, upsample_logits
from MediRoundCore.model.decoder_image_side import two_way_forward
from MediRoundCore.model.processing import PromptBuilder
from MediRoundCore.train.batching import make_batch
from MediRoundCore.train.embedding_cache import EmbeddingCache
from MediRoundCore.train.lite_data import PoolConfig, pool_stream
from MediRoundCore.train.trainer import set_trainable

torch.set_num_threads(2)
model, tok = build_lite()
model.load_state_dict(load_tensors("runs/lite/checkpoint/model.safetensors"), strict=False)
model.embedding_cache = EmbeddingCache(Path("runs/lite/embeddings"), model)
set_trainable(model, 1, False); model.train()
builder = PromptBuilder.for_model(tok, model)
stream = pool_stream(PoolConfig(slices=1000, views=2, paraphrase=0.7, long_share=0.5))(12345)
rng = np.random.default_rng(0)
batches = [make_batch([next(stream) for _ in range(4)], builder, model.config, 0.3, rng) for _ in range(3)]

def timed(fn):
    t0 = time.perf_counter(); out = fn(); return out, time.perf_counter() - t0

for b in batches:
    (ce, hidden), t_lm = timed(lambda: seg_hidden_states(model, b))
    _, t_lmb = timed(lambda: (ce + hidden.sum() * 0).backward())
    emb = model.encode_segmenter_image(b.seg_pixels)
    prompts = model.seg_prompts(hidden.detach().requires_grad_())
    rows = b.seg_positions[:, 0]
    dec = model.segmenter.mask_decoder
    def transformer():
        side = model._first_block_image_side(emb).rows(rows)
        out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], 0)
        k = prompts.shape[0]
        tokens = torch.cat([out_tokens.unsqueeze(0).expand(k, -1, -1), prompts.unsqueeze(1)], 1)
        return two_way_forward(dec.transformer, side, tokens)
    (hs, src), t_tr = timed(transformer)
    c, h, w = emb.shape[1:]
    up, t_up = timed(lambda: dec.output_upscaling(src.transpose(1, 2).reshape(len(rows), c, h, w)))
    def head():
        hyper = dec.output_hypernetworks_mlps[0](hs[:, 1, :])
        bu, cu, hu, wu = up.shape
        low = (hyper.unsqueeze(1) @ up.reshape(bu, cu, hu * wu)).reshape(bu, 1, hu, wu)
        logits = upsample_logits(model, low)
        weight = valid_region_mask(b.valid_hw, b.rounds_per_sample, logits.shape[-1], logits.device)
        return 2 * masked_bce(logits, b.target_masks, weight) + 2 * masked_dice(logits, b.target_masks, weight)
    loss, t_loss = timed(head)
    loss_b = loss
    _, t_b = timed(lambda: loss_b.backward())
    model.zero_grad(set_to_none=True)
    print(f"K={len(rows)} LM fwd {t_lm:.2f} bwd {t_lmb:.2f} | decoder transformer fwd {t_tr:.2f} upscaling fwd {t_up:.2f} "
          f"mask+loss fwd {t_loss:.2f} | decoder bwd (all) {t_b:.2f} s")
