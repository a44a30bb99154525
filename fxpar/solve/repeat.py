"""Repeated layers share decisions.

A transformer's or deep MLP's joint graph repeats one block per layer, forward and backward, in
graph order. Nodes with the same signature (op, shapes, dtypes, constant arguments) at a fixed
distance ``p`` in long runs are copies of one block: they get one class, so the ILP chooses one
strategy for all copies (a restriction of the search space that keeps the model small; the
solution is the best plan among those that treat repeated layers alike). Parameters are tied
when their users are.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.fx import Node


def tensor_sig(value) -> object:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return tuple(tensor_sig(v) for v in value)
    return repr(value)


def node_signature(node: Node) -> tuple:
    if node.op == "placeholder":
        return (node.op, node.meta.get("fxpar_role"), tensor_sig(node.meta.get("val")))
    consts = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: "T")
    return (
        node.op,
        str(node.target),
        tensor_sig(node.meta.get("val")),
        tuple(tensor_sig(a.meta.get("val")) for a in node.all_input_nodes),
        repr(consts),
    )


def _candidate_periods(seq: list[int], max_candidates: int = 4) -> list[int]:
    """Shifts p at which the sequence matches itself most often (a block repeated k times matches
    at its length on nearly all of its nodes; short motifs inside one block match far less)."""
    arr = np.asarray(seq)
    n = len(arr)
    matches = [(int(np.count_nonzero(arr[:-p] == arr[p:])), p) for p in range(1, n // 2 + 1)]
    matches.sort(key=lambda mp: (-mp[0], mp[1]))
    chosen: list[int] = []
    for m, p in matches:
        # Multiples of a chosen period match too (k blocks apart); the forward and backward
        # blocks have periods of their own, so skip the multiples to find both.
        if m == 0 or len(chosen) == max_candidates:
            break
        if not any(p % c == 0 for c in chosen):
            chosen.append(p)
    return chosen


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
