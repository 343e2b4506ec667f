"""CPU kernels (numba, ``parallel=True``, cached on disk): fused Hamming score + top-k, gather attention,
and bit packing for encode.

* :func:`hamming_topk`: one task per (batch, KV head), split over threads. Ranks are ``1 + distance``
  (0 = forced sink/recent key, last bin = padding), where the distance is the group-summed Hamming
  distance. With AVX2 and the codes also kept in *code blocks* (32 keys transposed, see
  :func:`write_code_blocks`), :func:`_scan_block` computes 32 ranks at once with byte-shuffle table
  lookups and compares them with the threshold estimate in the same pass; otherwise XOR + ``ctpop`` on
  the row codes fill a rank array. Distances are small integers (``<= G * bits``), so the top-k is a
  counting selection: a histogram of a sample (every ``step``-th block, or key) estimates the threshold
  bin, one pass keeps the positions at or below it (in order), and their histogram gives the exact
  threshold and its tie count (a pass keeping every key when fewer than k were at or below the
  estimate). No sorted array is ever built: O(N) per task; scratch is reused across calls. Over code
  blocks the candidate pass is branch-free with software prefetch (:func:`_collect_blocks`).
* :func:`gather_attention`: one task per (batch, KV head); the group's ``G`` query heads share each
  gathered K/V row (GQA). Three passes: logits of every selected K row, softmax weights in place, then
  the weighted V rows; each pass streams its rows with software prefetch a fixed distance ahead, so
  many random-row misses are in flight at once. (Measured on the 2-core machine, 2048 x 8 rows of a
  128K fp32 cache: about 30% faster than blocks of 64 rows with an online softmax, whose burst of
  V-row prefetches per block overflowed the miss queues.) bf16 rows are widened in registers.
* :func:`hamming_topk_attention`: the decode step in one parallel region; each (batch, KV head) task
  encodes its query group under ``W``, selects (as :func:`hamming_topk`) and attends (as
  :func:`gather_attention`).
* :func:`pack_bits`: ``projection >= 0`` packed 64 bits per word, LSB first (bit order version 1).

Threading: see :func:`lmexec.hata.kernels.select_threading_layer` (OpenMP shared with torch, else
``workqueue``). ``workqueue`` must not be entered from two threads at once, so the wrappers of the
parallel kernels (and of the top-k, whose workspace is shared) hold a lock; the single-threaded encode
and append kernels need none.
"""

from __future__ import annotations

import math
import threading
from collections import namedtuple

import numba as nb
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from lmexec.hata.attention import group_queries
from lmexec.hata.cache import GrowableBuffer
from lmexec.hata.kernels import (
    CODE_BLOCK_KEYS,
    SMALL_ENCODE_ROWS,
    Rows,
    code_block_bytes,
    select_threading_layer,
)

PREFETCH_DISTANCE = 8
_FAST = {"reassoc", "contract", "nsz", "arcp", "afn"}
"""fastmath without ``nnan``/``ninf``: masked logits are ``-inf`` and must compare as such."""

select_threading_layer()
_LOCK = threading.Lock()


@intrinsic
def _ctpop(typingctx, x):
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return sig, codegen


@intrinsic
def _cttz(typingctx, x):
    """Index of the lowest set bit of a non-zero ``uint64``."""
    sig = types.int64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.IntType(1)(1))

    return sig, codegen


# ---------------------------------------------------------------------------------------------------
# Transposed code blocks ("fast scan"): byte p of the codes of 32 consecutive keys is one 32-byte run,
# so one AVX2 byte shuffle (vpshufb) looks up 32 keys at once in a 16-entry table per nibble position.

BLOCK_KEYS = CODE_BLOCK_KEYS
"""Keys per block of the transposed layout (one AVX2 register holds one code byte of 32 keys)."""
MAX_SCAN_GROUP = 31
"""Largest GQA group the block scan takes: a code byte adds at most ``8 * G`` per key, kept in 8 bits."""


def _fast_scan_available() -> bool:
    """numba compiles for this host (no ``NUMBA_CPU_NAME``) and the host has AVX2."""
    import llvmlite.binding as llvm

    if nb.config.CPU_NAME is not None or nb.config.CPU_FEATURES is not None:
        return False
    return "+avx2" in llvm.get_host_cpu_features().flatten().split(",")


FAST_SCAN = _fast_scan_available()
"""Whether :func:`hamming_topk` scans code blocks (else the row codes, 3x slower on AVX2 machines)."""


