"""The official MediRound training checkpoint (github.com/Edisonhimself/MediRound) → our model.

What the public code saves: `train_ds.py` wraps `MediRoundForCausalLM` (a LISA-style `LlavaMistralForCausalLM`)
with peft (`get_peft_model`, LoRA r=8, alpha=16, dropout 0.05 on the decoder's q_proj/v_proj), resizes the
vocabulary to 32000+3 (`[SEG]`, `[BBOXINPUT]`, `[CROPPEDIMAGE]`, added in that order), trains under DeepSpeed
ZeRO-2 and saves with `model_engine.save_checkpoint`. `--weight DIR` then reads every `*.bin` in DIR (the
consolidated state dict DeepSpeed's `zero_to_fp32.py` writes, e.g. `pytorch_model.bin`) and loads it with
`strict=False` into the peft-wrapped model. Its keys (peft 0.4 names; peft ≥ 0.7 adds `.base_layer`):

  base_model.model.model.embed_tokens.weight / base_model.model.lm_head.weight   (32003 rows)
  base_model.model.model.layers.N.….weight, …q_proj.lora_A.default.weight, …lora_B.default.weight
  base_model.model.model.norm.weight
  base_model.model.model.mm_projector.{0,2}.*           → mm_projector
  base_model.model.model.vision_tower.vision_tower.vision_model.*  → vision_tower
  base_model.model.model.text_hidden_fcs.0.{0,2}.*      → seg_projection.{0,2}
  base_model.model.model.bbox_encoder.*                 → box_encoder
  base_model.model.model.visual_model.{image_encoder,prompt_encoder,mask_decoder}.* → segmenter
  base_model.model.model.mask_quality_MLP.fc{1,2,3}.*   → jcm.quality     (stage 2 checkpoints only)
  base_model.model.model.refine_MLP.fc{1,2,3}.*         → jcm.correction  (stage 2 checkpoints only)

Groups the public code trains (embeddings, LoRA, text_hidden_fcs, bbox_encoder, mask_decoder; the JCM MLPs in
stage 2) must be present. Frozen groups (decoder weights, norm, vision tower, projector, SAM image and prompt
encoders) may be absent — `zero_to_fp32 --exclude_frozen_parameters` drops them, and the public loader
tolerates that — in which case the weights already in our model are kept (load LLaVA-Med and MedSAM first, as
`full.load_full_model` does). A group is all there or all absent; a partial group is a missing-key error.

LoRA: merged by default (`lora="merge"`): W ← W + (B @ A)·alpha/r with r read from the tensors and alpha 16
(the public default; `--lora_alpha` is not overridden by its scripts). `lora="peft"` instead wraps our
language model with `MediRoundCore.model.lora.apply_lora` and loads A and B into the adapters (our config's
rank and alpha must match).

Vocabulary: rows 0…V-1 (V = rows − 3) copy as they are; row V ([SEG]) → our `[SEG]` id, V+1 ([BBOXINPUT]) →
our `<box>`, V+2 ([CROPPEDIMAGE]) → our `<crop>`. Our `<image>` row has no counterpart (the public code splices
image features at index -200) and is left as it was.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import CheckpointError
from ._common import (DictSource, Entry, LoadReport, TensorSource, check_consumed, execute, own_tensors, validate,
                      vision_prefix)
from .safety import load_tensors

PEFT_PREFIX = "base_model.model."
LORA_ALPHA = 16  # train_ds.py --lora_alpha default
IGNORE = [
    (r"rotary_emb\.inv_freq$", "rotary frequencies are recomputed from the config"),
    (r"position_ids$", "CLIP position ids are a constant buffer"),
    (r"visual_model\.pixel_(mean|std)$", "input normalisation is fixed by our config"),
]
# official module prefix (after base_model.model.) → our prefix
MODULE_MAP = [
    ("model.text_hidden_fcs.0.", "seg_projection."),
    ("model.bbox_encoder.", "box_encoder."),
    ("model.visual_model.", "segmenter."),
    ("model.mask_quality_MLP.", "jcm.quality."),
    ("model.refine_MLP.", "jcm.correction."),
    ("model.mm_projector.", "mm_projector."),
]
OFFICIAL_VISION = "model.vision_tower.vision_tower.vision_model."
NEW_TOKENS = ("seg", "box", "crop")  # [SEG], [BBOXINPUT], [CROPPEDIMAGE] in the order train_ds.py adds them


def read_official(path) -> TensorSource:
    """A consolidated state dict file (`.bin`/`.pth`/`.pt` through weights-only torch.load, or `.safetensors`),
    or a folder whose `*.bin` files are merged as the public `--weight` loader does."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.bin"))
        if not files:
            raise CheckpointError(f"{path}: no *.bin file; run DeepSpeed's zero_to_fp32.py in the checkpoint folder "
                                  f"first (it writes the consolidated pytorch_model.bin)")
    else:
        files = [path]
    tensors, file_of = {}, {}
    for file in files:
        for key, value in load_tensors(file).items():
            if key in tensors:
                raise CheckpointError(f"{file}: key {key!r} also in {file_of[key]}")
            tensors[key], file_of[key] = value, str(file)
    return DictSource(tensors, str(path), file_of)


