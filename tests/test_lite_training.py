"""Training with a frozen, slow encoder: embeddings computed once and read back, a pool stream that reuses
slice views with fresh dialogues, and a stage-1 run that checkpoints, resumes and never moves the frozen parts.
Uses a small TinyViT-segmenter model (same classes as lite, random weights) so it runs in seconds."""

import numpy as np
import pytest
import torch

from MediRoundCore.model.config import (MediRoundConfig, SegmenterConfig, TextConfig, TinyViTConfig, VisionConfig)
from MediRoundCore.model.modeling import MediRound
from MediRoundCore.model.tokenizer import TokenIds, train_tiny_tokenizer
from MediRoundCore.train.embedding_cache import EmbeddingCache
from MediRoundCore.train.lite_data import PoolConfig, pool_sample, pool_stream


def small_lite(seed=0):
    """lite's segmenter classes and frozen-base rule at toy widths."""
    corpus = [s.lower() for s in ("Segment the liver.", "left kidney: it lies on the left.", "now the cyst inside it.",
                                  "user: assistant:", "the lesion in the lung", "heart spleen aorta vertebra")]
    tokenizer = train_tiny_tokenizer(corpus * 20, vocab_size=300)
    config = MediRoundConfig(
        size="lite",
        text=TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                        rope_theta=10_000.0, tie_word_embeddings=True),
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            image_size=32, patch_size=16),
        segmenter=SegmenterConfig(image_size=64, patch_size=4, encoder="tiny_vit", decoder_mlp_dim=64,
                                  tiny_vit=TinyViTConfig(embed_dims=(8, 16, 16, 32), depths=(1, 1, 1, 1),
                                                         num_heads=(1, 2, 2, 2), window_sizes=(4, 4, 4, 4))),
        base_weights={"segmenter.image_encoder.": "lite_medsam", "segmenter.prompt_encoder.": "lite_medsam"},
    )
    config.max_answer_tokens = 4
    torch.manual_seed(seed)
    return MediRound(config, TokenIds.from_tokenizer(tokenizer)), tokenizer


def test_embeddings_are_computed_once(tmp_path):
    model, _ = small_lite()
    model.eval()
    pixels = torch.rand(3, 3, 64, 64)
    direct = model.segmenter.image_encoder(pixels)
    model.embedding_cache = EmbeddingCache(tmp_path, model)
    first = model.encode_segmenter_image(pixels)
    assert model.embedding_cache.misses == 3 and model.embedding_cache.hits == 0
    again = model.encode_segmenter_image(pixels[[2, 0]])
    assert model.embedding_cache.hits == 2 and model.embedding_cache.misses == 3
    assert torch.allclose(first, direct, atol=2e-3) and torch.equal(again, first[[2, 0]])
    changed = pixels[:1].clone()
    changed[0, 0, 0, 0] += 0.01
    model.encode_segmenter_image(changed)
    assert model.embedding_cache.misses == 4  # another image, another entry
    # a new process (new cache object) reads them from disk; another encoder never does
    fresh = EmbeddingCache(tmp_path, model)
    assert torch.equal(fresh.encode(model.segmenter.image_encoder, pixels), first) and fresh.misses == 0
    other, _ = small_lite(seed=1)
    assert EmbeddingCache(tmp_path, other).folder != fresh.folder


def test_pool_reuses_views_with_new_dialogues():
    cfg = PoolConfig(slices=3, views=2, paraphrase=1.0)
    a, b = pool_sample(cfg, 1, 5), pool_sample(cfg, 1, 5)
    assert a.queries == b.queries and np.array_equal(a.image, b.image)
    other = next(s for s in (pool_sample(cfg, 1, d) for d in range(6, 20)) if s is not None)
    assert np.array_equal(other.image, a.image) and other.queries != a.queries
    # the randomised view of the same slice is another image whose masks stay on it
    plain = next(s for s in (pool_sample(cfg, 0, d) for d in range(1, 20)) if s is not None)
    assert not np.array_equal(plain.image, a.image)
    assert all(m.any() for m in a.masks)


