"""fxpar under torchrun: the same numbers as single-process training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from . import train_fns as t

ROOT = Path(__file__).resolve().parents[2]


def test_compile_under_torchrun(tmp_path):
    out = tmp_path / "result.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests/runtime/torchrun_train.py"), str(out), "3"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(out, weights_only=False)
    ref_losses, ref_state = t.reference_training(t.mlp_model, t.mlp_inputs, 3)
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    for key, want in ref_state.items():
        torch.testing.assert_close(result["state"][key], want, rtol=1e-5, atol=1e-6)
