"""`mediround train`: build or resume MediRound-Tiny (or a full model) and run stage 1 and/or stage 2."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from ..errors import OptionError
from .batching import batches_in_workers
from .trainer import TrainConfig, Trainer, choose_precision, stream_seed


def training_stream(split: str = "train", fov_crop: float = 0.0, paraphrase: float = 0.0, absent: float = 0.0,
                    repeat: float = 0.0, fov_min_side: float = 0.5, product_references: float = 0.0):
    """A resumable sample stream factory: seed -> endless iterator of generated training dialogues; a share
    `paraphrase` of the queries re-worded, absent-target rounds inserted with probability `absent` after each
    round (and before the first), rounds asking again for an earlier structure with probability `repeat`
    (data/repeats.py), and a share `fov_crop` of the dialogues cut to a random field of view whose sides are
    shares from `fov_min_side` to 1 of the slice's (data/field_of_view.py); a share `product_references` of the
    dialogues refer where the product's resolver reads them (data/product_references.py)."""
    import numpy as np

    from ..data.field_of_view import FieldOfView, with_crops
    from ..data.product_references import shipped_scorer, with_product_references
    from ..data.splits import iter_training_samples, iter_varied_samples

    scorer = shipped_scorer() if product_references > 0 else None

    def stream(seed: int):
        samples = (iter_varied_samples(seed, split, paraphrase, absent, repeat) if paraphrase or absent or repeat
                   else iter_training_samples(seed=seed, split=split))
        if product_references > 0:
            rng = np.random.default_rng([seed, 43])
            samples = (with_product_references(s, rng, product_references, scorer) for s in samples)
        return with_crops(samples, fov_crop, seed, FieldOfView(side=(fov_min_side, 1.0)))
    return stream


def tokenizer_corpus(n_dialogues: int = 3000, seed: int = 999) -> list[str]:
    from ..answers import strip_seg

    texts: list[str] = []
    for sample in itertools.islice(training_stream()(seed), n_dialogues):
        texts += sample.queries + [strip_seg(a) for a in sample.answers]
    return texts


def new_tiny_model(vocab_size: int = 1024, seed: int = 0, corpus_dialogues: int = 3000):
    from ..model.config import tiny_config
    from ..model.modeling import MediRound
    from ..model.tokenizer import TokenIds, train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(tokenizer_corpus(corpus_dialogues), vocab_size=vocab_size)
    torch.manual_seed(seed)
    model = MediRound(tiny_config(vocab_size=len(tokenizer)), TokenIds.from_tokenizer(tokenizer))
    return model, tokenizer


def use_residual_correction(model, context: bool = False, attention: bool = False, refiner: bool = False) -> None:
    """Give `model` a fresh JCM whose correction is residual (identity until trained); with `context` it also
    sees the prompt's first decode, with `attention` also what the mask token reads around the mask, with
    `refiner` corrected masks are redrawn at full resolution. Stage 2 then trains it."""
    from ..model.jcm import build_jcm

    model.config.jcm.residual_correction = True
    model.config.jcm.correction_context = context
    model.config.jcm.correction_attention = attention
    model.config.jcm.correction_refiner = refiner
    model.jcm = build_jcm(model.config)


def check_features_match(features, model) -> None:
    """Cached features fit this model: the same segmenter frame and prompt width."""
    size, dim = model.config.segmenter.image_size, model.config.segmenter.prompt_dim
    if features.size != size or features.prompts.shape[-1] != dim:
        raise OptionError(f"features of a {features.size}² segmenter with {features.prompts.shape[-1]}-d prompts do "
                         f"not fit this model ({size}², {dim}-d): collect them with the --init model")


def run_training(output_dir, stage: int = 1, steps: int = 1000, batch_size: int = 8, init: str | None = None,
                 lr: float = 3e-4, lora: bool = False, workers: int = 1, progress: bool = True, seed: int = 0,
                 save_every: int = 100, corpus_dialogues: int = 3000, loss_weights: dict | None = None,
                 data: str = "train", reference_noise: float = 0.0, residual_correction: bool = False,
                 correction_focus: bool = False, correction_context: bool = False, correction_attention: bool = False,
                 correction_refiner: bool = False, features=None, fov_crop: float = 0.0,
                 paraphrase: float = 0.0, absent: float = 0.0, repeat: float = 0.0, fov_min_side: float = 0.5,
                 product_references: float = 0.0, precision: str = "fp32"):
    """Train into `output_dir/stage<k>`; resumes there if a checkpoint exists. Returns the checkpoint folder.

    `features` (stage 2): cached rounds of the frozen model (`jcm_features.FeatureSet` files) instead of the
    generated stream; `data` and `reference_noise` then belong to how the features were collected."""
    from ..model.modeling import MediRound

    if residual_correction and stage != 2:
        raise OptionError("--residual-correction belongs to stage 2 (it gives the JCM a fresh residual correction)")
    if correction_focus and stage != 2:
        raise OptionError("--correction-focus belongs to stage 2 (it weighs the JCM correction loss)")
    if features and stage != 2:
        raise OptionError("--features belongs to stage 2 (cached rounds of the frozen model)")
    if features and product_references:
        raise OptionError("--product-references changes generated dialogues; --features reads cached rounds whose "
                          "references were fixed when they were collected")
    if correction_attention and not correction_context:
        raise OptionError("--correction-attention comes with --correction-context (it reads the first decode)")
    if correction_refiner and not residual_correction:
        raise OptionError("--correction-refiner comes with --residual-correction (a fresh, identity-started JCM)")
    if correction_context and not residual_correction:
        raise OptionError("--correction-context comes with --residual-correction (a fresh, identity-started JCM)")
    out = Path(output_dir) / f"stage{stage}"
    ckpt = out / "checkpoint"
    resuming = (ckpt / "config.json").is_file()
    if resuming:
        model, tokenizer = MediRound.from_pretrained(ckpt)  # weights and optimiser state are restored by Trainer
    elif init:
        model, tokenizer = MediRound.from_pretrained(init)
    else:
        model, tokenizer = new_tiny_model(seed=seed, corpus_dialogues=corpus_dialogues)
    if residual_correction and not resuming:  # a resumed run's config already says so
        use_residual_correction(model, context=correction_context, attention=correction_attention,
                                refiner=correction_refiner)
    cfg = TrainConfig(str(out), stage=stage, steps=steps, batch_size=batch_size, lr=lr, lora=lora, seed=seed,
                      save_every=save_every, warmup_steps=min(100, max(1, steps // 10)),
                      reference_noise=reference_noise, correction_focus=correction_focus,
                      precision=choose_precision(precision))
    if loss_weights:
        cfg.loss_weights = {**cfg.loss_weights, **loss_weights}
    stream = training_stream(data, fov_crop, paraphrase, absent, repeat, fov_min_side, product_references)
    trainer = Trainer(model, tokenizer, cfg, stream)
    if features:
        from .jcm_features import FeatureSet

        cached = FeatureSet.load(features)
        check_features_match(cached, model)
        trainer.batch_source = cached.batches(batch_size, seed=stream_seed(cfg.seed, trainer.step), by_dialogue=True)
    elif workers > 0:
        trainer.batch_source = batches_in_workers(stream, stream_seed(cfg.seed, trainer.step), batch_size,
                                                  trainer.builder, model.config, reference_noise, workers)
    trainer.train(progress=progress)
    return trainer.save()
