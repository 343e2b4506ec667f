"""``lmexec tessel ...`` subcommands."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("tessel", help="schedule search for distributed execution")
    parser.add_subparsers(dest="tessel_command", required=True, metavar="SUBCOMMAND")
