"""Import `segment_anything.modeling` without running the package `__init__`.

The package `__init__` imports torchvision (through its automatic mask generator); where torchvision is
missing or broken (it cannot run beside some CPU torch builds) the modelling classes still work, so we load
them from a bare package shell. On a machine where the full import works, that is used instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def _load_modeling():
    if "segment_anything" not in sys.modules:
        spec = importlib.util.find_spec("segment_anything")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("segment-anything is not installed: pip install segment-anything")
        shell = types.ModuleType("segment_anything")
        shell.__path__ = list(spec.submodule_search_locations)
        shell.__spec__ = spec
        sys.modules["segment_anything"] = shell
    return importlib.import_module("segment_anything.modeling")


_modeling = _load_modeling()
Sam = _modeling.Sam
ImageEncoderViT = _modeling.ImageEncoderViT
PromptEncoder = _modeling.PromptEncoder
MaskDecoder = _modeling.MaskDecoder
TwoWayTransformer = _modeling.TwoWayTransformer
LayerNorm2d = importlib.import_module("segment_anything.modeling.common").LayerNorm2d
