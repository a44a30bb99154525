"""Plans cached on disk by content, so that planning the same step again skips the solve.

The key is a SHA-256 of everything a plan depends on: the captured graph's code and the shape and
dtype of every value in it, the cluster's JSON, the mesh, the optimizer, ``force``, the solver's
time limit, ``strict``, ``simplify``, ``recompute``, the op classes torch's settings let run on TF32
(``fxpar.cost.tf32_classes``), and the versions of fxpar and torch. An entry is the plan's
``to_json()`` text in ``DIR/plan-<key>.json``, written atomically (several ranks or processes may
share a directory). An entry that cannot be read as a plan is made again and overwritten.

``fxpar.plan(..., plan_cache=DIR)`` uses it; ``cached_plan`` is the same for a captured graph.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch.fx import GraphModule

from fxpar.cluster import Cluster, describe_value
from fxpar.cost import tf32_classes
from fxpar.errors import FallbackWarning, PlanFileError, PlanOptionError
from fxpar.plan import Plan

__all__ = ["cache_key", "cached_plan"]


def _fxpar_version() -> str:
    try:
        return version("fxpar")
    except PackageNotFoundError:
        return "unknown"


def _value_signature(val):
    if isinstance(val, torch.Tensor):
        return [list(val.shape), str(val.dtype)]
    if isinstance(val, (tuple, list)):
        return [_value_signature(v) for v in val]
    return type(val).__name__


def cache_key(
    gm: GraphModule,
    *,
    cluster: Cluster,
    mesh: tuple[int, ...],
    optimizer: str,
    force: Mapping[str, str] | None,
    time_limit_s: float,
    strict: bool,
    simplify: bool,
    recompute: bool = True,
) -> str:
    """The hex SHA-256 that names the plan of ``gm`` under these options (``cluster`` and ``mesh``
    as ``resolve_mesh`` returns them)."""
    payload = {
        "fxpar": _fxpar_version(),
        "torch": torch.__version__,
        "code": gm.code,
        "values": [
            [n.name, n.meta.get("fxpar_role"), n.meta.get("fxpar_fqn"), _value_signature(n.meta.get("val"))]
            for n in gm.graph.nodes
        ],
        "cluster": json.loads(cluster.to_json()),
        "mesh": list(mesh),
        "optimizer": optimizer,
        "force": dict(force or {}),
        "time_limit_s": time_limit_s,
        "strict": strict,
        "simplify": simplify,
        "recompute": recompute,
        "tf32": sorted(tf32_classes()),
        # Written only where it is not the default, so the keys of earlier plans are unchanged.
        **({"input_placement": gm.meta["fxpar_input_placement"]}
           if gm.meta.get("fxpar_input_placement", "shard") != "shard" else {}),
        **({"batch_norm": gm.meta["fxpar_batch_norm"]} if gm.meta.get("fxpar_batch_norm", "global") != "global" else {}),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _directory(plan_cache) -> Path:
    if isinstance(plan_cache, bool) or not isinstance(plan_cache, (str, os.PathLike)):
        raise PlanOptionError(
            f"plan_cache is {describe_value(plan_cache)}; give the path of a directory, e.g. plan_cache='.fxpar-plans'"
        )
    directory = Path(plan_cache)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PlanOptionError(
            f"plan_cache {str(directory)!r} cannot be used as a directory: {exc.strerror}; give a writable directory"
        ) from None
    return directory


def _read(path: Path) -> Plan | None:
    try:
        return Plan.from_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, PlanFileError):
        return None  # a truncated or foreign file: plan again and overwrite it


def _write(path: Path, text: str) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        warnings.warn(
            f"plan_cache: could not write {str(path)!r} ({exc.strerror}); the plan is made but the next call "
            "solves again (check the directory's permissions and free space)",
            UserWarning,
            stacklevel=3,
        )


def cached_plan(
    gm: GraphModule,
    *,
    plan_cache: str | os.PathLike,
    cluster: Cluster | None = None,
    mesh_shape: Sequence[int] | None = None,
    optimizer: str = "adam",
    force: Mapping[str, str] | None = None,
    time_limit_s: float = 60.0,
    strict: bool = False,
    simplify: bool = True,
    recompute: bool = True,
) -> Plan:
    """``plan_graph(gm, ...)[0]``, read from ``plan_cache`` if a plan for the same graph and options
    is there, otherwise solved and stored. A plan read from the cache repeats its fallback warnings
    and has no ``timings``."""
    from fxpar.planner import check_options, plan_graph, resolve_mesh

    check_options(optimizer=optimizer, force=force, time_limit_s=time_limit_s)
    cluster, mesh = resolve_mesh(cluster, mesh_shape)
    directory = _directory(plan_cache)
    key = cache_key(gm, cluster=cluster, mesh=mesh, optimizer=optimizer, force=force, time_limit_s=time_limit_s,
                    strict=strict, simplify=simplify, recompute=recompute)
    path = directory / f"plan-{key}.json"
    plan = _read(path)
    if plan is not None:
        for note in plan.fallbacks:
            warnings.warn(note, FallbackWarning, stacklevel=3)
        return plan
    plan, _ = plan_graph(gm, cluster=cluster, mesh_shape=mesh, optimizer=optimizer, force=force,
                         time_limit_s=time_limit_s, strict=strict, simplify=simplify, recompute=recompute)
    _write(path, plan.to_json())
    return plan
