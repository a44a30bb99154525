"""Run by tests/runtime/test_torchrun.py under torchrun: fxpar.compile picks the process group up
from torchrun's environment. Rank 0 writes its losses and final parameters to argv[1]."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import fxpar
from tests.runtime.train_fns import mlp_inputs, mlp_model, train_mlp_steps


def main(out_path: str, num_steps: int) -> None:
    torch.manual_seed(0)
    model = mlp_model()
    compiled = fxpar.compile(model, mlp_inputs(0), codegen="eager")  # initializes the group from torchrun's env
    rank, world = dist.get_rank(), dist.get_world_size()
    losses = train_mlp_steps(compiled, compiled.parameters(), rank, world, num_steps)
    state = compiled.state_dict()
    if rank == 0:
        torch.save({"losses": losses, "state": state}, out_path)
    # Every rank is past its last collective (rank 0's save included) before the groups go away.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
    # Past this point the work is done and saved. Under load, a C++ thread that torch's distributed
    # runtime leaves joinable is destroyed during interpreter finalization about once in ten runs
    # ("terminate called without an active exception", SIGABRT, with no Python frame left), which
    # would fail the run after it succeeded: skip finalization.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
