"""Two torchrun "nodes" on this machine (--nnodes 2 --nproc-per-node 2, rendezvous on 127.0.0.1),
a 2x2 mesh whose outer axis is the node: the same numbers as single-process training."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from . import train_fns as t

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_nodes_train_like_one_process(tmp_path):
    out = tmp_path / "result.pt"
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    nodes = []
    for node_rank in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
               "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
               str(ROOT / "tests/runtime/multinode_train.py"), str(out), "3"]
        nodes.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for proc in nodes:
            outputs.append(proc.communicate(timeout=300))
    finally:
        for proc in nodes:
            if proc.poll() is None:
                proc.kill()
    for proc, (_, err) in zip(nodes, outputs):
        assert proc.returncode == 0, err[-3000:]
    result = torch.load(out, weights_only=False)
    ref_losses, ref_state = t.reference_training(t.mlp_model, t.mlp_inputs, 3)
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    for key, want in ref_state.items():
        torch.testing.assert_close(result["state"][key], want, rtol=1e-5, atol=1e-6)
