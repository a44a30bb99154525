"""Activation recomputation: which forward values may be recomputed, where their copies live, and
what that costs, for the ILP (``fxpar.solve.ilp``), for evaluating any choice directly (the
reference the solver is tested against) and for the pass that recomputes (``passes.recompute``).

Positions are the graph's node order. The forward ends at the loss; a use at a later position is a
*late* use. Storage values are what ``fxpar.solve.problem._liveness`` counts: placeholders other
than parameters and non-view ops; a view extends its base's lifetime.

A *decision* is a forward op ``d`` (not a view, not a ``getitem``, not random, not a step output)
whose values are used late or feed another decision. Its *values* are its output (or, for an op
with several outputs, its ``getitem`` nodes). Recomputing ``d`` (``d`` in R) duplicates it, its
``getitem`` nodes and the forward views of its values that later uses need, at its *host*

    p(d) = min(fb(d), min over w in R that read a value of d of p(w))

(``fb(d)``: the first late use of any of its values); so a chain of recomputed ops is recomputed
from its start when its last op is first needed. Then, for a value ``v`` of ``d`` with bytes ``m``:

* forward copy: live on ``[o(v), lf(v)]`` (its definition to its last forward use), always;
* kept: live on ``(lf(v), lu(v)]`` (to its last use) when ``d`` is not in R;
* recomputed copy: live on ``[p(d), q(v)]`` when ``d`` is in R, where
  ``q(v) = max(lu(v), U(w) for decisions w reading v)`` bounds its last use from above;
* extension: a kept value read by a recomputed ``w`` lives until ``p(w)``; the model counts it up to
  ``U(w) >= p(w)`` (``U(w) = fb(w)``, or for a ``w`` without late uses the largest ``U`` of the
  decisions reading it).

Values that are not a decision's (placeholders, random ops' outputs) are live on
``[o(v), lu(v)]`` and extended the same way; placeholders (inputs, buffers) live past the graph
and the step's outputs to the output node, and positions run to one after the graph. What the
step holds besides these values (parameters' and activations' resharded copies, gradients' bucket
copies and their handoff copy: ``fxpar.solve.problem.step_memory``) is counted as the live sets
count it (``extras_at``), and the copies resharded for a recomputed ``w``'s forward use, a
parameter's copy among them (``param_extensions``), live on to ``U(w)``. The model's memory is therefore an upper bound of
the recomputed graph's own liveness (``passes.recompute``): the copy of a value and the extension
of a kept input may end earlier than ``q`` and ``U``.

Time: a recomputed ``d`` pays the compute of ``d`` and its ``getitem`` nodes again, under their
strategies, and the resharding on edges into its copies from copies (a kept producer's resharded
copy is shared with its forward consumer by the rewrite, so it is not paid again). Recomputation
does not widen the window that gradient synchronization hides behind, so it never shortens a step.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from fxpar.passes.capture import step_outputs
from fxpar.rules.registry import tensor_arg_nodes
from fxpar.solve.problem import copy_spans, is_storage_view, step_memory

INF = float("inf")


def is_random(node: Node) -> bool:
    """Ops that draw random numbers (``nondeterministic_seeded``: bernoulli, dropout, rand...), except
    those with a ``dropout_p`` argument of 0 (attention without dropout draws nothing)."""
    target = node.target
    tags = getattr(target, "tags", ())
    if torch.Tag.nondeterministic_seeded not in tags:
        return False
    schema = getattr(target, "_schema", None)
    if schema is None:
        return True
    for i, arg in enumerate(schema.arguments):
        if arg.name == "dropout_p":
            value = node.kwargs.get("dropout_p", node.args[i] if i < len(node.args) else arg.default_value)
            return not (isinstance(value, (int, float)) and value == 0)
    return True


@dataclass
class Value:
    node: Node
    start: int  # o(v)
    last_forward: int  # lf(v)
    first_late: float  # fb(v), INF without late uses
    last_use: int  # lu(v): the original end of its lifetime
    decision: Node | None = None
    readers: list[Node] = field(default_factory=list)  # decisions that read it (directly or through views)
    copy_end: float = -INF  # q(v)


@dataclass
class Decision:
    node: Node
    values: list[Node]  # storage values: the op itself, or its getitem nodes
    getitems: list[Node]
    views: list[Node]  # forward views of its values that a late use or a decision reads (cloned as needed)
    first_late: float = INF  # fb(d)
    latest_host: float = -INF  # U(d); -INF when no copy is ever needed
    readers: list[Node] = field(default_factory=list)  # decisions reading one of its values
    inputs: list[Node] = field(default_factory=list)  # decisions whose values it reads


@dataclass
class Analysis:
    order: dict[Node, int]
    loss_pos: int
    values: dict[Node, Value]
    decisions: dict[Node, Decision]
    owner: dict[Node, Node]  # cloned node (op, getitem, view) -> its decision
    root: dict[Node, Node]  # view -> its storage base
    step: object = None  # fxpar.solve.problem.StepMemory: what the step holds besides activations

    def members(self, d: Node) -> list[Node]:
        dec = self.decisions[d]
        return [d, *dec.getitems, *dec.views]

    def hosts(self, recompute) -> dict[Node, float]:
        """p(d) for every d in ``recompute`` (INF: never needed, so not recomputed)."""
        chosen = set(recompute)
        host: dict[Node, float] = {}
        for d in sorted(chosen, key=self.order.__getitem__, reverse=True):
            dec = self.decisions[d]
            host[d] = min([dec.first_late] + [host[w] for w in dec.readers if w in chosen])
        return host

    def profile(self, recompute, nbytes) -> list[float]:
        """Bytes live at every position under the model (``nbytes(value)``: its bytes)."""
        chosen = set(recompute)
        host = self.hosts(chosen)
        n = len(self.order) + 1  # the graph's positions and the one after it
        diff = [0.0] * (n + 2)

        def add(lo, hi, m):
            lo, hi = max(int(lo), 0), min(int(hi), n - 1)
            if lo <= hi and m:
                diff[lo] += m
                diff[hi + 1] -= m

        for v in self.values.values():
            m = nbytes(v.node)
            recomputed = v.decision is not None and v.decision in chosen
            if v.decision is None or not recomputed:
                add(v.start, v.last_use, m)
                ends = [self.decisions[w].latest_host for w in v.readers if w in chosen]
                if ends and max(ends) > v.last_use:
                    add(v.last_use + 1, max(ends), m)
            else:
                add(v.start, v.last_forward, m)
                if host[v.decision] < INF and v.copy_end >= host[v.decision]:
                    add(host[v.decision], v.copy_end, m)
        out, running = [], 0.0
        for i in range(n):
            running += diff[i]
            out.append(running)
        return out


def analyze(gm: GraphModule) -> Analysis:
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    loss, _, _ = step_outputs(gm)
    loss_pos = order[loss]
    outputs = set(gm.graph.output_node().all_input_nodes)
    root: dict[Node, Node] = {}
    storage: list[Node] = []
    for n in nodes:
        if is_storage_view(n):
            root[n] = root.get(n.args[0], n.args[0])
        elif n.op in ("placeholder", "call_function") and n.meta.get("fxpar_role") != "param":
            storage.append(n)
    uses: dict[Node, list[int]] = {v: [] for v in storage}
    for n in nodes:
        if n.op == "output":
            continue
        for a in n.all_input_nodes:
            r = root.get(a, a)
            if r in uses:
                uses[r].append(order[n])
    step = step_memory(gm)
    output_roots = {root.get(a, a) for a in gm.graph.output_node().all_input_nodes}
    values = {}
    for v in storage:
        o = order[v]
        early = [p for p in uses[v] if p <= loss_pos]
        late = [p for p in uses[v] if p > loss_pos]
        lf = max(early + [o])
        lu = max(late) if late else lf
        # The step's outputs live to the output node, inputs and buffers past the graph (as
        # fxpar.solve.problem._liveness counts them).
        if v.op == "placeholder":
            lu = step.after
        elif v in output_roots:
            lu = max(lu, step.end)
        values[v] = Value(v, o, lf, min(late) if late else INF, lu)

    def eligible(n: Node) -> bool:
        if n.op != "call_function" or n.meta.get("fxpar_is_view") or n.target is operator.getitem:
            return False
        if order[n] >= loss_pos or n.meta.get("fxpar_phase") != "forward" or n in outputs or is_random(n):
            return False
        val = n.meta.get("val")
        if isinstance(val, (tuple, list)):
            return all(u.target is operator.getitem and u not in outputs for u in n.users) and bool(n.users)
        return isinstance(val, torch.Tensor)

    # Decisions, from the loss backwards: values used late, or read by a later decision.
    decisions: dict[Node, Decision] = {}
    owner: dict[Node, Node] = {}
    reader_decisions: dict[Node, set[Node]] = {}  # storage value -> decisions reading it
    for n in reversed(nodes):
        if not eligible(n):
            continue
        multi = isinstance(n.meta["val"], (tuple, list))
        vals = [u for u in n.users if u.target is operator.getitem] if multi else [n]
        vals.sort(key=order.__getitem__)
        late = any(values[v].first_late < INF for v in vals)
        read = set().union(*[reader_decisions.get(v, set()) for v in vals])
        if late or read:
            decisions[n] = Decision(n, vals, vals if multi else [], [])
        if n in decisions:
            for a in tensor_arg_nodes(n):
                r = root.get(a, a)
                if r in values:
                    reader_decisions.setdefault(r, set()).add(n)
    for d, dec in decisions.items():
        owner[d] = d
        for g in dec.getitems:
            owner[g] = d
        dec.first_late = min(values[v].first_late for v in dec.values)
    # Forward views of a decision's values needed by a late use or a decision (clone candidates).
    needed: set[Node] = set()
    for n in reversed(nodes):
        if n not in root or order[n] > loss_pos or root[n] not in values:
            continue
        if any(order[u] > loss_pos or u in decisions or u in needed for u in n.users):
            needed.add(n)
    for n in nodes:
        if n in needed:
            d = owner.get(root[n])
            if d is not None:
                decisions[d].views.append(n)
                owner[n] = d
    for v in values.values():
        d = owner.get(v.node)
        v.decision = d if d is not None and v.node in decisions[d].values else None
        v.readers = sorted(reader_decisions.get(v.node, ()), key=order.__getitem__)
    for d, dec in decisions.items():
        dec.readers = sorted({w for v in dec.values for w in values[v].readers}, key=order.__getitem__)
        dec.inputs = sorted({values[r].decision for a in tensor_arg_nodes(d) for r in [root.get(a, a)]
                             if r in values and values[r].decision is not None}, key=order.__getitem__)
    # U(d): the latest its copy can be made, from the loss backwards (readers come later).
    for d in sorted(decisions, key=order.__getitem__, reverse=True):
        dec = decisions[d]
        if dec.first_late < INF:
            dec.latest_host = dec.first_late
        else:
            dec.latest_host = max([decisions[w].latest_host for w in dec.readers], default=-INF)
    for v in values.values():
        ends = [decisions[w].latest_host for w in v.readers]
        v.copy_end = max([v.last_use if v.first_late < INF else -INF] + ends)
    return Analysis(order, loss_pos, values, decisions, owner, root, step)


def extras_at(a: Analysis, pos: int) -> tuple[list[Node], list[tuple], float]:
    """What the step holds at position ``pos`` besides the analysis' values, as ``_liveness`` counts
    it: (nodes counted once more each, ``LiveSet`` copy items, fixed bytes)."""
    sm = a.step
    copies = [item for item, lo, hi in copy_spans(sm) if lo <= pos <= hi]
    if pos == sm.end:
        return [], copies + sm.bucket_items, sm.bucket_fixed
    if pos == sm.after:
        grads = [p for _, p in sm.grads]
        return grads + grads, copies, 0.0
    return [], copies, 0.0


def param_extensions(a: Analysis) -> list[tuple[Node, tuple, int, int]]:
    """(w, parameter copy item, first, last position) for every decision ``w`` that reads a
    parameter (directly or through its views) and whose latest host ``U(w)`` comes after the end of
    that parameter's copy span (``step_memory``): where ``w`` is recomputed, the rewrite keeps the
    parameter's resharded copy that its forward use read until the recomputation reads it again,
    so the copy lives on to ``U(w)``."""
    spans = {p: hi for p, _, _, hi in a.step.param_copies}
    out = []
    for w, dec in a.decisions.items():
        if dec.latest_host == -INF:
            continue
        params = {r for n in tensor_arg_nodes(w) for r in [a.root.get(n, n)] if r in spans}
        for p in sorted(params, key=a.order.__getitem__):
            hi = int(dec.latest_host)
            if hi > spans[p]:
                out.append((w, (p, None, "param"), spans[p] + 1, hi))
    return out


def analysis_of(problem) -> Analysis:
    """The recomputation analysis of the graph ``problem`` was built from (made once, kept on it)."""
    if problem.recompute_analysis is None:
        problem.recompute_analysis = analyze(problem.nodes[0].graph.owning_module)
    return problem.recompute_analysis


def memory_profile(problem, choice: dict[Node, int], recompute=()) -> list[float]:
    """Bytes live at every position (and after the graph) besides the parameters and their state
    when the decisions ``recompute`` are recomputed: activations, gradients, inputs, resharded
    parameter copies and bucket copies."""
    a = analysis_of(problem)
    act = problem.act_mem
    prof = a.profile(recompute, lambda v: act[v][choice[v]] if v in act else 0.0)
    sm = a.step
    diff = [0.0] * (len(prof) + 1)
    spans = copy_spans(sm)
    # A kept input's resharded copy that a recomputed op reads was made for its forward use and is
    # shared with the recomputation: it lives up to U(w), the latest the copy of w can be made.
    for w in set(recompute):
        hi = a.decisions[w].latest_host
        if hi > a.order[w]:
            spans.append(((None, w, "act"), a.order[w] + 1, int(hi)))
    # A parameter's copy that a recomputed op reads is kept by the rewrite until the recomputation.
    chosen = set(recompute)
    param_ends: dict[tuple, tuple[int, int]] = {}
    for w, item, lo, hi in param_extensions(a):
        if w in chosen:
            param_ends[item] = (lo, max(hi, param_ends.get(item, (lo, hi))[1]))
    spans += [(item, lo, hi) for item, (lo, hi) in param_ends.items()]
    for item, lo, hi in spans:
        m = problem.copy_bytes(item, choice)
        if m:
            diff[lo] += m
            diff[hi + 1] -= m
    running = 0.0
    for i in range(len(prof)):
        running += diff[i]
        prof[i] += running
    prof[sm.end] += sm.bucket_fixed + sum(problem.copy_bytes(item, choice) for item in sm.bucket_items)
    prof[sm.after] += 2 * sum(act[p][choice[p]] for _, p in sm.grads)
    return prof


def recompute_memory(problem, choice: dict[Node, int], recompute=()) -> float:
    """Peak bytes per device of ``choice`` with ``recompute`` recomputed (with none, ``memory_of``)."""
    return problem.param_memory(choice) + max(memory_profile(problem, choice, recompute), default=0.0)


def recompute_edges(problem) -> list[tuple]:
    """(edge, producer's decision, consumer's decision) for edges from one copy into another: their
    resharding is paid again when both decisions are recomputed."""
    a = analysis_of(problem)
    out = []
    for e in problem.edges:
        if e.position < 0:
            continue
        dc, du = a.owner.get(e.consumer), a.owner.get(e.producer)
        if dc is not None and du is not None:
            out.append((e, du, dc))
    return out


def recompute_time(problem, choice: dict[Node, int], recompute=()) -> float:
    """Seconds that recomputing ``recompute`` adds to the step under ``choice``."""
    a = analysis_of(problem)
    chosen = set(recompute)
    t = 0.0
    for d in chosen:
        for n in [d, *a.decisions[d].getitems]:
            t += problem.node_cost[n][choice[n]]
    for e, du, dc in recompute_edges(problem):
        if du in chosen and dc in chosen:
            t += problem.edge_cost(e, choice[e.producer], choice[e.consumer])
    return t


def recompute_split(problem, choice: dict[Node, int], recompute=()) -> tuple[float, float]:
    """(compute, communication) seconds of ``recompute_time``."""
    a = analysis_of(problem)
    chosen = set(recompute)
    compute = sum(problem.node_cost[n][choice[n]] for d in chosen for n in [d, *a.decisions[d].getitems])
    return compute, max(0.0, recompute_time(problem, choice, chosen) - compute)


def memory_may_bind(problem) -> bool:
    """False when no assignment can exceed the memory budget (every node's largest strategy fits):
    recomputation can then never pay off."""
    from fxpar.cost import spec_bytes

    mesh = problem.cost_model.mesh_shape

    def most(item) -> float:
        return sum(max(spec_bytes(e.tensor, t, mesh) for t in [*e.in_specs, *e.out_specs]) for e in problem.copy_edges(item))

    bound = sum(max(ms) for ms in problem.param_mem.values())
    bound += max((sum(max(problem.act_mem[v]) for v in live) + sum(most(i) for i in getattr(live, "copies", ()))
                  + getattr(live, "fixed", 0.0) for live in problem.live_sets), default=0.0)
    return bound > problem.memory_budget
