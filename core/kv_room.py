"""Key/value caches with room to grow: a decode step writes its token in place.

Why: transformers' ``DynamicLayer`` appends each new token with ``torch.cat``, which copies the
whole cache, every layer, every step. With a shared preamble of ~190 tokens and 64 rows that
copying took a quarter of a decode loop's CPU time on the embedded model (docs/decisions.md,
"Decoding: finished rows leave the batch, and the cache grows in place"). :func:`make_room`
gives the full-attention layers of a cache buffers sized for the tokens still to come; the
returned keys and values are views of the filled part, so attention sees exactly what it saw
before. Sliding-window layers (Gemma 3's local layers) keep their own logic; any change the
buffers were not told about (another library call replacing ``keys``) falls back to the
library's own append.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer


class RoomyLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are views of larger buffers (:func:`make_room`)."""

    _k: torch.Tensor
    _v: torch.Tensor

    @classmethod
    def from_layer(cls, layer: DynamicLayer, room: int) -> "RoomyLayer":
        new = cls.__new__(cls)
        new.__dict__.update(layer.__dict__)
        b, h, n, d = layer.keys.shape
        new._k = layer.keys.new_empty((b, h, n + room, d))
        new._v = layer.values.new_empty((b, h, n + room, layer.values.shape[-1]))
        new._k[:, :, :n] = layer.keys
        new._v[:, :, :n] = layer.values
        new.keys, new.values = new._k[:, :, :n], new._v[:, :, :n]
        return new

    def _in_place(self, key_states: torch.Tensor) -> bool:
        n, add = self.keys.shape[-2], key_states.shape[-2]
        return (self.keys.data_ptr() == self._k.data_ptr() and self.keys.shape[:2] == self._k.shape[:2]
                and key_states.shape[0] == self._k.shape[0] and n + add <= self._k.shape[-2])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized or not self._in_place(key_states):
            return super().update(key_states, value_states, *args, **kwargs)
        n, add = self.keys.shape[-2], key_states.shape[-2]
        self._k[:, :, n:n + add] = key_states
        self._v[:, :, n:n + add] = value_states
        self.keys, self.values = self._k[:, :, :n + add], self._v[:, :, :n + add]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices``, buffers included, so later steps still write in place."""
        if self.get_seq_length() == 0:
            return
        n = self.keys.shape[-2]
        if self.keys.data_ptr() != self._k.data_ptr():
            return super().batch_select_indices(indices)
        self._k, self._v = self._k[indices], self._v[indices]
        self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]


def make_room(cache: Any, room: int) -> Any:
    """Give every full-attention layer of ``cache`` (a transformers ``Cache``) buffers for ``room``
    more tokens; other layers, and caches without ``layers``, are left as they are. Returns ``cache``."""
    layers = getattr(cache, "layers", None)
    if room < 1 or not isinstance(layers, list):
        return cache
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys is not None and layer.keys.dim() == 4:
            layers[i] = RoomyLayer.from_layer(layer, room)
    return cache