def test_a_restart_renders_and_encodes_a_bounded_number_of_new_views(tmp_path):
    """`--new-views`: a (re)started stream draws from the entries its ledger lists (encoded on this machine
    before) and a bounded number of others, and lists what it draws; without a bound, from the whole pool."""
    import itertools

    from MediRoundCore.train.lite_data import read_ledger, stream_entries

    rng = np.random.default_rng(0)
    assert stream_entries(10, 0, [1, 2], rng) is None and stream_entries(10, 8, [1, 2], rng) is None
    picked = stream_entries(10, 3, [7, 2, 2, 99], rng)
    assert sorted(picked[:2]) == [2, 7] and len(set(picked)) == 5 and set(picked[2:]).isdisjoint({2, 7})

    cfg = PoolConfig(slices=12, views=1, absent=0.0, repeat=0.0, product_references=0.0)
    ledger = tmp_path / "pool_entries.txt"
    ledger.write_text("3\nx\n5\n45")  # "45": a last line cut by a crash (it may have been 456)
    assert read_ledger(ledger) == [3, 5]
    first = [s.meta["pool_entry"] for s in itertools.islice(pool_stream(cfg, 2, ledger)(0), 30)]
    assert {3, 5} <= set(first) and len(set(first)) <= 4  # the two known ones and at most two new ones
    assert sorted(read_ledger(ledger)) == sorted({3, 5} | set(first))  # each listed once, after the cut line
    known = set(read_ledger(ledger))
    again = [s.meta["pool_entry"] for s in itertools.islice(pool_stream(cfg, 2, ledger)(1), 60)]
    assert known <= set(again) and 0 < len(set(again) - known) <= 2  # all it knew, and at most two more
    whole = {s.meta["pool_entry"] for s in itertools.islice(pool_stream(cfg)(2), 40)}
    assert len(whole) > 6  # no bound: the whole pool


@pytest.mark.slow
def test_stage1_run_checkpoints_resumes_and_keeps_base_frozen(tmp_path):
    from MediRoundCore.train.lite import make_trainer
    from MediRoundCore.train.trainer import TrainConfig

    pool = PoolConfig(slices=2, views=1)
    model, tokenizer = small_lite()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("segmenter.image_encoder.")}
    decoder = model.segmenter.mask_decoder.iou_token.weight.detach().clone()
    cfg = TrainConfig(output_dir=str(tmp_path), steps=3, batch_size=2, save_every=3, warmup_steps=1,
                      loss_weights={"ce": 1.0, "bce": 2.0, "dice": 2.0})
    trainer = make_trainer(model, tokenizer, tmp_path, pool, cfg)
    history = trainer.train(progress=False)
    assert [h["step"] for h in history] == [1, 2, 3] and all(np.isfinite(h["loss"]) for h in history)
    cache = model.embedding_cache
    assert cache.misses <= 2 and cache.hits == 2 * 3 - cache.misses  # two slices, encoded once each
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())  # BatchNorm statistics included
    assert not torch.equal(model.segmenter.mask_decoder.iou_token.weight, decoder)  # trained parts move
    assert not any(k.startswith("segmenter.image_encoder.") for k in
                   __import__("safetensors").safe_open(str(tmp_path / "checkpoint" / "model.safetensors"), "pt").keys())
    # resume: a fresh model continues at step 3 with the trained weights
    again, tok = small_lite()
    cfg4 = TrainConfig(**{**cfg.__dict__, "steps": 4})
    resumed = make_trainer(again, tok, tmp_path, pool, cfg4)
    assert resumed.step == 3
    for key, value in model.state_dict().items():
        if not key.startswith("segmenter.image_encoder."):
            assert torch.equal(again.state_dict()[key], value), key
    resumed.train(progress=False)
    assert resumed.step == 4 and again.embedding_cache.misses == 0  # the views were on disk


