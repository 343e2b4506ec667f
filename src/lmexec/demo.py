"""``lmexec demo``: the main job, a short tour of both systems that grows as features land."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("demo", help="run the demo of both systems")
    parser.add_argument("--out", default="demo-out", help="folder for pictures and JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    print("lmexec demo")
    return 0
