"""A contact sheet of dialogues: each slice with its round masks coloured and the queries as captions."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from .dataset import Sample

COLOURS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                    [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]], dtype=float) / 255.0


def overlay(sample: Sample, alpha: float = 0.45) -> np.ndarray:
    """RGB image with round k's mask tinted in colour k (later rounds on top) and outlined."""
    rgb = np.repeat(sample.image[..., None], 3, axis=2).astype(float)
    for k, mask in enumerate(sample.masks):
        colour = COLOURS[k % len(COLOURS)]
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * colour
        edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
        rgb[edge] = colour
    return np.clip(rgb, 0, 1)


def caption(sample: Sample, width: int = 58) -> str:
    """Numbered queries with their reference and entity, wrapped."""
    lines = []
    for k, (q, ref, ent) in enumerate(zip(sample.queries, sample.ref_indices, sample.entities)):
        head = f"R{k + 1}" + (f"(→R{ref + 1})" if ref is not None else "")
        lines += textwrap.wrap(f"{head} {q} [{ent}]", width, subsequent_indent="    ")
    return "\n".join(lines)


def contact_sheet(samples: list[Sample], out_path, columns: int = 3, title: str | None = None) -> Path:
    """Write a PNG grid of the samples (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = -(-len(samples) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 9.0 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, sample in zip(axes.ravel(), samples):
        ax.imshow(overlay(sample), interpolation="nearest")
        meta = sample.meta
        ax.set_title(f"{meta.get('region', '')} {meta.get('modality', '')}  "
                     f"(patient L = image right, anterior = top)", fontsize=8)
        ax.text(0.0, -0.02, caption(sample), transform=ax.transAxes, fontsize=6.0, va="top", ha="left",
                family="monospace")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path


def build_docs_sheet(out_path="docs/data_contact_sheet.png") -> Path:
    """The sheet in docs/: two hard-split dialogues per region."""
    from .splits import to_sample, make_dialogue

    samples = [to_sample(make_dialogue("hard", 0, i)) for i in range(6)]
    return contact_sheet(samples, out_path, columns=3, title="Generated MR-MedSeg dialogues (hard split, seed 0)")


if __name__ == "__main__":
    print(build_docs_sheet())