def test_pool_crops_record_their_share_of_the_frame():
    """A randomised view cut to a smaller field of view records its share of the frame, so a model with a
    physical field of view sees its anatomy at the size of the plain view's (data/augment.py keep_scale)."""
    from MediRoundCore.model.processing import frame_shares
    from MediRoundCore.train.lite_data import pool_view

    found = 0
    for index in range(12):
        plain, plain_image, none, no_shift = pool_view("train", 0, index, 0)
        assert none is None and no_shift is None
        sl, image, extent, shift = pool_view("train", 0, index, 1)
        if extent is None:
            assert image.shape == plain_image.shape
            continue
        found += 1
        whole = frame_shares(plain_image.shape)
        assert extent == pytest.approx((whole[0] * image.shape[0] / plain_image.shape[0],
                                        whole[1] * image.shape[1] / plain_image.shape[1]))
        assert all(inst.mask.shape == image.shape for inst in sl.instances)
        sample = next(s for s in (pool_sample(PoolConfig(slices=12), 2 * index + 1, d) for d in range(1, 30))
                      if s is not None)
        assert sample.meta["frame_extent"] == extent and sample.image.shape == image.shape
        assert sample.meta["frame_shift"] == shift
        _assert_shown_where_it_lay(plain, plain_image, sl, image, extent, shift)
    assert found > 0


def _assert_shown_where_it_lay(plain, plain_image, sl, image, extent, shift):
    """A pool crop, padded to its place as the batcher and the pool encoder pad it, has every instance mask
    exactly where the plain view has it in the frame (inside the crop's window; nothing outside it)."""
    from MediRoundCore.model import tiny_config
    from MediRoundCore.model.field_placement import field_padding
    from MediRoundCore.model.processing import frame_shares, masks_to_segmenter_frame, segmenter_pixels

    config = tiny_config()
    size = config.segmenter.image_size
    padding = field_padding(image.shape, extent, shift)
    shown = padding.padded_extent(image.shape, extent)
    padded_shape = padding.padded_hw(image.shape)
    hw = segmenter_pixels(np.zeros(padded_shape, np.float32), config, shown)[1]
    window = masks_to_segmenter_frame(padding.pad(np.ones((1,) + image.shape, bool)), hw, size)[0] > 0
    plain_hw = segmenter_pixels(plain_image.astype(np.float32), config, frame_shares(plain_image.shape))[1]
    assert int(window.sum()) == image.shape[0] * image.shape[1]
    for crop_inst, plain_inst in zip(sl.instances, plain.instances):
        framed = masks_to_segmenter_frame(padding.pad(crop_inst.mask[None]), hw, size)[0]
        whole = masks_to_segmenter_frame(plain_inst.mask[None], plain_hw, size)[0]
        assert torch.equal(framed[window], whole[window]) and not framed[~window].any()


def test_vision_tower_taken_from_a_trained_checkpoint(tmp_path):
    from safetensors.torch import save_file

    from MediRoundCore.errors import CheckpointError
    from MediRoundCore.train.lite import take_vision_tower

    model, _ = small_lite(seed=0)
    trained, _ = small_lite(seed=1)
    save_file({k: v.clone() for k, v in trained.state_dict().items()}, str(tmp_path / "model.safetensors"))
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("vision_tower.")}
    assert take_vision_tower(model, tmp_path) > 0
    for key, value in model.state_dict().items():
        if key.startswith("vision_tower."):
            assert torch.equal(value, trained.state_dict()[key]), key
        else:
            assert torch.equal(value, before[key]), key  # nothing else moves
    # a checkpoint whose vision tower has another shape is refused, and changes nothing
    wrong = {k: (v[..., :1] if k.endswith("weight") and v.dim() > 1 else v) for k, v in trained.state_dict().items()}
    save_file({k: v.clone() for k, v in wrong.items()}, str(tmp_path / "wrong.safetensors"))
    fresh, _ = small_lite(seed=2)
    kept = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match="vision tower does not fit"):
        take_vision_tower(fresh, tmp_path / "wrong.safetensors")
    assert all(torch.equal(v, kept[k]) for k, v in fresh.state_dict().items())


