"""LiteMedSAM: our TinyViT encoder, the `lite_medsam.pth` loader (strict, hash-checked) and, with the pinned
weights on the machine, box-prompted Dice on real labelled scans (../shared/data, pyradiomics 3.1.0)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from MediRoundCore.checkpoints import base_weights
from MediRoundCore.checkpoints._common import load_manifest
from MediRoundCore.checkpoints.lite_medsam import load_lite_medsam
from MediRoundCore.errors import CheckpointError
from MediRoundCore.model.config import SegmenterConfig, lite_segmenter_config
from MediRoundCore.model.modeling import build_segmenter
from MediRoundCore.model.tiny_vit import WindowAttention

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pyradiomics-3.1.0" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data/pyradiomics-3.1.0/data")


def _real_weights() -> Path | None:
    try:
        return base_weights.file_path("lite_medsam")
    except CheckpointError:
        return None


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    return build_segmenter(lite_segmenter_config()).eval()


@pytest.fixture(scope="module")
def fixture_file(tmp_path_factory):
    """A file in the real key layout (every key and shape of the manifest), random small values."""
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for key, shape in load_manifest("lite_medsam")["keys"].items():
        if key.endswith("num_batches_tracked"):
            tensors[key] = torch.tensor(7, dtype=torch.int64)
        elif key.endswith("running_var"):
            tensors[key] = torch.rand(shape, generator=g) + 0.5
        else:
            tensors[key] = torch.randn(shape, generator=g) * 0.05
    path = tmp_path_factory.mktemp("lite") / "lite_medsam.pth"
    torch.save(tensors, path)
    return path, tensors


def test_attention_bias_offsets_follow_first_appearance_rule():
    """TinyViT numbers each |Δrow|,|Δcol| offset of a window by its first appearance over point pairs in
    row-major order; our closed form must give the same table (the weights index it)."""
    window = 5
    points = [(r, c) for r in range(window) for c in range(window)]
    seen, table = {}, []
    for p in points:
        for q in points:
            offset = (abs(p[0] - q[0]), abs(p[1] - q[1]))
            seen.setdefault(offset, len(seen))
            table.append(seen[offset])
    ours = WindowAttention(dim=8, num_heads=2, window=window).attention_bias_idxs
    assert ours.tolist() == torch.tensor(table).view(len(points), len(points)).tolist()


def test_embedding_grid_and_config(segmenter):
    with torch.inference_mode():
        out = segmenter.image_encoder(torch.rand(1, 3, 256, 256))
    assert out.shape == (1, 256, 64, 64)
    assert segmenter.prompt_encoder.image_embedding_size == (64, 64)
    with pytest.raises(Exception, match="patch_size 16 must equal the TinyViT stride 4"):
        SegmenterConfig(image_size=256, patch_size=16, encoder="tiny_vit")


def test_fixture_loads_strictly_and_values_land(segmenter, fixture_file):
    path, tensors = fixture_file
    report = load_lite_medsam(segmenter, path, check_hash=False)
    assert len(report.loaded) == len(tensors) == 435
    own = segmenter.state_dict()
    for key, value in tensors.items():
        assert torch.equal(own[key], value.to(own[key].dtype)), key


def test_fixture_errors_name_file_and_key(segmenter, fixture_file, tmp_path):
    _, tensors = fixture_file
    missing = {k: v for k, v in tensors.items() if k != "image_encoder.layers.2.blocks.3.attn.attention_biases"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing.pth: missing key 'image_encoder\.layers\.2\.blocks\.3\.attn"):
        load_lite_medsam(segmenter, tmp_path / "missing.pth", check_hash=False)
    extra = dict(tensors, **{"image_encoder.head.weight": torch.zeros(3)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"extra.pth: unexpected key 'image_encoder\.head\.weight'"):
        load_lite_medsam(segmenter, tmp_path / "extra.pth", check_hash=False)
    mobile = dict(tensors, **{"image_encoder.patch_embed.seq.0.c.weight": torch.zeros(32, 3, 3, 3)})
    torch.save(mobile, tmp_path / "mobilesam_stem.pth")  # MobileSAM's strided 3×3 stem is another layout
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'image_encoder\.patch_embed\.seq\.0\.c\.weight'"):
        load_lite_medsam(segmenter, tmp_path / "mobilesam_stem.pth", check_hash=False)
    # the default is to require the published file
    with pytest.raises(CheckpointError, match=r"lite_medsam.pth: sha256 [0-9a-f]{64} differs from the pinned 79d8c9"):
        load_lite_medsam(segmenter, fixture_file[0])


def test_vit_model_is_refused(fixture_file):
    vit = build_segmenter(SegmenterConfig(image_size=64, patch_size=16, embed_dim=16, depth=1, num_heads=2,
                                          window_size=2, decoder_mlp_dim=32))
    with pytest.raises(CheckpointError, match="need the TinyViT segmenter"):
        load_lite_medsam(vit, fixture_file[0], check_hash=False)


# -- the real weights ------------------------------------------------------------------------------------
def _dice(a, b):
    return 2 * (a & b).sum() / max(1, a.sum() + b.sum())


@pytest.fixture(scope="module")
def real_segmenter():
    path = _real_weights()
    if path is None:
        pytest.skip("LiteMedSAM weights not on this machine: python -m MediRoundCore.checkpoints.base_weights fetch")
    model = build_segmenter(lite_segmenter_config()).eval()
    report = load_lite_medsam(model)
    assert len(report.loaded) == 435 and not report.ignored
    return model


@pytest.mark.slow
@pytest.mark.parametrize("case, index, modality, window, floor", [
    # measured (runs/probe/lite_medsam_box_dice.py, box = the label's, no margin): 0.981 and 0.913
    ("lung2", 21, "CT", (-350.0, 1400.0), 0.95),
    ("brain1", 15, "MR", None, 0.88),
])
def test_real_scan_box_prompt_dice(real_segmenter, case, index, modality, window, floor):
    from MediRoundCore.imaging import extract_slice, load_volume, normalize_intensity
    from MediRoundCore.model.box_prompt import segment_in_box
    from MediRoundCore.model.config import tiny_config
    from MediRoundCore.model.processing import segmenter_pixels

    if not DATA.is_dir():
        pytest.skip(f"{DATA}: the real labelled volumes are not on this machine")
    volume = load_volume(DATA / f"{case}_image.nrrd", modality=modality)
    label = extract_slice(load_volume(DATA / f"{case}_label.nrrd"), "axial", index).pixels > 0
    image = extract_slice(volume, "axial", index)
    pixels01 = normalize_intensity(image.pixels, modality, window) if window else image.normalized()
    config = tiny_config()
    config.segmenter = lite_segmenter_config()
    seg_pixels, input_hw = segmenter_pixels(pixels01, config)
    with torch.inference_mode():
        embedding = real_segmenter.image_encoder(seg_pixels[None])
    mask = segment_in_box(real_segmenter, embedding, input_hw, label)
    assert _dice(mask, label) >= floor
    # the box alone is not the answer: the mask is the lesion inside it, not the box
    ys, xs = np.nonzero(label)
    box = np.zeros_like(label)
    box[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
    assert _dice(mask, label) > _dice(box, label) + 0.05


def test_encoder_fast_paths_compute_the_plain_forward():
    """TinyViT runs channels-last, and a CPU batch without gradients one image at a time: the same embedding
    as the plain (NCHW, whole-batch) forward, batched or not, with gradients or not."""
    from MediRoundCore.model.config import TinyViTConfig
    from MediRoundCore.model.tiny_vit import build_tiny_vit

    torch.manual_seed(3)
    enc = build_tiny_vit(TinyViTConfig(embed_dims=(8, 16, 16, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2),
                                       window_sizes=(4, 4, 4, 4)), img_size=64, out_chans=32)
    for module in enc.modules():  # running statistics other than BatchNorm's defaults
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    enc.eval()
    x = torch.rand(3, 3, 64, 64)

    def plain(pixels):
        y = enc.patch_embed(pixels)
        for layer in enc.layers:
            y = layer(y)
        return enc.neck(y)

    with torch.no_grad():
        expected = plain(x)
        batched = enc(x)
        single = enc(x[1:2])
    assert batched.shape == (3, 32, 16, 16) and batched.is_contiguous()
    torch.testing.assert_close(batched, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(single, expected[1:2], rtol=1e-5, atol=1e-5)
    with_grad = enc(x.requires_grad_())
    torch.testing.assert_close(with_grad, expected, rtol=1e-5, atol=1e-5)
    with_grad.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