def _target_names(own) -> dict[str, str]:
    """Official key (without the peft prefix, peft 0.4 naming) → our canonical key, for every tensor we have."""
    out = {}
    vp = vision_prefix(own)
    for key in own:
        if key.startswith("language_model."):
            out[key[len("language_model."):]] = key
        elif key.startswith(vp):
            out[OFFICIAL_VISION + key[len(vp):]] = key
        else:
            for theirs, ours in MODULE_MAP:
                if key.startswith(ours):
                    out[theirs + key[len(ours):]] = key
                    break
    return out


def _group(our_key: str, vp: str) -> str:
    if our_key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        return "embeddings"
    if our_key.startswith("language_model."):
        return "decoder"
    if our_key.startswith(vp):
        return "vision_tower"
    if our_key.startswith("segmenter.mask_decoder."):
        return "mask_decoder"
    for name in ("segmenter.image_encoder.", "segmenter.prompt_encoder.", "mm_projector.", "seg_projection.",
                 "box_encoder.", "jcm."):
        if our_key.startswith(name):
            return name.rstrip(".").split(".")[-1]
    return "other"


REQUIRED_GROUPS = {"embeddings", "mask_decoder", "seg_projection", "box_encoder"}
OPTIONAL_GROUPS = {"decoder", "vision_tower", "mm_projector", "image_encoder", "prompt_encoder", "jcm"}


