"""The CLI's parser is built without the heavy libraries: `lmexec ... --help` and flag errors answer at
once, and each command imports what it needs when it runs."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "ortools", "numba", "triton", "matplotlib")


def test_building_the_parser_imports_no_heavy_library():
    code = (
        "import sys; from lmexec.cli import build_parser; build_parser(); "
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
