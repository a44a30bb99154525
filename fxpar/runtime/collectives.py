"""The collectives of a rank's step, called one at a time: ``fxpar calibrate`` times them.

``DistComm`` runs single reshard steps (``fxpar.reshard.Step``) through
``fxpar.runtime.steps.apply_steps``, the code the rewritten graphs run (torch functional
collectives on the sub-groups of a ``DeviceMesh``), so what calibration measures is what a step
executes.
"""

from __future__ import annotations

import torch

from fxpar.reshard import Step
from fxpar.runtime.steps import RankMesh, apply_steps

__all__ = ["DistComm"]


class DistComm:
    """This rank's collectives over the per-axis sub-groups of a torch.distributed ``DeviceMesh``."""

    def __init__(self, mesh):
        self.mesh = RankMesh.from_device_mesh(mesh)
        self.mesh_shape = self.mesh.shape

    def coord(self, axis: int) -> int:
        return self.mesh.coords[axis]

    def all_gather(self, x: torch.Tensor, axis: int, dim: int) -> torch.Tensor:
        return apply_steps(x, [Step("all_gather", axis, dim)], self.mesh)

    def all_reduce(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        return apply_steps(x, [Step("all_reduce", axis)], self.mesh)

    def reduce_scatter(self, x: torch.Tensor, axis: int, dim: int) -> torch.Tensor:
        return apply_steps(x, [Step("reduce_scatter", axis, dim)], self.mesh)

    def all_to_all(self, x: torch.Tensor, axis: int, dim: int, dim2: int) -> torch.Tensor:
        return apply_steps(x, [Step("all_to_all", axis, dim, dim2)], self.mesh)
