"""Domain randomisation: windows, resolution, blur, noise and field of view vary; masks follow the image."""

import numpy as np

from MediRoundCore.data.augment import Randomization, randomize, randomize_sample
from MediRoundCore.data.splits import make_dialogue, to_sample


def test_views_vary_and_masks_follow():
    dlg = make_dialogue("train", 0, 1)
    sample = to_sample(dlg)
    rng = np.random.default_rng(0)
    views = [randomize_sample(rng, dlg, sample) for _ in range(6)]
    for v in views:
        assert v.image.shape == sample.image.shape and v.image.dtype == np.float32
        assert 0 <= v.image.min() and v.image.max() <= 1 and v.masks.shape == sample.masks.shape
        assert np.all(v.masks.reshape(len(v.masks), -1).sum(1) > 0)  # every target stays on the slice
    assert len({round(float(v.image.mean()), 4) for v in views}) == len(views)
    # with everything off but the zoom, a mask still covers the same image content as before
    zoom_only = Randomization(window_level_shift=0, window_width_scale=(1, 1), gamma=(1, 1), resolution=(1, 1),
                              blur_px=(0, 0), noise=(0, 0), zoom=(1.3, 1.3), mr_low_pct=(0.5, 0.5),
                              mr_high_pct=(99.5, 99.5))
    image, masks = randomize(np.random.default_rng(3), dlg.slice.image, sample.masks, dlg.slice.modality,
                             dlg.slice.region, zoom_only)
    assert not np.array_equal(masks, sample.masks)  # the field of view changed
    for k in range(len(masks)):
        before = sample.image[sample.masks[k]].mean()
        after = image[masks[k]].mean()
        assert abs(before - after) < 0.08, (k, before, after)


def test_keep_scale_cuts_the_field_of_view_at_the_slice_scale():
    """With `keep_scale` a smaller field of view is cut out, not magnified: pixels keep their size and content."""
    dlg = make_dialogue("train", 0, 1)
    sample = to_sample(dlg)
    only_zoom = dict(window_level_shift=0, window_width_scale=(1, 1), gamma=(1, 1), resolution=(1, 1),
                     blur_px=(0, 0), noise=(0, 0), zoom=(1.3, 1.3), mr_low_pct=(0.5, 0.5), mr_high_pct=(99.5, 99.5))
    image, masks = randomize(np.random.default_rng(3), dlg.slice.image, sample.masks, dlg.slice.modality,
                             dlg.slice.region, Randomization(keep_scale=True, **only_zoom))
    h, w = sample.image.shape
    assert image.shape == (round(h / 1.3), round(w / 1.3)) and masks.shape[1:] == image.shape
    # the crop is a window of the plain view: find where, and compare pixel for pixel
    full, _ = randomize(np.random.default_rng(3), dlg.slice.image, sample.masks, dlg.slice.modality,
                        dlg.slice.region, Randomization(**{**only_zoom, "zoom": (1.0, 1.0)}))
    hits = [(y, x) for y in range(h - image.shape[0] + 1) for x in range(w - image.shape[1] + 1)
            if np.allclose(full[y, x:x + 4], image[0, :4]) and np.allclose(full[y:y + image.shape[0], x:x + image.shape[1]], image)]
    assert len(hits) >= 1
    y, x = hits[0]
    assert np.array_equal(masks, sample.masks[:, y:y + image.shape[0], x:x + image.shape[1]])
    for k in range(len(masks)):  # each target mostly inside (the zoom's keep_fraction)
        assert masks[k].sum() >= 0.8 * sample.masks[k].sum()
