"""CPU kernels (numba, ``parallel=True``, cached on disk): fused Hamming score + top-k, gather attention,
and bit packing for encode.

* :func:`hamming_topk`: one task per (batch, KV head), split over threads. Distances are XOR +
  popcount (LLVM ``ctpop``) on the 64-bit words with the group's query codes in registers, mapped to a
  *rank bin* (0 = forced sink/recent key, ``1 + distance``, last bin = padding). Distances are small
  integers (``<= G * bits``), so the top-k is a counting selection: a histogram of about 4096 evenly
  spaced keys estimates the threshold bin, one pass keeps the positions at or below it (in order), and
  the candidates' histogram gives the exact threshold and its tie count (a pass over every key when the
  estimate kept fewer than k). No sorted array is ever built: O(N) per task, plus ``G * bits`` bins;
  the rank and candidate arrays are scratch reused across calls.
* :func:`gather_attention`: one task per (batch, KV head); the group's ``G`` query heads share each
  gathered K/V row (GQA). Three passes: logits of every selected K row, softmax weights in place, then
  the weighted V rows; each pass streams its rows with software prefetch a fixed distance ahead, so
  many random-row misses are in flight at once. (Measured on the 2-core machine, 2048 x 8 rows of a
  128K fp32 cache: about 30% faster than blocks of 64 rows with an online softmax, whose burst of
  V-row prefetches per block overflowed the miss queues.) bf16 rows are widened in registers.
* :func:`pack_bits`: ``projection >= 0`` packed 64 bits per word, LSB first (bit order version 1).

Threading: see :func:`lmexec.hata.kernels.select_threading_layer` (OpenMP shared with torch, else
``workqueue``). ``workqueue`` must not be entered from two threads at once, so the wrappers hold a lock.
"""

from __future__ import annotations

import math
import threading

import numba as nb
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from lmexec.hata.kernels import select_threading_layer

PREFETCH_DISTANCE = 8

select_threading_layer()
_LOCK = threading.Lock()


@intrinsic
def _ctpop(typingctx, x):
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return sig, codegen


@nb.njit(cache=True, boundscheck=False)
def _count_planes(qc, b, h):
    """Bit planes of the group's per-bit counts: for 2-word codes, ``planes[w, t]`` has bit ``j`` set when
    bit ``t`` of ``c_j = #{g : bit j of q_g is set}`` is set; ``total = sum_j c_j``. Then
    ``sum_g popcount(x ^ q_g) = total + sum_w (G * popcount(x_w) - 2 * sum_t 2^t popcount(x_w & planes[w, t]))``,
    a fixed 10 popcounts per key for any group size up to 15."""
    g_count = qc.shape[2]
    planes = np.zeros((2, 4), np.uint64)
    total = 0
    for w in range(2):
        for j in range(64):
            c = 0
            for g in range(g_count):
                c += int((qc[b, h, g, w] >> np.uint64(j)) & np.uint64(1))
            total += c
            for t in range(4):
                if (c >> t) & 1:
                    planes[w, t] |= np.uint64(1) << np.uint64(j)
    return planes, total