@intrinsic
def _scan_block(typingctx, blocks, offset, tables, out, at, positions, chunk, limit):
    """``out[at:at+32] = 1 + sum_g Hamming(key, q_g)`` for the 32 keys of the code block starting at
    element ``offset`` of ``blocks`` (``positions`` code bytes of 32 keys each); returns the bit mask
    (bit ``j`` for key ``j``) of the ranks ``<= limit``.

    ``tables`` holds, per code byte ``p``, two 32-byte rows: the group-summed popcount of
    ``nibble XOR q_g's nibble`` for the low, then the high nibble (16 entries, repeated for both 128-bit
    lanes). Per byte: split the 32 key bytes into nibbles, two ``vpshufb`` lookups, one byte add; byte
    sums are widened to 16 bits every ``chunk`` bytes (before they can exceed 255). Where the compile
    target lacks AVX2 the lookup is emitted element by element (correct, slow, and not chosen by
    :func:`hamming_topk`).
    """
    sig = types.uint64(blocks, offset, tables, out, at, positions, chunk, limit)
    i8, i16, i32, i64 = (ir.IntType(w) for w in (8, 16, 32, 64))
    v32i8, v16i16, v16i32 = ir.VectorType(i8, 32), ir.VectorType(i16, 16), ir.VectorType(i32, 16)

    def splat(t, n, v):
        return ir.Constant(ir.VectorType(t, n), [v] * n)

    def codegen(context, builder, signature, args):
        blocks_v, offset_v, tables_v, out_v, at_v, positions_v, chunk_v, limit_v = args
        arrays = [context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 2, 3)]
        base, tab = builder.gep(arrays[0].data, [offset_v]), arrays[1].data
        out = builder.gep(arrays[2].data, [at_v])
        if FAST_SCAN:
            pshufb = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(v32i8, [v32i8, v32i8]), "llvm.x86.avx2.pshuf.b"
            )
            lookup = lambda table, idx: builder.call(pshufb, [table, idx])  # noqa: E731
        else:

            def lookup(table, idx):
                result = ir.Constant(v32i8, None)
                for lane_byte in range(32):
                    at = builder.zext(builder.extract_element(idx, i32(lane_byte)), i32)
                    at = builder.add(at, i32(lane_byte // 16 * 16))
                    result = builder.insert_element(
                        result, builder.extract_element(table, at), i32(lane_byte)
                    )
                return result

        def load32(ptr, off):
            return builder.load(builder.bitcast(builder.gep(ptr, [off]), v32i8.as_pointer()), align=1)

        acc8 = cgutils.alloca_once_value(builder, ir.Constant(v32i8, None))
        acc_lo = cgutils.alloca_once_value(builder, ir.Constant(v16i16, None))
        acc_hi = cgutils.alloca_once_value(builder, ir.Constant(v16i16, None))
        count = cgutils.alloca_once_value(builder, i64(0))

        def widen():
            a = builder.load(acc8)
            for first, acc in ((0, acc_lo), (16, acc_hi)):
                half = builder.shuffle_vector(a, a, ir.Constant(v16i32, list(range(first, first + 16))))
                builder.store(builder.add(builder.load(acc), builder.zext(half, v16i16)), acc)
            builder.store(ir.Constant(v32i8, None), acc8)
            builder.store(i64(0), count)

        with cgutils.for_range(builder, positions_v) as loop:
            p = loop.index
            key_bytes = load32(base, builder.mul(p, i64(32)))
            low = builder.and_(key_bytes, splat(i8, 32, 15))
            high = builder.and_(builder.lshr(key_bytes, splat(i8, 32, 4)), splat(i8, 32, 15))
            row = builder.mul(p, i64(64))
            hits = builder.add(
                lookup(load32(tab, row), low), lookup(load32(tab, builder.add(row, i64(32))), high)
            )
            builder.store(builder.add(builder.load(acc8), hits), acc8)
            counted = builder.add(builder.load(count), i64(1))
            builder.store(counted, count)
            with builder.if_then(builder.icmp_unsigned("==", counted, chunk_v)):
                widen()
        widen()
        limit32 = builder.trunc(limit_v, i32)
        bound = builder.insert_element(ir.Constant(v16i32, None), limit32, i32(0))
        bound = builder.shuffle_vector(bound, bound, ir.Constant(v16i32, [0] * 16))
        mask = i64(0)
        for first, acc in ((0, acc_lo), (16, acc_hi)):
            ranks = builder.add(builder.zext(builder.load(acc), v16i32), splat(i32, 16, 1))
            builder.store(
                ranks, builder.bitcast(builder.gep(out, [i64(first)]), v16i32.as_pointer()), align=4
            )
            below = builder.bitcast(builder.icmp_signed("<=", ranks, bound), ir.IntType(16))
            mask = builder.or_(mask, builder.shl(builder.zext(below, i64), i64(first)))
        return mask

    return sig, codegen


@nb.njit(cache=True, boundscheck=False)
def _scan_tables(qc, b, h, tables):
    """Lookup tables of :func:`_scan_block` for the query group of (b, h)."""
    g_count, w_count = qc.shape[2], qc.shape[3]
    for p in range(w_count * 8):
        for v in range(16):
            low = np.uint64(0)
            high = np.uint64(0)
            for g in range(g_count):
                byte = (qc[b, h, g, p // 8] >> np.uint64(8 * (p % 8))) & np.uint64(0xFF)
                low += _ctpop(np.uint64(v) ^ (byte & np.uint64(15)))
                high += _ctpop(np.uint64(v) ^ (byte >> np.uint64(4)))
            for lane in (0, 16):
                tables[p * 64 + lane + v] = np.uint8(low)
                tables[p * 64 + 32 + lane + v] = np.uint8(high)


@nb.njit(cache=True, boundscheck=False)
def _write_blocks_kernel(codes, start, out):
    """Scatter row codes ``[B, H, T, words]`` of keys ``start..start+T`` into blocks ``[B, H, NB, 32 * 8 *
    words]`` (byte ``p`` of key ``32 * blk + j`` at ``out[., ., blk, 32 * p + j]``). Single-threaded: a
    decode step writes one key per head; a 128K-token prefill takes a few ms."""
    for b in range(codes.shape[0]):
        for h in range(codes.shape[1]):
            for t in range(codes.shape[2]):
                _scatter_code(codes, b, h, t, start + t, out)


@nb.njit(cache=True, inline="always", boundscheck=False)
def _scatter_code(codes, b, h, t, key, out):
    """Write the code ``codes[b, h, t]`` as key ``key``'s bytes in the blocks ``out`` (see above)."""
    blk, j = divmod(key, BLOCK_KEYS)
    for w in range(codes.shape[3]):
        word = codes[b, h, t, w]
        for byte in range(8):
            value = (word >> np.uint64(8 * byte)) & np.uint64(0xFF)
            out[b, h, blk, (w * 8 + byte) * BLOCK_KEYS + j] = np.uint8(value)


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
    qc, kc, blocks, use_blocks, n, k, sink, recent, valid, has_valid, out, scores_out, want_scores, workspace
):
    for task in nb.prange(qc.shape[0] * qc.shape[1]):
        _select_task(task, qc, kc, blocks, use_blocks, n, k, sink, recent, valid, has_valid, out, scores_out,
                     want_scores, workspace)  # fmt: skip


@nb.njit(cache=True, boundscheck=False)
def _select_task(task, qc, kc, blocks, use_blocks, n, k, sink, recent, valid, has_valid, out, scores_out,
                 want_scores, workspace):  # fmt: skip
    """Top-k of one (batch, KV head) into ``out[b, h]`` (see :func:`hamming_topk`)."""
    h_count, g_count, w_count = qc.shape[1], qc.shape[2], qc.shape[3]
    n_bins = g_count * w_count * 64 + 3
    pad_bin = n_bins - 1
    b = task // h_count
    h = task - b * h_count
    ranks, positions, kept = workspace[task, 0], workspace[task, 1], workspace[task, 2]
    listed = workspace[task, 0::3]  # [ranks, block ids and masks] of the block path's listing pass
    scan = _make_scan(blocks, use_blocks, task, w_count, g_count)
    if use_blocks:
        _scan_tables(qc, b, h, scan.tables)
    else:
        _distances(qc, kc, b, h, n, ranks, np.int32(1))  # rank = 1 + distance
    if k <= 0:
        if want_scores:
            _collect(scan, ranks, b, h, n, -1, sink, recent, valid, has_valid, pad_bin, positions, kept,
                     scores_out, True)  # fmt: skip
        return
    # The k-th smallest rank is estimated from a sample; one pass keeps the keys at or below the
    # estimate (in position order) and the exact threshold comes from their histogram alone. If
    # fewer than k keys were at or below the estimate, the pass is redone keeping every key.
    limit = _sample_limit(scan, ranks, b, n, k, sink, recent, valid, has_valid, n_bins)
    m, good = _candidates(scan, ranks, listed, b, h, n, limit, sink, recent, valid, has_valid, pad_bin,
                          positions, kept, scores_out, want_scores)  # fmt: skip
    if good < k:
        m, good = _candidates(scan, ranks, listed, b, h, n, pad_bin, sink, recent, valid, has_valid, pad_bin,
                              positions, kept, scores_out, False)  # fmt: skip
    hist = np.zeros(n_bins, np.int64)
    for c in range(m):
        hist[kept[c]] += 1
    threshold, ties = _threshold(hist, k)
    # compacted in place without a branch per key (taken or not is a coin flip near the threshold)
    j = 0
    for c in range(m):
        rank = kept[c]
        tie = rank == threshold
        take = np.int64((rank < threshold) | (tie & (ties > 0)))
        positions[j] = positions[c]
        j += take
        ties -= take & np.int64(tie)
    for c in range(k):
        out[b, h, c] = positions[c]


_Scan = namedtuple("_Scan", "blocks use_blocks first positions chunk tables scratch")
"""Where one task's ranks come from: its transposed code blocks (``use_blocks``; ``first`` is the flat
offset of its first block, ``positions`` code bytes per key, ``chunk`` bytes whose 8-bit sums cannot
overflow, lookup ``tables``, a 32-rank ``scratch``) or else the task's rank array."""


@nb.njit(cache=True, boundscheck=False)
def _make_scan(blocks, use_blocks, task, words, group):
    return _Scan(
        blocks,
        use_blocks,
        task * blocks.shape[2] * blocks.shape[3],
        words * 8,
        max(1, 255 // (8 * group)),
        np.empty(words * 8 * 64, np.uint8),
        np.empty(BLOCK_KEYS, np.int32),
    )


@nb.njit(cache=True, inline="always", boundscheck=False)
def _scan(scan, base, limit, out, at):
    """Ranks of keys ``base..base+31`` into ``out[at:at+32]``; the mask of those ``<= limit``."""
    return _scan_block(
        scan.blocks, scan.first + base * scan.positions, scan.tables, out, np.int64(at), scan.positions,
        scan.chunk, np.int64(limit),
    )  # fmt: skip


@nb.njit(cache=True, inline="always", boundscheck=False)
def _prefetch_block(scan, base):
    """Prefetch the code block of keys ``base..base+31`` (every 64-byte line)."""
    first = scan.first + base * scan.positions
    for off in range(0, scan.positions * BLOCK_KEYS, 64):
        _prefetch(scan.blocks, first + off)


SAMPLE_KEYS = 4096
"""About this many keys are sampled (evenly spaced keys, or whole blocks) to estimate the top-k threshold."""
SAMPLE_PREFETCH = 4
"""Sampled blocks are prefetched this many samples ahead."""
SCAN_PREFETCH = 8
"""The streaming pass prefetches the block this many blocks ahead: the hardware prefetcher alone ran
too little ahead of the scan's arithmetic, so memory and arithmetic barely overlapped (measured cold,
128K keys x 8 heads on the 2-core machine: 1.08 -> 0.96 ms; 4 to 32 blocks ahead all within 3 %)."""


@nb.njit(cache=True, boundscheck=False)
def _threshold(hist, k):
    """Smallest bin ``t`` with ``sum(hist[:t + 1]) >= k`` and how many keys of bin ``t`` complete ``k``."""
    below = 0
    for t in range(hist.shape[0]):
        if below + hist[t] >= k:
            return t, k - below
        below += hist[t]
    return hist.shape[0] - 1, k - below


@nb.njit(cache=True, inline="always", boundscheck=False)
def _final_rank(rank, i, b, n, sink, recent, valid, has_valid, pad_bin):
    """The rank selection orders key ``i`` by: padding last, then forced sink/recent keys first."""
    if has_valid and not valid[b, i]:
        return pad_bin
    if i < sink or i >= n - recent:
        return 0
    return rank


@nb.njit(cache=True, boundscheck=False)
def _sample_limit(scan, ranks, b, n, k, sink, recent, valid, has_valid, n_bins):
    """A rank bin that about ``k + (4 sqrt(k / step) + 8) * step`` keys are at or below (4 standard
    deviations of the sample count above ``k``), from a ``1/step`` sample: every
    ``step``-th block when scanning blocks (a block costs about what one scattered key would), else
    every ``step``-th key."""
    hist = np.zeros(n_bins, np.int64)
    count = 0
    if scan.use_blocks:
        n_blocks = -(-n // BLOCK_KEYS)
        step = max(1, n_blocks // (SAMPLE_KEYS // BLOCK_KEYS))
        stride = step * BLOCK_KEYS
        for ahead in range(stride, min(n, SAMPLE_PREFETCH * stride), stride):
            _prefetch_block(scan, ahead)
        for base in range(0, n, stride):
            # sampled blocks are far apart: the hardware prefetcher cannot guess them
            if base + SAMPLE_PREFETCH * stride < n:
                _prefetch_block(scan, base + SAMPLE_PREFETCH * stride)
            _scan(scan, base, -1, scan.scratch, 0)
            for j in range(min(BLOCK_KEYS, n - base)):
                i = base + j
                hist[_final_rank(scan.scratch[j], i, b, n, sink, recent, valid, has_valid, n_bins - 1)] += 1
                count += 1
    else:
        step = max(1, n // SAMPLE_KEYS)
        for i in range(0, n, step):
            hist[_final_rank(ranks[i], i, b, n, sink, recent, valid, has_valid, n_bins - 1)] += 1
            count += 1
    expected = k / step  # sampled keys among the true top-k
    want = min(count, int(expected + 4.0 * math.sqrt(expected)) + 8)
    return _threshold(hist, want)[0]


@nb.njit(cache=True, boundscheck=False)
def _collect(scan, ranks, b, h, n, limit, sink, recent, valid, has_valid, pad_bin, positions, kept,
             scores_out, want_scores):  # fmt: skip
    """One pass over the keys, ``BLOCK_KEYS`` at a time: positions whose rank is ``<= limit``, and every
    forced key, go (ascending) to ``positions`` with their final rank in ``kept``. Returns how many, and
    how many of them have a final rank ``<= limit``. With code blocks the ranks are computed here, block
    by block (no rank array is written)."""
    m = 0
    good = 0
    r = scan.scratch
    for base in range(0, n, BLOCK_KEYS):
        if scan.use_blocks:
            mask = _scan(scan, base, limit, r, 0)
        else:  # copied, not sliced: a view per block would bump the shared workspace's refcount
            mask = np.uint64(0)
            for j in range(BLOCK_KEYS):  # the workspace is padded to whole blocks
                r[j] = ranks[base + j]
                mask |= np.uint64(r[j] <= limit) << np.uint64(j)
        if want_scores:
            for j in range(min(BLOCK_KEYS, n - base)):
                scores_out[b, h, base + j] = r[j] - 1
        m, good = _emit_block(r, 0, mask, base, b, n, limit, sink, recent, valid, has_valid, pad_bin,
                              positions, kept, m, good)  # fmt: skip
    return m, good


@nb.njit(cache=True, inline="always", boundscheck=False)
def _candidates(scan, ranks, listed, b, h, n, limit, sink, recent, valid, has_valid, pad_bin, positions, kept,
                scores_out, want_scores):  # fmt: skip
    """The candidate pass: :func:`_collect_blocks` over code blocks, else (rows, or every key's score
    wanted) :func:`_collect`."""
    if scan.use_blocks and not want_scores:
        return _collect_blocks(scan, listed, b, n, limit, sink, recent, valid, has_valid, pad_bin, positions,
                               kept)  # fmt: skip
    return _collect(scan, ranks, b, h, n, limit, sink, recent, valid, has_valid, pad_bin, positions, kept,
                    scores_out, want_scores)  # fmt: skip


@nb.njit(cache=True, boundscheck=False)
def _collect_blocks(scan, listed, b, n, limit, sink, recent, valid, has_valid, pad_bin, positions, kept):
    """:func:`_collect` over code blocks in two passes. The streaming pass has no data-dependent branch:
    every block's 32 ranks go to the next free slot of ``listed[0]`` and its id and mask to
    ``listed[1]``, and the slot is kept (the write position advances) only when the block has a rank
    ``<= limit`` or a forced key. (A branch per block on its mask, taken at random, cost a pipeline
    flush per few blocks: the one pass took 1.4x a bare scan.) The second pass emits the kept blocks."""
    ranks, ids = listed[0], listed[1]
    n_blocks = -(-n // BLOCK_KEYS)
    forced_below = sink  # blocks starting below this hold sink keys
    forced_above = n - recent - BLOCK_KEYS  # blocks starting above this hold recent keys
    count = 0
    for blk in range(n_blocks):
        base = blk * BLOCK_KEYS
        if blk + SCAN_PREFETCH < n_blocks:
            _prefetch_block(scan, base + SCAN_PREFETCH * BLOCK_KEYS)
        mask = _scan(scan, base, limit, ranks, count * BLOCK_KEYS)
        ids[2 * count] = blk
        ids[2 * count + 1] = np.int32(np.uint32(mask))
        count += (mask != 0) | (base < forced_below) | (base > forced_above)
    m = 0
    good = 0
    for t in range(count):
        mask = np.uint64(np.uint32(ids[2 * t + 1]))
        m, good = _emit_block(ranks, t * BLOCK_KEYS, mask, ids[2 * t] * BLOCK_KEYS, b, n, limit, sink,
                              recent, valid, has_valid, pad_bin, positions, kept, m, good)  # fmt: skip
    return m, good


@nb.njit(cache=True, inline="always", boundscheck=False)
def _emit_block(r, at, mask, base, b, n, limit, sink, recent, valid, has_valid, pad_bin, positions, kept,
                m, good):  # fmt: skip
    """Append the keys of the block at ``base`` whose bit is in ``mask`` (ranks ``r[at:at+32]``), plus
    its forced sink/recent keys, to ``positions``/``kept`` (from ``m``); padding past ``n`` is dropped."""
    one = np.uint64(1)
    if base < sink:
        mask |= (one << np.uint64(min(BLOCK_KEYS, sink - base))) - one
    if base + BLOCK_KEYS > n - recent:
        mask |= np.uint64(0xFFFFFFFF) & ~((one << np.uint64(max(0, n - recent - base))) - one)
    mask &= (one << np.uint64(min(BLOCK_KEYS, n - base))) - one
    while mask != 0:
        j = _cttz(mask)
        mask &= mask - one
        i = base + j
        rank = _final_rank(r[at + j], i, b, n, sink, recent, valid, has_valid, pad_bin)
        positions[m] = i
        kept[m] = rank
        m += 1
        good += rank <= limit
    return m, good


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


@intrinsic
def _f32_from_bits(typingctx, bits):
    """The float32 whose IEEE bits are the int32 ``bits``."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


def _elem(rows, b, h, i, c):  # pragma: no cover - replaced by the overload below inside numba
    raise NotImplementedError


@overload(_elem, inline="always")
def _elem_impl(rows, b, h, i, c):
    """``rows[b, h, i, c]`` as fp32 (bf16 bits are the high half of an fp32).

    Indexed, never viewed: every numba view of ``rows`` bumps the shared array's reference count
    atomically, and two threads doing that per gathered row fought over one cache line."""
    if rows.dtype == types.uint16:

        def widen(rows, b, h, i, c):
            return _f32_from_bits(np.int32(np.uint32(rows[b, h, i, c]) << np.uint32(16)))

        return widen

    def read(rows, b, h, i, c):
        return rows[b, h, i, c]

    return read


@nb.njit(cache=True, inline="always", fastmath=_FAST)
def _exp_nonpositive(x):
    """``exp(x)`` for float32 ``x <= 0`` (``-inf`` -> 0, NaN stays NaN), within 5 ulp under the gather's
    fastmath flags, in plain arithmetic so a loop of it vectorises (libm's ``exp`` is a scalar call: the
    softmax pass cost as much as the K pass)."""
    clamped = max(x, np.float32(-87.0))
    n = np.floor(clamped * np.float32(1.4426950408889634) + np.float32(0.5))
    r = clamped - n * np.float32(0.693145751953125) - n * np.float32(1.428606765330187e-06)
    p = np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    scaled = p * _f32_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))
    return np.float32(0.0) if x < np.float32(-87.0) else scaled


@nb.njit(cache=True, parallel=True, fastmath=_FAST, boundscheck=False)
def _gather_attention_kernel(q, keys, values, idx, scale, keep, has_keep, valid, has_valid, out):
    for task in nb.prange(q.shape[0] * q.shape[1]):
        _gather_task(task, q, keys, values, idx, scale, keep, has_keep, valid, has_valid, out)


@nb.njit(cache=True, fastmath=_FAST, boundscheck=False)
def _gather_task(task, q, keys, values, idx, scale, keep, has_keep, valid, has_valid, out):
    """Attention of the query group of one (batch, KV head) over its selected rows (see the module doc)."""
    h_count, g_count, d = q.shape[1], q.shape[2], q.shape[3]
    dv = values.shape[3]
    k_count = idx.shape[2]
    b = task // h_count
    h = task - b * h_count
    qs = np.empty((g_count, d), np.float32)
    for g in range(g_count):
        for c in range(d):
            qs[g, c] = q[b, h, g, c] * scale
    logits = np.empty((g_count, k_count), np.float32)
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
        if g_count == 4:  # the common GQA group: one pass over the row feeds four dot products
            s0 = s1 = s2 = s3 = np.float32(0.0)
            for c in range(d):
                kc = _elem(keys, b, h, i, c)
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
                    dot += qs[g, c] * _elem(keys, b, h, i, c)
                logits[g, j] = dot
    for j in range(min(PREFETCH_DISTANCE, k_count)):  # V rows of pass 3 start loading now
        _prefetch_row(values, idx, b, h, j)
    # pass 2: softmax weights in place (all logits are known: no running max or rescaling)
    totals = np.zeros(g_count, np.float32)
    for g in range(g_count):
        top = np.float32(-np.inf)
        for j in range(k_count):
            top = max(top, logits[g, j])
        if top == -np.inf:
            logits[g, :] = 0.0
            continue
        total = np.float32(0.0)
        for j in range(k_count):
            p = _exp_nonpositive(logits[g, j] - top)
            logits[g, j] = p
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
        i = idx[b, h, j]
        if g_count == 4:
            p0, p1, p2, p3 = logits[0, j], logits[1, j], logits[2, j], logits[3, j]
            for c in range(dv):
                vc = _elem(values, b, h, i, c)
                acc[0, c] += p0 * vc
                acc[1, c] += p1 * vc
                acc[2, c] += p2 * vc
                acc[3, c] += p3 * vc
        else:
            for g in range(g_count):
                p = logits[g, j]
                for c in range(dv):
                    acc[g, c] += p * _elem(values, b, h, i, c)
    for g in range(g_count):
        inv = np.float32(1.0) / totals[g] if totals[g] > 0 else np.float32(np.nan)
        for c in range(dv):
            out[b, h, g, c] = acc[g, c] * inv


@nb.njit(cache=True, parallel=True, fastmath=_FAST, boundscheck=False)
def _topk_attention_kernel(qc, kc, blocks, use_blocks, n, k, sink, recent, valid, has_valid, indices, scores,
                           want_scores, workspace, q, keys, values, scale, out, w):  # fmt: skip
    """Per (batch, KV head): encode the group's queries into ``qc`` under ``W``, select, attend."""
    for task in nb.prange(qc.shape[0] * qc.shape[1]):
        _encode_rows(q, w, task // qc.shape[1], task % qc.shape[1], 0, q.shape[2], qc, 0)
        _select_task(task, qc, kc, blocks, use_blocks, n, k, sink, recent, valid, has_valid, indices, scores,
                     want_scores, workspace)  # fmt: skip
        _gather_task(task, q, keys, values, indices, scale, _DUMMY_MASK, False, valid, has_valid, out)


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


@nb.njit(cache=True, fastmath={"contract"}, boundscheck=False)
def _encode_small_kernel(x, w, out):
    """Fused ``sign(x @ W[h])`` + pack for a few rows per head (decode: the new key, the query heads).

    ``x [B, H, T, d]`` fp32, ``W [H, d, r]`` fp32, ``out [B, H, T, words]`` uint64. Single-threaded on
    purpose: a decode step encodes a handful of rows, less work than waking threads. Accumulates in
    fp32 (fused multiply-add, 8 lanes) over ``W``'s contiguous rows, so a bit can differ from the
    reference matmul only where the projection is within rounding of 0."""
    for b in range(x.shape[0]):
        for h in range(x.shape[1]):
            _encode_rows(x, w, b, h, 0, x.shape[2], out, 0)


@nb.njit(cache=True, fastmath={"contract"}, boundscheck=False)
def _append_codes_kernel(keys, w, start, end, codes, blocks, use_blocks):
    """Encode keys ``start..end`` of the K buffer ``[B, H, capacity, d]`` (fp32 or bf16 bits) into the
    code rows ``[B, H, capacity, words]`` and, with ``use_blocks``, the code blocks, in place: the cache
    append of a decode step in one call (see :func:`_encode_small_kernel`)."""
    for b in range(keys.shape[0]):
        for h in range(keys.shape[1]):
            _encode_rows(keys, w, b, h, start, end - start, codes, start)
            if use_blocks:
                for t in range(start, end):
                    _scatter_code(codes, b, h, t, t, blocks)


@nb.njit(cache=True, fastmath={"contract"}, boundscheck=False)
def _encode_rows(x, w, b, h, first, count, out, at):
    """Codes of rows ``first..first+count`` of ``x[b, h]`` (fp32, or bf16 bits) under ``W[h]`` into
    ``out[b, h, at..at+count]`` (see :func:`_encode_small_kernel`)."""
    d = x.shape[3]
    r = w.shape[2]
    words = out.shape[3]
    acc = np.empty(r, np.float32)
    for t in range(count):
        for j in range(r):
            acc[j] = 0.0
        for c in range(d):
            xc = _elem(x, b, h, first + t, c)
            for j in range(r):  # indexed, not a view per row: views cost atomic refcounts
                acc[j] += xc * w[h, c, j]
        for word in range(words):
            bits = np.uint64(0)
            for j in range(min(64, r - 64 * word)):
                if acc[64 * word + j] >= 0:
                    bits |= np.uint64(1) << np.uint64(j)
            out[b, h, at + t, word] = bits


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


def _rows(x: Rows) -> np.ndarray:
    """The kernels' array of ``x``: its whole ``[B, H, capacity, F]`` storage (see :func:`rows_buffer`);
    a :class:`GrowableBuffer`'s is made once per allocation, not every step."""
    if isinstance(x, GrowableBuffer):
        return x.derived("numba", _np)
    return _np(rows_buffer(x))


_DUMMY_MASK = np.ones((1, 1), dtype=np.bool_)


def _mask(mask: torch.Tensor | None) -> tuple[np.ndarray, bool]:
    if mask is None:
        return _DUMMY_MASK, False
    return mask.to(torch.bool).contiguous().numpy(), True


_WORKSPACE = np.empty(0, np.int32)


def _workspace(tasks: int, n: int) -> np.ndarray:
    """Scratch ``[tasks, 4, n rounded up to whole blocks]`` int32 (ranks of the row path or the block
    path's listed ranks, kept positions, their ranks, listed block ids and masks), reused across calls
    (callers hold the lock). A fresh buffer per call would be a fresh ``mmap``: at 128K keys its page
    faults cost about as much as the selection itself (measured 1.5 ms of 4 ms single-threaded)."""
    global _WORKSPACE
    n = -(-n // BLOCK_KEYS) * BLOCK_KEYS
    need = tasks * 4 * n
    if _WORKSPACE.size < need:
        _WORKSPACE = np.empty(max(need, 2 * _WORKSPACE.size), np.int32)
    return _WORKSPACE[:need].reshape(tasks, 4, n)


_NO_BLOCKS = np.zeros((1, 1, 1, BLOCK_KEYS), np.uint8)


def code_blocks_usable(key_codes: Rows, key_blocks: Rows | None, group: int) -> bool:
    """Whether :func:`hamming_topk` can scan ``key_blocks`` for these codes (else it reads the rows)."""
    if key_blocks is None or not FAST_SCAN or group > MAX_SCAN_GROUP or key_blocks.dtype != torch.uint8:
        return False
    b, h, n, words = key_codes.shape
    kb, kh, blocks, width = key_blocks.shape
    return (kb, kh, width) == (b, h, code_block_bytes(words)) and blocks * BLOCK_KEYS >= n


def write_code_blocks(blocks: torch.Tensor, start: int, codes: torch.Tensor) -> None:
    """Write the codes of keys ``start..start+T`` (``[B, H, T, words]``) into the transposed block
    buffer ``blocks [B, H, >= ceil((start+T)/32), 32 * 8 * words]`` (uint8, contiguous) in place."""
    b, h, t, words = codes.shape
    needed = (b, h, -(-(start + t) // BLOCK_KEYS), code_block_bytes(words))
    if blocks.shape[:2] != needed[:2] or blocks.shape[2] < needed[2] or blocks.shape[3] != needed[3]:
        raise ValueError(
            f"code blocks {list(blocks.shape)} cannot hold keys {start}..{start + t}: need {needed}"
        )
    if not blocks.is_contiguous() or blocks.dtype != torch.uint8:
        raise ValueError("code blocks must be a contiguous uint8 tensor")
    if t:
        _write_blocks_kernel(_np(codes.contiguous()), start, blocks.numpy())


def hamming_scores(query_codes: torch.Tensor, key_codes: torch.Tensor) -> torch.Tensor:
    b, h, n, _ = key_codes.shape
    out = torch.empty(b, h, n, dtype=torch.int64)
    if n:
        qc = _np(query_codes.contiguous())
        with _LOCK:
            _hamming_scores_kernel(qc, _np(rows_buffer(key_codes)), n, out.numpy())
    return out


_NO_SCORES = np.empty((1, 1, 1), np.int32)


def _topk_args(query_codes, key_codes: Rows, k, sink, recent, valid, key_blocks: Rows | None, return_scores):
    """The selection arguments of :func:`_select_task` (after ``task``): inputs, outputs, workspace."""
    b, h, n, _ = key_codes.shape
    k = min(k, n)
    out = np.empty((b, h, k), np.int64)
    scores = np.empty((b, h, n), np.int32) if return_scores else _NO_SCORES
    valid_np, has_valid = _mask(valid)
    use_blocks = code_blocks_usable(key_codes, key_blocks, query_codes.shape[2])
    blocks = _rows(key_blocks) if use_blocks and key_blocks is not None else _NO_BLOCKS
    args = (
        query_codes, _rows(key_codes), blocks, use_blocks, n, k, sink, recent, valid_np, has_valid, out,
        scores, return_scores, _workspace(b * h, n),
    )  # fmt: skip
    return args, out, scores


def hamming_topk(
    query_codes: torch.Tensor,
    key_codes: torch.Tensor,
    k: int,
    sink: int = 0,
    recent: int = 1,
    valid: torch.Tensor | None = None,
    return_scores: bool = False,
    key_blocks: torch.Tensor | None = None,
):
    """Fused score + top-k. ``key_blocks``, the same codes in the transposed block layout (kept beside
    the rows by the hash selection methods), is scanned when :func:`code_blocks_usable`."""
    with _LOCK:  # the workspace is shared
        args, out, scores = _topk_args(
            _np(query_codes.contiguous()), key_codes, k, sink, recent, valid, key_blocks, return_scores
        )
        _hamming_topk_kernel(*args)
    out_t = torch.from_numpy(out)
    return (out_t, torch.from_numpy(scores)) if return_scores else out_t


SUPPORTED_ATTENTION_DTYPES = (torch.float32, torch.bfloat16)
APPEND_KEY_DTYPES = SUPPORTED_ATTENTION_DTYPES
"""K buffer dtypes :func:`append_codes` reads in place: the same rows ``_elem`` reads for the gather
(bf16 widened in registers)."""


def _attention_args(query: torch.Tensor, keys: Rows, values: Rows, scale: float | None):
    """Grouped fp32 query, the K/V row buffers, scale and the fp32 output ``[B, H_kv, G, dv]``."""
    b, h_q, d = query.shape
    h_kv = keys.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    grouped = group_queries(query, h_kv).float().contiguous()
    out = torch.empty(b, h_kv, h_q // h_kv, values.shape[-1], dtype=torch.float32)
    args = (grouped.numpy(), _rows(keys), _rows(values), np.float32(scale))
    return args, out


def gather_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    scale: float | None = None,
    keep: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    (q, k_rows, v_rows, scale_), out = _attention_args(query, keys, values, scale)
    keep_np, has_keep = _mask(keep)
    valid_np, has_valid = _mask(valid)
    with _LOCK:
        _gather_attention_kernel(
            q, k_rows, v_rows, indices.to(torch.int64).contiguous().numpy(), scale_, keep_np, has_keep,
            valid_np, has_valid, out.numpy(),
        )  # fmt: skip
    return out.reshape(query.shape[0], query.shape[1], values.shape[-1]).to(query.dtype)


def hamming_topk_attention(
    query: torch.Tensor,
    w: torch.Tensor,
    key_codes: Rows,
    keys: Rows,
    values: Rows,
    k: int,
    sink: int = 0,
    recent: int = 1,
    valid: torch.Tensor | None = None,
    scale: float | None = None,
    key_blocks: Rows | None = None,
) -> torch.Tensor:
    """Encode the queries under ``W [H_kv, d, bits]``, :func:`hamming_topk`, then :func:`gather_attention`
    (``valid`` masks both) in one parallel region: each thread encodes, selects and attends for one
    (batch, KV head) at a time, so one core's random K/V row reads overlap the other's streaming code
    scan, and the query encode (a 4 x 128 x 128 product per KV head) is split over the threads too."""
    (q, k_rows, v_rows, scale_), out = _attention_args(query, keys, values, scale)
    b, h_kv, g, _ = q.shape
    query_codes = np.empty((b, h_kv, g, key_codes.shape[3]), np.uint64)
    with _LOCK:
        args, _, _ = _topk_args(query_codes, key_codes, k, sink, recent, valid, key_blocks, False)
        _topk_attention_kernel(*args, q, k_rows, v_rows, scale_, out.numpy(), w.float().contiguous().numpy())
    return out.reshape(query.shape[0], query.shape[1], values.shape[-1]).to(query.dtype)


def append_codes(keys: GrowableBuffer, start: int, w: torch.Tensor, codes: GrowableBuffer,
                 blocks: GrowableBuffer | None) -> None:  # fmt: skip
    """Encode keys ``start..keys.length`` into ``codes`` (and ``blocks``), whose storage already has room,
    in one kernel call (see :func:`_append_codes_kernel`)."""
    _append_codes_kernel(
        _rows(keys), w.float().contiguous().numpy(), start, keys.length, _rows(codes),
        _rows(blocks) if blocks is not None else _NO_BLOCKS, blocks is not None,
    )  # fmt: skip


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
