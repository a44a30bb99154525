"""The planning problem: every node's strategies and costs, the edges between them, memory.

``build_problem`` gathers what the ILP needs from an annotated graph and its strategies; the
``Problem`` also evaluates any assignment directly (``cost_of``, ``memory_of``), which is the
reference the solver is tested against. With ``simplify`` (the default), repeated layers share decisions (``classes``: nodes in one class
take the same strategy, see ``fxpar.solve.repeat``) and edges between cheap ops carry no resharding
(``no_reshard``, see ``fxpar.solve.ilp``); both restrict the search space to keep the model small.
"""

from __future__ import annotations

import bisect
import operator
import time
from dataclasses import dataclass, field

import numpy as np
from torch.fx import GraphModule, Node

from fxpar.cost import CostModel, collective_time, spec_bytes
from fxpar.passes.capture import step_outputs
from fxpar.passes.schedule import made_from
from fxpar.placement import Spec, replicated
from fxpar.reshard import reshard_steps
from fxpar.rules.registry import OpStrategy, input_source, op_facts, output_values, tensor_arg_nodes
from fxpar.solve.repeat import node_signature, repeated_classes

# Collectives the runtime can leave in flight (fxpar.runtime.steps.ASYNC_KINDS).
ASYNC_KINDS = ("all_reduce", "reduce_scatter")

OPTIMIZER_STATE_FACTOR = {"sgd": 0, "sgd-momentum": 1, "adam": 2, "adamw": 2}

# The runtime packs the gradient collectives of one kind, mesh axis and dtype into buckets of at
# most this many bytes (fxpar.runtime.codegen.bucket_collectives, DDP's 25 MB default).
GRAD_BUCKET_BYTES = 25 * 1024 * 1024


class EarlyValue:
    """The value on an edge whose producer is made from the parameters alone or from the batch
    alone: the runtime can issue its collectives before the step needs them (the batch's at the
    start of the step, ``fxpar.passes.schedule``), so they do not pay the in-step cost of a
    collective waited for between computations (``LinkSpec.in_step_latency``)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __getattr__(self, name):
        return getattr(self.value, name)


class GradValue:
    """A gradient's value on the edge that synchronizes it into its parameter's spec: the edge is
    priced as part of a bucket (``Problem.grad_sync_cost``) rather than as a collective of its own."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    @property
    def shape(self):
        return self.value.shape

    @property
    def dtype(self):
        return self.value.dtype

    def element_size(self) -> int:
        return self.value.element_size()

    def numel(self) -> int:
        return self.value.numel()


@dataclass(eq=False)
class Edge:
    producer: Node
    consumer: Node
    out_index: int
    tensor: object
    out_specs: list  # per producer strategy: the spec of its output out_index
    in_specs: list  # per consumer strategy: the spec it wants
    position: int = -1  # which tensor argument of the consumer; -1 for a gradient's edge


