"""Run by tests/runtime/test_torchrun.py under torchrun: fxpar.compile picks the process group up
from torchrun's environment. Rank 0 writes its losses and final parameters to argv[1]."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

import fxpar
from tests.runtime.train_fns import finish_torchrun_rank, mlp_inputs, mlp_model, train_mlp_steps


def main(out_path: str, num_steps: int) -> None:
    torch.manual_seed(0)
    model = mlp_model()
    compiled = fxpar.compile(model, mlp_inputs(0), codegen="eager")  # initializes the group from torchrun's env
    rank, world = dist.get_rank(), dist.get_world_size()
    losses = train_mlp_steps(compiled, compiled.parameters(), rank, world, num_steps)
    finish_torchrun_rank(out_path, {"losses": losses, "state": compiled.state_dict()})


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
