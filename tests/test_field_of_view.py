"""Field-of-view crops of training dialogues (data/field_of_view.py) and the `--fov-crop` training stream."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from MediRoundCore.data.field_of_view import FieldOfView, crop_box, crop_sample
from MediRoundCore.data.splits import iter_training_samples


@settings(max_examples=200, deadline=None)
@given(h=st.integers(24, 300), w=st.integers(24, 300), seed=st.integers(0, 10**6),
       boxes=st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)), max_size=4))
def test_a_crop_keeps_every_mask_whole_inside_the_slice(h, w, seed, boxes):
    masks = np.zeros((max(1, len(boxes)), h, w), bool)
    for m, (a, b, c, d) in zip(masks, boxes):
        r0, r1 = sorted((int(a * (h - 1)), int(b * (h - 1))))
        c0, c1 = sorted((int(c * (w - 1)), int(d * (w - 1))))
        m[r0:r1 + 1, c0:c1 + 1] = True
    r0, c0, rows, cols = crop_box(np.random.default_rng(seed), (h, w), masks)
    assert 0 <= r0 and r0 + rows <= h and 0 <= c0 and c0 + cols <= w and rows >= 1 and cols >= 1
    inside = masks[:, r0:r0 + rows, c0:c0 + cols].reshape(len(masks), -1).sum(1)
    assert np.array_equal(inside, masks.reshape(len(masks), -1).sum(1))


def test_crops_vary_in_shape_place_and_cut_into_the_body():
    sample = next(iter_training_samples(seed=0, split="train"))
    rng = np.random.default_rng(1)
    body = sample.image > 0.02
    crops = [crop_sample(rng, sample) for _ in range(40)]
    shapes = {c.image.shape for c in crops}
    assert len(shapes) > 30 and any(a != b for a, b in shapes)  # mostly non-square

    def body_inside(crop):
        r0, c0, rows, cols = crop.meta["field_of_view"]
        return body[r0:r0 + rows, c0:c0 + cols].sum()

    assert sum(body_inside(c) < body.sum() for c in crops) > 20  # most crops cut into the body
    for c in crops:
        r0, c0, rows, cols = c.meta["field_of_view"]
        assert c.masks.shape[1:] == c.image.shape == (rows, cols)
        assert np.array_equal(c.image, sample.image[r0:r0 + rows, c0:c0 + cols])
        assert np.array_equal(c.masks.sum((1, 2)), sample.masks.sum((1, 2)))
    side = FieldOfView().side
    assert min(min(s) for s in shapes) >= int(side[0] * min(sample.image.shape)) - 1


def test_fov_crop_stream_is_deterministic_and_takes_its_share():
    from MediRoundCore.train.run import training_stream

    def shapes(share):
        return [s.image.shape for s in itertools.islice(training_stream("train", share)(5), 30)]

    full = shapes(0.0)
    assert all(s == full[0] for s in full)  # no crop without the option
    half = shapes(0.5)
    assert half == shapes(0.5)
    assert 5 <= sum(s != full[0] for s in half) <= 25
