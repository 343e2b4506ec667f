"""Fast HATA kernels behind one dispatch: encode, Hamming score + top-k, gather attention, and the
three fused.

Every operation has a plain torch reference (:mod:`.reference`, the definition), a CPU implementation
in numba (:mod:`.cpu`) and a GPU implementation in Triton (:mod:`.gpu`). The backend is chosen per call
from the tensors' device:

* CPU tensors -> ``numba`` (``torch`` when numba is missing or the dtype is unsupported, e.g. fp16 K/V);
* CUDA tensors -> ``triton`` (``torch`` when triton is missing).

Override with the environment variable ``LMEXEC_HATA_KERNELS`` = ``auto`` | ``torch`` | ``numba`` |
``triton`` or, in code, ``with use_backend("torch"): ...``. ``triton`` on CPU tensors needs
``TRITON_INTERPRET=1`` set before triton is first imported (the interpreter; how the tests run it).

Semantics shared by all backends (tested equal to the reference):

* ``encode(x [B, H_kv, N, d], W [H_kv, d, r])`` -> int64 ``[B, H_kv, N, ceil(r/64)]`` (bit order v1);
* ``hamming_scores(q [B, H_kv, G, w], k [B, H_kv, N, w])`` -> int64 ``[B, H_kv, N]``, summed over G;
* ``hamming_topk(q, k, k_sel, sink, recent, valid)`` -> int64 ``[B, H_kv, min(k_sel, N)]``, ascending
  positions: forced sink/recent keys first, then smallest distance, ties to the earlier key, padding
  (``valid [B, N]`` False) only when nothing else is left;
* ``gather_attention(q [B, H_q, d], K, V [B, H_kv, N, d], idx [B, H_kv, K], scale, keep [B, K],
  valid [B, N])`` -> ``[B, H_q, d]`` in the query dtype, fp32 math;
* ``hamming_topk_attention(q, W, k codes, K, V, k_sel, sink, recent, valid, scale)``: ``encode`` of the
  grouped query, ``hamming_topk``, ``gather_attention`` with ``valid``: one fused kernel on CPU,
  composed of the three elsewhere;
* ``append_codes(K buffer, start, W, code buffer, block buffer)``: ``encode`` of keys ``start:`` written
  into the code rows (and code blocks) of the cache: one kernel call on CPU at decode sizes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar
from importlib.util import find_spec

import torch

from lmexec.errors import UserError
from lmexec.hata.cache import GrowableBuffer
from lmexec.hata.kernels import checks, reference

ENV_VAR = "LMEXEC_HATA_KERNELS"
SMALL_ENCODE_ROWS = 64
"""Up to this many new rows per head (decode steps) the CPU encodes in one fused single-threaded call;
more (prefill) go through one batched matmul, the same as the reference, and the parallel packer."""
Rows = torch.Tensor | GrowableBuffer
"""Per-token rows (K, V, codes, code blocks): a ``[B, H, n, F]`` tensor or the cache buffer holding them."""
BACKENDS = ("auto", "torch", "numba", "triton")
_override: ContextVar[str | None] = ContextVar("lmexec_hata_kernels", default=None)


def numba_available() -> bool:
    return find_spec("numba") is not None


def triton_available() -> bool:
    return find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def select_threading_layer() -> None:
    """Prefer numba's OpenMP threading layer (else ``workqueue``) unless ``NUMBA_THREADING_LAYER`` or
    ``NUMBA_THREADING_LAYER_PRIORITY`` is set.

    Must run before numba starts its threads; done when this package is imported, after torch. numba's
    ``omp`` layer then runs on the OpenMP runtime torch has already loaded (its GOMP symbols are global),
    so numba kernels and torch ops share one thread pool instead of two pools fighting for the cores,
    and the calling thread takes a share of each kernel. Measured on the 2-core machine: a small
    parallel kernel 78 us with ``omp``, 336 us with ``workqueue`` (whose caller only waits while two
    helpers wake up); a torch matmul right after a kernel took as long as on its own.
    """
    if (
        os.environ.get("NUMBA_THREADING_LAYER")
        or os.environ.get("NUMBA_THREADING_LAYER_PRIORITY")
        or not numba_available()
    ):
        return
    import numba

    numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]
    numba.config.THREADING_LAYER = "default"


select_threading_layer()


def requested_backend() -> str:
    choice = _override.get() or os.environ.get(ENV_VAR, "auto") or "auto"
    if choice not in BACKENDS:
        raise UserError(f"{ENV_VAR} must be one of {', '.join(BACKENDS)}, got {choice!r}")
    return choice


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside the block (``auto`` restores device-based choice)."""
    if name not in BACKENDS:
        raise UserError(f"kernel backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def backend_for(t: torch.Tensor) -> str:
    """The backend that runs an operation on ``t``'s device under the current setting."""
    choice = requested_backend()
    if choice == "auto":
        if t.is_cuda:
            return "triton" if triton_available() else "torch"
        return "numba" if numba_available() else "torch"
    if choice == "numba" and (t.is_cuda or not numba_available()):
        raise UserError("the numba kernels need numba and CPU tensors")
    if choice == "triton":
        if not triton_available():
            raise UserError("the triton kernels need triton (pip install triton)")
        if not t.is_cuda and not triton_interpreting():
            raise UserError("triton kernels on CPU tensors need TRITON_INTERPRET=1")
    return choice


def _impl(backend: str):
    if backend == "numba":
        from lmexec.hata.kernels import cpu

        return cpu
    if backend == "triton":
        from lmexec.hata.kernels import gpu

        return gpu
    return reference


def encode(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Packed codes of ``x [B, H_kv, N, d]`` under ``W [H_kv, d, r]``."""
    checks.check_encode(x, w)
    return _impl(backend_for(x)).encode(x, w)


def hamming_scores(query_codes: torch.Tensor, key_codes: torch.Tensor) -> torch.Tensor:
    """Group-summed Hamming distances ``[B, H_kv, N]`` (int64)."""
    checks.check_codes(query_codes, key_codes)
    return _impl(backend_for(key_codes)).hamming_scores(query_codes, key_codes)


def hamming_topk(
    query_codes: torch.Tensor,
    key_codes: torch.Tensor,
    k: int,
    sink: int = 0,
    recent: int = 1,
    valid: torch.Tensor | None = None,
    key_blocks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused score + selection: indices ``[B, H_kv, min(k, N)]`` in ascending position order.

    ``key_blocks`` (optional): the same key codes in the CPU kernel's transposed block layout (see
    :func:`code_blocks_wanted`), which it scans about 3x faster than the rows; other backends ignore it."""
    checks.check_codes(query_codes, key_codes, valid, key_blocks)
    if k < 0:
        raise ValueError(f"hamming_topk: k must be >= 0, got {k}")
    backend = backend_for(key_codes)
    if backend == "numba":
        from lmexec.hata.kernels import cpu

        return cpu.hamming_topk(query_codes, key_codes, k, sink, recent, valid, key_blocks=key_blocks)
    return _impl(backend).hamming_topk(query_codes, key_codes, k, sink, recent, valid)


CODE_BLOCK_KEYS = 32
"""Keys per block of the transposed code layout (:func:`write_code_blocks`)."""


def code_block_bytes(words: int) -> int:
    """Bytes of one block (``CODE_BLOCK_KEYS`` keys) of codes ``words`` int64 words long."""
    return CODE_BLOCK_KEYS * 8 * words


def code_blocks_wanted(codes: torch.Tensor) -> bool:
    """Whether key codes on this device should also be kept in the transposed block layout: CPU tensors
    where numba can scan it with AVX2. The layout is [B, H_kv, ceil(N / 32), 32 * 8 * words] (uint8): byte
    ``p`` (little-endian within the int64 words) of key ``32 * blk + j`` is at ``[., ., blk, 32 * p + j]``."""
    if codes.device.type != "cpu" or not numba_available():
        return False
    from lmexec.hata.kernels import cpu

    return cpu.FAST_SCAN


def write_code_blocks(blocks: torch.Tensor, start: int, codes: torch.Tensor) -> None:
    """Write the codes ``[B, H_kv, T, words]`` of keys ``start..start+T`` into ``blocks`` in place."""
    from lmexec.hata.kernels import cpu

    cpu.write_code_blocks(blocks, start, codes)


def gather_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    scale: float | None = None,
    keep: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact attention of ``query [B, H_q, d]`` over the selected rows of ``keys/values``; with no row
    selected (``K = 0``) the output is zeros on every backend."""
    checks.check_attention(query, keys, values, indices, keep, valid)
    if indices.shape[2] == 0:
        return query.new_zeros(*query.shape[:2], values.shape[3])
    backend = backend_for(keys)
    if backend == "numba":
        from lmexec.hata.kernels import cpu

        if keys.dtype not in cpu.SUPPORTED_ATTENTION_DTYPES or values.dtype != keys.dtype:
            backend = "torch"
    if backend == "triton" and values.shape[3] != keys.shape[3]:
        backend = "torch"  # the Triton kernel reads V rows of the K width
    return _impl(backend).gather_attention(query, keys, values, indices, scale, keep, valid)


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
    """Decode attention of ``query [B, H_q, d]`` over the keys that :func:`hamming_topk` selects for
    its codes under ``W [H_kv, d, bits]``: the result of ``encode`` (grouped query), ``hamming_topk``
    and ``gather_attention(..., valid=valid)``, fused into one kernel on CPU (numba), composed of the
    three elsewhere. The per-token inputs may be the cache's :class:`GrowableBuffer` s themselves, which
    lets the CPU kernel reuse its view of them across steps."""
    checks.check_attention(query, keys, values, valid=valid, key_codes=key_codes)
    _, h_kv, _, words = _storage(key_codes).shape
    checks.check_projection(w, h_kv, query.shape[2], words)
    if k < 0:
        raise ValueError(f"hamming_topk_attention: k must be >= 0, got {k}")
    # nothing selected (k = 0 or no keys): the empty attention is 0, as the composition gives
    if k == 0 or key_codes.shape[2] == 0:
        return query.new_zeros(*query.shape[:2], values.shape[3])
    if backend_for(_storage(key_codes)) == "numba" and backend_for(_storage(keys)) == "numba":
        from lmexec.hata.kernels import cpu

        if keys.dtype in cpu.SUPPORTED_ATTENTION_DTYPES and values.dtype == keys.dtype:
            return cpu.hamming_topk_attention(
                query, w, key_codes, keys, values, k, sink, recent, valid, scale, key_blocks
            )
    from lmexec.hata.attention import group_queries

    code_t, keys_t, values_t = _tensor(key_codes), _tensor(keys), _tensor(values)
    query_codes = encode(group_queries(query, code_t.shape[1]), w)
    blocks = _tensor(key_blocks) if key_blocks is not None else None
    indices = hamming_topk(query_codes, code_t, k, sink, recent, valid, blocks)
    return gather_attention(query, keys_t, values_t, indices, scale, valid=valid)


def append_codes(
    keys: GrowableBuffer, start: int, w: torch.Tensor, codes: GrowableBuffer, blocks: GrowableBuffer | None
) -> None:
    """Encode keys ``start..keys.length`` of a K buffer under ``W`` into the code buffer (and the code
    blocks, see :func:`write_code_blocks`), whose storage the caller has grown to hold them: the cache
    append of a decode step, in one kernel call on CPU. Lengths are the caller's to set."""
    end = keys.length
    checks.check_append(keys, start, w, codes, blocks, code_block_bytes(codes.data.shape[3]), CODE_BLOCK_KEYS)
    backend = backend_for(codes.data)
    if backend == "numba" and 0 < end - start <= SMALL_ENCODE_ROWS:
        from lmexec.hata.kernels import cpu

        if keys.dtype in cpu.APPEND_KEY_DTYPES:
            cpu.append_codes(keys, start, w, codes, blocks)
            return
    new = encode(keys.data[:, :, start:end], w)
    codes.data[:, :, start:end] = new
    if blocks is not None:
        write_code_blocks(blocks.data, start, new)


def _tensor(x: Rows) -> torch.Tensor:
    """The rows as a tensor (a buffer's filled part)."""
    return x.view() if isinstance(x, GrowableBuffer) else x


def _storage(x: Rows) -> torch.Tensor:
    """A tensor on the rows' device, for choosing the backend without making a view."""
    return x.data if isinstance(x, GrowableBuffer) else x


__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "CODE_BLOCK_KEYS",
    "append_codes",
    "backend_for",
    "code_block_bytes",
    "code_blocks_wanted",
    "encode",
    "gather_attention",
    "hamming_scores",
    "hamming_topk",
    "hamming_topk_attention",
    "numba_available",
    "reference",
    "requested_backend",
    "triton_available",
    "use_backend",
    "write_code_blocks",
]
