"""``lmexec hata ...`` subcommands."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("hata", help="hash-aware top-k attention for LLM decoding")
    sub = parser.add_subparsers(dest="hata_command", required=True, metavar="SUBCOMMAND")
    del sub  # subcommands are added by the HATA modules as they land
