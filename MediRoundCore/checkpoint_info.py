"""Facts about a checkpoint folder read from its config.json alone: no torch or transformers import, so the
Slicer panel can show them before the model's dependencies are installed."""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_CHECKPOINT = Path(__file__).parent / "weights" / "mediround-lite"
PAPER_BETA = 0.6


def default_model_name() -> str:
    """The bundled default model as users read it, e.g. "MediRound-Lite" for weights/mediround-lite."""
    return "MediRound-" + DEFAULT_CHECKPOINT.name.removeprefix("mediround-").capitalize()


def _field(checkpoint, path: tuple[str, ...], default):
    """config.json's value at `path` in a checkpoint folder (None: the bundled default), or `default` when the
    folder, file or field is missing or unreadable."""
    folder = Path(checkpoint) if checkpoint else DEFAULT_CHECKPOINT
    try:
        value = json.loads((folder / "config.json").read_text())
        for key in path:
            value = value[key]
        return value
    except (OSError, ValueError, KeyError, TypeError):
        return default


def checkpoint_beta(checkpoint: str | Path | None = None) -> float:
    """The JCM threshold a checkpoint folder was shipped with (chosen on validation), without loading it;
    the paper's 0.6 when the folder or field is missing."""
    try:
        return float(_field(checkpoint, ("jcm", "beta"), PAPER_BETA))
    except (TypeError, ValueError):
        return PAPER_BETA


def checkpoint_base_weights(checkpoint: str | Path | None = None) -> list[str]:
    """The pinned base weights (checkpoints/base_weights.py names) a checkpoint folder loads besides its own
    files, from its config.json; [] for a model that needs none (or an unreadable folder: loading it says why)."""
    names = _field(checkpoint, ("base_weights",), None)
    return sorted({str(n) for n in names.values()}) if isinstance(names, dict) else []


def checkpoint_size(checkpoint: str | Path | None = None) -> str:
    """The size preset a checkpoint folder was built with ("tiny", "lite", "full"), from its config.json; "?" when
    the folder or field is missing."""
    return str(_field(checkpoint, ("size",), "?"))


def checkpoint_jcm_trained(checkpoint: str | Path | None = None) -> bool:
    """Whether a checkpoint folder's JCM is applied: False only where its config records it untrained
    (`jcm.trained` false, a stage-1 checkpoint); True where trained or not recorded (older checkpoints)."""
    return _field(checkpoint, ("jcm", "trained"), None) is not False
