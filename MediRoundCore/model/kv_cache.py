"""The engine's key/value cache: transformers' `DynamicCache` whose layers keep spare room.

`DynamicLayer.update` (transformers/cache_utils.py) concatenates the new keys and values onto the whole cache,
so every answer token copies every layer's cache once more: the longer the dialogue, the slower each token
(the tiny model's time per answer token grew 1.8× from round 2 to round 20 in `benchmarks/RESULTS.md`).
`RoomyLayer` writes new states into a buffer that doubles when full and exposes the filled part as views, so a
step copies only its own states. Everything that reads the cache (transformers' forward, `DecodeStep`, masks
sized by `get_seq_length`, `crop` for rejected answer drafts) sees the same tensors' values as before.

Where transformers' cache has no replaceable layer class (versions before the layered `Cache`), `new_cache()`
returns a plain `DynamicCache`.
"""

from __future__ import annotations

import torch


def _layer_class():
    import inspect

    from transformers.cache_utils import DynamicLayer

    # transformers 4.5x initialise a layer from the keys alone, 5.x from keys and values
    init_arity = len(inspect.signature(DynamicLayer.lazy_initialization).parameters) - 1

    class RoomyLayer(DynamicLayer):
        """A `DynamicLayer` whose keys and values are views of buffers with room to grow."""

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None,
                                *args) -> None:
            super().lazy_initialization(*(key_states, value_states)[:init_arity])
            self._key_buffer = self._value_buffer = None
            self._length = 0

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            elif self._key_buffer is None or not self._holds(self.keys, self._key_buffer):
                self._key_buffer = self._value_buffer = None  # the views were replaced (a reorder): start from them
                held_keys, held_values, self._length = self.keys, self.values, self.keys.shape[-2]
                room = max(2 * (self._length + key_states.shape[-2]), 64)
                self._key_buffer = self._grow_from(held_keys, room)
                self._value_buffer = self._grow_from(held_values, room)
            new = key_states.shape[-2]
            end = self._length + new
            if self._key_buffer is None or end > self._key_buffer.shape[-2]:
                room = max(2 * end, 64)
                self._key_buffer = self._grow(self._key_buffer, key_states, room)
                self._value_buffer = self._grow(self._value_buffer, value_states, room)
            self._key_buffer[..., self._length:end, :] = key_states
            self._value_buffer[..., self._length:end, :] = value_states
            self._length = end
            self.keys = self._key_buffer[..., :end, :]
            self.values = self._value_buffer[..., :end, :]
            return self.keys, self.values

        def _holds(self, view: torch.Tensor, buffer: torch.Tensor) -> bool:
            return view.data_ptr() == buffer.data_ptr() and view.shape[-2] == self._length

        def _grow_from(self, held: torch.Tensor, room: int) -> torch.Tensor:
            grown = held.new_empty(*held.shape[:-2], room, held.shape[-1])
            grown[..., :held.shape[-2], :] = held
            return grown

        def _grow(self, buffer, states: torch.Tensor, room: int) -> torch.Tensor:
            grown = states.new_empty(*states.shape[:-2], room, states.shape[-1])
            if buffer is not None:
                grown[..., :self._length, :] = buffer[..., :self._length, :]
            return grown

        def crop(self, tokens_to_remove: int) -> None:
            super().crop(tokens_to_remove)  # checks the argument, slices the views
            if self.is_initialized and self._key_buffer is not None:
                self._length = self.keys.shape[-2]

        def reset(self) -> None:
            super().reset()
            self._key_buffer = self._value_buffer = None
            self._length = 0

    return RoomyLayer


_ROOMY = None


def new_cache():
    """An empty cache for the engine: a `DynamicCache` whose layers keep spare room (see the module docstring)."""
    global _ROOMY
    from transformers import DynamicCache

    cache = DynamicCache()
    if getattr(cache, "layer_class_to_replicate", None) is None:  # an older transformers: its own layout
        return cache
    if _ROOMY is None:
        _ROOMY = _layer_class()
    cache.layer_class_to_replicate = _ROOMY
    return cache
