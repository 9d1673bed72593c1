"""Per-weight-tensor cache (identity + version counter) for layouts and one-time code checks.

Kernels called directly through the op (not through a BitLinear, which caches on the module) use it so
that a conversion or a validation pass runs once per weight tensor, not once per call.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch


def tensor_version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter (and cannot change in place)
        return -1


class WeightCache:
    """``get(weight, tag, build)``: ``build()``'s result, rebuilt when ``weight`` changes in place."""

    def __init__(self):
        self._entries: dict[tuple[int, str], tuple] = {}

    def get(self, weight: torch.Tensor, tag: str, build: Callable[[], object]):
        key = (id(weight), tag)
        version = tensor_version(weight)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is weight and entry[1] == version:
            return entry[2]
        value = build()
        entries = self._entries
        ref = weakref.ref(weight, lambda _, k=key: entries.pop(k, None))
        entries[key] = (ref, version, value)
        return value

    def clear(self) -> None:
        self._entries.clear()
