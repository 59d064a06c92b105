"""MediRound-Lite, the default model's architecture on the pinned base weights: built from LiteMedSAM and
MiniLM, one engine Ask end to end on a real CT slice, and a checkpoint that stores only what we train."""

from pathlib import Path

import numpy as np
import pytest
import torch

from MediRoundCore.checkpoints import base_weights
from conftest import build_lite_or_skip

DATA = Path("/work/shared/data/pyradiomics-3.1.0/data")


@pytest.fixture(scope="module")
def lite():
    model, tokenizer = build_lite_or_skip()
    model.config.max_answer_tokens = 6  # untrained: keep its babble short
    return model.eval(), tokenizer


def test_parts_come_from_the_base_weights(lite):
    from MediRoundCore.checkpoints.safety import load_tensors

    model, tokenizer = lite
    pth = load_tensors(base_weights.file_path("lite_medsam"))
    own = model.state_dict()
    for key in ("image_encoder.layers.2.blocks.5.attn.qkv.weight", "mask_decoder.iou_token.weight",
                "prompt_encoder.point_embeddings.2.weight"):
        assert torch.equal(own["segmenter." + key], pth[key])
    words = load_tensors(base_weights.locate("minilm") / "model.safetensors")["embeddings.word_embeddings.weight"]
    embed = model.language_model.get_input_embeddings().weight
    kidney = tokenizer.convert_tokens_to_ids("kidney")
    assert torch.equal(embed[kidney], words[kidney])
    assert model.language_model.lm_head.weight is embed  # tied
    assert tokenizer.convert_tokens_to_ids("[SEG]") == 30522 and model.token_ids.bos == tokenizer.cls_token_id
    # the base a training snapshot stores the word embeddings against is where they start
    from MediRoundCore.checkpoints.base_delta import BASES

    key, make = BASES["lite_word_embeddings"]
    assert torch.equal(make(tuple(embed.shape)), embed.detach()) and key in model.state_dict()
    assert make((300, 384)) is None and make((embed.shape[0], 128)) is None
    # the frozen base parts get no gradient; the mask decoder does
    assert not any(p.requires_grad for p in model.segmenter.image_encoder.parameters())
    assert all(p.requires_grad for p in model.segmenter.mask_decoder.parameters())


@pytest.mark.slow
def test_one_ask_end_to_end_on_a_real_ct(lite):
    from MediRoundCore.engine import Engine
    from MediRoundCore.imaging import extract_slice, load_volume
    from MediRoundCore.session import Session

    if not DATA.is_dir():
        pytest.skip("real volumes not on this machine")
    model, tokenizer = lite
    volume = load_volume(DATA / "lung2_image.nrrd")
    engine = Engine(model, tokenizer)
    session = Session(volume.fingerprint())
    image = extract_slice(volume, "axial", 21)
    result = engine.ask(session, "Segment the right lung.", image)
    assert result.mask.shape == image.pixels.shape and result.mask.dtype == bool
    assert result.prompt.shape == (256,) and torch.isfinite(result.prompt).all()
    assert result.round.timings["segmenter_encoder_ms"] > 0 and result.round.lm_tokens > 64
    second = engine.ask(session, "Go back to the first one.", image)
    assert second.round.reference == 1 and "segmenter_encoder_ms" not in second.round.timings
    # MiniLM's 30.5 k-word head is read through its int8 screen, and the answers are the float32 head's
    screen = engine._decode_step._screen
    assert screen is not None and screen.usable and screen.rescored > 0
    plain = Engine(model, tokenizer, fast_decode=False)
    again = Session(volume.fingerprint())
    assert [plain.ask(again, q, image).round.answer for q in ("Segment the right lung.", "Go back to the first one.")
            ] == [result.round.answer, second.round.answer]


def test_the_word_heads_screen_picks_the_float32_argmax(lite):
    """MiniLM's own word embeddings as the head, states leaning towards words through the final RMSNorm's scale:
    the int8 screen's tokens are the float32 argmax, rescoring a few rows each."""
    import torch.nn.functional as F

    from MediRoundCore.model.greedy_head import ScreenedArgmax

    model, _ = lite
    head = model.language_model.lm_head
    screen = ScreenedArgmax.for_head(head)
    g = torch.Generator().manual_seed(0)
    words = head.weight.detach()[torch.randint(0, head.weight.shape[0], (200,), generator=g)]
    states = words / words.norm(dim=1, keepdim=True) * 3 * 384 ** 0.5 + torch.randn(200, 384, generator=g)
    with torch.inference_mode():
        expected = F.linear(states, head.weight).argmax(-1)
    assert torch.equal(screen(states), expected)
    assert screen.usable and screen.fallbacks == 0 and screen.rescored <= 200 * 16


