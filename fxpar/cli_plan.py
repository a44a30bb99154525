"""``fxpar plan`` and ``fxpar explain``: plan a user's own model from the command line.

    fxpar plan mypkg.models:make --batch 64 --cluster a100-nvlink-8 --mesh 2x4 --out plan.json
    fxpar explain plan.json
    fxpar explain plan.json --measured mypkg.models:make --batch 64   # per-op predicted vs measured

``MODULE:FACTORY`` names a function that returns ``(model, example_inputs)`` (the global batch);
with ``--batch B`` it is called as ``FACTORY(B)``. ``--cluster`` is a preset name or a cluster JSON
file (``python -m fxpar calibrate --out FILE`` writes one). The plan prints as ``explain()`` and,
with ``--out``, is written as JSON, which ``fxpar explain`` prints again. ``fxpar explain --measured
MODULE:FACTORY`` also runs the plan on local gloo ranks (one per device of its mesh; the eager
runtime, or with ``--codegen inductor`` the compiled step) under torch's profiler and prints
predicted against measured time per op (``fxpar.profile_report``), priced with ``--cluster`` (the
cluster the plan was made for).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from fxpar.errors import PlanOptionError

PLAN_HELP = "plan a model given as MODULE:FACTORY and print the plan"
EXPLAIN_HELP = "print a plan JSON written by `fxpar plan --out`"


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("factory", help="MODULE:FACTORY, a function returning (model, example_inputs)")
    parser.add_argument("--batch", type=int, default=None, help="global batch size, passed as FACTORY(B)")
    parser.add_argument("--cluster", default="cpu-local", help="a preset name or a cluster JSON file")
    parser.add_argument("--mesh", default=None, help="mesh shape, e.g. 8 or 2x4 (default: all devices, 1-D)")
    parser.add_argument("--optimizer", default="adam", help="sgd, sgd-momentum, adam or adamw")
    parser.add_argument("--time-limit", type=float, default=60.0, help="solver time limit in seconds")
    parser.add_argument("--out", default=None, help="write the plan JSON here")


def add_explain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", help="a plan JSON file")
    parser.add_argument("--measured", default=None, metavar="MODULE:FACTORY",
                        help="run the plan on local gloo ranks under torch's profiler; print predicted vs measured per op")
    parser.add_argument("--batch", type=int, default=None, help="global batch size, passed as FACTORY(B)")
    parser.add_argument("--cluster", default="cpu-local", help="the cluster the plan was made for (preset or JSON file)")
    parser.add_argument("--by", default="signature", choices=("signature", "op", "class"), help="rows per op signature, op or op class")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after one warm-up step)")
    parser.add_argument("--codegen", default="eager", choices=("eager", "inductor"),
                        help="the runtime measured: op by op, or compiled by Inductor (generated kernels as one class, fused)")


def parse_mesh(text: str) -> tuple[int, ...]:
    """``"2x4"`` -> ``(2, 4)``."""
    parts = text.lower().replace(",", "x").split("x")
    if not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise PlanOptionError(f"--mesh {text!r} is not a mesh shape; write positive sizes joined by 'x', e.g. 8 or 2x4")
    return tuple(int(p) for p in parts)


def load_factory(spec: str):
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise PlanOptionError(f"{spec!r} is not MODULE:FACTORY; e.g. mypkg.models:make_model")
    sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PlanOptionError(f"cannot import module {module_name!r} of {spec!r}: {exc}; run from the folder that holds it") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise PlanOptionError(f"module {module_name!r} has no function {attr!r} (from {spec!r})")
    return factory


def resolve_cluster(name: str, num_devices: int | None):
    import fxpar
    from fxpar.cluster import PRESETS, Cluster

    if name in PRESETS:
        return fxpar.preset(name, num_devices=num_devices) if num_devices else fxpar.preset(name)
    if Path(name).exists():
        return Cluster.load(name)
    raise PlanOptionError(f"--cluster {name!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a file")


def run_plan(args: argparse.Namespace) -> None:
    import math

    import fxpar
    from fxpar.progress import show_progress

    mesh = parse_mesh(args.mesh) if args.mesh else None
    factory = load_factory(args.factory)
    made = factory(args.batch) if args.batch is not None else factory()
    if not (isinstance(made, tuple) and len(made) == 2):
        raise PlanOptionError(f"{args.factory} returned {type(made).__name__}; it must return (model, example_inputs)")
    model, inputs = made
    cluster = resolve_cluster(args.cluster, math.prod(mesh) if mesh else None)
    print(f"planning {type(model).__name__} on {cluster.name}, mesh {list(mesh) if mesh else cluster.num_devices} ...", flush=True)
    with show_progress():  # capture, ILP build and solve report on stderr while they run
        plan = fxpar.plan(model, tuple(inputs), cluster=cluster, mesh_shape=mesh, optimizer=args.optimizer,
                          time_limit_s=args.time_limit)
    print(plan.explain())
    if args.out:
        Path(args.out).write_text(plan.to_json())
        print(f"plan written to {args.out}")


def run_explain(args: argparse.Namespace) -> None:
    import fxpar

    try:
        text = Path(args.plan).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanOptionError(f"cannot read plan file {args.plan!r}: {exc}") from exc
    plan = fxpar.Plan.from_json(text)
    print(plan.explain())
    if getattr(args, "measured", None):
        import math

        from fxpar.profile_report import measure

        load_factory(args.measured)  # checks the name here; the ranks import it again
        factory = (args.measured, (args.batch,) if args.batch is not None else ())
        cluster = resolve_cluster(args.cluster, math.prod(plan.mesh_shape))
        report = measure(factory, nprocs=math.prod(plan.mesh_shape), cluster=cluster, plan=plan, steps=args.steps, by=args.by,
                         codegen=args.codegen)
        print()
        print(report.table())