def test_pool_draws_long_dialogues_with_the_hard_splits_settings():
    from MediRoundCore.data.splits import SPLITS

    def drawn(share, n=40):
        cfg = PoolConfig(slices=4, views=1, long_share=share, absent=0.0, paraphrase=0.0, repeat=0.0,
                         product_references=0.0, bare=0.0)
        return [s for s in (pool_sample(cfg, e % 4, d) for e, d in zip(range(n), range(100, 100 + n)))
                if s is not None]

    short, long_, mixed = drawn(0.0), drawn(1.0), drawn(0.5)
    lo, hi = SPLITS["train"].rounds
    assert {s.meta["dialogue_settings"] for s in short} == {"train"}
    assert all(lo <= s.num_rounds <= hi for s in short)
    lo, hi = SPLITS["train-long"].rounds
    assert {s.meta["dialogue_settings"] for s in long_} == {"train-long"}
    assert all(lo <= s.num_rounds <= hi for s in long_)
    assert np.mean([s.num_rounds for s in long_]) > np.mean([s.num_rounds for s in short]) + 1
    assert {s.meta["dialogue_settings"] for s in mixed} == {"train", "train-long"}
    # a reach-back: a round referring to an earlier round than the previous one
    def reach_backs(samples):
        return sum(r is not None and r < k - 1 for s in samples for k, r in enumerate(s.ref_indices))
    assert reach_backs(long_) > reach_backs(short)


def test_pool_dialogues_carry_what_tinys_last_phases_needed():
    """Repeated structures, absent rounds (also opening a dialogue) contrasted by direct requests for present
    structures, inserted rounds referring to the round before, and a share read with the product's references."""
    cfg = PoolConfig(slices=6, views=1, paraphrase=0.0, absent=0.3, repeat=0.3, product_references=0.5)
    samples = [s for s in (pool_sample(cfg, e % 6, d) for e, d in zip(range(60), range(200, 260))) if s is not None]
    meta = [s.meta for s in samples]
    repeats = [(s, k) for s in samples for k, flag in enumerate(s.meta.get("repeat") or []) if flag]
    assert repeats and all(s.masks[k].any() and s.ref_indices[k] is not None
                           and np.array_equal(s.masks[k], s.masks[s.ref_indices[k]]) for s, k in repeats)
    absent = [(s, k) for s in samples for k, flag in enumerate(s.meta.get("absent") or []) if flag]
    assert any(k == 0 for _, k in absent) and any(k > 0 for _, k in absent)
    assert all(not s.masks[k].any() and "not on this slice" in s.answers[k] for s, k in absent)
    assert 0.25 < np.mean([m.get("product_references", False) for m in meta]) < 0.75
    # direct requests for present structures: segmented rounds beyond the dialogue's own (same entry and draw)
    inserted = PoolConfig(slices=6, views=1, paraphrase=0.0, absent=0.3, repeat=0.0, product_references=0.0, bare=0.0)
    base = PoolConfig(slices=6, views=1, paraphrase=0.0, absent=0.0, repeat=0.0, product_references=0.0, bare=0.0)
    present = 0
    for e, d in zip(range(60), range(200, 260)):
        a, b = pool_sample(inserted, e % 6, d), pool_sample(base, e % 6, d)
        if a is not None:
            flags = a.meta.get("absent") or [False] * a.num_rounds
            segmented = [k for k in range(a.num_rounds) if not flags[k]]
            present += len(segmented) - b.num_rounds
            assert all(a.ref_indices[k] == k - 1 for k in range(1, a.num_rounds) if a.queries[k] not in b.queries)
    assert present > 0


def test_pool_refuses_evaluation_splits_and_shares_outside_0_1():
    for bad in (dict(long_split="hard"), dict(split="val"), dict(long_share=1.5), dict(long_share=-0.1)):
        with pytest.raises(ValueError):
            PoolConfig(**bad)