@nb.njit(cache=True, boundscheck=False)
def _distances(qc, kc, b, h, n, out, offset):
    """``out[i] = offset + sum_g popcount(k_i XOR q_g)`` for the ``n`` keys of (b, h).

    Scalar ``popcnt`` is what limits this loop, so the query codes are held in registers: a fully
    unrolled body for the common 128-bit / group-of-4 case (8 popcounts per key, LLVM also vectorises it),
    count bit planes for other groups of 128-bit codes (10 popcounts), a plain loop otherwise.
    """
    g_count, w_count = qc.shape[2], qc.shape[3]
    keys = kc[b, h, :n]
    if w_count == 2 and g_count == 4:
        a0, a1 = qc[b, h, 0, 0], qc[b, h, 0, 1]
        b0, b1 = qc[b, h, 1, 0], qc[b, h, 1, 1]
        c0, c1 = qc[b, h, 2, 0], qc[b, h, 2, 1]
        d0, d1 = qc[b, h, 3, 0], qc[b, h, 3, 1]
        for i in range(keys.shape[0]):
            x = keys[i, 0]
            y = keys[i, 1]
            out[i] = np.int32(
                _ctpop(x ^ a0) + _ctpop(y ^ a1) + _ctpop(x ^ b0) + _ctpop(y ^ b1)
                + _ctpop(x ^ c0) + _ctpop(y ^ c1) + _ctpop(x ^ d0) + _ctpop(y ^ d1)
            ) + offset  # fmt: skip
    elif w_count == 2 and g_count <= 15:
        planes, base = _count_planes(qc, b, h)
        p0, p1, p2, p3 = planes[0, 0], planes[0, 1], planes[0, 2], planes[0, 3]
        r0, r1, r2, r3 = planes[1, 0], planes[1, 1], planes[1, 2], planes[1, 3]
        g = np.int64(g_count)
        for i in range(n):
            x = keys[i, 0]
            y = keys[i, 1]
            ones = np.int64(_ctpop(x) + _ctpop(y))
            weighted = (
                np.int64(_ctpop(x & p0) + _ctpop(y & r0))
                + 2 * np.int64(_ctpop(x & p1) + _ctpop(y & r1))
                + 4 * np.int64(_ctpop(x & p2) + _ctpop(y & r2))
                + 8 * np.int64(_ctpop(x & p3) + _ctpop(y & r3))
            )
            out[i] = np.int32(base + g * ones - 2 * weighted) + offset
    else:
        for i in range(n):
            total = np.uint64(0)
            for w in range(w_count):
                x = keys[i, w]
                for gg in range(g_count):
                    total += _ctpop(x ^ qc[b, h, gg, w])
            out[i] = np.int32(total) + offset


@nb.njit(cache=True, parallel=True, boundscheck=False)
def _hamming_topk_kernel(
    qc, kc, n, k, sink, recent, valid, has_valid, out, scores_out, want_scores, workspace
):
    b_count, h_count, g_count, w_count = qc.shape
    n_bins = g_count * w_count * 64 + 3
    pad_bin = n_bins - 1
    for task in nb.prange(b_count * h_count):
        b = task // h_count
        h = task - b * h_count
        ranks = workspace[task, 0, :n]
        _distances(qc, kc, b, h, n, ranks, np.int32(1))  # rank = 1 + distance
        if want_scores:
            for i in range(n):
                scores_out[b, h, i] = ranks[i] - 1
        for i in range(min(sink, n)):
            ranks[i] = 0
        for i in range(max(0, n - recent), n):
            ranks[i] = 0
        if has_valid:
            for i in range(n):
                if not valid[b, i]:
                    ranks[i] = pad_bin
        if k <= 0:
            continue
        # The k-th smallest rank is estimated from a sample; one pass keeps the keys at or below the
        # estimate (in position order), and the exact threshold comes from their histogram alone. If the
        # estimate kept fewer than k keys, the pass is redone keeping every key.
        estimate = _estimate_threshold(ranks, k, n_bins)
        candidates = workspace[task, 1, :n]
        m = _keep_at_most(ranks, estimate, candidates)
        if m < k:
            m = _keep_at_most(ranks, pad_bin, candidates)
        hist = np.zeros(n_bins, np.int64)
        for c in range(m):
            hist[ranks[candidates[c]]] += 1
        threshold, ties = _threshold(hist, k)
        j = 0
        for c in range(m):
            i = candidates[c]
            rank = ranks[i]
            if rank < threshold or (rank == threshold and ties > 0):
                if rank == threshold:
                    ties -= 1
                out[b, h, j] = i
                j += 1


SAMPLE_KEYS = 4096
"""Keys sampled (evenly spaced) to estimate the top-k threshold."""


