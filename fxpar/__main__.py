"""Command line: ``python -m fxpar <command>``. Each command is a module with a one-line ``HELP``,
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
    parser = argparse.ArgumentParser(prog="python -m fxpar", description="fxpar: automatic parallelization of training steps")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=module.HELP))
    args = parser.parse_args(argv)
    modules[args.command].run(args)


if __name__ == "__main__":
    main()
