"""Key/value caches with room to grow: a decode step writes its token in place.

Why: transformers' ``DynamicLayer`` appends each new token with ``torch.cat``, which copies the
whole cache, every layer, every step. With a shared preamble of ~190 tokens and 64 rows that
copying took a quarter of a decode loop's CPU time on the embedded model (docs/decisions.md,
"Decoding: finished rows leave the batch, and the cache grows in place"). :func:`make_room`
gives the layers of a cache buffers sized for the tokens still to come; the returned keys and
values are views of the filled part, so attention sees exactly what it saw before.

A sliding-window layer (Gemma 3's local layers) keeps every token while the sequence is
shorter than its window, and then it is a full layer that also counts tokens: it writes in
place while the sequence stays under the window and goes back to the library's own code
(append, then keep the last window) once it would not. Any change the buffers were not told
about (another library call replacing ``keys``) also falls back to the library's append.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer


class _Room:
    """Buffers with room to grow for a cache layer class (mixed in before it)."""

    _k: torch.Tensor
    _v: torch.Tensor

    @classmethod
    def from_layer(cls, layer: Any, room: int) -> Any:
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
        self._grew(add)
        return self.keys, self.values

    def _grew(self, add: int) -> None:
        """Bookkeeping of the layer class beyond ``keys`` (none for a full layer)."""

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices``, buffers included, so later steps still write in place."""
        if self.get_seq_length() == 0:
            return
        n = self.keys.shape[-2]
        if self.keys.data_ptr() != self._k.data_ptr():
            return super().batch_select_indices(indices)
        self._k, self._v = self._k[indices], self._v[indices]
        self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]


class RoomyLayer(_Room, DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are views of larger buffers (:func:`make_room`)."""


class RoomySlidingLayer(_Room, DynamicSlidingWindowLayer):
    """A ``DynamicSlidingWindowLayer`` that writes in place while the sequence is shorter than
    its window (the library keeps the last ``sliding_window - 1`` tokens: all of them, then).
    Its buffers end there (:func:`make_room`), so a longer sequence takes the library's path."""

    def _grew(self, add: int) -> None:
        self.cumulative_length += add


def make_room(cache: Any, room: int) -> Any:
    """Give the layers of ``cache`` (a transformers ``Cache``) buffers for ``room`` more tokens:
    full-attention layers, and sliding-window layers as far as their window (and only when
    they do not record the past for a later crop). Other layers, and caches without
    ``layers``, are left as they are. Returns ``cache``."""
    layers = getattr(cache, "layers", None)
    if room < 1 or not isinstance(layers, list):
        return cache
    for i, layer in enumerate(layers):
        if not (getattr(layer, "is_initialized", False) and layer.keys is not None and layer.keys.dim() == 4):
            continue
        if type(layer) is DynamicLayer:
            layers[i] = RoomyLayer.from_layer(layer, room)
        elif type(layer) is DynamicSlidingWindowLayer and not layer.record_past:
            n = layer.keys.shape[-2]
            if n == layer.cumulative_length and n + 1 <= layer.sliding_window - 1:
                layers[i] = RoomySlidingLayer.from_layer(layer, min(room, layer.sliding_window - 1 - n))
    return cache
