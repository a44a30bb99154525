"""Run by tests/runtime/test_multinode.py under two torchrun "nodes" of 2 processes each: a 2x2
mesh whose outer axis is the node (ranks 0-1 on node 0, 2-3 on node 1, as torchrun numbers them).
Rank 0 writes its losses and final parameters to argv[1]."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import fxpar
from tests.runtime.train_fns import finish_torchrun_rank, mlp_inputs, mlp_model, train_mlp_steps


def main(out_path: str, num_steps: int) -> None:
    torch.manual_seed(0)
    model = mlp_model()
    compiled = fxpar.compile(model, mlp_inputs(0), mesh_shape=(2, 2), codegen="eager")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert int(os.environ["GROUP_RANK"]) == rank // 2, "torchrun numbers ranks node by node"
    losses = train_mlp_steps(compiled, compiled.parameters(), rank, world, num_steps)
    finish_torchrun_rank(out_path, {"losses": losses, "state": compiled.state_dict(), "plan": compiled.plan.to_json()})


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
