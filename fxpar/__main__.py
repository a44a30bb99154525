"""Command line: ``python -m fxpar demo``."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fxpar", description="fxpar: automatic parallelization of training steps")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="plan an MLP, print the plan, train it on local CPU ranks")
    demo.add_argument("--nprocs", type=int, default=2)
    demo.add_argument("--steps", type=int, default=8)
    demo.add_argument("--batch", type=int, default=64, help="global batch size")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from fxpar.demo import main as demo_main

        demo_main(args.nprocs, args.steps, args.batch)


if __name__ == "__main__":
    main()
