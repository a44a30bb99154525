"""Functional capture: models written with in-place ops, views of them, constants created in
forward and dropout capture as a functional joint step that computes what eager autograd does."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxpar
from fxpar.errors import CaptureError, FallbackWarning
from fxpar.passes.capture import capture, step_outputs


class InPlace(nn.Module):
    """The in-place idioms third-party models use."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, y):
        h = self.fc1(x)
        h += 1.0                                   # add_ on an intermediate
        h = self.drop(torch.relu(h))               # bernoulli_ where p > 0
        h = self.bn(h)                             # running statistics updated in place
        h.masked_fill_(h > 2.0, 2.0)               # masked_fill_
        h.view(-1, 4, 4)[:, 0].mul_(0.5)           # in place through a view
        scale = torch.tensor([1.0, 2.0, 0.5, 1.5])  # a constant created in forward
        return nn.functional.cross_entropy(self.fc2(h) * scale, y)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)


def test_captured_step_has_no_in_place_op_and_computes_eager_gradients():
    torch.manual_seed(0)
    model = InPlace()
    x, y = _inputs()
    gm = capture(model, (x, y))
    mutating = [n for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "_schema", None) is not None
                and n.target._schema.is_mutable]
    assert not mutating, mutating
    assert any(n.op == "get_attr" for n in gm.graph.nodes), "the constant tensor should be a get_attr node"
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.detach().clone() for b in model.buffers()]
    loss, *rest = gm(params, buffers, [x, y])
    grads, new_buffers = rest[: len(params)], rest[len(params):]

    reference = InPlace()
    reference.load_state_dict(model.state_dict())
    expected = reference(x, y)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    for g, p in zip(grads, reference.parameters()):
        torch.testing.assert_close(g, p.grad)
    # The step updates the running statistics and the counter, as the eager step did.
    updated = [fqn for kind, fqn in gm.meta["fxpar_outputs"] if kind == "buffer"]
    assert updated == ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
    ref_buffers = dict(reference.named_buffers())
    for fqn, value in zip(updated, new_buffers):
        torch.testing.assert_close(value, ref_buffers[fqn])
    assert len(step_outputs(gm)[2]) == 3


def test_dropout_with_p_above_zero_plans_without_fallback():
    model = InPlace(dropout=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = fxpar.plan(model, _inputs(), mesh_shape=(2,))
    assert not [w for w in caught if issubclass(w.category, FallbackWarning)]
    draws = [name for name, s in plan.strategies.items() if name.startswith("bernoulli")]
    assert draws and all(all(type(p).__name__ == "Shard" for p in plan.strategies[d].outputs[0]) for d in draws)


class WritesParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        with torch.no_grad():
            self.fc.weight.mul_(0.5)
        return self.fc(x).sum()


class WritesInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        x.mul_(2.0)
        return self.fc(x).sum()


@pytest.mark.parametrize("model, what", [(WritesParameter(), "fc.weight"), (WritesInput(), r"input\[0\]")])
def test_in_place_write_into_a_parameter_or_input_is_an_error(model, what):
    with pytest.raises(CaptureError, match=f"writes into {what} in place during the step"):
        capture(model, (torch.randn(2, 4),))


def test_model_output_with_a_loss_is_accepted():
    class WithOutput(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return {"loss": self.fc(x).pow(2).mean(), "logits": self.fc(x)}

    gm = capture(WithOutput(), (torch.randn(2, 4),))
    assert gm.meta["fxpar_outputs"][0] == ("loss", None)