@dataclass
class Problem:
    nodes: list[Node]
    strategies: dict[Node, list[OpStrategy]]
    node_cost: dict[Node, list[float]]
    edges: list[Edge]
    param_mem: dict[Node, list[float]]
    live_sets: list[list[Node]]
    act_mem: dict[Node, list[float]]
    memory_budget: float
    cost_model: CostModel
    build_seconds: float = 0.0
    forced: dict[Node, set[int]] = field(default_factory=dict)
    classes: dict[Node, Node] = field(default_factory=dict)  # node -> its class representative
    no_reshard: set = field(default_factory=set)  # edges the consumer takes as the producer gives
    # Gradient synchronization that the runtime runs asynchronously (a single all-reduce or
    # reduce-scatter per gradient) hides behind backward compute that follows it.
    overlap: bool = True
    overlap_efficiency: float = 1.0  # the share of backward compute time that hides communication
    backward: set = field(default_factory=set)  # nodes of the backward pass
    last_grads: set = field(default_factory=set)  # gradient edges of the last bucket (last_bucket)
    num_grad_syncs: int = 1  # gradient edges: the most gradients that can share one bucket
    # Per parameter and strategy: seconds of its optimizer update, which node_cost includes.
    update_cost: dict[Node, list[float]] = field(default_factory=dict)
    # fxpar.solve.recompute.Analysis of the graph, made when recomputation is planned.
    recompute_analysis: object = field(default=None, repr=False)
    _reshard_cache: dict = field(default_factory=dict, repr=False)
    _matrix_cache: dict = field(default_factory=dict, repr=False)
    _edge_terms_cache: dict = field(default_factory=dict, repr=False)
    _copy_size_cache: dict = field(default_factory=dict, repr=False)

    def reshard_cost(self, tensor, src: Spec, dst: Spec) -> float:
        if src == dst:
            return 0.0
        grad = isinstance(tensor, GradValue)
        early = isinstance(tensor, EarlyValue)
        key = (tuple(tensor.shape), tensor.dtype, src, dst, grad, early)
        if key not in self._reshard_cache:
            if grad:
                self._reshard_cache[key] = self.grad_sync_cost(tensor, src, dst)
            else:
                self._reshard_cache[key] = self.cost_model.reshard_time(tensor.value if early else tensor, src, dst,
                                                                        in_step=not early)
        return self._reshard_cache[key]

    def grad_sync_cost(self, grad: GradValue, src: Spec, dst: Spec) -> float:
        """Seconds of synchronizing a gradient from ``src`` to its parameter's ``dst`` as the runtime
        runs it. A single all-reduce or reduce-scatter goes into a bucket with the other gradients
        of its kind, axis and dtype (one collective per ``GRAD_BUCKET_BYTES``): the gradient pays
        its transfer time, its copy into the bucket, and its share of one bucket's
        fixed cost (the collective's latency and launch), ``max(bytes / bucket, 1 / gradients)``,
        so that a model whose gradients fill one partial bucket pays one latency, not one per
        gradient. Anything else is resharded step by step, as on any edge."""
        steps = reshard_steps(src, dst)
        cm = self.cost_model
        if len(steps) != 1 or steps[0].kind not in ASYNC_KINDS:
            return cm.reshard_time(grad.value, src, dst)
        step = steps[0]
        n = cm.mesh_shape[step.axis]
        if n <= 1:
            return 0.0
        nbytes = float(spec_bytes(grad.value, src, cm.mesh_shape))
        bandwidth, latency = cm.links[step.axis].figures(step.kind)
        fixed = collective_time(step.kind, 0.0, n, bandwidth, latency) + cm.cluster.device.kernel_overhead_s
        transfer = collective_time(step.kind, nbytes, n, bandwidth, latency) - collective_time(step.kind, 0.0, n, bandwidth, latency)
        # The bucket is one concatenation of its gradients (read and written once); the results
        # are views of the collective's output.
        copies = cm.roofline(0.0, 2 * nbytes, "elementwise") - cm.cluster.device.kernel_overhead_s
        share = max(nbytes / GRAD_BUCKET_BYTES, 1.0 / max(self.num_grad_syncs, 1))
        return transfer + copies + share * fixed

    def cost_matrix(self, tensor, a_specs: list[Spec], b_specs: list[Spec]) -> dict[tuple[Spec, Spec], float]:
        # A gradient's sync is priced apart from a tensor of its shape (grad_sync_cost), as in reshard_cost.
        key = (tuple(tensor.shape), tensor.dtype, tuple(a_specs), tuple(b_specs), isinstance(tensor, GradValue),
               isinstance(tensor, EarlyValue))
        if key not in self._matrix_cache:
            self._matrix_cache[key] = {(a, b): self.reshard_cost(tensor, a, b) for a in a_specs for b in b_specs}
        return self._matrix_cache[key]

    def edge_cost(self, edge: Edge, su: int, sv: int) -> float:
        return self.reshard_cost(edge.tensor, edge.out_specs[su], edge.in_specs[sv])

    def rep(self, node: Node) -> Node:
        return self.classes.get(node, node)

    def live_set_memory(self, live: list[Node], choice: dict[Node, int]) -> float:
        """Bytes live in ``live`` (a ``LiveSet``) under ``choice``: its nodes' outputs (a parameter:
        its gradient), the parameters' resharded copies and gradients' bucket copies it holds, and
        its fixed bytes."""
        total = sum(self.act_mem[v][choice[v]] for v in live)
        for item in getattr(live, "copies", ()):
            total += self.copy_bytes(item, choice)
        return total + getattr(live, "fixed", 0.0)

    def copy_edges(self, item: tuple) -> list[Edge]:
        """The edges of a ``LiveSet`` copy item: ``(parameter, None, "param")`` -> the edges out of
        a parameter; ``(None, consumer, "act")`` -> the edges into a consumer from other values
        that may reshard; ``(gradient, parameter, "grad")`` -> the gradient's edge."""
        index = self.__dict__.get("_copy_index")
        if index is None or index[0] is not self.edges:
            table: dict = {}
            for e in self.edges:
                if e.position == -1:
                    table.setdefault((e.producer, e.consumer, "grad"), []).append(e)
                elif e.producer in self.param_mem:
                    table.setdefault((e.producer, None, "param"), []).append(e)
                elif e not in self.no_reshard:
                    table.setdefault((None, e.consumer, "act"), []).append(e)
            index = self.__dict__["_copy_index"] = (self.edges, table)
        return index[1].get(item, [])

    def copy_bytes(self, item: tuple, choice: dict[Node, int]) -> float:
        """Bytes of a copy item under ``choice``: for a parameter, the largest copy any of its
        consumers has resharded for it (in the spec that consumer wants); for a consumer, the
        copies resharded for it; for a gradient, its concatenation into its bucket (in its
        producer's spec) where its edge reshards."""
        grad = item[2] == "grad"
        sizes = [self._copy_size(e, choice[e.producer], choice[e.consumer], grad) for e in self.copy_edges(item)]
        return max(sizes, default=0.0) if item[2] == "param" else sum(sizes)

    def _copy_size(self, edge: Edge, su: int, sv: int, grad: bool) -> float:
        """Bytes per device of ``edge``'s resharded copy under (``su``, ``sv``): 0 where it does not
        reshard, else the tensor in the producer's spec (a gradient's bucket copy) or the
        consumer's; remembered per edge and pair, as ``edge_terms``."""
        table = _edge_table(self._copy_size_cache, edge)
        size = table.get((su, sv, grad))
        if size is None:
            a, b = edge.out_specs[su], edge.in_specs[sv]
            size = table[(su, sv, grad)] = 0.0 if a == b else float(spec_bytes(edge.tensor, a if grad else b,
                                                                                  self.cost_model.mesh_shape))
        return size

    def resident_param_bytes(self, p: Node, k: int) -> float:
        """Bytes parameter ``p`` under its strategy ``k`` holds for the whole step: the parameter and
        its optimizer state (``param_mem`` less the gradient, which the live sets count from the
        node that produces it)."""
        grad = spec_bytes(p.meta["val"], self.strategies[p][k].outputs[0], self.cost_model.mesh_shape)
        return self.param_mem[p][k] - grad

    def edge_terms(self, edge: Edge, su: int, sv: int) -> tuple[float, bool]:
        """(``reshard_cost``, ``overlappable``) of ``edge`` with its producer under strategy ``su``
        and its consumer under ``sv``, remembered per edge and pair (``breakdown`` asks for every
        edge of every assignment it is given, brute force for millions)."""
        table = _edge_table(self._edge_terms_cache, edge, self.overlap)
        terms = table.get((su, sv))
        if terms is None:
            a, b = edge.out_specs[su], edge.in_specs[sv]
            terms = table[(su, sv)] = (self.reshard_cost(edge.tensor, a, b), self.overlappable(edge, a, b))
        return terms

    def overlappable(self, edge: Edge, src: Spec, dst: Spec) -> bool:
        if not self.overlap or edge.position != -1 or src == dst:
            return False
        steps = reshard_steps(src, dst)
        return len(steps) == 1 and steps[0].kind in ASYNC_KINDS

    def breakdown(self, choice: dict[Node, int]) -> dict[str, float]:
        """Seconds: compute, communication on the critical path, overlappable gradient sync, the
        backward compute it can hide behind, the part of it exposed, and the step in total."""
        compute = sum(self.node_cost[n][choice[n]] for n in self.nodes)
        comm = grad_sync = last = 0.0
        for e in self.edges:
            cost, overlappable = self.edge_terms(e, choice[e.producer], choice[e.consumer])
            if overlappable:
                grad_sync += cost
                last += cost if e in self.last_grads else 0.0
            else:
                comm += cost
        window = self.overlap_efficiency * sum(self.node_cost[n][choice[n]] for n in self.backward)
        exposed = max(0.0, grad_sync - window, (1 - self.overlap_efficiency) * grad_sync, last)
        return {"compute": compute, "comm": comm, "grad_sync": grad_sync, "window": window,
                "exposed_grad_sync": exposed, "step": compute + comm + exposed}

    def cost_of(self, choice: dict[Node, int]) -> float:
        """The objective of any assignment, computed directly (the reference for brute force)."""
        return self.breakdown(choice)["step"]

    def cost_floor(self) -> float:
        """A lower bound of ``cost_of`` over every assignment: each node at its cheapest strategy,
        with no communication (the step is compute + communication + exposed sync, the last two
        never negative; repeated layers' ties only raise it). Recomputation only adds time, so it
        bounds those plans too. Where the solver stops without a bound (a 3-D mesh whose plan is a
        start), this is the bound reported: on Llama-7B on 2x4x8 it is within 8.4% of the plan
        found, against a solver bound of about 0 (docs/solver-scale.md)."""
        return sum(min(self.node_cost[n]) for n in self.nodes)

    def memory_of(self, choice: dict[Node, int]) -> float:
        """Peak bytes per device: the parameters and their optimizer state, plus the largest live set
        (``_liveness``)."""
        sets = self.live_set_memories(choice)
        return self.param_memory(choice) + (float(sets.max()) if len(sets) else 0.0)

    def param_memory(self, choice: dict[Node, int]) -> float:
        """Bytes of the parameters and their optimizer state (held for the whole step)."""
        return sum(self.resident_param_bytes(p, choice[p]) for p in self.param_mem)

    def live_set_memories(self, choice: dict[Node, int]) -> np.ndarray:
        """``live_set_memory`` of every live set under ``choice``, in order. Live sets made by
        ``_liveness`` (a ``LiveSets``) are evaluated from their spans: each node's bytes and each
        copy item's bytes once, added over the run of sets holding it; other lists set by set."""
        return self.per_live_set(lambda v: self.act_mem[v][choice[v]], lambda item: self.copy_bytes(item, choice))

    def per_live_set(self, node_value, item_value, fixed: bool = True) -> np.ndarray:
        """For every live set, the sum of ``node_value(v)`` over its nodes (a node listed twice counts
        twice), of ``item_value(item)`` over its copy items, and (with ``fixed``) its fixed bytes."""
        sets = self.live_sets
        spans = getattr(sets, "spans", None)
        if spans is None or not spans.describes(sets):
            return np.array([sum(node_value(v) for v in live) + sum(item_value(i) for i in getattr(live, "copies", ()))
                             + (getattr(live, "fixed", 0.0) if fixed else 0.0) for live in sets], dtype=float)
        values = np.fromiter((node_value(v) for v in spans.nodes), dtype=float, count=len(spans.nodes))
        if spans.items:
            items = np.fromiter((item_value(i) for i in spans.items), dtype=float, count=len(spans.items))
            values = np.concatenate([values, items])
        # A run [first, last] adds its value from set first on and takes it off after set last.
        n = len(sets)
        diff = np.bincount(spans.first, weights=values, minlength=n + 1)
        diff -= np.bincount(spans.last + 1, weights=values, minlength=n + 1)
        total = np.cumsum(diff[:n])
        return total + spans.fixed if fixed else total


