"""Stage 1 and stage 2 trainers on Accelerate: one CPU, one GPU, or `accelerate launch` over N GPUs.

Stage 1 (teacher forcing): 1.0·CE + 2.0·BCE + 0.5·Dice; at full size LoRA (r 8, α 16, q/v) on the language
model with the seg projection, box encoder, mask decoder, projector and token embeddings trainable; the tiny
model may train every weight. Stage 2 (JCM): the model frozen, only the two MLPs train; judgment target = IoU of
the unrefined mask with the ground truth (BCE, weight 2); correction = 2·BCE + 0.5·Dice of the refined mask.
AdamW (lr 3e-4, betas 0.9/0.95), 100 warm-up steps then linear decay. Checkpoints in our safetensors format
under `<out>/checkpoint`, with the optimiser state beside them; a run resumes where the last one stopped.
"""

from __future__ import annotations

import csv
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..model.jcm import refiner_image
from ..model.modeling import (masked_bce, masked_dice, seg_hidden_states, stage1_losses,
                              upsample_logits, valid_region_mask)
from ..model.processing import PromptBuilder
from .batching import batches_in_workers, make_batch
from .jcm_features import FeatureBatch

STATE_FILE = "trainer_state.pt"


@dataclass
class TrainConfig:
    output_dir: str
    stage: int = 1
    steps: int = 1000
    batch_size: int = 8
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    save_every: int = 200
    log_every: int = 10
    seed: int = 0
    lora: bool = False
    reference_noise: float = 0.0  # share of reference masks replaced by a prediction-like perturbation
    correction_focus: bool = False  # stage 2: weigh the correction loss towards poor masks
    loss_weights: dict = field(default_factory=lambda: {"ce": 1.0, "bce": 2.0, "dice": 0.5})
    rewarm_steps: int = 50  # warm-up again after `Trainer.start_from` (weights without optimiser state)
    precision: str = "fp32"  # "bf16": forward and backward under bfloat16 autocast, float32 weights and Adam state


PRECISIONS = ("auto", "bf16", "fp32")


def native_bf16(device_type: str) -> bool:
    """Whether this machine multiplies bfloat16 in hardware: a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 or AMX (elsewhere bfloat16 is emulated, slower than float32)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and bool(check()) for check in checks)


def choose_precision(choice: str, device_type: str | None = None) -> str:
    """"bf16" or "fp32" for a `--precision` choice; "auto" takes bf16 where it is native (`native_bf16`)."""
    if choice not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {choice!r}")
    if choice != "auto":
        return choice
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    return "bf16" if native_bf16(device_type) else "fp32"


def stream_seed(seed: int, step: int) -> int:
    """Seed of the data stream for a run (re)started at `step`: a fresh stream after every resume."""
    return (seed * 7919 + step) % 1000


def warmup_linear(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def rewarmed(step: int, rewarm_from: int | None, rewarm_steps: int) -> float:
    """The factor on the schedule after a run restarted from weights alone (fresh optimiser moments): linear
    from 1/rewarm_steps to 1 over `rewarm_steps` steps from `rewarm_from`; 1 for a run never restarted so
    (`rewarm_from` None). Steps count the scheduler's steps: one per optimiser step on one process."""
    if rewarm_from is None or step < rewarm_from:
        return 1.0
    return min(1.0, (step - rewarm_from + 1) / max(1, rewarm_steps))


def set_trainable(model, stage: int, lora: bool) -> list[torch.nn.Parameter]:
    """Freeze/unfreeze per stage; returns the parameters to optimise."""
    for p in model.parameters():
        p.requires_grad = False
    if stage == 2:
        modules = [model.jcm]
    elif lora:
        from ..model.lora import apply_lora, base_language_model

        apply_lora(model)
        lm = base_language_model(model)
        for name, p in model.language_model.named_parameters():
            p.requires_grad = "lora_" in name
        modules = [model.seg_projection, model.box_encoder, model.segmenter.mask_decoder, model.mm_projector,
                   lm.get_input_embeddings(), lm.get_output_embeddings()]
    else:
        modules = [m for name, m in model.named_children() if name != "jcm"]
    for module in modules:
        for p in module.parameters():
            p.requires_grad = True
    frozen = tuple(model.config.base_weights)  # pretrained base parts (lite) are never trained
    for name, p in model.named_parameters():
        if frozen and name.startswith(frozen):
            p.requires_grad = False
    return [p for p in model.parameters() if p.requires_grad]


