"""Preprocessing that matches training on real files: CT recognised by its values whatever the scanner's fill,
the window the model was trained with for the volume's region, and slice caches keyed by all of it."""

from pathlib import Path

import numpy as np
import pytest

from MediRoundCore.data.anatomy import CT_WINDOWS, generate_slice
from MediRoundCore.imaging import (CT_REGION_WINDOWS, Volume, extract_slice, guess_ct_region, guess_modality,
                                   load_volume, normalize_intensity, to_sitk)
from MediRoundCore.model.config import tiny_config

DATA = Path("/work/shared/data/pyradiomics-3.1.0/data")
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="real labelled volumes not on this machine")


def _with_fov_fill(array: np.ndarray, fill: int) -> np.ndarray:
    """A scanner's reconstruction circle: voxels outside the inscribed circle set to the fill value."""
    out = array.copy()
    k, h, w = out.shape
    yy, xx = np.mgrid[:h, :w]
    outside = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 > (min(h, w) / 2) ** 2
    out[:, outside] = fill
    return out


@needs_data
@pytest.mark.parametrize("case", ["lung1", "lung2"])
@pytest.mark.parametrize("fill", [None, -3024, -2048, -1024])
def test_real_chest_ct_is_ct_whatever_the_fill(case, fill, tmp_path):
    volume = load_volume(DATA / f"{case}_image.nrrd")
    array = volume.array if fill is None else _with_fov_fill(volume.array, fill)
    if fill is not None:  # through a file, as a user's scan arrives
        import SimpleITK as sitk

        sitk.WriteImage(to_sitk(volume, array), str(tmp_path / "scan.nrrd"))
        volume = load_volume(tmp_path / "scan.nrrd")
    assert volume.modality == "CT" and volume.region == "chest"
    image = extract_slice(volume, "axial", volume.num_slices("axial") // 2)
    assert image.ct_window() == (-350.0, 1400.0)
    # lung parenchyma (about -850 HU) is visible (neither black nor white) through the chest window
    shown = image.normalized()
    lung = (image.pixels > -900) & (image.pixels < -700)
    assert 0.05 < float(np.median(shown[lung])) < 0.4


@needs_data
@pytest.mark.parametrize("case", ["brain1", "brain2", "breast1"])
def test_real_mr_is_mr(case):
    volume = load_volume(DATA / f"{case}_image.nrrd")
    assert volume.modality == "MR" and volume.region is None
    assert extract_slice(volume, "axial", 5).ct_window() is None


@pytest.mark.parametrize("region", ["abdomen", "chest", "brain"])
@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_generated_anatomy_is_recognised(region, modality):
    for seed in range(3):
        image = generate_slice(region, seed, modality=modality).image
        assert guess_modality(image) == modality
        if modality == "CT":
            assert guess_ct_region(image) == region
            assert guess_modality(_with_fov_fill(image[None], -3024)) == "CT"


def test_values_that_are_not_hounsfield_units():
    rng = np.random.default_rng(0)
    assert guess_modality(rng.uniform(0, 4000, (4, 32, 32)).astype(np.int16)) == "MR"  # no air
    assert guess_modality(rng.uniform(-5000, 5000, (4, 32, 32))) == "MR"  # a continuum below -1100: no fill
    assert guess_modality(np.zeros((2, 8, 8), np.uint8)) == "MR"


def test_training_windows_agree():
    """The model config's windows, imaging's defaults and the generator's are the same numbers."""
    assert tiny_config().ct_windows == CT_REGION_WINDOWS == {k: tuple(v) for k, v in CT_WINDOWS.items()}


def test_explicit_window_wins_and_model_windows_apply():
    array = np.full((2, 16, 16), 40, np.int16)
    array[:, :4] = -1000
    volume = Volume(array, (1, 1, 1), (0, 0, 0), modality="CT", window=(50.0, 350.0))
    assert extract_slice(volume, "axial", 0).ct_window() == (50.0, 350.0)
    plain = Volume(array, (1, 1, 1), (0, 0, 0), modality="CT", region="chest")
    image = extract_slice(plain, "axial", 0)
    assert image.ct_window({"chest": (-500.0, 1000.0)}) == (-500.0, 1000.0)
    assert np.array_equal(image.normalized({"chest": (-500.0, 1000.0)}),
                          normalize_intensity(image.pixels, "CT", (-500.0, 1000.0)))


def test_engine_encodes_through_the_model_window_and_keys_the_cache_by_it(tiny_engine, ct_volume):
    from MediRoundCore.model.field_placement import field_padding
    from MediRoundCore.model.processing import segmenter_pixels
    from MediRoundCore.session import Session

    engine = tiny_engine
    engine.forget()
    volume = Volume(ct_volume.array, ct_volume.spacing, ct_volume.origin, modality="CT", region="chest")
    session = Session(volume.fingerprint())
    image = extract_slice(volume, "axial", 1)
    first = engine.ask(session, "Segment the liver.", image)
    assert "segmenter_encoder_ms" in first.round.timings
    # the slice is framed at the model's scale (test_physical_frame), at its place in the field (test_field_placement)
    fields = engine.model.config.field_of_view_mm
    extent = image.frame_extent(fields)
    padding = field_padding(image.pixels.shape, extent, image.frame_shift(fields))
    assert not padding.none  # this small slice lies off the field's centre
    windowed = normalize_intensity(image.pixels, "CT", engine.model.config.ct_windows["chest"])
    expected, _ = segmenter_pixels(padding.pad(windowed), engine.model.config,
                                   padding.padded_extent(image.pixels.shape, extent))
    assert np.allclose(engine.slice_pixels(session, image).numpy(), expected.numpy())
    again = engine.ask(session, "Now the lesion inside it.", image)
    assert "segmenter_encoder_ms" not in again.round.timings  # same slice, same window: cached
    # the same voxels asked as MR, or through another window, are encoded anew
    as_mr = extract_slice(Volume(volume.array, volume.spacing, volume.origin, modality="MR"), "axial", 1)
    assert "segmenter_encoder_ms" in engine.ask(session, "Segment the liver.", as_mr).round.timings
    other = extract_slice(Volume(volume.array, volume.spacing, volume.origin, modality="CT", window=(40.0, 80.0)),
                          "axial", 1)
    result = engine.ask(session, "Segment the liver.", other)
    assert "segmenter_encoder_ms" in result.round.timings
    expected, _ = segmenter_pixels(normalize_intensity(image.pixels, "CT", (40.0, 80.0)), engine.model.config,
                                   other.frame_extent(fields))
    assert np.allclose(engine.slice_pixels(session, other).numpy(), expected.numpy())
