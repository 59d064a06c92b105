"""Device faults during a round: a GPU out-of-memory or driver error retries the round on the CPU when the model
fits in RAM there; otherwise a DeviceError names a smaller option. The round is never lost or doubled: a failed
attempt leaves the session as it was (rounds are added only at the end of `Engine.ask`), and the retry adds it
once.

    result = with_cpu_fallback(engine, session, lambda: engine._ask(...), progress)
"""

from __future__ import annotations

import re
import weakref
from typing import Callable, TypeVar

import torch

from .checkpoint_info import default_model_name
from .errors import DeviceError

T = TypeVar("T")

# Messages of device failures that are not torch.cuda.OutOfMemoryError (driver errors, cuBLAS/cuDNN, other backends).
_DEVICE_MESSAGE = re.compile(r"CUDA out of memory|out of memory|CUDA error|CUBLAS_STATUS|cuDNN error|CUDNN_STATUS|"
                             r"NCCL error|HIP error|MPS backend|device-side assert|no kernel image|"
                             r"CUDA driver|not enough memory|can't allocate memory", re.IGNORECASE)
CPU_HEADROOM_BYTES = 512 * 2**20  # activations, KV cache and the interpreter beside the weights
SMALLER_OPTIONS = (f"use a smaller option: the bundled default model ({default_model_name()}: leave out "
                   "--checkpoint / choose the bundled model in the panel), or the full model quantised to 4-bit "
                   "on the GPU")


def is_device_fault(exc: BaseException) -> bool:
    """A failure of the compute device (out of memory, driver or kernel error), not of the input."""
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8: CUDA errors raised as this
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and bool(_DEVICE_MESSAGE.search(str(exc)))


def describe_fault(exc: BaseException) -> str:
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    kind = "ran out of memory" if (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower() \
        else "failed"
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return f"the {'GPU' if torch.cuda.is_available() else 'compute device'} {kind} ({first})"


def model_bytes(model: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of the model's parameters and buffers, as they are or converted to `dtype`."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        size = torch.empty((), dtype=dtype).element_size() if dtype is not None and t.is_floating_point() \
            else t.element_size()
        total += t.numel() * size
    return total


def bytes_to_move(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """RAM the model needs beyond what it already holds there: its tensors not yet on the CPU (in `dtype`)."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type != "cpu" or (t.is_floating_point() and t.dtype != dtype):
            size = torch.empty((), dtype=dtype).element_size() if t.is_floating_point() else t.element_size()
            total += t.numel() * size
    return total


def available_memory_bytes() -> int | None:
    """RAM available to a new allocation (psutil, else /proc/meminfo's MemAvailable); None when unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - psutil missing or unusable: try the kernel's own figure
        pass
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gb(n: int) -> str:
    return f"{n / 2**30:.1f} GB"


def move_engine_to_cpu(engine, reason: str) -> None:
    """Move the engine's model to the CPU in float32 and drop its device caches, or raise DeviceError
    (naming a smaller option) when the model does not fit in the RAM that is available."""
    model = engine.model
    need = bytes_to_move(model, torch.float32) + CPU_HEADROOM_BYTES
    available = available_memory_bytes()
    if available is not None and need > available:
        raise DeviceError(f"{reason}; the model needs about {_gb(need)} of RAM to run on the CPU and only "
                          f"{_gb(available)} is available, so the round was not run (the session is unchanged): "
                          f"{SMALLER_OPTIONS}")
    if hasattr(engine, "forget"):
        engine.forget()  # per-slice caches (KV cache, embeddings) on the failed device: rebuilt on demand
    try:
        model.to(device="cpu", dtype=torch.float32)
        for name, value in vars(engine).items():  # other memories (reference features, …): moved, not lost
            if name not in ("model", "tokenizer", "builder"):
                _tensors_to_cpu(value)
    except (RuntimeError, ValueError, TypeError) as exc:  # e.g. a quantised model that cannot leave the GPU
        raise DeviceError(f"{reason}; moving the model to the CPU failed ({str(exc).splitlines()[0][:200]}), so "
                          f"the round was not run (the session is unchanged): {SMALLER_OPTIONS}") from None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _tensors_to_cpu(value, depth: int = 0):
    """`value` with every tensor inside (dicts and lists changed in place, tuples rebuilt) on the CPU in float32."""
    if isinstance(value, torch.Tensor):
        return value.to(device="cpu", dtype=torch.float32 if value.is_floating_point() else value.dtype)
    if depth > 4:
        return value
    if isinstance(value, (dict, weakref.WeakKeyDictionary)):
        for key in list(value.keys()):
            value[key] = _tensors_to_cpu(value[key], depth + 1)
    elif isinstance(value, list):
        value[:] = [_tensors_to_cpu(v, depth + 1) for v in value]
    elif isinstance(value, tuple):
        return tuple(_tensors_to_cpu(v, depth + 1) for v in value)
    return value


def with_cpu_fallback(engine, session, attempt: Callable[[], T], progress=None) -> T:
    """Run `attempt` (one round); on a device fault, move the engine to the CPU and run it once more."""
    before = len(session.rounds)
    try:
        return attempt()
    except Exception as exc:  # noqa: BLE001 - only device faults are handled; everything else re-raised
        if not is_device_fault(exc):
            raise
        if len(session.rounds) != before:  # the round was saved before the failure: never add it twice
            raise DeviceError(f"{describe_fault(exc)} after round {len(session.rounds)} was saved; the round is "
                              f"in the session, its display could not be produced") from None
        reason = describe_fault(exc)
    # out of the except block: the failed attempt's tensors (held by the traceback) can be freed
    move_engine_to_cpu(engine, reason)
    if progress is not None:
        progress(f"{reason}; retrying on the CPU", 0.05)
    try:
        return attempt()
    except Exception as exc:  # noqa: BLE001
        if is_device_fault(exc) and len(session.rounds) == before:
            raise DeviceError(f"{reason}; the retry on the CPU failed too ({describe_fault(exc)}), so the round "
                              f"was not run (the session is unchanged): {SMALLER_OPTIONS}") from None
        raise