class LiveSet(list):
    """The nodes whose storage is live at one point of the step (a node listed twice: two copies of
    it; a parameter: its gradient in the parameter's spec), with ``copies``: items whose bytes
    depend on an edge's resharding (``Problem.copy_bytes``), and ``fixed`` bytes no choice changes.
    ``position`` is the graph position (``len(graph)``: after the graph)."""

    def __init__(self, nodes=(), copies=(), fixed: float = 0.0, position: int = 0):
        super().__init__(nodes)
        self.copies = list(copies)
        self.fixed = fixed
        self.position = position


class LiveSpans:
    """Where each node and copy item of a list of live sets appears: ``nodes`` and ``items`` (one
    entry per appearance run; a node listed twice in a set has two runs) over the sets ``first``
    to ``last`` (inclusive, one array over the nodes then the items), and each set's ``fixed``
    bytes. ``_liveness`` makes them as it makes the sets; ``describes`` checks that the sets at
    hand are the ones they were made for (the same set objects, with the same numbers of nodes and
    copies and the same fixed bytes; a set edited in place to another content of the same sizes
    is not detected)."""

    def __init__(self, nodes: list, items: list, first: list[int], last: list[int], sets: list):
        self.nodes = nodes
        self.items = items
        self.first = np.asarray(first, dtype=np.int64)
        self.last = np.asarray(last, dtype=np.int64)
        self.fixed = np.array([getattr(live, "fixed", 0.0) for live in sets], dtype=float)
        self._sets = list(sets)
        self._sizes = [(len(live), len(getattr(live, "copies", ())), getattr(live, "fixed", 0.0)) for live in sets]

    def describes(self, sets: list) -> bool:
        return len(sets) == len(self._sets) and all(
            a is b and len(a) == n and len(getattr(a, "copies", ())) == c and getattr(a, "fixed", 0.0) == f
            for a, b, (n, c, f) in zip(sets, self._sets, self._sizes))


