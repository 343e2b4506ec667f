"""Tessel schedule search: repetend (modulo scheduling), completion, driver, exact reference solver."""

from lmexec.tessel.search.driver import SearchResult, search

__all__ = ["SearchResult", "search"]
