"""Diagnostic: how much could ANY prompt-only correction gain? Per mask, optimise the 256-d prompt directly
against the ground truth (an oracle no MLP can beat) and report Dice: raw, trained correction, oracle.

usage: python runs/probe/oracle_prompt.py CHECKPOINT N_BATCHES SPLIT   (e.g. weights 6 train-long; ~2 min/batch)"""
import sys
import numpy as np, torch
torch.set_num_threads(1)
from MediRoundCore.model.modeling import MediRound, seg_hidden_states, decode_for_samples, valid_region_mask
from MediRoundCore.model.modeling import masked_bce, masked_dice
from MediRoundCore.train.run import training_stream
from MediRoundCore.train.batching import make_batch
from MediRoundCore.model.processing import PromptBuilder

ckpt, n_batches, split = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model, tok = MediRound.from_pretrained(ckpt)
model.eval()
for p in model.parameters():
    p.requires_grad = False
cfg = model.config
builder = PromptBuilder(tok, model.token_ids, cfg.chat_template, cfg.vision.num_patches)
stream = training_stream(split)(777)
rng = np.random.default_rng(0)

def dice_of(logits, target, weight):
    pred = (logits > 0).float() * weight
    inter = (pred * target).flatten(1).sum(-1); s = pred.flatten(1).sum(-1) + target.flatten(1).sum(-1)
    return torch.where(s > 0, 2 * inter / s.clamp(min=1), torch.ones_like(s))

rows = []
for b in range(n_batches):
    batch = make_batch([next(stream) for _ in range(8)], builder, cfg, 0.3, rng)
    with torch.no_grad():
        _, hidden = seg_hidden_states(model, batch)
        emb = model.encode_segmenter_image(batch.seg_pixels)
        prompts = model.seg_prompts(hidden)
        logits = decode_for_samples(model, emb, batch, prompts)
        score = model.jcm.quality(prompts)
    weight = valid_region_mask(batch.valid_hw, batch.rounds_per_sample, logits.shape[-1], logits.device)
    target = batch.target_masks
    d0 = dice_of(logits, target, weight)
    with torch.no_grad():
        d_mlp = dice_of(decode_for_samples(model, emb, batch, model.jcm.correction(prompts)), target, weight)
    delta = torch.zeros_like(prompts, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=0.05)
    for _ in range(50):
        lg = decode_for_samples(model, emb, batch, prompts + delta)
        loss = 2 * masked_bce(lg, target, weight) + 0.5 * masked_dice(lg, target, weight)
        opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad():
        d1 = dice_of(decode_for_samples(model, emb, batch, prompts + delta), target, weight)
    size = target.flatten(1).sum(-1)
    for k in range(len(d0)):
        rows.append((float(d0[k]), float(d_mlp[k]), float(d1[k]), float(score[k]), float(size[k])))
    a = np.array(rows)
    print(f"batch {b}: n={len(a)} Dice raw {100*a[:,0].mean():.1f} mlp {100*a[:,1].mean():.1f} oracle {100*a[:,2].mean():.1f}", flush=True)
a = np.array(rows)
for name, sel in [("all", a[:, 3] >= 0), ("score<=0.7", a[:, 3] <= 0.7), ("score>0.7", a[:, 3] > 0.7),
                  ("<64px", a[:, 4] < 64), ("64-256", (a[:, 4] >= 64) & (a[:, 4] < 256))]:
    s = a[sel]
    print(f"{name:12s} n={len(s):4d} raw {100*s[:,0].mean():.1f}  mlp {100*s[:,1].mean():.1f}  oracle prompt {100*s[:,2].mean():.1f}")
np.save("runs/probe/oracle_rows.npy", a)
