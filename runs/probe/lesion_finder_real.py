"""Probe (issue 23, session 48): does the lesion finder, trained on generated anatomy, find the real lesions? On
each pyradiomics case of the evaluator's real set (its slice with the largest lesion), the finder reads every
cell of the segmenter embedding (solid kinds, and cysts); prints the strongest cell inside the true lesion, the
strongest cell outside it, and the rank of the first lesion cell among all cells. If the finder points at real
lesions, a first "Segment the lesion." could be placed by it (the language side answers MR lesions on the wrong
side, design notes); nothing is written.

    PYTHONPATH=$PWD python runs/probe/lesion_finder_real.py [MODEL_DIR]
"""

import sys

import numpy as np
import torch
import torch.nn.functional as F

from MediRoundCore.data.real_validation import real_sample
from MediRoundCore.engine import Engine
from MediRoundCore.evaluate.protocol import sample_fingerprint, sample_image
from MediRoundCore.lesion_finder import SOLID_KINDS, _touching_groups
from MediRoundCore.model.processing import masks_to_segmenter_frame
from MediRoundCore.session import Session

from box_refine import pretrained_lite_medsam  # runs/probe, the script's folder
from lesion_relocate import draw_in_spot_box


def main():
    torch.set_num_threads(2)
    engine = Engine.load(sys.argv[1] if len(sys.argv) > 1 else None, device="cpu")  # a model folder, or the shipped
    finder = engine.lesion_finder
    pretrained = pretrained_lite_medsam()[0]
    for case in ("lung1", "lung2", "brain1", "brain2", "breast1"):
        sample = real_sample(case)
        image = sample_image(sample)
        session = Session(sample_fingerprint(sample))
        with torch.inference_mode():
            state = engine._slice_state(session, image, {}, None)
            lesion = np.asarray(sample.masks[-1], bool)
            size = engine.model.config.segmenter.image_size
            frame = masks_to_segmenter_frame(state.padding.pad(lesion)[None], state.input_hw, size)
            body = masks_to_segmenter_frame(state.padding.pad(np.ones_like(lesion))[None], state.input_hw, size)
            g = state.seg_embedding.shape[-1]
            inside = (F.adaptive_avg_pool2d(frame[:, None].float(), (g, g))[0, 0] > 0).numpy()
            field = (F.adaptive_avg_pool2d(body[:, None].float(), (g, g))[0, 0] >= 0.5).numpy()
            probs = F.softmax(finder(state.seg_embedding[0].float()[None]), 1)[0].numpy()  # (1+K, g, g)
        for label, kinds in (("solid", SOLID_KINDS), ("cyst", ("cyst",)), ("any", finder.config.kinds)):
            p = probs[[1 + finder.config.kinds.index(k) for k in kinds]].sum(0)
            ranked = np.argsort(-np.where(field, p, -1).ravel())
            first = next((r for r, c in enumerate(ranked) if inside.ravel()[c]), None)
            print(f"{case:8s} {label:5s} lesion cells {int(inside.sum()):4d}  best inside {p[inside].max():.2f}  "
                  f"best outside {p[field & ~inside].max():.2f}  first lesion cell at rank {first} of "
                  f"{int(field.sum())}", flush=True)
            for threshold in (0.9, 0.99):
                spots = _touching_groups(np.argwhere(field & (p > threshold)))
                hits = [len(s) for s in spots if any(inside[y, x] for y, x in s)]
                sizes = sorted((len(s) for s in spots), reverse=True)
                print(f"             above {threshold}: {len(spots)} spots, sizes {sizes[:8]}, on the lesion: {hits}")
                if label == "solid" and spots:  # the largest spot as a box prompt to the pretrained LiteMedSAM
                    shape = state.padding.pad(lesion).shape
                    for margin in (0, 2):
                        drawn = draw_in_spot_box(pretrained, state, max(spots, key=len), size, shape, margin)
                        print(f"             largest spot's box +{margin} px -> LiteMedSAM Dice "
                              f"{2 * (drawn & lesion).sum() / max(1, drawn.sum() + lesion.sum()):.3f} "
                              f"({int(drawn.sum())} px against {int(lesion.sum())})")
        engine.forget()


if __name__ == "__main__":
    main()
