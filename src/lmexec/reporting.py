"""Small output helpers shared by every CLI command: rich tables and ``--json`` files."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

# Wide enough for tables when output goes to a file or pipe (rich would assume 80 columns). No markup:
# printed text holds user names and values ("layer[x]", "[nan, nan]") that rich would eat as tags.
console = Console(highlight=False, markup=False, width=None if sys.stdout.isatty() else 140)


def _jsonable(value: Any) -> Any:
    """Make floats JSON-safe (inf/nan become null) and convert tuples/paths recursively."""
    if isinstance(value, float):
        return None if math.isinf(value) or math.isnan(value) else value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    return value


PICTURE_SUFFIXES = (".png", ".svg", ".pdf")


def output_path(text: str) -> str:
    """argparse type of an output file: refused up front (not after a long run) when it cannot be written."""
    if not text:
        raise argparse.ArgumentTypeError("an output path must not be empty")
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    if path.exists():  # an existing file (or /dev/stdout) needs write access to itself, not its folder
        if not os.access(path, os.W_OK):
            raise argparse.ArgumentTypeError(f"cannot write {text}: permission denied")
        return text
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: {ancestor} is not a writable folder")
    return text


def picture_path(text: str) -> str:
    """:func:`output_path` whose suffix names a picture format matplotlib writes."""
    if Path(text).suffix.lower() not in PICTURE_SUFFIXES:
        raise argparse.ArgumentTypeError(
            f"a picture path ends in {', '.join(PICTURE_SUFFIXES)}, got {text!r}"
        )
    return output_path(text)


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure, creating parent folders (as :func:`output_path` promised), and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def write_json(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(payload), indent=2) + "\n")
    return path


def fmt(value: Any, digits: int = 3) -> str:
    """Format a table cell: whole floats as integers, others with ``digits`` decimals, or below 1 with
    ``digits + 1`` significant digits (a 0.0004 ms bound must not print as 0); None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == int(value):
            return f"{int(value)}"
        if abs(value) < 1:
            return f"{value:.{digits + 1}g}"
        return f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return str(value)


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Print a rich table whose cells are formatted with :func:`fmt`."""
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, justify="right" if column not in (columns[0],) else "left")
    for row in rows:
        table.add_row(*(fmt(cell) for cell in row))
    console.print(table)
