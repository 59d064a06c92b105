"""What must be installed before the model can run, and how (pure logic; the dialog lives in the widget).

Torch comes from Slicer's PyTorch extension (it picks the CUDA build that fits the machine); the rest from pip.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

# import name → pip requirement. Torch is separate (PyTorch extension).
PIP_REQUIREMENTS = {
    "transformers": "transformers>=4.45",
    "tokenizers": "tokenizers>=0.19",
    "safetensors": "safetensors>=0.4",
    "segment_anything": "segment-anything>=1.0",
}
TORCH_REQUIREMENT = ">=2.1"


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


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def install_plan(is_installed=_installed, torch_extension_available: bool = True) -> InstallPlan:
    """What is missing: `is_installed(import_name) -> bool` decides (injectable for tests)."""
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
