"""The int8 screen of a large language-model head (model/greedy_head.py): the same greedy token as the float32
head's argmax on states that decide sharply, on near-ties and on flat ones; the bound it relies on holds for every
row; the screen follows the weights when they change; heads it is not for, or a machine where its check fails,
keep the float32 head. The engine's answers with it are those without it (a lite-sized head)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import MistralConfig, MistralForCausalLM

import MediRoundCore.model.greedy_head as greedy_head
from MediRoundCore.model.decode_step import DecodeStep
from MediRoundCore.model.greedy_head import MIN_HEAD_BYTES, ScreenedArgmax, _quantise_rows

H = 384
V = MIN_HEAD_BYTES // (H * 4) + 500  # just large enough to be screened


def _head(seed=0, vocab=V):
    """A head with word-embedding statistics like MiniLM's (rows of norm ~1.2, a few larger entries)."""
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(H, vocab, bias=False)
    with torch.no_grad():
        w = torch.randn(vocab, H, generator=g) * 0.06
        w[:, :4] *= 5  # outlier dimensions, as trained embeddings have
        head.weight.copy_(w)
    return head


def _states(head, n, seed=1, sharpness=1.0):
    """Final hidden states at an RMSNorm's scale leaning towards random rows (as a trained model's do)."""
    g = torch.Generator().manual_seed(seed)
    rows = head.weight.detach()[torch.randint(0, head.weight.shape[0], (n,), generator=g)]
    x = sharpness * rows / rows.norm(dim=1, keepdim=True) * 4 * H ** 0.5 + torch.randn(n, H, generator=g)
    return x


def test_the_screens_token_is_the_float32_argmax_and_few_rows_are_rescored():
    head = _head()
    screen = ScreenedArgmax.for_head(head)
    assert screen is not None
    x = _states(head, 300)
    with torch.inference_mode():
        expected = F.linear(x, head.weight).argmax(-1)
    assert torch.equal(screen(x), expected)
    assert screen.usable and screen.fallbacks == 0
    assert screen.rescored <= 300 * 8  # the screen decides almost alone: a few rows per state, not V


def test_the_bound_holds_for_every_row():
    head = _head(seed=3)
    screen = ScreenedArgmax.for_head(head)
    assert screen.prepare()
    for sharpness in (0.0, 0.3, 1.0, 3.0):
        x = _states(head, 64, seed=5, sharpness=sharpness)
        with torch.inference_mode():
            y, bound, covered = screen._bounds(x)
            exact = x.double() @ head.weight.detach().double().T
        assert covered.all() and ((exact - y.double()).abs() <= bound.double()).all()


def _aimed_states(head, picked):
    """States that make each rounding term of the bound nearly tight on the picked rows: along the rows' own
    int8 rounding errors (the weight term), and states a hair under half a step off the int8 grid, leaning the
    way each row's entries point (the state term)."""
    w = head.weight.detach()[picked]
    scale, q, _ = _quantise_rows(w)
    along = w - q.float() * scale[:, None]
    along = along / along.norm(dim=1, keepdim=True) * 4 * H ** 0.5
    leaning = torch.zeros(len(picked), H)
    leaning[:, 0] = 127.0
    leaning = (leaning + 0.49 * torch.sign(q.float())) * 0.05
    return along, leaning


def test_the_bound_is_nearly_reached_by_aimed_states():
    """Each term is needed: on states aimed at it the error reaches over half the bound on some row, so a bound
    without that term, or a halved one, would not hold."""
    head = _head(seed=3)
    screen = ScreenedArgmax.for_head(head)
    assert screen.prepare()
    picked = torch.randint(0, V, (32,), generator=torch.Generator().manual_seed(0))
    for x in _aimed_states(head, picked):
        with torch.inference_mode():
            y, bound, _ = screen._bounds(x)
            exact = x.double() @ head.weight.detach().double().T
        ratio = ((exact - y.double()).abs() / bound.double())[torch.arange(32), picked]
        assert ratio.max() <= 1.0 and ratio.max() > 0.5


