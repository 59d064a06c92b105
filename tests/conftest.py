"""Shared fixtures: a random tiny engine (same code paths as the shipped model) and small volumes."""

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_engine():
    from MediRoundCore.engine import Engine

    return Engine.random_tiny(seed=0)


@pytest.fixture
def ct_volume():
    from MediRoundCore.imaging import Volume

    rng = np.random.default_rng(0)
    array = (rng.normal(40, 30, size=(6, 48, 64))).astype(np.int16)
    array[:, 10:30, 20:40] = 200
    array[0, 0, 0] = -1000
    return Volume(array, (0.8, 0.8, 2.5), (-100.0, 50.0, 20.0), np.diag([1.0, 1.0, 1.0]))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: on a shared, busy CPU a second thread mostly waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def shipped_model_missing() -> str | None:
    """Why the bundled default model cannot load here (its weights are not in the checkout, or the pinned base
    weights it loads besides them are not fetched), or None."""
    from MediRoundCore.checkpoint_info import DEFAULT_CHECKPOINT, checkpoint_base_weights
    from MediRoundCore.checkpoints import base_weights

    if not (DEFAULT_CHECKPOINT / "model.safetensors").is_file():
        return "the shipped model's weights are not in this checkout"
    lacking = base_weights.missing(checkpoint_base_weights())
    if lacking:
        return (f"base weights {', '.join(lacking)} of the shipped model are not on this machine: "
                "python -m MediRoundCore.checkpoints.base_weights fetch")
    return None


_SHIPPED_MISSING = shipped_model_missing()
needs_shipped_model = pytest.mark.skipif(_SHIPPED_MISSING is not None, reason=_SHIPPED_MISSING or "")


def build_lite_or_skip():
    """(model, tokenizer) of an untrained MediRound-Lite on the pinned base weights; skips where they are not
    fetched (python -m MediRoundCore.checkpoints.base_weights fetch)."""
    from MediRoundCore.checkpoints import base_weights
    from MediRoundCore.errors import CheckpointError

    try:
        base_weights.locate("lite_medsam")
        base_weights.locate("minilm")
    except CheckpointError:
        pytest.skip("base weights not on this machine: python -m MediRoundCore.checkpoints.base_weights fetch")
    from MediRoundCore.model.lite import build_lite

    return build_lite()
