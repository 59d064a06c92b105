"""The small bundled demo: a generated abdomen CT volume, its label volume and a scripted dialogue.

Files in `MediRoundCore/data/bundled/`:
  demo_abdomen.nrrd         int16 CT (HU), 256 x 256 x 24, spacing 1.5 x 1.5 x 2.5 mm, LPS, gzip
  demo_abdomen_labels.nrrd  uint8 ground truth; the label names are in the header (MediRound_labels)
  demo_dialogue.json        rounds: {"query", "slice_index", "refers_to", "expected_entity", "expected_label"}
Rebuild with `python -m MediRoundCore.data.demo` (deterministic).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .anatomy import GeneratedVolume, generate_volume

BUNDLED = Path(__file__).resolve().parent / "bundled"
DEMO_SHAPE = (256, 256, 24)
DEMO_SPACING = (1.5, 1.5, 2.5)
DEMO_ORIGIN = (-191.25, -191.25, 380.0)
DEMO_LESIONS = {"liver": 1, "left kidney": 1, "right kidney": 0, "spleen": 0, "force_gallbladder": 1}


def bundled_demo_paths() -> dict[str, Path]:
    """Paths of the bundled demo files: 'volume', 'labels', 'dialogue'."""
    return {"volume": BUNDLED / "demo_abdomen.nrrd", "labels": BUNDLED / "demo_abdomen_labels.nrrd",
            "dialogue": BUNDLED / "demo_dialogue.json"}


def _demo_slice(vol: GeneratedVolume) -> int | None:
    """Axial slice with the largest left-kidney lesion where the gallbladder and spleen are also visible."""
    lesion = [n for n in vol.names.values() if n.endswith("in the left kidney")]
    if not lesion:
        return None
    area = vol.mask(lesion[0]).sum(axis=(1, 2))
    ok = (vol.mask("gallbladder").sum(axis=(1, 2)) > 100) & (vol.mask("spleen").sum(axis=(1, 2)) > 300)
    area = np.where(ok, area, 0)
    k = int(np.argmax(area))
    return k if area[k] >= 25 else None


def demo_dialogue(vol: GeneratedVolume, k: int) -> list[dict]:
    lesion = [n for n in vol.names.values() if n.endswith("in the left kidney")][0]
    rounds = [("Segment the left kidney.", None, "left kidney"),
              ("Now the lesion inside it.", 0, lesion),
              ("Segment the organ that stores bile.", 1, "gallbladder"),
              ("Now segment the organ that removes old red blood cells on the same side as it.", 0, "spleen")]
    return [{"query": q, "slice_index": k, "refers_to": ref, "expected_entity": ent,
             "expected_label": vol.label_of(ent)} for q, ref, ent in rounds]


def build_bundled_demo(out_dir=BUNDLED, first_seed: int = 100) -> dict[str, Path]:
    """Generate and write the demo files (searches seeds from first_seed for a suitable slice)."""
    import SimpleITK as sitk

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for seed in range(first_seed, first_seed + 50):
        vol = generate_volume("abdomen", seed, shape=DEMO_SHAPE, spacing=DEMO_SPACING, origin=DEMO_ORIGIN,
                              noise_level=0.25, contrast=1.0, lesions=DEMO_LESIONS)
        k = _demo_slice(vol)
        if k is not None:
            break
    else:  # pragma: no cover
        raise RuntimeError("no suitable demo volume found")
    paths = {"volume": out / "demo_abdomen.nrrd", "labels": out / "demo_abdomen_labels.nrrd",
             "dialogue": out / "demo_dialogue.json"}
    vol.image.SetMetaData("MediRound_generator", f"MediRoundCore.data.demo seed {seed}")
    sitk.WriteImage(vol.image, str(paths["volume"]), useCompression=True)
    sitk.WriteImage(vol.labels, str(paths["labels"]), useCompression=True)
    paths["dialogue"].write_text(json.dumps(demo_dialogue(vol, k), indent=2) + "\n", encoding="utf-8")
    return paths


def read_label_names(labels_image) -> dict[int, str]:
    """Label value -> entity name from a demo label image's header."""
    return {int(k): v for k, v in json.loads(labels_image.GetMetaData("MediRound_labels")).items()}


if __name__ == "__main__":
    for name, path in build_bundled_demo().items():
        print(name, path, path.stat().st_size)