def test_exact_ties_pick_the_lowest_index_as_argmax():
    head = _head(seed=4)
    with torch.no_grad():
        head.weight[7] = head.weight[5000]  # an exact duplicate of a later row: the two tie
    x = (head.weight.detach()[[5000]] * 40).clone()
    screen = ScreenedArgmax.for_head(head)
    with torch.inference_mode():
        expected = F.linear(x, head.weight).argmax(-1)
    assert expected.tolist() == [7]
    assert screen(x).tolist() == [7]


def test_states_beyond_the_bound_read_the_whole_head():
    """NaN, infinite, overflowing and vanishing states: the float32 head's argmax, never an error."""
    head = _head(seed=13)
    with torch.no_grad():
        head.weight[3] = 0.0  # an exactly representable row: its rounding term is 0 (0 × inf is NaN)
    screen = ScreenedArgmax.for_head(head)
    base = _states(head, 6, seed=14)
    x = torch.stack([base[0].clone().fill_(float("nan")), base[1] * float("inf"), base[2] * 1e37,
                     base[3] * 1e-25, base[4] * 1e-35, torch.zeros(H)])
    x[0, 5:] = base[0, 5:]  # partly NaN
    with torch.inference_mode():
        expected = F.linear(x, head.weight).argmax(-1)
    assert torch.equal(screen(x), expected)


def test_flat_states_read_the_whole_head():
    head = _head(seed=6)
    screen = ScreenedArgmax.for_head(head)
    with torch.no_grad():
        head.weight[100:2000] = head.weight[100]  # 1900 rows that tie with each other
    x = torch.cat([torch.zeros(1, H), head.weight[100:101].detach() * 40])
    with torch.inference_mode():
        expected = F.linear(x, head.weight).argmax(-1)
    assert torch.equal(screen(x), expected)
    assert expected.tolist() == [0, 100] and screen.fallbacks == 2


def test_the_screen_follows_weights_that_change():
    head = _head(seed=7)
    screen = ScreenedArgmax.for_head(head)
    x = _states(head, 20, seed=8)

    def check():
        with torch.inference_mode():
            expected = F.linear(x, head.weight).argmax(-1)
        assert torch.equal(screen(x), expected)

    check()
    with torch.no_grad():
        head.weight.mul_(-1.0)  # in place: the version counter moves
    check()
    head.weight = torch.nn.Parameter(_head(seed=9).weight.detach().clone())  # replaced
    check()
    for cast in (torch.bfloat16, torch.float32):  # a round trip: the same Parameter, new storage, new values
        head.to(cast)
    check()
    head.weight.data.copy_(_head(seed=15).weight.detach())  # through .data: invisible until cleared
    screen.clear()
    check()
    assert ScreenedArgmax.for_head(head) is screen  # one screen per head, shared


def test_heads_it_is_not_for():
    assert ScreenedArgmax.for_head(_head(vocab=1000)) is None  # small: float32 is quick
    biased = torch.nn.Linear(H, V)
    assert ScreenedArgmax.for_head(biased) is None
    assert ScreenedArgmax.for_head(_head().to(torch.bfloat16)) is None


def test_a_failed_check_keeps_the_float32_head(monkeypatch):
    """Where the int8 product is missing (or rounds beyond the bound), the float32 head decides."""
    head = _head(seed=10)
    screen = ScreenedArgmax.for_head(head)

    def missing(*args):
        raise RuntimeError("_int_mm: not implemented for this CPU")

    monkeypatch.setattr(greedy_head.torch, "_int_mm", missing)
    screen.clear()
    x = _states(head, 10, seed=11)
    with torch.inference_mode():
        expected = F.linear(x, head.weight).argmax(-1)
    assert torch.equal(screen(x), expected)
    assert not screen.usable and screen.rescored == 0

    monkeypatch.undo()
    screen.clear()
    assert screen.prepare()
    monkeypatch.setattr(greedy_head, "REL", -1.0)  # a bound that cannot hold
    screen.clear()
    assert torch.equal(screen(x), expected)
    assert not screen.usable and screen.rescored == 0

    def inexact(a, b):  # an int8 product that saturates, as a 16-bit kernel would
        return (a.int() @ b.int()).clamp(-2 ** 15, 2 ** 15 - 1)

    monkeypatch.undo()
    monkeypatch.setattr(greedy_head.torch, "_int_mm", inexact)
    screen.clear()
    assert not screen.prepare()


