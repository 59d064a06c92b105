"""Probe: LiteMedSAM (our TinyViT + the pinned weights) prompted with the label's box on the real labelled
volumes in ../shared/data (pyradiomics 3.1.0 cases). Prints Dice per case, window and box margin (frame pixels).

    PYTHONPATH=$PWD python runs/probe/lite_medsam_box_dice.py [--slices 3]
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from MediRoundCore.checkpoints.lite_medsam import load_lite_medsam
from MediRoundCore.imaging import extract_slice, load_volume, normalize_intensity
from MediRoundCore.model.box_prompt import segment_in_box
from MediRoundCore.model.config import MediRoundConfig, lite_segmenter_config, tiny_config
from MediRoundCore.model.modeling import build_segmenter
from MediRoundCore.model.processing import segmenter_pixels

DATA = Path("/work/shared/data/pyradiomics-3.1.0/data")
WINDOWS = {"CT": [(40.0, 400.0), (-350.0, 1400.0), (-600.0, 1500.0)], "MR": [None]}


def dice(a, b):
    return 2 * (a & b).sum() / max(1, a.sum() + b.sum())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=3, help="largest-label slices per case")
    parser.add_argument("--cases", nargs="*", default=["lung1", "lung2", "brain1", "brain2", "breast1"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = tiny_config()
    cfg.segmenter = lite_segmenter_config()
    segmenter = build_segmenter(cfg.segmenter).eval()
    load_lite_medsam(segmenter)
    for case in args.cases:
        volume = load_volume(DATA / f"{case}_image.nrrd", modality="CT" if case.startswith("lung") else "MR")
        label = load_volume(DATA / f"{case}_label.nrrd", modality="MR")
        per_slice = (label.array > 0).reshape(label.array.shape[0], -1).sum(1)
        for k in np.argsort(per_slice)[::-1][: args.slices]:
            image = extract_slice(volume, "axial", int(k))
            truth = extract_slice(label, "axial", int(k)).pixels > 0
            for window in WINDOWS[volume.modality]:
                pixels01 = normalize_intensity(image.pixels, volume.modality, window) if window else image.normalized()
                seg_pixels, input_hw = segmenter_pixels(pixels01, cfg)
                t = time.perf_counter()
                with torch.inference_mode():
                    embedding = segmenter.image_encoder(seg_pixels[None])
                ms = (time.perf_counter() - t) * 1000
                scores = {m: dice(segment_in_box(segmenter, embedding, input_hw, truth, m), truth) for m in (0, 2, 4)}
                print(f"{case} slice {k} ({int(truth.sum())} px) window {window}: "
                      + ", ".join(f"margin {m}: {d:.3f}" for m, d in scores.items()) + f"  encoder {ms:.0f} ms",
                      flush=True)


if __name__ == "__main__":
    main()
