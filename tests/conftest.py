from __future__ import annotations

import pytest
import torch

from fxpar.models import MLP
from fxpar.planner import capture_and_annotate


def small_mlp() -> tuple[MLP, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = MLP((16, 32, 24, 8))
    return model, model.example_inputs(8)


@pytest.fixture(scope="session")
def mlp_graph():
    model, inputs = small_mlp()
    return model, inputs, capture_and_annotate(model, inputs)
