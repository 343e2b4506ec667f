"""Tessel schedule search: repetend (modulo scheduling), completion, driver, exact reference solver.

The names below are imported on first use, so that building the CLI does not load OR-Tools."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmexec.tessel.search.driver import SearchResult, schedule_for, search

__all__ = ["SearchResult", "schedule_for", "search"]


def __getattr__(name: str):
    if name in __all__:
        from lmexec.tessel.search import driver

        return getattr(driver, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
