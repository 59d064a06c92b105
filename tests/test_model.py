"""The MediRound model at tiny size: parts, reference features, [SEG] decoding, JCM, LoRA, checkpoints."""

import numpy as np
import pytest
import torch

from MediRoundCore.errors import CheckpointError, ConfigError
from MediRoundCore.model import MediRound, MediRoundConfig, full_config, tiny_config
from MediRoundCore.model.jcm import JudgmentCorrection
from MediRoundCore.model.processing import reference_inputs


def test_presets_share_prompt_and_jcm_sizes():
    full, tiny = full_config(), tiny_config()
    assert full.segmenter.prompt_dim == tiny.segmenter.prompt_dim == 256
    assert full.jcm.hidden_dim == tiny.jcm.hidden_dim == 512 and full.jcm.beta == 0.6
    assert full.text.hidden_size == 4096 and full.vision.image_size == 336 and full.segmenter.image_size == 1024
    assert full.vision.num_patches == 576
    assert tiny.segmenter.image_size == 256


def test_jcm_layer_sizes_match_paper(tiny_engine):
    jcm = tiny_engine.model.jcm
    q = [(l.in_features, l.out_features) for l in (jcm.quality.fc1, jcm.quality.fc2, jcm.quality.fc3)]
    c = [(l.in_features, l.out_features) for l in (jcm.correction.fc1, jcm.correction.fc2, jcm.correction.fc3)]
    assert q == [(256, 512), (512, 512), (512, 1)]
    assert c == [(256, 512), (512, 512), (512, 256)]


def test_jcm_decision_follows_beta():
    torch.manual_seed(0)
    jcm = JudgmentCorrection()
    x = torch.randn(16, 256)
    score = jcm.quality(x)
    beta = float(score.detach().median())
    out, s, corrected = jcm(x, beta)
    assert torch.equal(corrected, score <= beta)
    assert corrected.any() and (~corrected).any()
    assert torch.allclose(out[corrected], jcm.correction(x[corrected]))
    assert torch.equal(out[~corrected], x[~corrected])


def test_seg_projection_and_box_encoder_shapes(tiny_engine):
    m = tiny_engine.model
    h = m.config.text.hidden_size
    assert [type(l).__name__ for l in m.seg_projection] == ["Linear", "ReLU", "Linear"]
    assert m.seg_projection[0].in_features == h and m.seg_projection[2].out_features == 256
    assert (m.box_encoder.in_features, m.box_encoder.out_features) == (4, h)


def test_reference_crop_and_box():
    cfg = tiny_config()
    img = np.linspace(0, 1, 60 * 80, dtype=np.float32).reshape(60, 80)
    mask = np.zeros((60, 80), bool)
    mask[10:20, 40:70] = True
    crop, box = reference_inputs(img, mask, cfg)
    assert crop.shape == (3, cfg.vision.image_size, cfg.vision.image_size)
    # normalised in the square frame the model sees the 60x80 slice in: centred in 80x80, 10 rows above it
    assert torch.allclose(box, torch.tensor([40 / 80, 20 / 80, 70 / 80, 30 / 80]))
    empty_crop, empty_box = reference_inputs(img, np.zeros_like(mask), cfg)
    assert torch.equal(empty_box, torch.zeros(4))


def test_batched_decoder_equals_sam_decoder(tiny_engine):
    m = tiny_engine.model
    g = m.config.segmenter.embedding_size
    torch.manual_seed(1)
    emb, prompts = torch.randn(3, 256, g, g), torch.randn(3, 256)
    ours = m.decode_with_prompts(emb, prompts)
    pe = m.segmenter.prompt_encoder
    for i in range(3):
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, g, g)
        ref, _ = m.segmenter.mask_decoder(image_embeddings=emb[i:i + 1], image_pe=pe.get_dense_pe(),
                                          sparse_prompt_embeddings=prompts[i:i + 1, None],
                                          dense_prompt_embeddings=dense, multimask_output=False)
        assert torch.allclose(ours[i:i + 1], ref, atol=1e-5)


def test_embed_inputs_fills_placeholders(tiny_engine):
    m, ids = tiny_engine.model, tiny_engine.model.token_ids
    h = m.config.text.hidden_size
    seq = torch.tensor([[ids.bos, ids.image, ids.image, 9, ids.crop, ids.box, 10]])
    image, crop, box = torch.randn(1, 2, h), torch.randn(1, h), torch.randn(1, h)
    out = m.embed_inputs(seq, image, crop, box)
    assert torch.equal(out[0, 1:3], image[0]) and torch.equal(out[0, 4], crop[0]) and torch.equal(out[0, 5], box[0])
    with pytest.raises(ValueError, match="placeholder"):
        m.embed_inputs(seq, image, None, box)


def test_save_and_load_round_trip_exact(tiny_engine, tmp_path):
    m, tok = tiny_engine.model, tiny_engine.tokenizer
    m.save_pretrained(tmp_path / "ckpt", tok)
    loaded, tok2 = MediRound.from_pretrained(tmp_path / "ckpt")
    a, b = m.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert tok2.encode("segment the liver.") == tok.encode("segment the liver.")
    assert loaded.config.to_dict() == m.config.to_dict()


