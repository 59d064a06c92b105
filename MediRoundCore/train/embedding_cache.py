"""Segmenter image embeddings computed once and kept on disk: a frozen encoder (LiteMedSAM's TinyViT, about
1 s per 256² slice on two CPU cores) encodes each distinct training image once; every later round, dialogue or
epoch on that image reads it back (2 MB per slice in fp16).

`model.embedding_cache = EmbeddingCache(folder, model)` makes `MediRound.encode_segmenter_image` go through
it. The key is a hash of the exact segmenter input pixels and of the encoder (its config and weights), so a
changed image, window, augmentation or encoder never reads a stale embedding. Files are written atomically;
a run killed mid-write leaves no partial entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import torch


def encoder_fingerprint(model) -> str:
    """Hash of the segmenter encoder's config and weights (sampled tensors: cheap, and changes with them)."""
    h = hashlib.sha256(json.dumps(model.config.segmenter.__dict__, default=str, sort_keys=True).encode())
    for name, tensor in sorted(model.segmenter.image_encoder.state_dict().items()):
        h.update(name.encode())
        flat = tensor.detach().flatten()
        h.update(flat[:: max(1, flat.numel() // 64)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class EmbeddingCache:
    """Disk (+ a small in-memory LRU) cache of (256,g,g) embeddings keyed by segmenter pixels."""

    def __init__(self, folder: str | Path, model, memory_items: int = 64, dtype=torch.float16):
        self.folder = Path(folder) / encoder_fingerprint(model)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.memory_items = memory_items
        self.dtype = dtype
        self.hits = self.misses = 0

    @staticmethod
    def key(pixels: torch.Tensor) -> str:
        return hashlib.sha256(pixels.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()[:32]

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.pt"

    def _get(self, key: str) -> torch.Tensor | None:
        if key in self.memory:
            self.memory.move_to_end(key)
            return self.memory[key]
        path = self._path(key)
        if path.is_file():
            tensor = torch.load(path, map_location="cpu", weights_only=True)
            self._remember(key, tensor)
            return tensor
        return None

    def _remember(self, key: str, tensor: torch.Tensor) -> None:
        self.memory[key] = tensor
        while len(self.memory) > self.memory_items:
            self.memory.popitem(last=False)

    def _put(self, key: str, tensor: torch.Tensor) -> None:
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(tensor, tmp)
        tmp.replace(path)
        self._remember(key, tensor)

    @torch.no_grad()
    def encode(self, encoder, pixels: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) → (B,256,g,g): cached rows read back, the others encoded (in one batch) and stored. Outside
        any autocast (a bf16 training step's): stored as inference computes them, returned in the encoder's
        dtype."""
        with torch.autocast(pixels.device.type, enabled=False):
            return self._encode(encoder, pixels)

    def _encode(self, encoder, pixels: torch.Tensor) -> torch.Tensor:
        keys = [self.key(p) for p in pixels]
        found = [self._get(k) for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            fresh = encoder(pixels[missing])
            for i, row in zip(missing, fresh):
                found[i] = row.to("cpu", self.dtype).clone()
                self._put(keys[i], found[i])
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        param = next(encoder.parameters())
        return torch.stack(found).to(param.device, param.dtype)
