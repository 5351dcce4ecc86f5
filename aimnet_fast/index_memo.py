"""What is derived from index tensors alone (a neighbor list), or from frozen weights, kept while
those tensors live unchanged.

A model's T passes, and their backward, reuse one neighbor list per batch, so what follows from the
list alone (its check, the fast CPU backend's row layout) is computed once per list, not at every
call. An entry is keyed by the identity of one tensor or of a tuple of them (triplets and their
pair indices) and a tag, held through weak references (dropped when any of them is freed) and valid
only while every tensor's version counter is unchanged (an in-place change makes it stale). Never
for anything that depends on coordinates or carries autograd history (``cpu_mlp`` keeps its
transposed weights here, made without gradients).
"""
from __future__ import annotations

import weakref
from typing import Any, Hashable

import torch

Indices = torch.Tensor | tuple[torch.Tensor, ...]


def _as_tuple(index: Indices) -> tuple[torch.Tensor, ...]:
    return index if isinstance(index, tuple) else (index,)


class IndexMemo:
    def __init__(self):
        self._entries: dict[tuple, tuple[tuple[weakref.ref, ...], tuple[int, ...], Any]] = {}

    def get(self, index: Indices, tag: Hashable = ()) -> Any | None:
        """The value stored for ``index`` under ``tag``, or None (never stored, freed or changed)."""
        ts = _as_tuple(index)
        entry = self._entries.get((tuple(map(id, ts)), tag))
        if entry is None:
            return None
        refs, versions, value = entry
        if any(r() is not t for r, t in zip(refs, ts)) or versions != tuple(t._version for t in ts):
            return None
        return value

    def put(self, index: Indices, value: Any, tag: Hashable = ()) -> Any:
        ts = _as_tuple(index)
        key = (tuple(map(id, ts)), tag)
        entries = self._entries

        def forget(_, key=key):
            entries.pop(key, None)

        entries[key] = (tuple(weakref.ref(t, forget) for t in ts), tuple(t._version for t in ts), value)
        return value