def test_lora_round_trip_and_trainable_set(tmp_path):
    from MediRoundCore.engine import Engine
    from MediRoundCore.model.lora import has_lora
    from MediRoundCore.train.trainer import set_trainable

    engine = Engine.random_tiny(seed=3)
    params = set_trainable(engine.model, stage=1, lora=True)
    assert has_lora(engine.model)
    names = {n for n, p in engine.model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in names) and any("q_proj" in n and "lora" in n for n in names)
    assert not any("k_proj" in n and "lora" in n for n in names)
    assert any(n.startswith("segmenter.mask_decoder") for n in names)
    assert not any(n.startswith("segmenter.image_encoder") for n in names)
    assert not any(n.startswith("language_model") and "layers.0.mlp" in n for n in names)
    with torch.no_grad():
        for n, p in engine.model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    engine.model.save_pretrained(tmp_path / "lora", engine.tokenizer)
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").is_file()
    loaded, _ = MediRound.from_pretrained(tmp_path / "lora")
    assert has_lora(loaded)
    a, b = engine.model.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(params) == len(names)


def test_config_missing_field_is_named(tmp_path):
    data = tiny_config().to_dict()
    del data["segmenter"]["embed_dim"]
    with pytest.raises(ConfigError, match="embed_dim"):
        MediRoundConfig.from_dict(data)


def test_checkpoint_of_wrong_size_names_tensor(tiny_engine, tmp_path):
    tiny_engine.model.save_pretrained(tmp_path / "ckpt", tiny_engine.tokenizer)
    import json
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["text"]["intermediate_size"] = 640
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'language_model\.model\.layers\.0\.mlp"):
        MediRound.from_pretrained(tmp_path / "ckpt")


def test_float16_storage_loads_as_float32(tiny_engine, tmp_path):
    m, tok = tiny_engine.model, tiny_engine.tokenizer
    m.save_pretrained(tmp_path / "half", tok, storage_dtype=torch.float16)
    loaded, _ = MediRound.from_pretrained(tmp_path / "half")
    w = loaded.box_encoder.weight
    assert w.dtype == torch.float32
    assert torch.equal(w, m.box_encoder.weight.half().float())


def test_bfloat16_model_decodes_masks(tiny_engine):
    """The GPU path runs in bf16: SAM's positional encoding must not mix dtypes."""
    import copy

    model = copy.deepcopy(tiny_engine.model).to(torch.bfloat16)
    g = model.config.segmenter.embedding_size
    out = model.decode_with_prompts(torch.randn(2, 256, g, g, dtype=torch.bfloat16), torch.randn(2, 256, dtype=torch.bfloat16))
    ref = tiny_engine.model.decode_with_prompts(torch.zeros(1, 256, g, g), torch.zeros(1, 256))
    assert out.dtype == torch.bfloat16 and out.shape[1:] == ref.shape[1:]
    assert torch.isfinite(out.float()).all()


def test_language_model_rope_theta_reaches_the_rotary_embedding():
    """The configured RoPE base is used under transformers 4.x (rope_theta) and 5.x (rope_parameters): the full
    model's Mistral uses 1e6, not transformers' default 10000."""
    import dataclasses

    from MediRoundCore.model.config import tiny_config
    from MediRoundCore.model.modeling import build_language_model

    text = dataclasses.replace(tiny_config().text, rope_theta=1e6)
    lm = build_language_model(text)
    head_dim = text.hidden_size // text.num_attention_heads
    expected = 1.0 / (1e6 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    torch.testing.assert_close(lm.model.rotary_emb.inv_freq, expected)


def test_answer_loss_equals_transformers_causal_lm_loss_with_gradients(tiny_engine):
    """The training loss runs the LM head only where a label is; loss and gradients are transformers' own."""
    from MediRoundCore.model.modeling import LAST_LOGITS_ONLY, answer_loss

    lm = tiny_engine.model.language_model
    torch.manual_seed(0)
    embeds = torch.randn(2, 12, lm.config.hidden_size)
    labels = torch.full((2, 12), -100)
    labels[0, 5:9] = torch.randint(0, lm.config.vocab_size, (4,))
    labels[1, 2:4] = torch.randint(0, lm.config.vocab_size, (2,))
    weights = [p for p in lm.parameters()]

    def run(ours: bool):
        x = embeds.clone().requires_grad_()
        with torch.enable_grad():
            if ours:
                out = lm(inputs_embeds=x, output_hidden_states=True, **LAST_LOGITS_ONLY)
                assert out.logits.shape[1] == (1 if LAST_LOGITS_ONLY else 12)
                loss = answer_loss(lm, out.hidden_states[-1], labels)
            else:
                loss = lm(inputs_embeds=x, labels=labels).loss
            return loss.detach(), torch.autograd.grad(loss, [x, *weights], allow_unused=True)

    ours, our_grads = run(True)
    theirs, their_grads = run(False)
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(our_grads, their_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
