"""Measuring the memory a step really allocates, for comparing with the model's prediction."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage that ops make while the mode is active, and their peak. A storage
    counts from the op that makes it until the last tensor object viewing it is gone; storages of
    the ``resident`` tensors (updated in place) are not counted."""

    def __init__(self, resident: list[torch.Tensor] = ()):
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage address -> [live tensor objects, bytes]
        self._resident = {t.untyped_storage().data_ptr() for t in resident}

    def _release(self, key: int) -> None:
        entry = self._refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in self._resident:
                continue
            if key in self._refs:
                self._refs[key][0] += 1
            else:
                self._refs[key] = [1, storage.nbytes()]
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._release, key)
        return out
