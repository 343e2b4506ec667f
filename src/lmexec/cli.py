"""``lmexec`` console entry point: a thin argparse layer over the library.

Each subsystem registers its own subcommands (``lmexec tessel ...``, ``lmexec hata ...``); this module
only wires them together and turns :class:`~lmexec.errors.UserError` into a one-line message.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from lmexec import __version__
from lmexec.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse with the same one-line ``error:`` as a UserError (its usage block buried the message)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from lmexec import demo
    from lmexec.hata import cli as hata_cli
    from lmexec.tessel import cli as tessel_cli

    parser = _Parser(
        prog="lmexec",
        description="Run large DNN models fast: Tessel schedule search and HATA sparse attention.",
    )
    parser.add_argument("--version", action="version", version=f"lmexec {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tessel_cli.register(commands)
    hata_cli.register(commands)
    demo.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if not error.filename:  # not about a file the user named: a real failure, keep its traceback
            raise
        print(f"error: {error.filename}: {error.strerror or error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