FOCUS_FLOOR = 0.05  # with correction focus, the weight of a mask the model already gets right


def stage2_losses(model, batch, focus: bool = False, bce: float = 2.0, dice: float = 0.5) -> dict:
    """JCM objective on the frozen model with teacher-forced references (see `jcm_losses`)."""
    with torch.no_grad():
        _, hidden = seg_hidden_states(model, batch)
        image_embeddings = model.encode_segmenter_image(batch.seg_pixels)
        prompts = model.seg_prompts(hidden)
    weight = valid_region_mask(batch.valid_hw, batch.rounds_per_sample, batch.target_masks.shape[-1],
                               prompts.device)
    rows = batch.seg_positions[:, 0]
    images = refiner_image(batch.seg_pixels[rows]) if model.jcm.refiner is not None else None
    return jcm_losses(model, image_embeddings[rows], prompts, batch.target_masks, weight, focus, bce, dice,
                      images=images)


def jcm_losses(model, embeddings, prompts, target, weight, focus: bool = False, bce: float = 2.0,
               dice: float = 0.5, images: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> dict:
    """Stage 2 on prompts of the frozen model: prompt k decodes on image embedding row k against target k.

    Judgment: BCE of the quality score against the IoU of the unrefined mask (weight 2). Correction: `bce`·BCE +
    `dice`·Dice of the refined mask (the paper's 2 and 0.5 by default), on every sample. With `focus`, each
    mask's correction loss is weighted by 1 − IoU of the unrefined mask (at least FOCUS_FLOOR): the correction
    then learns from the masks it will be applied to at inference, the poor ones, instead of mostly from masks
    that need no change. A JCM with a refiner redraws the refined masks from `images` (K,S,S), the segmenter input.
    `rows`: prompt k decodes on image embedding row rows[k] (a few images, many rounds on each)."""
    with torch.no_grad():
        low_res, mask_tokens = model.decode_with_tokens(embeddings, prompts, rows)
        raw_logits = upsample_logits(model, low_res)
    # outside no_grad: an attending correction's context has weights of its own
    context = (model.context_from_decode(embeddings if rows is None else embeddings[rows], low_res, mask_tokens)
               if model.jcm.uses_context else None)
    pred = (raw_logits > 0).float() * weight
    inter = (pred * target).flatten(1).sum(-1)
    union = ((pred + target) > 0).float().flatten(1).sum(-1)
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    score = model.jcm.quality(prompts)
    with torch.autocast(score.device.type, enabled=False):  # CUDA's autocast refuses BCE on probabilities
        judgment = F.binary_cross_entropy(score.float().clamp(1e-6, 1 - 1e-6), iou.float())
    refined = model.jcm.correction(prompts, context)
    refined_logits = upsample_logits(model, model.decode_with_prompts(embeddings, refined, rows))
    if model.jcm.refiner is not None:
        if images is None:
            raise ValueError("this JCM has a refiner: stage 2 needs the segmenter images (collect features with "
                             "images, or add them with jcm_features --add-images)")
        refined_logits = model.jcm.refiner(images, refined_logits)
    sample_weights = (1 - iou).clamp(min=FOCUS_FLOOR) if focus else None
    bce_term = masked_bce(refined_logits, target, weight, sample_weights=sample_weights)
    dice_term = masked_dice(refined_logits, target, weight, sample_weights=sample_weights)
    with torch.no_grad():  # the same terms for the unrefined masks: what the correction has to beat
        bce_raw = masked_bce(raw_logits, target, weight, sample_weights=sample_weights)
        dice_raw = masked_dice(raw_logits, target, weight, sample_weights=sample_weights)
    return {"loss": 2.0 * judgment + bce * bce_term + dice * dice_term, "judgment": judgment, "bce": bce_term,
            "dice": dice_term, "bce_unrefined": bce_raw, "dice_unrefined": dice_raw, "iou": iou.mean()}


class Trainer:
    """Runs `steps` optimisation steps on batches drawn from `sample_stream(seed)`; resumable."""

    def __init__(self, model, tokenizer, config: TrainConfig, sample_stream: Callable[[int], Iterator]):
        from accelerate import Accelerator

        if config.precision not in ("bf16", "fp32"):
            raise ValueError(f"TrainConfig.precision is 'bf16' or 'fp32' (choose_precision resolves 'auto'), "
                             f"got {config.precision!r}")
        self.cfg = config
        self.out = Path(config.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.tokenizer = tokenizer
        self.sample_stream = sample_stream
        self.builder = PromptBuilder.for_model(tokenizer, model)
        params = set_trainable(model, config.stage, config.lora)
        model.config.jcm.trained = config.stage == 2  # stage 1 leaves the JCM untrained (or stale): not applied
        self.raw_model = model
        optimizer = torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay)
        self.rewarm_from: int | None = None  # the step a `start_from` restarted at, kept in the trainer state
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_linear(s, config.warmup_steps, config.steps)
            * rewarmed(s, self.rewarm_from, config.rewarm_steps))
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model.train(), optimizer, scheduler)
        self.step = 0
        self.batch_source = None  # an iterator of ready Batches (e.g. a DataLoader); else built here
        self.workers = 0  # > 0: the batches are made in that many worker processes (`batching.batches_in_workers`)
        self._resume()

    def autocast(self):
        """The context a step's forward runs in: bfloat16 autocast for `precision="bf16"` (our own, not
        Accelerate's, whose mixed precision is fixed once per process), else Accelerate's (a launch config's)."""
        if self.cfg.precision == "bf16":
            return torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16)
        return self.accelerator.autocast()

    # -- checkpoints -----------------------------------------------------------------------------------
    def _resume(self) -> None:
        state_path = self.out / "checkpoint" / STATE_FILE
        if not state_path.is_file():
            return
        from ..checkpoints.ours import not_stored
        from ..checkpoints.safety import load_strict, load_tensors

        state = load_trainer_state(state_path)
        weights = load_tensors(self.out / "checkpoint" / "model.safetensors")
        load_strict(self.raw_model, weights, str(self.out / "checkpoint"),
                    ignore_missing=not_stored(self.raw_model.config))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.rewarm_from = state.get("rewarm_from")
        self.accelerator.print(f"resumed from step {self.step}")

    def start_from(self, weights: dict[str, torch.Tensor], step: int, source: str) -> None:
        """Continue a run at `step` from its weights alone (e.g. a `snapshot` carried in the repository): the
        optimiser's moments start afresh, so the learning rate warms up again over `rewarm_steps`."""
        from ..checkpoints.ours import not_stored
        from ..checkpoints.safety import load_strict

        own = self.raw_model.state_dict()
        load_strict(self.raw_model, {k: v.to(own[k].dtype) if k in own else v for k, v in weights.items()},
                    source, ignore_missing=not_stored(self.raw_model.config))
        self.step = self.rewarm_from = int(step)
        getattr(self.optimizer, "optimizer", self.optimizer).state.clear()  # moments of a run resumed here
        inner = getattr(self.scheduler, "scheduler", self.scheduler)  # Accelerate wraps it
        inner.last_epoch = self.step - 1
        with warnings.catch_warnings():  # "scheduler stepped before the optimiser": deliberate, to reach `step`
            warnings.simplefilter("ignore", UserWarning)
            inner.step()
        self.accelerator.print(f"started from {source} at step {self.step} (learning rate warms up again)")

    def save(self) -> Path:
        folder = self.out / "checkpoint"
        if self.accelerator.is_main_process:
            model = self.accelerator.unwrap_model(self.model)
            model.save_pretrained(folder, self.tokenizer)
            tmp = folder / (STATE_FILE + ".tmp")
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "step": self.step, "rewarm_from": self.rewarm_from, "config": json.dumps(asdict(self.cfg))}, tmp)
            tmp.replace(folder / STATE_FILE)
        return folder

    # -- loop ------------------------------------------------------------------------------------------
    def _batches(self):
        stream = self.sample_stream(stream_seed(self.cfg.seed, self.step))
        while True:
            yield [next(stream) for _ in range(self.cfg.batch_size)]

    def train(self, progress: bool = True) -> list[dict]:
        from tqdm import tqdm

        cfg = self.cfg
        log_path = self.out / f"log_stage{cfg.stage}.csv"
        history: list[dict] = []
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not progress, desc=f"stage {cfg.stage}", unit="step")
        batches = self.batch_source
        if batches is None and self.workers > 0:  # made at the step training starts from, as below
            batches = batches_in_workers(self.sample_stream, stream_seed(cfg.seed, self.step), cfg.batch_size,
                                         self.builder, self.raw_model.config, cfg.reference_noise, self.workers)
        elif batches is None:
            built = self._batches()
            rng = np.random.default_rng(stream_seed(cfg.seed, self.step))
            batches = (make_batch(samples, self.builder, self.raw_model.config, cfg.reference_noise, rng)
                       for samples in built)
        running = None
        t0 = time.perf_counter()
        while self.step < cfg.steps:
            batch = next(batches).to(self.accelerator.device)
            with self.autocast():
                terms = self._losses(batch)
            self.optimizer.zero_grad(set_to_none=True)
            self.accelerator.backward(terms["loss"])
            if cfg.grad_clip:
                self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            row = {k: float(v.detach()) for k, v in terms.items() if k != "logits"}
            running = row["loss"] if running is None else 0.95 * running + 0.05 * row["loss"]
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}")
            row.update(step=self.step, lr=self.scheduler.get_last_lr()[0], seconds=time.perf_counter() - t0)
            history.append(row)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self._log(log_path, row)
            if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                self.save()
            if not math.isfinite(row["loss"]):
                raise FloatingPointError(f"loss became {row['loss']} at step {self.step}")
        bar.close()
        return history

    def _losses(self, batch) -> dict:
        if self.cfg.stage == 1:
            return stage1_losses(self.model, batch, **self.cfg.loss_weights)
        weights = {"bce": self.cfg.loss_weights["bce"], "dice": self.cfg.loss_weights["dice"]}
        if isinstance(batch, FeatureBatch):  # cached stage 2 (see jcm_features)
            return jcm_losses(self.model, batch.embeddings, batch.prompts, batch.targets, batch.weight,
                              self.cfg.correction_focus, images=batch.images, rows=batch.rows, **weights)
        return stage2_losses(self.model, batch, focus=self.cfg.correction_focus, **weights)

    def _log(self, path: Path, row: dict) -> None:
        new = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)


def load_trainer_state(path: Path) -> dict:
    """The optimiser, scheduler and step of a run to resume, read with torch.load(weights_only=True) only: a
    pickle carrying code (or anything but tensors and plain values) is refused, never run."""
    import pickle
    import zipfile

    from ..errors import CheckpointError

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError,
            AttributeError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        pickled = isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc) \
            or "Unsupported global" in str(exc)
        reason = ("it holds pickled objects other than tensors, which are refused for safety" if pickled
                  else f"unreadable: {first[:160]}")
        raise CheckpointError(f"{path}: cannot resume training from this state ({reason}); remove "
                              f"{path.name} to start this stage afresh from the saved weights, or train into "
                              f"another --out folder") from None
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "step"} <= set(state):
        raise CheckpointError(f"{path}: not a MediRound training state (needs optimizer, scheduler and step); "
                              f"remove it to start this stage afresh, or train into another --out folder")
    return state