def test_checkpoint_stores_only_what_we_train(lite, tmp_path):
    from safetensors import safe_open

    from MediRoundCore.model.modeling import MediRound

    model, tokenizer = lite
    with torch.no_grad():  # pretend training moved a trained part
        model.segmenter.mask_decoder.iou_token.weight.add_(0.5)
    model.save_pretrained(tmp_path, tokenizer)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any(k.startswith(("segmenter.image_encoder.", "segmenter.prompt_encoder.")) for k in keys)
    assert "language_model.lm_head.weight" not in keys and "segmenter.mask_decoder.iou_token.weight" in keys
    loaded, tok = MediRound.from_pretrained(tmp_path)
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert set(ours) == set(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert loaded.language_model.lm_head.weight is loaded.language_model.get_input_embeddings().weight
    assert tok.convert_tokens_to_ids("[SEG]") == 30522
    with torch.no_grad():
        model.segmenter.mask_decoder.iou_token.weight.sub_(0.5)


def test_query_states_reach_exactly_the_query_tokens(lite):
    from MediRoundCore.model.processing import PromptBuilder

    model, tokenizer = lite
    builder = PromptBuilder.for_model(tokenizer, model)  # the lite preset's prompts carry round tags
    first = builder.user("Segment the right lung.", False, True, number=1)
    second = builder.user("Now the lesion inside it.", True, False, number=2, reference=1)
    ids = torch.tensor([builder.prefix() + first + builder.answer("right lung: the lung.") + second])
    spans = model.query_spans(ids)
    words = [tokenizer.decode(ids[0, s:e].tolist()) for _, s, e in spans]
    assert words == ["segment the right lung.", "( about round 1 ) now the lesion inside it."]  # not "round 2:"
    inside = torch.zeros(ids.shape[1], dtype=torch.bool)
    for _, s, e in spans:
        inside[s:e] = True
    # the projection starts at zero: the untrained model reads the plain word embeddings
    with torch.no_grad():
        plain = model.language_model.get_input_embeddings()(ids)
        filled = model.embed_inputs(ids, torch.zeros(1, 64, 384), torch.zeros(1, 384), torch.zeros(1, 384))
        assert torch.equal(filled[0, inside], plain[0, inside])
        model.query_projection.weight.normal_(0, 0.02)
        states = model.query_states(ids)
        model.query_projection.weight.zero_()
    assert (states[0, inside].abs().sum(-1) > 0).all() and (states[0, ~inside] == 0).all()
    # training mode leaves the frozen base parts (BatchNorm statistics, dropout) as published
    model.train()
    assert not model.segmenter.image_encoder.training and not model.query_encoder.training
    assert model.segmenter.mask_decoder.training
    model.eval()


def test_answers_decode_as_written(lite):
    """MiniLM's WordPiece splits off every punctuation mark; the chat shows what the answer said, not
    "left kidney : it lies on the patient ' s left" (every generated answer of two splits, lower-cased as lite
    reads them, comes back exactly)."""
    from MediRoundCore.data.splits import make_dialogue, to_sample
    from MediRoundCore.model.processing import PromptBuilder

    model, tokenizer = lite
    builder = PromptBuilder.for_model(tokenizer, model)
    answers = {a.replace("[SEG]", "").strip().lower() for split in ("train-long", "hard") for i in range(25)
               for a in to_sample(make_dialogue(split, 0, i)).answers}
    answers |= {"left kidney: not on this slice.", "it is 3.5 cm, fluid-filled (round 2); t2-weighted, the liver's."}
    assert len(answers) > 100
    for answer in answers:
        ids = builder.answer(answer)[:-2]  # without [SEG] and EOS
        assert builder.decode(ids) == answer
        assert builder.answer(builder.decode(ids)) == builder.answer(answer)  # the same ids when fed again
    raw = tokenizer.decode(builder.answer("the patient's left: (round 2)")[:-2], skip_special_tokens=True)
    assert raw.strip() == "the patient ' s left : ( round 2 )"  # what the tidying is for
