"""Measuring the memory a step really allocates, for comparing with the model's prediction."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _plain(t: torch.Tensor) -> torch.Tensor:
    """The tensor that holds ``t``'s storage on this rank: a DTensor's local piece, else ``t``."""
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage that ops make while the mode is active, and their peak. A storage
    counts once, from the op that makes it until the last tensor object viewing it is gone (views
    and aliases share it); storages of the ``resident`` tensors (held across steps, updated in place:
    parameters, optimizer state, inputs; a DTensor by its local piece) are counted apart, once
    each, in ``resident_bytes``. A tensor subclass (DTensor) dispatches first and the plain tensors
    its ops make are counted. ``peak_op`` names the op at which the peak was reached."""

    def __init__(self, resident: list[torch.Tensor] = ()):
        super().__init__()
        self.live = self.peak = 0
        self.peak_op = ""
        self._refs: dict[int, list[int]] = {}  # storage address -> [live tensor objects, bytes]
        storages = {}
        for t in resident:
            s = _plain(t).untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        self._resident = set(storages)
        self.resident_bytes = sum(storages.values())

    def _release(self, key: int) -> None:
        entry = self._refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is not torch.Tensor and not issubclass(torch.Tensor, t) for t in types):
            return NotImplemented
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
                if self.live > self.peak:
                    self.peak, self.peak_op = self.live, str(func)
            weakref.finalize(t, self._release, key)
        return out


def measure_step(step, resident: list[torch.Tensor]) -> dict:
    """One call of ``step`` under ``LiveTensorBytes(resident)``: ``{"peak": bytes, "resident":
    bytes, "at": op name}``, the peak counting the resident tensors' storage once and the storage
    the step's ops make at its largest."""
    mode = LiveTensorBytes(resident)
    with mode:
        step()
    return {"peak": mode.resident_bytes + mode.peak, "resident": mode.resident_bytes, "at": mode.peak_op}
