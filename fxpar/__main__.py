"""Command line: ``fxpar <command>`` or ``python -m fxpar <command>``. Each command is a module with a one-line ``HELP``,
``add_arguments(parser)`` and ``run(args)``."""

from __future__ import annotations

import argparse
import importlib

COMMANDS = {
    "calibrate": "fxpar.calibrate",
    "demo": "fxpar.demo",
    "sweep": "fxpar.sweep",
}


def main(argv: list[str] | None = None) -> None:
    """``python -m fxpar`` and the ``fxpar`` console script. An ``FxparError`` (bad input) prints
    as one line and exits with status 2."""
    from fxpar import cli_plan
    from fxpar.errors import FxparError

    parser = argparse.ArgumentParser(prog="fxpar", description="fxpar: automatic parallelization of training steps")
    sub = parser.add_subparsers(dest="command", required=True)
    runners = {}
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        runners[name] = module.run
        module.add_arguments(sub.add_parser(name, help=module.HELP))
    cli_plan.add_plan_arguments(sub.add_parser("plan", help=cli_plan.PLAN_HELP))
    cli_plan.add_explain_arguments(sub.add_parser("explain", help=cli_plan.EXPLAIN_HELP))
    runners["plan"], runners["explain"] = cli_plan.run_plan, cli_plan.run_explain
    args = parser.parse_args(argv)
    try:
        runners[args.command](args)
    except FxparError as exc:
        parser.exit(2, f"fxpar: error: {type(exc).__name__}: {exc}\n")


if __name__ == "__main__":
    main()
