"""The live sets' spans (``fxpar.solve.problem.LiveSpans``): every set evaluated at once equals the
set-by-set sum (``Problem.live_set_memory``) on the shipped models under random assignments, the
spans list exactly the sets' nodes and copies, and a list the spans do not describe is evaluated
set by set."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

import fxpar
from fxpar.cost import CostModel
from fxpar.models import GPT, MLP, VGG16, AlexNet, GPTConfig, Llama, LlamaConfig, ResNet18
from fxpar.planner import capture_and_annotate
from fxpar.solve.ilp import _initial_sets, _overflowing, build_problem
from fxpar.solve.problem import LiveSet, LiveSets
from fxpar.solve.strategies import all_strategies

MODELS = {
    "mlp": lambda: MLP(),
    "alexnet": lambda: AlexNet(num_classes=8, image_size=32, width=1 / 16, dropout=0.0),
    "vgg16": lambda: VGG16(num_classes=8, image_size=32, width=1 / 16, dropout=0.0),
    "resnet18": lambda: ResNet18(num_classes=8, image_size=32, width=1 / 16),
    "gpt": lambda: GPT(GPTConfig(vocab_size=64, seq_len=8, n_layer=2, n_head=4, d_model=32, dropout=0.0)),
    "llama": lambda: Llama(LlamaConfig(vocab_size=64, seq_len=8, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                                       ffn_hidden=64)),
}


def _problem(name: str, mesh: tuple[int, ...], simplify: bool = True):
    torch.manual_seed(0)
    model = MODELS[name]()
    gm = capture_and_annotate(model, model.example_inputs(8))
    cluster = fxpar.preset("cpu-local", num_devices=math.prod(mesh))
    return build_problem(gm, all_strategies(gm, mesh), CostModel(cluster, mesh), simplify=simplify)


def _reference_memory(problem, choice) -> float:
    """``Problem.memory_of`` as the sum over every set, one by one."""
    params = sum(problem.resident_param_bytes(p, choice[p]) for p in problem.param_mem)
    return params + max((problem.live_set_memory(live, choice) for live in problem.live_sets), default=0.0)


def _choices(problem, count: int, seed: int):
    rng = random.Random(seed)
    yield {n: 0 for n in problem.nodes}
    yield {n: len(problem.strategies[n]) - 1 for n in problem.nodes}
    for _ in range(count):
        yield {n: rng.randrange(len(problem.strategies[n])) for n in problem.nodes}


@pytest.mark.parametrize("name,mesh", [("mlp", (2, 2)), ("alexnet", (2,)), ("vgg16", (2, 2)), ("resnet18", (2,)),
                                       ("gpt", (2, 2)), ("llama", (2, 2)), ("llama", (2, 2, 2))])
def test_spans_evaluate_every_set_as_set_by_set(name, mesh):
    problem = _problem(name, mesh, simplify=name != "gpt")
    assert isinstance(problem.live_sets, LiveSets) and problem.live_sets.spans.describes(problem.live_sets)
    resharded = 0
    for choice in _choices(problem, 12, seed=len(name) + len(mesh)):
        fast = problem.live_set_memories(choice).tolist()
        ref = [problem.live_set_memory(live, choice) for live in problem.live_sets]
        assert fast == pytest.approx(ref, rel=1e-12, abs=0.0)
        assert problem.memory_of(choice) == pytest.approx(_reference_memory(problem, choice), rel=1e-12, abs=0.0)
        resharded += sum(problem.copy_bytes(item, choice) > 0 for live in problem.live_sets for item in live.copies)
    assert resharded > 0  # the assignments reshard some copies, so the copy terms are exercised


@pytest.mark.parametrize("name,mesh", [("gpt", (2, 2)), ("resnet18", (2,)), ("llama", (2, 2))])
def test_spans_list_exactly_the_sets_nodes_and_copies(name, mesh):
    problem = _problem(name, mesh)
    sets = problem.live_sets
    spans = sets.spans
    nodes: list[Counter] = [Counter() for _ in sets]
    items: list[Counter] = [Counter() for _ in sets]
    entries = list(spans.nodes) + list(spans.items)
    for k, (entry, lo, hi) in enumerate(zip(entries, spans.first.tolist(), spans.last.tolist())):
        assert 0 <= lo <= hi < len(sets)
        for i in range(lo, hi + 1):
            (nodes if k < len(spans.nodes) else items)[i][entry] += 1
    for i, live in enumerate(sets):
        assert nodes[i] == Counter(live)
        assert items[i] == Counter(live.copies)
        assert spans.fixed[i] == live.fixed


def test_a_list_the_spans_do_not_describe_is_evaluated_set_by_set():
    problem = _problem("gpt", (2, 2))
    choice = {n: len(problem.strategies[n]) - 1 for n in problem.nodes}
    before = problem.live_set_memories(choice).tolist()
    biggest = max(problem.act_mem, key=lambda v: problem.act_mem[v][choice[v]])
    extra = problem.act_mem[biggest][choice[biggest]]
    assert extra > 0
    # The same LiveSets with one set grown in place: its spans no longer describe it.
    problem.live_sets[0].append(biggest)
    assert not problem.live_sets.spans.describes(problem.live_sets)
    after = problem.live_set_memories(choice).tolist()
    assert after[0] == pytest.approx(before[0] + extra, rel=1e-12)
    assert after[1:] == before[1:]
    # A plain list of sets (no spans), as a caller may set.
    problem.live_sets = [LiveSet([biggest, biggest], fixed=5.0)]
    assert problem.live_set_memories(choice).tolist() == [2 * extra + 5.0]


@pytest.mark.parametrize("name,mesh", [("gpt", (2, 2)), ("vgg16", (2, 2))])
def test_lazy_rows_pick_the_sets_set_by_set_sums_pick(name, mesh):
    problem = _problem(name, mesh)
    act = problem.act_mem
    sets = problem.live_sets
    top = lambda f: sorted(range(len(sets)), key=f, reverse=True)[:8]  # noqa: E731
    most = top(lambda i: sum(max(act[v]) for v in sets[i]))
    least = top(lambda i: sum(min(act[v]) for v in sets[i]))
    assert _initial_sets(problem) == list(dict.fromkeys(most + least))
    for choice in _choices(problem, 4, seed=3):
        params = sum(problem.resident_param_bytes(p, choice[p]) for p in problem.param_mem)
        sizes = [problem.live_set_memory(live, choice) for live in sets]
        limit = params + sorted(sizes)[len(sizes) // 2]  # about half the sets overflow
        over = sorted(((params + m - limit, i) for i, m in enumerate(sizes) if i % 3), reverse=True)
        expected = [i for o, i in over if o > 1e-6 * max(1.0, limit)][:8]
        assert expected
        assert _overflowing(problem, choice, limit, {i for i in range(len(sets)) if not i % 3}) == expected


@pytest.mark.parametrize("name,mesh", [("gpt", (2, 2)), ("llama", (2, 4)), ("resnet18", (2,))])
def test_activation_bytes_computed_once_per_signature_are_each_nodes_own(name, mesh):
    from fxpar.cost import spec_bytes
    from fxpar.rules.registry import output_values

    problem = _problem(name, mesh)
    live = {v for s in problem.live_sets for v in s}
    assert set(problem.act_mem) == live
    for n in live:
        own = [float(sum(spec_bytes(t, sp, problem.cost_model.mesh_shape) for t, sp in zip(output_values(n), s.outputs)
                         if hasattr(t, "shape"))) for s in problem.strategies[n]]
        assert problem.act_mem[n] == own, n
