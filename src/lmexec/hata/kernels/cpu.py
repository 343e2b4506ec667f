"""CPU kernels (numba, ``parallel=True``, cached on disk): fused Hamming score + top-k, gather attention,
and bit packing for encode.

* :func:`hamming_topk`: one task per (batch, KV head), split over threads. Scores of a block of 512
  keys are accumulated XOR + popcount (LLVM ``ctpop``) on the 64-bit words, block by block so the
  block stays in L1, then mapped to a *rank bin* (0 = forced sink/recent key, ``1 + distance``, last bin
  = padding). Distances are small integers (``<= G * bits``), so the top-k is a counting selection: a
  histogram of the bins gives the threshold bin and how many ties it contributes, and one more pass
  over the (L2-resident) ranks writes the chosen positions in ascending order, ties to the earlier key.
  No sorted array is ever built: O(N) per task, plus ``G * bits`` bins.
* :func:`gather_attention`: one task per (batch, KV head); the group's ``G`` query heads share each
  gathered K/V row (GQA). Rows are processed in blocks of 64 with an online softmax (running max and
  sum, the accumulator rescaled once per block); only the selected rows are read. bf16 rows are
  widened in registers (``bits << 16``).
* :func:`pack_bits`: ``projection >= 0`` packed 64 bits per word, LSB first (bit order version 1).

Threading: numba's OpenMP layer busy-waits after each parallel region and, being a second OpenMP
runtime beside torch's, made every following torch op wait for a time slice (measured: a 0.3 ms torch op
took 56 ms after a numba kernel on the shared 2-core machine). Unless ``NUMBA_THREADING_LAYER`` is set,
the ``workqueue`` layer (sleeping pthreads) is used; it must not be entered from two threads at once,
so the wrappers hold a lock.
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

ATTN_BLOCK = 64

select_threading_layer()
_LOCK = threading.Lock()


@intrinsic
def _ctpop(typingctx, x):
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return sig, codegen


@nb.njit(cache=True, inline="always", boundscheck=False)
def _distance(kc, qc, b, h, i, g_count, w_count):
    """Group-summed Hamming distance of key ``i`` (scalar popcnt: LLVM does not vectorise ctpop on AVX2)."""
    total = np.uint64(0)
    if w_count == 2:  # 128-bit codes: unrolled
        a = kc[b, h, i, 0]
        c = kc[b, h, i, 1]
        for g in range(g_count):
            total += _ctpop(a ^ qc[b, h, g, 0]) + _ctpop(c ^ qc[b, h, g, 1])
    else:
        for w in range(w_count):
            a = kc[b, h, i, w]
            for g in range(g_count):
                total += _ctpop(a ^ qc[b, h, g, w])
    return np.int32(total)


@nb.njit(cache=True, parallel=True, boundscheck=False)
def _hamming_topk_kernel(qc, kc, n, k, sink, recent, valid, has_valid, out, scores_out, want_scores):
    b_count, h_count, g_count, w_count = qc.shape
    n_bins = g_count * w_count * 64 + 3
    pad_bin = n_bins - 1
    for task in nb.prange(b_count * h_count):
        b = task // h_count
        h = task - b * h_count
        ranks = np.empty(n, np.int32)
        hist = np.zeros(n_bins, np.int64)
        for i in range(n):
            distance = _distance(kc, qc, b, h, i, g_count, w_count)
            if want_scores:
                scores_out[b, h, i] = distance
            rank = distance + 1
            if i < sink or i >= n - recent:
                rank = 0
            if has_valid and not valid[b, i]:
                rank = pad_bin
            ranks[i] = rank
            hist[rank] += 1
        if k <= 0:
            continue
        below = 0
        threshold = 0
        for threshold in range(n_bins):
            if below + hist[threshold] >= k:
                break
            below += hist[threshold]
        ties = k - below
        j = 0
        for i in range(n):
            rank = ranks[i]
            if rank < threshold:
                out[b, h, j] = i
                j += 1
            elif rank == threshold and ties > 0:
                out[b, h, j] = i
                j += 1
                ties -= 1


@nb.njit(cache=True, parallel=True, boundscheck=False)
def _hamming_scores_kernel(qc, kc, n, out):
    b_count, h_count, g_count, w_count = qc.shape
    for task in nb.prange(b_count * h_count):
        b = task // h_count
        h = task - b * h_count
        for i in range(n):
            out[b, h, i] = _distance(kc, qc, b, h, i, g_count, w_count)


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
def _prefetch_rows(rows, idx, b, h, start, stop):
    """Prefetch rows ``idx[b, h, start:stop]`` of ``rows [B, H, N, F]`` (every 64-byte line): the gathered
    rows are random, so the hardware prefetcher cannot guess them and each would cost a DRAM latency."""
    _, h_count, n_rows, f = rows.shape
    line = max(1, 64 // rows.itemsize)
    base = (b * h_count + h) * n_rows
    for j in range(start, min(stop, idx.shape[2])):
        first = (base + idx[b, h, j]) * f
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
        running_max = np.full(g_count, -np.inf, np.float32)
        running_sum = np.zeros(g_count, np.float32)
        acc = np.zeros((g_count, dv), np.float32)
        logits = np.empty((g_count, ATTN_BLOCK), np.float32)
        scratch = np.empty(max(d, dv), np.float32)
        _prefetch_rows(keys, idx, b, h, 0, ATTN_BLOCK)
        for start in range(0, k_count, ATTN_BLOCK):
            size = min(k_count, start + ATTN_BLOCK) - start
            _prefetch_rows(values, idx, b, h, start, start + size)
            _prefetch_rows(keys, idx, b, h, start + ATTN_BLOCK, start + 2 * ATTN_BLOCK)
            for jj in range(size):  # logits of the block: each gathered K row read once for the group
                j = start + jj
                i = idx[b, h, j]
                if (has_keep and not keep[b, j]) or (has_valid and not valid[b, i]):
                    for g in range(g_count):
                        logits[g, jj] = -np.inf
                    continue
                krow = _row(keys, b, h, i, scratch)
                for g in range(g_count):
                    qrow = qs[g]
                    dot = np.float32(0.0)
                    for c in range(d):
                        dot += qrow[c] * krow[c]
                    logits[g, jj] = dot
            for g in range(g_count):  # online softmax: rescale the accumulator once per block
                lrow = logits[g]
                block_max = running_max[g]
                for jj in range(size):
                    block_max = max(block_max, lrow[jj])
                if block_max == -np.inf:
                    for jj in range(size):
                        lrow[jj] = 0.0
                    continue
                if block_max > running_max[g]:
                    correction = np.float32(math.exp(running_max[g] - block_max))
                    running_sum[g] *= correction
                    arow = acc[g]
                    for c in range(dv):
                        arow[c] *= correction
                    running_max[g] = block_max
                total = np.float32(0.0)
                for jj in range(size):
                    p = np.float32(math.exp(lrow[jj] - block_max))
                    lrow[jj] = p
                    total += p
                running_sum[g] += total
            for jj in range(size):  # weighted V rows, each read once for the group
                live = False
                for g in range(g_count):
                    live = live or logits[g, jj] != 0.0
                if not live:
                    continue
                vrow = _row(values, b, h, idx[b, h, start + jj], scratch)
                for g in range(g_count):
                    p = logits[g, jj]
                    arow = acc[g]
                    for c in range(dv):
                        arow[c] += p * vrow[c]
        for g in range(g_count):
            inv = np.float32(1.0) / running_sum[g] if running_sum[g] > 0 else np.float32(np.nan)
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


# ---------------------------------------------------------------------------------------------------
# torch-facing wrappers


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


def encode(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Same projection as the reference (one batched matmul), packed by the numba kernel."""
    projected = torch.einsum("bhnd,hdr->bhnr", x.float(), w.float())
    return pack_bits(projected)
