"""What is derived from an index tensor alone (a neighbor list), kept while that tensor lives
unchanged.

A model's T passes, and their backward, reuse one neighbor list per batch, so what follows from the
list alone (its check, the fast CPU backend's row layout) is computed once per list, not at every
call. An entry is keyed by the tensor's identity and a tag, held through a weak reference (dropped
when the list is freed) and valid only while the tensor's version counter is unchanged (an in-place
change makes it stale). Never for anything that depends on coordinates or carries autograd history.
"""
from __future__ import annotations

import weakref
from typing import Any, Hashable

import torch


class IndexMemo:
    def __init__(self):
        self._entries: dict[tuple[int, Hashable], tuple[weakref.ref, int, Any]] = {}

    def get(self, index: torch.Tensor, tag: Hashable = ()) -> Any | None:
        """The value stored for ``index`` under ``tag``, or None (never stored, freed or changed)."""
        entry = self._entries.get((id(index), tag))
        if entry is None or entry[0]() is not index or entry[1] != index._version:
            return None
        return entry[2]

    def put(self, index: torch.Tensor, value: Any, tag: Hashable = ()) -> Any:
        key = (id(index), tag)
        entries = self._entries

        def forget(_, key=key):
            entries.pop(key, None)

        entries[key] = (weakref.ref(index, forget), index._version, value)
        return value

    def __len__(self) -> int:
        return len(self._entries)