def load_official(path, model, lora: str = "merge", lora_alpha: float = LORA_ALPHA,
                  require_complete: bool = False) -> LoadReport:
    """Load an official MediRound checkpoint into `model`. See the module docstring for the mapping.

    lora: "merge" (fold B@A·alpha/r into the decoder weights; the model must not carry adapters) or "peft"
    (wrap with `apply_lora` and load the adapters). require_complete: also demand the frozen groups."""
    if lora not in ("merge", "peft"):
        raise ValueError(f"lora must be 'merge' or 'peft', got {lora!r}")
    from ..model.lora import apply_lora, has_lora

    source = read_official(path)
    keys = source.keys()
    where = source.where()
    if keys and not all(k.startswith(PEFT_PREFIX) for k in keys):
        bad = next(k for k in keys if not k.startswith(PEFT_PREFIX))
        raise CheckpointError(f"{source.where(bad)}: unexpected key {bad!r}: the official checkpoint's keys all start "
                              f"with {PEFT_PREFIX!r} (the peft-wrapped model)")
    stripped = {k[len(PEFT_PREFIX):]: k for k in keys}
    # peft >= 0.7 names the wrapped base weight `.base_layer.weight`; read both spellings.
    names = {}
    for short, full in stripped.items():
        canonical = short.replace(".base_layer.", ".")
        if canonical in names:
            raise CheckpointError(f"{source.where(full)}: key {full!r} duplicates {names[canonical]!r}")
        names[canonical] = full

    lora_pairs = {}
    for short in list(names):
        m = re.match(r"(.*)\.(lora_[AB])\.default\.weight$", short)
        if m:
            lora_pairs.setdefault(m.group(1), {})[m.group(2)] = names.pop(short)
    for module, pair in lora_pairs.items():
        for part in ("lora_A", "lora_B"):
            if part not in pair:
                raise CheckpointError(f"{where}: missing key {PEFT_PREFIX + module + '.' + part + '.default.weight'!r}")

    if lora == "merge" and has_lora(model):
        raise CheckpointError(f"{where}: lora='merge' needs a model without LoRA adapters (use lora='peft')")
    own, own_lora = own_tensors(model)
    vp = vision_prefix(own)
    targets = _target_names(own)
    report = LoadReport(source=where)

    # -- coverage per group ---------------------------------------------------------------------------
    by_group: dict[str, list[str]] = {}
    for theirs, ours in targets.items():
        by_group.setdefault(_group(ours, vp), []).append(theirs)
    present_groups = set()
    for group, theirs_keys in sorted(by_group.items()):
        present = [k for k in theirs_keys if k in names]
        if not present:
            if group in REQUIRED_GROUPS or require_complete:
                raise CheckpointError(f"{where}: missing key {PEFT_PREFIX + sorted(theirs_keys)[0]!r} "
                                      f"(group {group!r} is absent)")
            report.notes.append(f"{group}: not in the checkpoint; kept the weights already in the model")
            continue
        absent = sorted(set(theirs_keys) - set(present))
        if absent:
            raise CheckpointError(f"{where}: missing key {PEFT_PREFIX + absent[0]!r}"
                                  + (f" (+{len(absent) - 1} more)" if len(absent) > 1 else ""))
        present_groups.add(group)

    # -- LoRA ------------------------------------------------------------------------------------------
    lora_targets = {}
    for module, pair in lora_pairs.items():
        weight_key = f"language_model.{module}.weight"
        if weight_key not in own:
            raise CheckpointError(f"{source.where(pair['lora_A'])}: unexpected key {pair['lora_A']!r}: no such layer "
                                  f"in our model")
        a_shape, b_shape = source.shape(pair["lora_A"]), source.shape(pair["lora_B"])
        out_f, in_f = own[weight_key].shape
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != in_f or b_shape[0] != out_f or a_shape[0] != b_shape[1]:
            raise CheckpointError(f"{source.where(pair['lora_A'])}: shape mismatch for {pair['lora_A']!r} {a_shape} / "
                                  f"{pair['lora_B']!r} {b_shape}: model layer {weight_key!r} is {(out_f, in_f)}")
        lora_targets[module] = (weight_key, a_shape[0])
    # -- plan: validated in full before anything is written ----------------------------------------------
    plan, used = [], set()
    for theirs, ours in targets.items():
        if _group(ours, vp) not in present_groups:
            continue
        full_key = names[theirs]
        used.add(full_key)
        if _group(ours, vp) == "embeddings":
            plan.append(_embedding_entry(ours, full_key, source, own, model))
        else:
            plan.append(Entry(ours, full_key))
    for pair in lora_pairs.values():
        used |= set(pair.values())
    check_consumed(source, used, IGNORE, report)
    validate(plan, source, own)

    if lora == "peft" and lora_pairs:
        ranks = {r for _, r in lora_targets.values()}
        if ranks != {model.config.lora_rank} or lora_alpha != model.config.lora_alpha:
            raise CheckpointError(f"{where}: LoRA rank {sorted(ranks)} / alpha {lora_alpha} differ from our config "
                                  f"(rank {model.config.lora_rank}, alpha {model.config.lora_alpha})")
        apply_lora(model)
        own, own_lora = own_tensors(model)
        ours_modules = {k.rsplit(".", 1)[0] for k in own_lora}
        theirs_modules = {f"language_model.{m}" for m in lora_pairs}
        extra = sorted(theirs_modules - ours_modules)
        if extra:
            m = extra[0][len("language_model."):]
            raise CheckpointError(f"{where}: unexpected key {PEFT_PREFIX + m + '.lora_A.default.weight'!r}: our LoRA "
                                  f"config ({model.config.lora_target_modules}) has no adapter there")
        short = sorted(ours_modules - theirs_modules)
        if short:
            m = short[0][len("language_model."):]
            raise CheckpointError(f"{where}: missing key {PEFT_PREFIX + m + '.lora_A.default.weight'!r}")
    execute(plan, source, own, report)
    # A checkpoint without the JCM (stage 1) leaves the model's untrained: recorded, so it is not applied.
    model.config.jcm.trained = "jcm" in present_groups
    if "jcm" not in present_groups:
        report.notes.append("jcm: not applied (config.jcm.trained False)")

    # -- LoRA: merge or load into adapters -------------------------------------------------------------
    with torch.no_grad():
        for module, (weight_key, rank) in sorted(lora_targets.items()):
            a = source.get(lora_pairs[module]["lora_A"]).float()
            b = source.get(lora_pairs[module]["lora_B"]).float()
            if lora == "merge":
                w = own[weight_key]
                w.copy_((w.float() + (b @ a) * (lora_alpha / rank)).to(w.dtype))
                report.loaded.append(weight_key + " (+LoRA merged)")
            else:
                for part, value in (("lora_A", a), ("lora_B", b)):
                    dst = own_lora[f"language_model.{module}.{part}"]
                    dst.copy_(value.to(dst.dtype))
                    report.loaded.append(f"language_model.{module}.{part}")
    if lora_targets:
        report.notes.append(f"LoRA on {len(lora_targets)} layers: "
                            + ("merged into the weights" if lora == "merge" else "loaded into peft adapters")
                            + f" (alpha {lora_alpha}, rank {sorted({r for _, r in lora_targets.values()})})")
    return report


def _embedding_entry(ours: str, theirs: str, source: TensorSource, own, model) -> Entry:
    n_src = source.shape(theirs)[0]
    base = n_src - len(NEW_TOKENS)
    ids = model.token_ids
    new_ids = [getattr(ids, name) for name in NEW_TOKENS]
    n_own = own[ours].shape[0]
    if base <= 0 or min(new_ids) < base or max(new_ids) >= n_own or len(set(new_ids)) != 3:
        raise CheckpointError(f"{source.where(theirs)}: {theirs!r} has {n_src} rows (= {base} + [SEG], [BBOXINPUT], "
                              f"[CROPPEDIMAGE]) but our tokenizer's [SEG]/<box>/<crop> ids are {new_ids} in a "
                              f"vocabulary of {n_own}")
    rows = [(i, i) for i in range(base)] + [(our_id, base + j) for j, our_id in enumerate(new_ids)]
    return Entry(ours, theirs, rows=rows)
