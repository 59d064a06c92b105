"""What must be installed before the model can run, and how (pure logic; the dialog lives in the widget).

Torch comes from Slicer's PyTorch extension (it picks the CUDA build that fits the machine); the rest from pip.
"""

from __future__ import annotations

import importlib
import importlib.util
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

    @property
    def needed(self) -> bool:
        return self.torch or bool(self.pip)

    def describe(self) -> str:
        items = (["PyTorch (through the PyTorch extension)"] if self.torch else []) + self.pip
        return ", ".join(items) if items else "nothing"


def installed(name: str) -> bool:
    """Whether `name` can be imported now (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def install_plan(is_installed=None, torch_extension_available: bool = True) -> InstallPlan:
    """What is missing: `is_installed(import_name) -> bool` decides (default: `installed`; injectable for tests)."""
    is_installed = is_installed or installed
    plan = InstallPlan()
    if not is_installed("torch"):
        plan.torch = True
        plan.torch_extension_missing = not torch_extension_available
    plan.pip = [req for name, req in PIP_REQUIREMENTS.items() if not is_installed(name)]
    return plan


def install(plan: InstallPlan, torch_utils_logic=None, pip_install=None) -> None:
    """Carry out `plan` (main thread, inside Slicer). Raises RuntimeError with a clear message on failure."""
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