class LiveSets(list):
    """The live sets of ``_liveness`` (a list of ``LiveSet``), with their ``spans`` (``LiveSpans``),
    from which ``Problem.per_live_set`` evaluates every set at once."""

    spans: LiveSpans | None = None


@dataclass
class StepMemory:
    """What ``_liveness`` counts besides activations, by graph position: ``end`` the output node's
    position (the step's outputs live to it; the runtime synchronizes gradients in buckets there),
    ``after`` = len(graph) (the gradients handed to the parameters), ``param_copies``
    (parameter, None, first, last position): where a parameter's resharded copy may live (from
    its first reader to its last use), ``act_copies`` (consumer, first, last position): where the
    copies resharded for a consumer from other values live,
    ``grads`` (gradient, parameter) pairs, ``bucket_items``: gradient items whose bucket copy is
    counted at ``end``, or ``bucket_fixed`` bytes of one full bucket instead."""

    end: int
    after: int
    param_copies: list[tuple[Node, None, int, int]]
    act_copies: list[tuple[Node, int, int]]
    grads: list[tuple[Node, Node]]
    bucket_items: list[tuple[Node, Node, str]]
    bucket_fixed: float


def step_memory(gm: GraphModule) -> StepMemory:
    """The parts of a step's memory that are not activations (see ``StepMemory``)."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    params = {n for n in nodes if n.op == "placeholder" and n.meta.get("fxpar_role") == "param"}
    # A resharded copy of a value is made before the first consumer that wants its spec and kept by
    # the rewrite for every later consumer that wants it, so it may live from the value's first
    # reader to its last use: reach(n), the latest position that reads n, or, through views and
    # getitems of n (which share its storage), reads them.
    reach: dict[Node, int] = {}
    for n in reversed(nodes):
        hi = -1
        for r in n.users:
            if r.op == "output":
                continue
            through = r.op == "call_function" and (r.meta.get("fxpar_is_view") or r.target is operator.getitem)
            hi = max(hi, reach.get(r, order[r]) if through else order[r])
        reach[n] = hi
    copies = [(n, None, min(order[r] for r in n.users if r.op != "output"), reach[n]) for n in nodes
              if n in params and reach[n] >= 0]
    # Another value's copy is counted at the consumer c that reads it (beside its source, which
    # lives at least that long), or, where c is a view, to c's last use: the rewrite shares one
    # copy between consumers that want the same spec, which the model does not follow.
    act = [(n, order[n], max(order[n], reach[n]) if n.meta.get("fxpar_is_view") else order[n]) for n in nodes
           if n.op == "call_function" and any(a not in params for a in n.all_input_nodes)]
    _, grads, _ = step_outputs(gm)
    total = sum(g.meta["val"].numel() * g.meta["val"].element_size() for g, _ in grads)
    # Gradients synchronized by an all-reduce or reduce-scatter are concatenated into buckets of
    # GRAD_BUCKET_BYTES: one bucket holds every gradient that fits it (its copy is counted per
    # gradient that reshards), else one full bucket is counted.
    fits = total <= GRAD_BUCKET_BYTES
    items = [(g, p, "grad") for g, p in grads] if fits else []
    out = gm.graph.output_node()
    return StepMemory(order[out], len(nodes), copies, act, list(grads), items,
                      0.0 if fits or not grads else float(GRAD_BUCKET_BYTES))


def copy_spans(sm: StepMemory) -> list[tuple[tuple, int, int]]:
    """(copy item, first, last position) of every value's resharded copy."""
    return [((p, None, "param"), lo, hi) for p, _, lo, hi in sm.param_copies] + [
        ((None, c, "act"), lo, hi) for c, lo, hi in sm.act_copies]


