from __future__ import annotations

import resource

import torch
from torch.utils.flop_counter import FlopCounterMode

import fxpar
from fxpar.models import MLP
from fxpar.passes.annotate import tensor_bytes
from fxpar.planner import capture_and_annotate

aten = torch.ops.aten


def test_roles_and_outputs(mlp_graph):
    model, inputs, gm = mlp_graph
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = [n for n, _ in model.named_parameters()]
    assert [n.meta["fxpar_role"] for n in placeholders] == ["param"] * len(names) + ["input", "input"]
    assert [n.meta["fxpar_fqn"] for n in placeholders[: len(names)]] == names
    assert gm.meta["fxpar_outputs"] == [("loss", None)] + [("grad", n) for n in names]
    outs = gm.graph.output_node().args[0]
    for p, g in zip(placeholders, outs[1:]):
        assert g.meta["val"].shape == p.meta["val"].shape


def test_captured_graph_computes_loss_and_grads(mlp_graph):
    model, inputs, gm = mlp_graph
    params = list(model.parameters())
    loss, *grads = gm([p.detach() for p in params], [], list(inputs))
    ref = model(*inputs)
    ref_grads = torch.autograd.grad(ref, params)
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_flops_agree_with_torch_flop_counter(mlp_graph):
    model, inputs, gm = mlp_graph
    counter = FlopCounterMode(display=False)
    with counter:
        model(*inputs).backward()
    total = sum(n.meta.get("fxpar_flops", 0) for n in gm.graph.nodes)
    assert total == counter.get_total_flops() > 0


def test_bytes_and_saved_for_backward(mlp_graph):
    _, _, gm = mlp_graph
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        assert n.meta["fxpar_output_bytes"] == tensor_bytes(n.meta["val"])
        if n.meta["fxpar_is_view"]:
            assert n.meta["fxpar_bytes_written"] == 0
        else:
            assert n.meta["fxpar_bytes_written"] == n.meta["fxpar_output_bytes"]
            assert n.meta["fxpar_bytes_read"] == sum(tensor_bytes(a.meta["val"]) for a in n.all_input_nodes)
    relus = [n for n in gm.graph.nodes if n.target == aten.relu.default]
    assert relus and all(n.meta["fxpar_phase"] == "forward" and n.meta["fxpar_saved_for_backward"] for n in relus)
    backward_mms = [n for n in gm.graph.nodes if n.target == aten.mm.default]
    assert backward_mms and all(n.meta["fxpar_phase"] == "backward" for n in backward_mms)


def test_large_model_plans_on_meta_without_its_memory():
    # ~7.5e9 parameters: 30 GB in fp32, far beyond what this process may allocate for it.
    with torch.device("meta"):
        model = MLP((8192, 16384, 16384, 16384, 16384, 16384, 16384, 16384, 16384, 16384, 16384, 16384, 16384,
                     16384, 16384, 16384, 16384, 16384, 16384, 16384, 16384, 16384, 16384, 16384, 16384, 16384,
                     16384, 16384, 16384, 16384, 8192))
        x = torch.empty(64, 8192)
        y = torch.empty(64, dtype=torch.long)
    num_params = sum(p.numel() for p in model.parameters())
    assert num_params > 7e9
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cluster = fxpar.preset("a100-nvlink-8")
    plan = fxpar.plan(model, (x, y), cluster=cluster, mesh_shape=(8,))
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 2 * 2**20, f"planning grew the process by {grown_kib / 2**20:.1f} GiB"
    assert plan.memory_bytes <= cluster.device.memory_bytes
    assert len(plan.param_specs) == len(list(model.parameters()))


def test_capture_keeps_graph_small(mlp_graph):
    _, _, gm = mlp_graph
    assert not any(n.target == aten.detach.default for n in gm.graph.nodes)
    assert sum(1 for n in gm.graph.nodes if n.target == aten.addmm.default) == 3
    del gm


def test_mlp_meta_capture_matches_real_shapes():
    model = MLP((4, 8, 2))
    gm = capture_and_annotate(model, model.example_inputs(4))
    loss = gm.graph.output_node().args[0][0]
    assert loss.meta["val"].shape == ()


class _BatchNormNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)
        self.bn = torch.nn.BatchNorm1d(4)

    def forward(self, x, y):
        return torch.nn.functional.cross_entropy(self.bn(self.fc(x)), y)


def test_buffer_updates_become_outputs_equal_to_eager():
    torch.manual_seed(0)
    model = _BatchNormNet()
    x, y = torch.randn(8, 8), torch.randint(0, 4, (8,))
    gm = capture_and_annotate(model, (x, y))
    assert [k for k, _ in gm.meta["fxpar_outputs"]].count("buffer") == 3
    assert not any(n.target == aten.native_batch_norm.default for n in gm.graph.nodes)
    params = [p.detach() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    outs = gm(params, buffers, [x, y])
    loss = model(x, y)  # updates the module's buffers in place
    torch.testing.assert_close(outs[0], loss.detach())
    new_values = dict(zip([fqn for kind, fqn in gm.meta["fxpar_outputs"] if kind == "buffer"], outs[1 + len(params):]))
    for name, value in model.named_buffers():
        torch.testing.assert_close(new_values[name], value)


def test_symbolic_batch_annotations_are_expressions_of_the_batch():
    from fxpar.passes.annotate import BATCH, annotate
    from fxpar.passes.capture import capture

    model = MLP((16, 32, 24, 8))
    symbolic = annotate(capture(model, model.example_inputs(8), dynamic_batch=True))
    mm_flops = [n.meta["fxpar_flops"] for n in symbolic.graph.nodes if n.target == aten.addmm.default]
    assert mm_flops and all(BATCH in f.free_symbols for f in mm_flops)
    for batch in (4, 12):
        static = capture_and_annotate(model, model.example_inputs(batch))
        sym_nodes = [n for n in symbolic.graph.nodes if n.op != "output"]
        static_nodes = [n for n in static.graph.nodes if n.op != "output"]
        assert [n.target for n in sym_nodes] == [n.target for n in static_nodes]
        for s, c in zip(sym_nodes, static_nodes):
            for key in ("fxpar_flops", "fxpar_bytes_read", "fxpar_bytes_written", "fxpar_output_bytes"):
                value = s.meta[key]
                value = int(value.subs(BATCH, batch)) if hasattr(value, "subs") else value
                assert value == c.meta[key], (s.name, key)
