"""How fast this machine reads *random rows*, the access pattern of a sparse attention step's K/V gather.

The streaming bandwidth (``bench.measure_bandwidth``) is the limit for a method that reads its bytes in
order (dense attention, HATA's code scan). The rows a selection picks are scattered over the cache: each
costs a full memory latency, and a CPU core keeps only so many misses in flight, so they arrive well
below the streaming rate whatever the kernel does. This probe reads ``count`` distinct random rows of
``row_bytes`` (in position order, as a selection emits them) from a large buffer, with caches flushed
before each read, by a numba loop that touches one byte of every 64-byte line of each row and prefetches
rows ahead, with no arithmetic: the best a gather can do on this machine. CPU only (the bench does not
measure it on a GPU).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numba as nb
import numpy as np
import torch

from lmexec.hata.cache import advise_huge_pages
from lmexec.hata.kernels.cpu import PREFETCH_DISTANCE, _prefetch

ROWS = 32768
"""Rows read per probe: a 128K-token HATA step's gather (2048 selected x 8 KV heads x K and V)."""
LINE = 64


@nb.njit(cache=True, inline="always", boundscheck=False)
def _prefetch_row(rows: np.ndarray, row: int, tail: bool) -> None:
    """Prefetch the lines :func:`_touch_rows` reads of row ``row``."""
    width = rows.shape[1]
    for off in range(0, width, LINE):
        _prefetch(rows, row * width + off)
    if tail:
        _prefetch(rows, row * width + width - 1)


@nb.njit(cache=True, parallel=True, boundscheck=False)
def _touch_rows(rows: np.ndarray, idx: np.ndarray, parts: int) -> int:
    """Read every 64-byte line that rows ``idx`` of ``rows [R, width]`` (uint8) overlap: the bytes 64
    apart from the row's first, and its last byte when the width is no multiple of 64 (its line may
    start past the last of those). ``parts`` contiguous slices of ``idx`` go over the threads, rows are
    prefetched ahead; returns the sum of the bytes read so the reads happen."""
    n, width = idx.shape[0], rows.shape[1]
    tail = width % LINE != 0
    share = (n + parts - 1) // parts
    sums = np.zeros(parts, np.int64)
    for part in nb.prange(parts):
        first, stop = part * share, min(n, part * share + share)
        total = 0
        for j in range(first, min(stop, first + PREFETCH_DISTANCE)):
            _prefetch_row(rows, idx[j], tail)
        for j in range(first, stop):
            if j + PREFETCH_DISTANCE < stop:
                _prefetch_row(rows, idx[j + PREFETCH_DISTANCE], tail)
            row = idx[j]
            for off in range(0, width, LINE):
                total += rows[row, off]
            if tail:
                total += rows[row, width - 1]
        sums[part] = total
    return sums.sum()


def random_rows(total: int, count: int, seed: int = 0) -> np.ndarray:
    """``count`` distinct row numbers below ``total``, sorted (the order a selection emits them)."""
    if not 0 < count <= total:
        raise ValueError(f"need 0 < count <= total rows, got count {count} of {total}")
    return np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False)).astype(np.int64)


def measure_row_bandwidths(
    row_sizes: list[int],
    evict: Callable[[], None],
    count: int = ROWS,
    gib: float = 1.0,
    repeats: int = 7,
    huge_pages: bool = True,
    seed: int = 0,
) -> dict[int, float]:
    """Random-row read rate in bytes/s per row size: best of ``repeats`` reads of ``count`` random rows,
    each after ``evict()`` (so every row comes from memory). One buffer of ``gib`` GiB (more if ``count``
    rows need it) serves every size; ``huge_pages`` backs it with 2 MiB pages, as the cache's buffers."""
    if not row_sizes or min(row_sizes) < 1 or count < 1:
        raise ValueError(f"row sizes and count must be positive, got {row_sizes}, {count}")
    nbytes = max(int(gib * 2**30), count * max(row_sizes))
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    if huge_pages:
        advise_huge_pages(buffer)
    buffer.fill_(1)
    flat = buffer.numpy()
    parts = nb.get_num_threads()
    rates = {}
    for size in sorted(set(row_sizes)):
        rows = flat[: nbytes // size * size].reshape(-1, size)
        idx = random_rows(rows.shape[0], count, seed)
        _touch_rows(rows, idx, parts)  # compile / warm up
        best = math.inf
        for _ in range(repeats):
            evict()
            t = time.perf_counter()
            _touch_rows(rows, idx, parts)
            best = min(best, time.perf_counter() - t)
        rates[size] = count * size / best
    return rates
