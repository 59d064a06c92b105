"""Property tests (hypothesis, issue 14): session save/load round trip; reference parsing of any text;
preprocessing of slices of any dtype, shape and value range."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from MediRoundCore.errors import MediRoundError, VolumeError
from MediRoundCore.imaging import normalize_intensity
from MediRoundCore.references import named_round, resolve_reference
from MediRoundCore.session import Round, Session

FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- sessions ------------------------------------------------------------------------------------------------------
texts = st.text(max_size=60)  # any unicode (hypothesis leaves out lone surrogates, which JSON cannot carry)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@st.composite
def rounds(draw):
    n = draw(st.integers(0, 5))
    out = []
    for number in range(1, n + 1):
        shape = draw(st.tuples(st.integers(1, 24), st.integers(1, 24)))
        out.append(Round(
            number=number,
            view=draw(st.sampled_from(["axial", "coronal", "sagittal"])),
            slice_index=draw(st.integers(0, 10_000)),
            query=draw(texts), answer=draw(texts), entity=draw(st.none() | texts),
            reference=draw(st.none() | st.integers(1, number - 1)) if number > 1 else None,
            mask=draw(hnp.arrays(bool, shape)),
            jcm_score=draw(st.none() | finite), corrected=draw(st.booleans()), seg_forced=draw(st.booleans()),
            lm_tokens=draw(st.integers(0, 10**6)),
            timings=draw(st.dictionaries(st.text(max_size=10), finite, max_size=3))))
    return out


@FAST
@given(rounds(), st.text(min_size=1, max_size=20), texts)
def test_session_round_trip(rs, fingerprint, volume_name):
    with tempfile.TemporaryDirectory() as folder:
        s = Session(fingerprint, folder, volume_name)
        for r in rs:
            s.add_round(r)
        s.save()  # a session without rounds is written only when asked
        loaded = Session.load(folder, expected_fingerprint=fingerprint)
        assert loaded.volume_name == volume_name and loaded.volume_fingerprint == fingerprint
        assert len(loaded.rounds) == len(rs)
        for a, b in zip(rs, loaded.rounds):
            assert b.to_json() == a.to_json()
            assert b.mask.dtype == bool and np.array_equal(a.mask, b.mask)
        if rs:  # undo persists as well
            s.undo()
            assert len(Session.load(folder).rounds) == len(rs) - 1


# -- references ---------------------------------------------------------------------------------------------------
@FAST
@given(st.text(max_size=200), st.lists(st.none() | st.text(max_size=20), max_size=8))
def test_reference_parsing_never_raises(query, entities):
    n = len(entities)
    named = named_round(query, entities)
    assert named is None or 1 <= named <= n
    resolved = resolve_reference(query, entities)
    assert (resolved is None) if n == 0 else 1 <= resolved <= n


@FAST
@given(st.integers(1, 12), st.integers(-5, 20), st.sampled_from(["round {}", "R{}", "turn #{}", "Round  {} again"]))
def test_named_round_numbers(n, k, template):
    got = named_round(template.format(k), ["liver"] * n)
    assert got == (k if 1 <= k <= n else None)


# -- preprocessing ---------------------------------------------------------------------------------------------
DTYPES = [np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64,
          np.float16, np.float32, np.float64]
shapes = st.tuples(st.integers(1, 48), st.integers(1, 48)) | st.tuples(st.just(1), st.integers(1, 600)) \
    | st.tuples(st.integers(1, 600), st.just(1))


@st.composite
def slices(draw, finite_only=True):
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = draw(shapes)
    if dtype.kind == "f":
        elements = st.floats(allow_nan=not finite_only, allow_infinity=not finite_only, width=dtype.itemsize * 8)
    else:
        elements = None  # hypothesis: the dtype's full range
    return draw(hnp.arrays(dtype, shape, elements=elements))


@FAST
@given(slices(), st.sampled_from(["CT", "MR", "normalized"]))
@example(np.array([[-1.7e308, 1.7e308, 0.0]]), "MR")  # the range itself overflows float64
@example(np.array([[np.finfo(np.float16).max, np.finfo(np.float16).min]], np.float16), "MR")
@example(np.array([[5e-324, 0.0, 1e-323]]), "MR")  # subnormal range
@example(np.full((3, 4), np.iinfo(np.uint64).max, np.uint64), "CT")
def test_normalize_any_finite_slice(pixels, modality):
    out = normalize_intensity(pixels, modality)
    assert out.shape == pixels.shape and out.dtype == np.float32
    assert np.all(np.isfinite(out)) and out.min() >= 0.0 and out.max() <= 1.0


@st.composite
def non_finite_slices(draw):
    dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
    with np.errstate(over="ignore"):  # big integers become inf in float16: fine, that is the point
        pixels = draw(slices()).astype(dtype)
    flat = pixels.reshape(-1)
    for i in draw(st.lists(st.integers(0, flat.size - 1), min_size=1, max_size=4)):
        flat[i] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return pixels


@FAST
@given(non_finite_slices(), st.sampled_from(["CT", "MR", "normalized"]))
def test_normalize_refuses_nan_and_inf(pixels, modality):
    with pytest.raises(VolumeError, match="NaN or infinite"):
        normalize_intensity(pixels, modality)


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0), (7,), (2, 3, 4), ()])
def test_normalize_refuses_empty_and_wrong_shapes(shape):
    with pytest.raises(MediRoundError, match="2D slice"):
        normalize_intensity(np.zeros(shape, np.float32))


@pytest.fixture(scope="module")
def configs():
    import torch

    from MediRoundCore.model.config import tiny_config

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy shared CPU: one thread is much faster
    a = tiny_config(vocab_size=400)
    b = tiny_config(vocab_size=400)
    b.segmenter_normalization = "sam_mean_std"
    yield a, b
    torch.set_num_threads(threads)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pixels=slices(), modality=st.sampled_from(["CT", "MR", "normalized"]), which=st.integers(0, 1))
def test_model_inputs_of_any_slice(configs, pixels, modality, which):
    """What the engine feeds the model: normalised slice -> segmenter and vision-tower pixels."""
    from MediRoundCore.model.processing import segmenter_pixels, vision_pixels

    x = normalize_intensity(pixels, modality)
    for config in configs[which:which + 1]:
        seg, (h, w) = segmenter_pixels(x, config)
        size = config.segmenter.image_size
        assert seg.shape == (3, size, size) and bool(seg.isfinite().all())
        assert 1 <= h <= size and 1 <= w <= size and max(h, w) == size
        vis = vision_pixels(x, config)
        assert vis.shape == (3, config.vision.image_size, config.vision.image_size) and bool(vis.isfinite().all())
