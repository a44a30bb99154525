"""Repeated layers share decisions.

A transformer's or deep MLP's joint graph repeats one block per layer, forward and backward, in
graph order. Nodes with the same signature (op, shapes, dtypes, constant arguments) at a fixed
distance ``p`` in long runs are copies of one block: they get one class, so the ILP chooses one
strategy for all copies (a restriction of the search space that keeps the model small; the
solution is the best plan among those that treat repeated layers alike). Parameters are tied
when their users are.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.fx import Node


def tensor_sig(value) -> object:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return tuple(tensor_sig(v) for v in value)
    return repr(value)


def node_signature(node: Node) -> tuple:
    consts = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: "T")
    return (
        node.op,
        str(node.target),
        tensor_sig(node.meta.get("val")),
        tuple(tensor_sig(a.meta.get("val")) for a in node.all_input_nodes),
        repr(consts),
    )


def _candidate_periods(seq: list[int], max_candidates: int = 6) -> list[int]:
    last: dict[int, int] = {}
    diffs: Counter = Counter()
    for i, s in enumerate(seq):
        if s in last:
            diffs[i - last[s]] += 1
        last[s] = i
    return [p for p, _ in diffs.most_common(max_candidates) if p > 0]


def repeated_classes(nodes: list[Node], strategies: dict[Node, list], min_repeats: int = 2) -> dict[Node, Node]:
    """node -> representative for nodes that copy an earlier block (others map to themselves)."""
    calls = [n for n in nodes if n.op == "call_function"]
    sig_ids: dict[tuple, int] = {}
    seq = [sig_ids.setdefault(node_signature(n), len(sig_ids)) for n in calls]
    n = len(calls)
    rep = list(range(n))
    tied = [False] * n
    for p in _candidate_periods(seq):
        i = 0
        while i + p < n:
            if seq[i] != seq[i + p]:
                i += 1
                continue
            j = i
            while j + p < n and seq[j] == seq[j + p]:
                j += 1
            run = j - i  # positions i..j-1 equal their copy p later
            if run >= p * (min_repeats - 1):
                for k in range(i + p, j + p):
                    if not tied[k] and strategies[calls[k]] == strategies[calls[rep[k - p]]]:
                        rep[k] = rep[k - p]
                        tied[k] = True
            i = j
    classes = {calls[k]: calls[rep[k]] for k in range(n)}
    position = {node: k for k, node in enumerate(calls)}
    # Parameters (and other placeholders) follow their users' classes.
    by_key: dict[tuple, Node] = {}
    for node in nodes:
        if node.op != "placeholder" or len(strategies[node]) <= 1:
            continue
        users = tuple(sorted(position[classes[u]] if u in classes else -1 for u in node.users))
        key = (node_signature(node), users)
        classes[node] = by_key.setdefault(key, node)
    return classes
