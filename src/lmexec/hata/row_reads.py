"""How fast this machine reads *random rows*, the access pattern of a sparse attention step's K/V gather.

The streaming bandwidth (``bench.measure_bandwidth``) is the limit for a method that reads its bytes in
order (dense attention, HATA's code scan). The rows a selection picks are scattered over the cache: each
costs a full memory latency, and a core keeps only so many misses in flight, so on a CPU they arrive
well below the streaming rate whatever the kernel does. This probe reads ``count`` distinct random rows of
``row_bytes`` (in position order, as a selection emits them) from a 1 GiB buffer, with caches flushed
before each read: on CPU with a numba loop that touches one byte per 64-byte line and prefetches rows
ahead (no arithmetic: the best a gather can do here), on CUDA with ``torch.index_select``. The rate
bounds the gather part of a step, as the streaming rate bounds the rest (``bench``'s access bound).
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


@nb.njit(cache=True, parallel=True, boundscheck=False)
def _touch_rows(rows: np.ndarray, idx: np.ndarray, parts: int) -> int:
    """Read one byte of every 64-byte line of rows ``idx`` of ``rows [R, row_bytes]`` (uint8), in
    ``parts`` contiguous slices of ``idx`` over the threads; returns their sum so the reads happen."""
    n, width = idx.shape[0], rows.shape[1]
    share = (n + parts - 1) // parts
    sums = np.zeros(parts, np.int64)
    for part in nb.prange(parts):
        first, stop = part * share, min(n, part * share + share)
        total = 0
        for j in range(first, min(stop, first + PREFETCH_DISTANCE)):
            for off in range(0, width, 64):
                _prefetch(rows, idx[j] * width + off)
        for j in range(first, stop):
            ahead = j + PREFETCH_DISTANCE
            if ahead < stop:
                for off in range(0, width, 64):
                    _prefetch(rows, idx[ahead] * width + off)
            row = idx[j]
            for off in range(0, width, 64):
                total += rows[row, off]
        sums[part] = total
    return sums.sum()


def measure_row_bandwidths(
    row_sizes: list[int],
    evict: Callable[[], None],
    count: int = ROWS,
    gib: float = 1.0,
    repeats: int = 7,
    device: str = "cpu",
    seed: int = 0,
) -> dict[int, float]:
    """Random-row read rate in bytes/s per row size: best of ``repeats`` reads of ``count`` random rows,
    each after ``evict()`` (so every row comes from memory). One ``gib`` GiB buffer serves every size."""
    if not row_sizes or min(row_sizes) < 1 or count < 1:
        raise ValueError(f"row sizes and count must be positive, got {row_sizes}, {count}")
    nbytes = max(int(gib * 2**30), count * max(row_sizes))
    buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
    if device == "cpu":
        advise_huge_pages(buffer)  # as the bench's K/V buffers are
    buffer.fill_(1)
    gen = torch.Generator().manual_seed(seed)
    return {
        size: _best_rate(buffer[: nbytes // size * size].view(-1, size), count, evict, repeats, device, gen)
        for size in sorted(set(row_sizes))
    }


def _best_rate(
    rows: torch.Tensor, count: int, evict: Callable[[], None], repeats: int, device: str, gen: torch.Generator
) -> float:
    idx = torch.randperm(rows.shape[0], generator=gen)[:count].sort().values
    if device == "cpu":
        rows_np, idx_np = rows.numpy(), idx.numpy()
        parts = nb.get_num_threads()

        def read() -> None:
            _touch_rows(rows_np, idx_np, parts)

    else:
        idx = idx.to(device)
        out = torch.empty(count, rows.shape[1], dtype=torch.uint8, device=device)

        def read() -> None:
            torch.index_select(rows, 0, idx, out=out)

    read()  # compile / warm up
    best = math.inf
    for _ in range(repeats):
        evict()
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        read()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return count * rows.shape[1] / best
