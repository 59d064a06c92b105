"""Probe (session 35): on training-distribution rounds that ask again for an earlier structure as "it", teacher-forced:
the probability of the right first answer token, and the largest head attention from that position to the referenced
round's "round M :" opening and to the query's "(about round M)" (tagged checkpoints).
  python runs/probe/lite_it_rounds_attention.py CHECKPOINT"""
import torch, numpy as np, sys
from MediRoundCore.model.modeling import MediRound
from MediRoundCore.train.lite_data import PoolConfig, pool_sample
from MediRoundCore.train.batching import sample_tokens
from MediRoundCore.model.processing import PromptBuilder
torch.set_num_threads(1)
model, tok = MediRound.from_pretrained(sys.argv[1]); model.eval()
model.language_model.config._attn_implementation = "eager"
b = PromptBuilder.for_model(tok, model)
rows = []
for e in range(40):
    s = pool_sample(PoolConfig(slices=1000, repeat=0.6), e, 11)
    if s is None: continue
    flags = (s.meta or {}).get("repeat") or []
    ids, labels, _ = sample_tokens(s, b)
    idt = torch.tensor([ids])
    opening = {k: b._encode(f" round {k + 1}:") for k in range(len(s.queries))}
    def find(seq, start=0):
        for i in range(start, len(ids) - len(seq) + 1):
            if ids[i:i + len(seq)] == seq: return i
        return -1
    targets = []
    for k, f in enumerate(flags):
        import re
        if not f or not re.search(r"\bit\b", s.queries[k].lower()): continue
        ref = s.ref_indices[k]
        if b.round_tags:
            pos = find(opening[k]) + len(opening[k]) - 1  # predicts the first answer token
            hist = find(opening[ref]) + len(opening[ref])  # first answer token of the referenced round
            about = find(b._encode(f"(about round {ref + 1}"))  # with or without the entity after it
            if pos < 0 or hist < 0 or about < 0: continue
        else:  # untagged: the position before the k-th answer
            seg_ends = [i for i, l in enumerate(labels) if l != -100 and (i == 0 or labels[i - 1] == -100)]
            pos, hist, about = seg_ends[k] - 1, 5, 5
        targets.append((pos, hist, about, ids[pos + 1]))
    if not targets: continue
    from MediRoundCore.train.batching import make_batch
    batch = make_batch([s], b, model.config, 0.0, np.random.default_rng(0))
    with torch.no_grad():
        image_tokens = model.encode_image_tokens(batch.vision_pixels)
        crops = model.encode_crops(batch.crop_pixels) if batch.crop_pixels is not None else None
        boxes = model.encode_boxes(batch.boxes) if batch.boxes is not None else None
        out = model.language_model(inputs_embeds=model.embed_inputs(batch.input_ids, image_tokens, crops, boxes),
                                   output_attentions=True)
    for pos, hist, about, right in targets:
        p = out.logits[0, pos].softmax(-1)[right].item()
        top = out.logits[0, pos].argmax().item()
        att_hist = max(a[0, :, pos, hist - 4:hist + 1].sum(-1).max().item() for a in out.attentions)
        att_about = max(a[0, :, pos, about:about + 6].sum(-1).max().item() for a in out.attentions)
        rows.append((p, top == right, att_hist, att_about))
    if len(rows) >= 30: break
r = np.array(rows, dtype=float)
print(f"{len(r)} 'it' rounds: P(right first token) median {np.median(r[:,0]):.3f}, argmax right {r[:,1].mean():.2f}; "
      f"max head attention to the referenced opening {np.median(r[:,2]):.3f}, to '(about round M)' {np.median(r[:,3]):.3f}")