@pytest.mark.parametrize("draft", [1, 5])
def test_decode_steps_greedy_tokens_are_the_logits_argmax(draft):
    """`DecodeStep.greedy` on a language model with a screened head: the tokens `many`'s logits give, with the
    same hidden states and cache, through a short greedy decode that feeds its own tokens back."""
    config = MistralConfig(vocab_size=V, hidden_size=H, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                           sliding_window=None, tie_word_embeddings=True)
    torch.manual_seed(0)
    lm = MistralForCausalLM(config).eval()
    with torch.no_grad():
        lm.model.embed_tokens.weight.copy_(_head(seed=12).weight)
        lm.model.norm.weight.fill_(4.0)  # trained final norms scale up: sharp logits
    step = DecodeStep.for_model(lm)
    assert step._screen is not None and step.greedy_weight_bytes < step.weight_bytes
    from MediRoundCore.model.kv_cache import new_cache

    caches = [new_cache(), new_cache()]
    prefix = lm.model.embed_tokens.weight[:12][None].detach()
    with torch.inference_mode():
        tokens = [step.greedy(prefix, caches[0], 0, last_only=True)[0],
                  step.many(prefix, caches[1], 0, last_only=True)[0].argmax(-1)]
        assert torch.equal(*tokens)
        position = 12
        for _ in range(4):
            ids = torch.cat([tokens[0][-1:], torch.arange(draft - 1) + 100])
            embeds = lm.model.embed_tokens(ids)[None]
            greedy, hidden = step.greedy(embeds, caches[0], position)
            logits, hidden_ref = step.many(embeds, caches[1], position)
            assert torch.equal(greedy, logits.argmax(-1))
            torch.testing.assert_close(hidden, hidden_ref)
            tokens = [greedy, greedy]
            position += draft
    assert step._screen.rescored > 0


def test_the_engine_answers_the_same_through_a_screened_head(tiny_engine, monkeypatch):
    """The engine's decoding with its head screened (the tiny model's, screened here by lowering the size floor)
    gives the answers and masks of transformers' forward, round by round."""
    import numpy as np

    from MediRoundCore.engine import Engine
    from MediRoundCore.imaging import SliceImage
    from MediRoundCore.session import Session

    monkeypatch.setattr(greedy_head, "MIN_HEAD_BYTES", 0)
    screened = Engine(tiny_engine.model, tiny_engine.tokenizer)
    screen = screened._decode_step._screen
    assert screen is not None and screen.usable
    plain = Engine(tiny_engine.model, tiny_engine.tokenizer, fast_decode=False)
    pixels = np.zeros((64, 80), np.float32)
    pixels[20:40, 10:50] = 1.0
    image = SliceImage(pixels=pixels, view="axial", index=0, axis=2, transpose=False, flip_rows=False,
                       flip_cols=False, modality="MR")
    queries = ("Segment the liver.", "Now the lesion inside it.", "Go back to the first one.", "Segment the spleen.")
    results = []
    for engine in (plain, screened):
        session = Session("vol")
        results.append([engine.ask(session, q, image) for q in queries])
    for a, b in zip(*results):
        assert a.round.answer == b.round.answer
        assert (a.round.mask == b.round.mask).mean() > 0.999
    assert screen.rescored > 0