def is_storage_view(n: Node) -> bool:
    """Whether ``n`` shares another node's storage: a view op, or a ``getitem`` of one (the pieces of
    ``split``, ``unbind`` or ``chunk`` are views of their input, which lives as long as any of them)."""
    if n.op != "call_function":
        return False
    if n.meta.get("fxpar_is_view"):
        return True
    src = n.args[0] if n.target is operator.getitem and n.args else None
    return isinstance(src, Node) and src.op == "call_function" and bool(src.meta.get("fxpar_is_view"))


def _liveness(gm: GraphModule) -> list[LiveSet]:
    """The sets of values live at once, in graph order, at every position where one dies (views
    share their base's storage), and after the graph.

    Activations live from the node that makes them to their last use; the step's outputs
    (gradients, loss, buffer updates) to the output node, where the runtime synchronizes the
    gradients in buckets (a bucket's concatenation beside its sources, ``step_memory``); inputs and
    buffers, which the caller holds, through the whole step. A parameter's resharded copy (the
    largest its consumers want) lives from its first reader to its last use; a copy of another
    value at the consumer it is made for (``step_memory``). After the graph, the gradients, in their
    parameters' specs, are handed to the parameters as a second copy (scaled by the loss's
    gradient) beside the inputs."""
    sm = step_memory(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    base: dict[Node, Node] = {}
    end: dict[Node, int] = {}
    for n in gm.graph.nodes:
        if is_storage_view(n):
            base[n] = base.get(n.args[0], n.args[0])
        elif n.op in ("placeholder", "call_function") and n.meta.get("fxpar_role") != "param":
            end[n] = sm.after if n.op == "placeholder" else order[n]
    for n in gm.graph.nodes:
        for arg in n.all_input_nodes:
            root = base.get(arg, arg)
            if root in end:
                end[root] = max(end[root], order[n])
    dying: dict[int, list[Node]] = {}
    for n, t in end.items():
        dying.setdefault(t, []).append(n)
    copies_at: dict[int, list] = {}
    copy_end: set[int] = set()
    for item, lo, hi in copy_spans(sm):
        for t in range(lo, hi + 1):
            copies_at.setdefault(t, []).append(item)
        copy_end.add(hi)
    live: list[Node] = []
    sets: list[LiveSet] = []
    # The spans of the sets (LiveSpans): each node from the first set made after it joins `live`
    # to the last made before it leaves; each copy over the sets at positions it spans.
    joined: dict[Node, int] = {}
    span_nodes: list[Node] = []
    first: list[int] = []
    last: list[int] = []
    for n in gm.graph.nodes:
        t = order[n]
        if n in end:
            live.append(n)
            joined[n] = len(sets)
        dead = dying.get(t, [])
        if dead or t in copy_end or t == sm.end:
            extra = LiveSet(live, copies_at.get(t, []), position=t)
            if t == sm.end:
                extra.copies += sm.bucket_items
                extra.fixed += sm.bucket_fixed
            sets.append(extra)
            if dead:
                gone = set(dead)
                for v in live:
                    if v in gone:
                        span_nodes.append(v)
                        first.append(joined[v])
                        last.append(len(sets) - 1)
                live = [v for v in live if v not in gone]
    grads = [p for _, p in sm.grads]
    final = len(sets)
    kept = [v for v in live if end.get(v) == sm.after]
    sets.append(LiveSet(kept + grads + grads, position=sm.after))
    for v in live:
        if end.get(v) == sm.after or joined[v] < final:
            span_nodes.append(v)
            first.append(joined[v])
            last.append(final if end.get(v) == sm.after else final - 1)
    for v in grads + grads:
        span_nodes.append(v)
        first.append(final)
        last.append(final)
    # Copies: a copy item (lo, hi) is in every set whose position lies in [lo, hi]; bucket items
    # in the set at the output node.
    positions = [live.position for live in sets]
    span_items: list = []
    item_first: list[int] = []
    item_last: list[int] = []
    for item, lo, hi in copy_spans(sm):
        i, j = bisect.bisect_left(positions, lo), bisect.bisect_right(positions, hi) - 1
        if i <= j:
            span_items.append(item)
            item_first.append(i)
            item_last.append(j)
    at_end = [i for i, live in enumerate(sets) if live.position == sm.end]
    for item in sm.bucket_items if at_end else ():
        span_items.append(item)
        item_first.append(at_end[0])
        item_last.append(at_end[0])
    out = LiveSets(sets)
    out.spans = LiveSpans(span_nodes, span_items, first + item_first, last + item_last, sets)
    return out


def _early_values(gm) -> set:
    """The nodes made from the parameters (and buffers, constants) alone or from the batch alone."""
    out: set = set()
    for roots in (("param", "buffer"), ("input",)):
        made = made_from(gm.graph.nodes, lambda n, roots=roots: n.meta.get("fxpar_role") in roots,
                         lambda n: bool(n.all_input_nodes))
        out |= {n for n in made if n.op != "get_attr"}
    return out


def build_problem(
    gm: GraphModule,
    strategies: dict[Node, list[OpStrategy]],
    cost_model: CostModel,
    *,
    optimizer: str = "adam",
    simplify: bool = True,
) -> Problem:
    start = time.perf_counter()
    mesh_shape = cost_model.mesh_shape
    nodes = list(strategies)
    compute_cache: dict = {}

    signature: dict[Node, tuple] = {}

    def compute(n: Node) -> list[float]:
        # Repeated layers repeat signatures: price each (op, shapes) once.
        key = signature[n] = node_signature(n)
        if key not in compute_cache:
            compute_cache[key] = [cost_model.compute_time(n, s) for s in strategies[n]]
        return compute_cache[key]

    node_cost = {n: list(compute(n)) for n in nodes}
    edges: list[Edge] = []
    early = _early_values(gm)
    for v in nodes:
        args = tensor_arg_nodes(v)
        for j in range(len(args)):
            u, idx = input_source(v, j, args)
            value = output_values(u)[idx]
            edges.append(
                Edge(u, v, idx, EarlyValue(value) if u in early else value, [s.outputs[idx] for s in strategies[u]],
                     [s.inputs[j] for s in strategies[v]], j)
            )
    loss, grads, buffer_updates = step_outputs(gm)
    rep = replicated(len(mesh_shape))
    params = [param for _, param in grads]
    for grad, param in grads:
        edges.append(
            Edge(grad, param, 0, GradValue(grad.meta["val"]), [s.outputs[0] for s in strategies[grad]],
                 [s.outputs[0] for s in strategies[param]])
        )
    # The optimizer updates every parameter after the step, on the device's own piece of it (a
    # replicated parameter whole on every device, a sharded one in pieces), outside the window the
    # gradient synchronization can hide behind: the update is a cost of the parameter's strategy.
    update_cost = {p: [cost_model.optimizer_time(p.meta["val"], s.outputs[0], optimizer) for s in strategies[p]] for p in params}
    # The runtime's hand-over of each parameter's gradient (outside the graph; the same under every
    # strategy) is a cost of the step too.
    handoff = cost_model.gradient_handoff_time()
    for p, costs in update_cost.items():
        node_cost[p] = [c + u + handoff for c, u in zip(node_cost[p], costs)]
    factor = 2 + OPTIMIZER_STATE_FACTOR[optimizer]
    param_mem = {p: [factor * spec_bytes(p.meta["val"], s.outputs[0], mesh_shape) for s in strategies[p]] for p in params}
    live_sets = _liveness(gm)
    act_mem = {}
    act_cache: dict = {}
    for n in set(live_sets.spans.nodes):  # every node of a live set
        # Nodes of one signature have outputs of the same shapes and share one strategy list
        # (all_strategies): their bytes are computed once.
        key = (signature[n] if n in signature else node_signature(n), id(strategies[n]))
        if key not in act_cache:
            vals = output_values(n)
            act_cache[key] = [float(sum(spec_bytes(t, sp, mesh_shape) for t, sp in zip(vals, s.outputs) if hasattr(t, "shape")))
                              for s in strategies[n]]
        act_mem[n] = list(act_cache[key])
    problem = Problem(
        nodes, strategies, node_cost, edges, param_mem, live_sets, act_mem,
        cost_model.cluster.device.memory_bytes, cost_model, time.perf_counter() - start,
    )
    problem.update_cost = update_cost
    problem.backward = {n for n in nodes if n.meta.get("fxpar_phase") == "backward"}
    problem.num_grad_syncs = len(grads)
    # The loss and updated buffers leave the step replicated. One all-reduce (a Partial loss, a
    # buffer's update summed over devices) is issued after the gradients and joins their bucket
    # (fxpar.passes.rewrite), so it is priced as a gradient's sync: its transfer and its share of
    # the bucket's latency; any other reshard step by step.
    for out in [loss] + [value for value, _ in buffer_updates]:
        val = GradValue(out.meta["val"])
        node_cost[out] = [c + problem.reshard_cost(val, s.outputs[0], rep) for c, s in zip(node_cost[out], strategies[out])]
    problem.overlap_efficiency = cost_model.cluster.device.overlap_efficiency
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    grad_edges = [e for e in edges if e.position == -1]
    problem.last_grads = last_bucket(grad_edges, order)
    if simplify:
        problem.classes = repeated_classes(nodes, strategies)
        cheap = [e for e in edges if _is_cheap(e.producer) and _is_cheap(e.consumer)]
        problem.no_reshard = _satisfiable(problem, cheap)
    return problem


def several(specs: list) -> bool:
    """Whether ``specs`` holds more than one distinct spec (stops at the first that differs, where
    ``len(set(specs)) > 1`` hashes every spec of a 3-D mesh's long lists)."""
    first = specs[0] if specs else None
    return any(s != first for s in specs)


def _edge_table(cache: dict, edge: Edge, stamp=None) -> dict:
    """``edge``'s table in ``cache`` (values by strategy pair), emptied when the edge's spec lists
    are replaced or ``stamp`` (what else the values depend on) changes."""
    entry = cache.get(edge)
    if entry is None or entry[0] is not edge.out_specs or entry[1] is not edge.in_specs or entry[2] != stamp:
        entry = cache[edge] = (edge.out_specs, edge.in_specs, stamp, {})
    return entry[3]


def last_bucket(grad_edges: list[Edge], order: dict[Node, int]) -> set[Edge]:
    """The gradient edges whose sync goes into the step's last bucket. The runtime fills buckets of
    ``GRAD_BUCKET_BYTES`` with the gradients in the order the backward produces them and issues each
    bucket once its last gradient exists (``fxpar.runtime.codegen.bucket_collectives``), so the last
    bucket starts after the last gradient, with no compute left to hide behind: the gradients of a
    model with at most one bucket of them are all in it. Sizes are the gradients' whole bytes (what
    an all-reduce or a reduce-scatter of a Partial gradient sends in), so the set does not depend on
    the strategies."""
    last: set[Edge] = set()
    nbytes = 0.0
    for e in sorted(grad_edges, key=lambda e: order[e.producer]):
        size = float(e.tensor.numel() * e.tensor.element_size())
        if last and nbytes + size > GRAD_BUCKET_BYTES:
            last, nbytes = set(), 0.0
        last.add(e)
        nbytes += size
    return last


def _satisfiable(problem: Problem, edges: list[Edge]) -> set[Edge]:
    """The no-reshard edges, less those that would leave a class with no strategy: an edge's
    consumer keeps the strategies whose input spec its producer can still give, propagated to a
    fixed point; an edge that empties a class is resharded as usual, and the propagation restarts."""
    kept = list(edges)
    while True:
        alive = {v: set(range(len(problem.strategies[v]))) for v in {problem.rep(n) for n in problem.nodes}}
        constraining = [e for e in kept if several(e.out_specs) and several(e.in_specs)]
        dead = None
        changed = True
        while changed and dead is None:
            changed = False
            for e in constraining:
                u, v = problem.rep(e.producer), problem.rep(e.consumer)
                given = {e.out_specs[k] for k in alive[u]}
                left = {k for k in alive[v] if e.in_specs[k] in given}
                if not left:
                    dead = e
                    break
                if left != alive[v]:
                    alive[v], changed = left, True
        if dead is None:
            return set(kept)
        kept.remove(dead)




def _is_cheap(node: Node) -> bool:
    """Elementwise ops, views and slicing (``OpFacts.cheap``): their output can be resharded as
    cheaply before them as after them, so the solver need not consider both."""
    if node.op != "call_function":
        return False
    facts = op_facts(node.target)
    return facts.rule is not None and facts.cheap
