"""Tessel schedule search: repetend (modulo scheduling), completion, driver, exact reference solver."""

from lmexec.tessel.search.driver import SearchResult, schedule_for, search

__all__ = ["SearchResult", "schedule_for", "search"]