@nb.njit(cache=True, boundscheck=False)
def _threshold(hist, k):
    """Smallest bin ``t`` with ``sum(hist[:t + 1]) >= k`` and how many keys of bin ``t`` complete ``k``."""
    below = 0
    for t in range(hist.shape[0]):
        if below + hist[t] >= k:
            return t, k - below
        below += hist[t]
    return hist.shape[0] - 1, k - below


@nb.njit(cache=True, boundscheck=False)
def _estimate_threshold(ranks, k, n_bins):
    """A rank bin that about ``2k + 16 * step`` keys are at or below, from every ``step``-th key."""
    n = ranks.shape[0]
    step = max(1, n // SAMPLE_KEYS)
    hist = np.zeros(n_bins, np.int64)
    count = 0
    for i in range(0, n, step):
        hist[ranks[i]] += 1
        count += 1
    want = min(count, (2 * k + step - 1) // step + 16)
    return _threshold(hist, want)[0]


@nb.njit(cache=True, boundscheck=False)
def _keep_at_most(ranks, limit, out):
    """Positions ``i`` with ``ranks[i] <= limit``, ascending, into ``out``; returns how many."""
    m = 0
    for i in range(ranks.shape[0]):  # branch-free: the comparison is unpredictable near the limit
        out[m] = i
        m += np.int64(ranks[i] <= limit)
    return m


@nb.njit(cache=True, parallel=True, boundscheck=False)
def _hamming_scores_kernel(qc, kc, n, out):
    b_count, h_count = qc.shape[0], qc.shape[1]
    for task in nb.prange(b_count * h_count):
        b = task // h_count
        h = task - b * h_count
        distance = np.empty(n, np.int32)
        _distances(qc, kc, b, h, n, distance, np.int32(0))
        for i in range(n):
            out[b, h, i] = distance[i]


@intrinsic
def _prefetch(typingctx, arr, offset):
    """``llvm.prefetch`` (read, keep in all cache levels) of element ``offset`` of ``arr``'s flat data."""
    sig = types.void(arr, offset)

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        address = builder.gep(array.data, [args[1]])
        i8p = ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [i8p, ir.IntType(32), ir.IntType(32), ir.IntType(32)]),
            "llvm.prefetch.p0",
        )
        i32 = ir.IntType(32)
        builder.call(fn, [builder.bitcast(address, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@nb.njit(cache=True, inline="always", boundscheck=False)
def _prefetch_row(rows, idx, b, h, j):
    """Prefetch row ``idx[b, h, j]`` of ``rows [B, H, N, F]`` (every 64-byte line; nothing past the list).

    Gathered rows are random, so the hardware prefetcher cannot guess them and each would cost a full
    DRAM latency; prefetching a fixed distance ahead keeps many misses in flight."""
    if j < idx.shape[2]:
        _, h_count, n_rows, f = rows.shape
        first = ((b * h_count + h) * n_rows + idx[b, h, j]) * f
        line = max(1, 64 // rows.itemsize)
        for off in range(0, f, line):
            _prefetch(rows, first + off)


def _row(rows, b, h, i, scratch):  # pragma: no cover - replaced by the overload below inside numba
    raise NotImplementedError


@overload(_row, inline="always")
def _row_impl(rows, b, h, i, scratch):
    """Row ``rows[b, h, i]`` as fp32: a view for fp32 storage, widened into ``scratch`` for bf16."""
    if rows.dtype == types.uint16:  # bf16 bits are the high half of an fp32

        def widen(rows, b, h, i, scratch):
            src = rows[b, h, i]
            bits = scratch.view(np.uint32)
            for c in range(src.shape[0]):
                bits[c] = np.uint32(src[c]) << np.uint32(16)
            return scratch

        return widen

    def view(rows, b, h, i, scratch):
        return rows[b, h, i]

    return view


@nb.njit(cache=True, parallel=True, fastmath=True, boundscheck=False)
def _gather_attention_kernel(q, keys, values, idx, scale, keep, has_keep, valid, has_valid, out):
    b_count, h_count, g_count, d = q.shape
    dv = values.shape[3]
    k_count = idx.shape[2]
    for task in nb.prange(b_count * h_count):
        b = task // h_count
        h = task - b * h_count
        qs = np.empty((g_count, d), np.float32)
        for g in range(g_count):
            for c in range(d):
                qs[g, c] = q[b, h, g, c] * scale
        logits = np.empty((g_count, k_count), np.float32)
        scratch = np.empty(max(d, dv), np.float32)
        # pass 1: logits; each gathered K row is read once for the whole group
        for j in range(min(PREFETCH_DISTANCE, k_count)):
            _prefetch_row(keys, idx, b, h, j)
        for j in range(k_count):
            _prefetch_row(keys, idx, b, h, j + PREFETCH_DISTANCE)
            i = idx[b, h, j]
            if (has_keep and not keep[b, j]) or (has_valid and not valid[b, i]):
                for g in range(g_count):
                    logits[g, j] = -np.inf
                continue
            krow = _row(keys, b, h, i, scratch)
            if g_count == 4:  # the common GQA group: one pass over the row feeds four dot products
                s0 = s1 = s2 = s3 = np.float32(0.0)
                for c in range(d):
                    kc = krow[c]
                    s0 += qs[0, c] * kc
                    s1 += qs[1, c] * kc
                    s2 += qs[2, c] * kc
                    s3 += qs[3, c] * kc
                logits[0, j] = s0
                logits[1, j] = s1
                logits[2, j] = s2
                logits[3, j] = s3
            else:
                for g in range(g_count):
                    dot = np.float32(0.0)
                    for c in range(d):
                        dot += qs[g, c] * krow[c]
                    logits[g, j] = dot
        for j in range(min(PREFETCH_DISTANCE, k_count)):  # V rows of pass 3 start loading now
            _prefetch_row(values, idx, b, h, j)
        # pass 2: softmax weights in place (all logits are known: no running max or rescaling)
        totals = np.zeros(g_count, np.float32)
        for g in range(g_count):
            row = logits[g]
            top = -np.inf
            for j in range(k_count):
                top = max(top, row[j])
            if top == -np.inf:
                row[:] = 0.0
                continue
            total = np.float32(0.0)
            for j in range(k_count):
                p = np.float32(math.exp(row[j] - top))
                row[j] = p
                total += p
            totals[g] = total
        # pass 3: weighted V rows, each read once for the group; rows no head weighs are skipped
        acc = np.zeros((g_count, dv), np.float32)
        for j in range(k_count):
            _prefetch_row(values, idx, b, h, j + PREFETCH_DISTANCE)
            live = False
            for g in range(g_count):
                live = live or logits[g, j] != 0.0
            if not live:
                continue
            vrow = _row(values, b, h, idx[b, h, j], scratch)
            if g_count == 4:
                p0, p1, p2, p3 = logits[0, j], logits[1, j], logits[2, j], logits[3, j]
                for c in range(dv):
                    vc = vrow[c]
                    acc[0, c] += p0 * vc
                    acc[1, c] += p1 * vc
                    acc[2, c] += p2 * vc
                    acc[3, c] += p3 * vc
            else:
                for g in range(g_count):
                    p = logits[g, j]
                    for c in range(dv):
                        acc[g, c] += p * vrow[c]
        for g in range(g_count):
            inv = np.float32(1.0) / totals[g] if totals[g] > 0 else np.float32(np.nan)
            for c in range(dv):
                out[b, h, g, c] = acc[g, c] * inv


@nb.njit(cache=True, parallel=True, boundscheck=False)
def _pack_kernel(projected, out):
    rows, bits = projected.shape
    words = out.shape[1]
    for i in nb.prange(rows):
        for w in range(words):
            word = np.uint64(0)
            top = min(64, bits - 64 * w)
            for j in range(top):
                if projected[i, 64 * w + j] >= 0:
                    word |= np.uint64(1) << np.uint64(j)
            out[i, w] = word


@nb.njit(cache=True, fastmath=False, boundscheck=False)
def _encode_small_kernel(x, w, out):
    """Fused ``sign(x @ W[h])`` + pack for a few rows per head (decode: the new key, the query heads).

    ``x [B, H, T, d]`` fp32, ``W [H, d, r]`` fp32, ``out [B, H, T, words]`` uint64. Single-threaded on
    purpose: a decode step encodes a handful of rows, less work than waking threads. Accumulates in
    fp64 over ``W``'s contiguous rows, so a bit can differ from the fp32 matmul only where the projection
    is within rounding of 0."""
    b_count, h_count, t_count, d = x.shape
    r = w.shape[2]
    words = out.shape[3]
    acc = np.empty(r, np.float64)
    for b in range(b_count):
        for h in range(h_count):
            for t in range(t_count):
                for j in range(r):
                    acc[j] = 0.0
                for c in range(d):
                    xc = np.float64(x[b, h, t, c])
                    wrow = w[h, c]
                    for j in range(r):
                        acc[j] += xc * wrow[j]
                for word in range(words):
                    bits = np.uint64(0)
                    for j in range(min(64, r - 64 * word)):
                        if acc[64 * word + j] >= 0:
                            bits |= np.uint64(1) << np.uint64(j)
                    out[b, h, t, word] = bits


# ---------------------------------------------------------------------------------------------------
# torch-facing wrappers


HUGE_PAGE = 2 << 20


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask Linux to back ``t``'s (not yet touched) memory with 2 MiB pages (``madvise(MADV_HUGEPAGE)``).

    Gathered K/V rows are random: with 4 KiB pages nearly every selected row is a TLB miss (measured on
    the 2-core machine: gather attention over 2048 x 8 rows of a 128K fp32 cache, 6.2 ms -> 4.4 ms CPU).
    Needs transparent huge pages in ``madvise`` or ``always`` mode; returns False where it cannot apply.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux") or t.device.type != "cpu":
        return False
    start = (t.data_ptr() + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
    end = (t.data_ptr() + t.numel() * t.element_size()) // HUGE_PAGE * HUGE_PAGE
    if end <= start:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 14) == 0  # MADV_HUGEPAGE
    except (OSError, AttributeError):
        return False


def rows_buffer(t: torch.Tensor) -> torch.Tensor:
    """A C-contiguous ``[B, H, capacity, F]`` tensor whose ``[:, :, :n]`` is ``t [B, H, n, F]``.

    Cache reads are views of a preallocated buffer (``data[:, :, :n]``); handing numba the whole buffer
    keeps its arrays contiguous (vectorisable) without copying. Anything else is made contiguous.
    """
    b, h, n, f = t.shape
    s = t.stride()
    if t.is_contiguous():
        return t
    if s[3] == 1 and s[2] == f and s[1] % f == 0 and s[0] == h * s[1] and s[1] // f >= n:
        capacity = s[1] // f
        needed = t.storage_offset() + b * h * capacity * f
        if needed * t.element_size() <= t.untyped_storage().nbytes():
            return t.as_strided((b, h, capacity, f), (h * capacity * f, capacity * f, f, 1))
    return t.contiguous()


def _np(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype == torch.int64:
        return t.numpy().view(np.uint64)
    return t.numpy()


_DUMMY_MASK = np.ones((1, 1), dtype=np.bool_)


def _mask(mask: torch.Tensor | None) -> tuple[np.ndarray, bool]:
    if mask is None:
        return _DUMMY_MASK, False
    return mask.to(torch.bool).contiguous().numpy(), True


_WORKSPACE = np.empty(0, np.int32)


def _workspace(tasks: int, n: int) -> np.ndarray:
    """Scratch ``[tasks, 2, n]`` int32 (ranks and candidate positions), reused across calls (callers hold
    the lock). A fresh buffer per call would be a fresh ``mmap``: at 128K keys its page faults cost
    about as much as the selection itself (measured 1.5 ms of 4 ms single-threaded)."""
    global _WORKSPACE
    need = tasks * 2 * n
    if _WORKSPACE.size < need:
        _WORKSPACE = np.empty(max(need, 2 * _WORKSPACE.size), np.int32)
    return _WORKSPACE[:need].reshape(tasks, 2, n)


def hamming_scores(query_codes: torch.Tensor, key_codes: torch.Tensor) -> torch.Tensor:
    b, h, n, _ = key_codes.shape
    out = torch.empty(b, h, n, dtype=torch.int64)
    if n:
        qc = _np(query_codes.contiguous())
        with _LOCK:
            _hamming_scores_kernel(qc, _np(rows_buffer(key_codes)), n, out.numpy())
    return out


def hamming_topk(
    query_codes: torch.Tensor,
    key_codes: torch.Tensor,
    k: int,
    sink: int = 0,
    recent: int = 1,
    valid: torch.Tensor | None = None,
    return_scores: bool = False,
):
    b, h, n, _ = key_codes.shape
    k = min(k, n)
    out = torch.empty(b, h, k, dtype=torch.int64)
    scores = torch.empty(b, h, n if return_scores else 1, dtype=torch.int32)
    valid_np, has_valid = _mask(valid)
    with _LOCK:
        workspace = _workspace(b * h, n)
        _hamming_topk_kernel(
            _np(query_codes.contiguous()),
            _np(rows_buffer(key_codes)),
            n,
            k,
            sink,
            recent,
            valid_np,
            has_valid,
            out.numpy(),
            scores.numpy(),
            return_scores,
            workspace,
        )
    return (out, scores) if return_scores else out


SUPPORTED_ATTENTION_DTYPES = (torch.float32, torch.bfloat16)


def gather_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    scale: float | None = None,
    keep: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    b, h_q, d = query.shape
    h_kv = keys.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    grouped = query.reshape(b, h_kv, h_q // h_kv, d).float().contiguous()
    out = torch.empty(b, h_kv, h_q // h_kv, values.shape[-1], dtype=torch.float32)
    keep_np, has_keep = _mask(keep)
    valid_np, has_valid = _mask(valid)
    with _LOCK:
        _gather_attention_kernel(
            grouped.numpy(),
            _np(rows_buffer(keys)),
            _np(rows_buffer(values)),
            indices.to(torch.int64).contiguous().numpy(),
            np.float32(scale),
            keep_np,
            has_keep,
            valid_np,
            has_valid,
            out.numpy(),
        )
    return out.reshape(b, h_q, values.shape[-1]).to(query.dtype)


def pack_bits(projected: torch.Tensor) -> torch.Tensor:
    """``projected [..., r]`` (float) -> int64 ``[..., ceil(r/64)]`` with bit ``j`` = ``projected[j] >= 0``."""
    r = projected.shape[-1]
    flat = projected.reshape(-1, r).float().contiguous()
    out = torch.empty(flat.shape[0], (r + 63) // 64, dtype=torch.int64)
    if flat.shape[0]:
        with _LOCK:
            _pack_kernel(flat.numpy(), out.numpy().view(np.uint64))
    return out.reshape(*projected.shape[:-1], out.shape[1])


SMALL_ENCODE_ROWS = 64
"""Up to this many rows per head (decode steps) the fused single-threaded kernel encodes; more rows
(prefill) go through one batched matmul, the same as the reference, and the parallel packer."""


def encode(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    b, h, t, _ = x.shape
    r = w.shape[-1]
    if 0 < t <= SMALL_ENCODE_ROWS:
        out = torch.empty(b, h, t, (r + 63) // 64, dtype=torch.int64)
        _encode_small_kernel(
            x.float().contiguous().numpy(), w.float().contiguous().numpy(), out.numpy().view(np.uint64)
        )
        return out
    projected = torch.einsum("bhnd,hdr->bhnr", x.float(), w.float())
    return pack_bits(projected)