def test_run_carried_by_a_snapshot_continues_on_a_fresh_clone(tmp_path):
    """`train.snapshot`: a run's float16 weights and step, committed, continue it where `<out>` is gone; the
    optimiser starts afresh, so the learning rate warms up again, and a later resume keeps that warm-up."""
    from safetensors import safe_open

    from MediRoundCore.train.lite import make_trainer
    from MediRoundCore.train.snapshot import load_snapshot, main as snapshot_main, save_snapshot
    from MediRoundCore.errors import CheckpointError
    from MediRoundCore.train.trainer import TrainConfig, warmup_linear

    pool = PoolConfig(slices=2, views=1)
    model, tokenizer = small_lite()
    cfg = TrainConfig(output_dir=str(tmp_path / "first"), steps=2, batch_size=2, save_every=2, warmup_steps=1,
                      rewarm_steps=8)
    make_trainer(model, tokenizer, tmp_path / "first", pool, cfg).train(progress=False)
    info = save_snapshot(tmp_path / "first" / "checkpoint", tmp_path / "snap")
    assert info["step"] == 2 and info["float16"] > 0.8 * info["tensors"]
    with safe_open(str(tmp_path / "snap" / "model.safetensors"), "pt") as f:
        for k in f.keys():  # float16 unless its largest value is below float16's normal range (kept as it is)
            tensor, source = f.get_tensor(k), model.state_dict()[k]
            assert tensor.dtype == (torch.float16 if source.abs().max() >= 1e-3 else source.dtype), k
    size = (tmp_path / "snap" / "model.safetensors").stat().st_size
    assert size < 0.55 * (tmp_path / "first" / "checkpoint" / "model.safetensors").stat().st_size

    again, tok = small_lite(seed=5)
    cfg_on = TrainConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "fresh"), "steps": 4, "save_every": 1})
    trainer = make_trainer(again, tok, tmp_path / "fresh", pool, cfg_on)
    assert trainer.step == 0
    weights, step = load_snapshot(tmp_path / "snap")
    trainer.start_from(weights, step, "snap")
    assert trainer.step == 2 and not trainer.optimizer.state_dict()["state"]
    trained = model.state_dict()
    for key, value in again.state_dict().items():
        if not key.startswith(tuple(again.config.base_weights)):  # filled from the base packages, not stored
            assert value.dtype == trained[key].dtype
            torch.testing.assert_close(value, trained[key], rtol=1e-3, atol=1e-4)
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(cfg.lr * warmup_linear(2, 1, 4) / 8)
    history = trainer.train(progress=False)
    assert [h["step"] for h in history] == [3, 4]
    assert history[0]["lr"] == pytest.approx(cfg.lr * warmup_linear(3, 1, 4) * 2 / 8)
    # a later resume from the run's own checkpoint keeps the warm-up where it was
    third, tok3 = small_lite(seed=6)
    resumed = make_trainer(third, tok3, tmp_path / "fresh", pool, TrainConfig(**{**cfg_on.__dict__, "steps": 6}))
    assert resumed.step == 4 and resumed.rewarm_from == 2
    assert resumed.train(progress=False)[0]["lr"] == pytest.approx(cfg.lr * warmup_linear(5, 1, 6) * 4 / 8)

    assert snapshot_main(["save", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 1  # a message, no traceback
    assert not (tmp_path / "x").exists()

    # word embeddings that start from a pinned base are stored as an int8 difference from it, one scale per row
    key = "language_model.model.embed_tokens.weight"
    start = small_lite()[0].state_dict()[key]
    bases = {"toy_words": (key, lambda shape: start.clone() if tuple(shape) == tuple(start.shape) else None)}
    info = save_snapshot(tmp_path / "first" / "checkpoint", tmp_path / "snap8", bases)
    assert info["int8_delta"] == {key: "toy_words"}
    weights, _ = load_snapshot(tmp_path / "snap8", bases)
    change = (trained[key] - start).abs().amax(dim=1, keepdim=True)
    assert change.max() > 0 and bool(((weights[key] - trained[key]).abs() <= change / 254 + 1e-7).all())
    with pytest.raises(CheckpointError, match="toy_words"):
        load_snapshot(tmp_path / "snap8", {})
    with pytest.raises(CheckpointError, match="not available here"):
        load_snapshot(tmp_path / "snap8", {"toy_words": (key, lambda shape: None)})
    # a snapshot further on than the checkpoint (the run went on elsewhere) is kept; none replaces its source
    (tmp_path / "snap8" / "snapshot.json").write_text('{"step": 99}')
    with pytest.raises(CheckpointError, match="further on"):
        save_snapshot(tmp_path / "first" / "checkpoint", tmp_path / "snap8", bases)
    assert save_snapshot(tmp_path / "first" / "checkpoint", tmp_path / "snap8", bases, force=True)["step"] == 2
    with pytest.raises(CheckpointError, match="replace the checkpoint"):
        save_snapshot(tmp_path / "first" / "checkpoint", tmp_path / "first" / "checkpoint")
    # a run resumed from its own, older checkpoint continues from a snapshot ahead of it with fresh moments
    behind = make_trainer(*small_lite(seed=7), tmp_path / "first", pool, TrainConfig(**{**cfg.__dict__, "steps": 9}))
    assert behind.step == 2 and behind.optimizer.state_dict()["state"]
    behind.start_from(weights, 6, "snap8")
    assert behind.step == 6 and not behind.optimizer.state_dict()["state"]


def test_encode_only_fills_the_cache_and_lists_the_entries(tmp_path):
    """`--encode-only`: every pool view encoded once and listed in the ledger, so a later bounded run knows it."""
    from MediRoundCore.train.lite import encode_pool, pool_ledger
    from MediRoundCore.train.lite_data import read_ledger

    model, _ = small_lite()
    model.eval()
    model.embedding_cache = cache = EmbeddingCache(tmp_path, model)
    pool = PoolConfig(slices=2, views=1)
    assert encode_pool(model, pool, cache, progress=False, ledger=pool_ledger(cache)) == 2
    assert pool_ledger(cache).parent == cache.folder and read_ledger(pool_ledger(cache)) == [0, 1]
    assert encode_pool(model, pool, cache, progress=False, ledger=pool_ledger(cache)) == 0
    assert read_ledger(pool_ledger(cache)) == [0, 1]


def test_bf16_steps_run_under_autocast_near_float32_and_keep_float32_weights(tmp_path):
    """`TrainConfig(precision="bf16")`: the step's products run in bfloat16 (the mask decoder's hypernetwork output
    is bf16), its loss stays near the float32 step's on the same batch and weights, and what is optimised and
    saved stays float32."""
    from safetensors import safe_open

    from MediRoundCore.model.modeling import stage1_losses
    from MediRoundCore.train.batching import make_batch
    from MediRoundCore.train.lite import make_trainer
    from MediRoundCore.train.trainer import TrainConfig

    pool = PoolConfig(slices=2, views=1)
    losses, dtypes = {}, []
    for precision in ("fp32", "bf16"):
        model, tokenizer = small_lite()
        cfg = TrainConfig(output_dir=str(tmp_path / precision), steps=2, batch_size=2, save_every=2, warmup_steps=1,
                          precision=precision, loss_weights={"ce": 1.0, "bce": 2.0, "dice": 2.0})
        trainer = make_trainer(model, tokenizer, tmp_path / precision, pool, cfg)
        samples = [s for s in (pool_sample(pool, e, 0) for e in range(6)) if s is not None][:2]
        batch = make_batch(samples, trainer.builder, model.config, 0.0, np.random.default_rng(0))
        hook = model.segmenter.mask_decoder.output_hypernetworks_mlps[0].register_forward_hook(
            lambda module, args, out: dtypes.append((precision, out.dtype)))
        with torch.no_grad(), trainer.autocast():
            losses[precision] = float(stage1_losses(model, batch, **cfg.loss_weights)["loss"])
        hook.remove()
        history = trainer.train(progress=False)
        assert all(np.isfinite(h["loss"]) for h in history)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        with safe_open(str(tmp_path / precision / "checkpoint" / "model.safetensors"), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    assert set(dtypes) == {("fp32", torch.float32), ("bf16", torch.bfloat16)}
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05) and losses["bf16"] != losses["fp32"]


def test_embeddings_are_encoded_in_float32_under_autocast(tmp_path):
    """A cache miss met inside a bf16 training step is encoded as inference encodes it (float32), so the cache
    never holds a bfloat16 encoding of a view."""
    model, _ = small_lite()
    model.eval()
    pixels = torch.rand(2, 3, 64, 64)
    direct = model.segmenter.image_encoder(pixels)
    cache = EmbeddingCache(tmp_path, model, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = cache.encode(model.segmenter.image_encoder, pixels)
        plain_bf16 = model.segmenter.image_encoder(pixels)
    assert torch.allclose(under_autocast, direct, atol=1e-5)
    assert not torch.allclose(plain_bf16.float(), direct, atol=1e-5)  # what the guard keeps out


def test_precision_choice(tmp_path):
    from MediRoundCore.train.trainer import TrainConfig, Trainer, choose_precision, native_bf16

    assert choose_precision("fp32") == "fp32" and choose_precision("bf16") == "bf16"
    assert choose_precision("auto", "cpu") == ("bf16" if native_bf16("cpu") else "fp32")
    with pytest.raises(ValueError):
        choose_precision("fp16")
    model, tokenizer = small_lite()
    with pytest.raises(ValueError, match="precision"):
        Trainer(model, tokenizer, TrainConfig(output_dir=str(tmp_path / "run"), precision="auto"),
                lambda seed: iter(()))
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_batches_made_in_a_worker_are_the_trainers_own(tmp_path):
    """`train.lite --workers 1`: a worker process makes exactly the batches the trainer would make itself, in
    order, from the step it starts at; a second worker draws other dialogues, never copies."""
    from MediRoundCore.train.batching import batches_in_workers
    from MediRoundCore.train.lite import make_trainer
    from MediRoundCore.train.trainer import TrainConfig, stream_seed

    pool = PoolConfig(slices=3, views=1)
    model, tokenizer = small_lite()
    cfg = TrainConfig(output_dir=str(tmp_path), steps=2, batch_size=2, save_every=2, warmup_steps=1)
    trainer = make_trainer(model, tokenizer, tmp_path, pool, cfg)
    trainer.step = 5
    own_samples = trainer._batches()
    rng = np.random.default_rng(stream_seed(cfg.seed, 5))
    from MediRoundCore.train.batching import make_batch

    own = [make_batch(next(own_samples), trainer.builder, model.config, 0.0, rng) for _ in range(2)]
    one = batches_in_workers(trainer.sample_stream, stream_seed(cfg.seed, 5), 2, trainer.builder, model.config,
                             0.0, workers=1, prefetch=2)
    for mine, theirs in zip(own, [next(one) for _ in range(2)]):
        assert torch.equal(mine.input_ids, theirs.input_ids) and torch.equal(mine.target_masks, theirs.target_masks)
    two = batches_in_workers(trainer.sample_stream, stream_seed(cfg.seed, 5), 2, trainer.builder, model.config,
                             0.0, workers=2, prefetch=2)
    first, second = next(two), next(two)
    assert torch.equal(first.input_ids, own[0].input_ids)
    assert not (first.input_ids.shape == second.input_ids.shape and torch.equal(first.input_ids, second.input_ids))
    # and the trainer trains from them
    trainer.step, trainer.workers = 0, 1
    history = trainer.train(progress=False)
    assert [h["step"] for h in history] == [1, 2] and all(np.isfinite(h["loss"]) for h in history)
