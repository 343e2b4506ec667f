"""Argument checks of the kernel API.

The numba and Triton kernels index without bounds checks (that is where their speed comes from), so a
shape or index the torch reference would refuse can make them read out of bounds: silent garbage or a
crash. The dispatchers in :mod:`lmexec.hata.kernels` run these checks first, on shapes only (a few
microseconds), except for the index range of :func:`gather_attention`'s caller-given indices on CPU.
"""

from __future__ import annotations

import torch

from lmexec.hata.cache import GrowableBuffer

Rows = torch.Tensor | GrowableBuffer


def _shape(x: Rows) -> tuple[int, ...]:
    return tuple(x.shape)


def _fail(kernel: str, problems: list[str]) -> None:
    if problems:
        raise ValueError(f"{kernel}: " + "; ".join(problems))


def _check_mask(name: str, mask: torch.Tensor | None, shape: tuple[int, int], problems: list[str]) -> None:
    if mask is None:
        return
    if mask.dtype != torch.bool:
        problems.append(f"{name} must be a bool tensor, got {mask.dtype}")
    if tuple(mask.shape) != shape:
        problems.append(f"{name} has shape {list(mask.shape)}, expected {list(shape)}")


def check_encode(x: torch.Tensor, w: torch.Tensor) -> None:
    """``x [B, H_kv, N, d]`` and ``W [H_kv, d, bits]``."""
    problems = []
    if x.dim() != 4 or w.dim() != 3 or x.shape[1] != w.shape[0] or x.shape[3] != w.shape[1]:
        problems.append(
            f"x {list(x.shape)} and W {list(w.shape)} must be [B, H_kv, N, d] and [H_kv, d, bits]"
        )
    _fail("encode", problems)


def _projection_problems(w: torch.Tensor, h_kv: int, d: int, words: int) -> list[str]:
    if w.dim() != 3 or tuple(w.shape[:2]) != (h_kv, d) or not 0 < w.shape[2] <= 64 * words:
        return [f"W {list(w.shape)} must be [{h_kv}, {d}, bits <= {64 * words}]"]
    return []


def check_projection(w: torch.Tensor, h_kv: int, d: int, words: int) -> None:
    """``W [H_kv, d, bits]`` for codes of ``words`` 64-bit words (the fused step reads it unchecked)."""
    _fail("hamming_topk_attention", _projection_problems(w, h_kv, d, words))


def check_codes(
    query_codes: torch.Tensor,
    key_codes: Rows,
    valid: torch.Tensor | None = None,
    key_blocks: Rows | None = None,
) -> None:
    """``query_codes [B, H_kv, G, words]``, ``key_codes [B, H_kv, N, words]``, ``valid [B, N]``."""
    problems = []
    q, k = tuple(query_codes.shape), _shape(key_codes)
    if len(q) != 4 or len(k) != 4 or q[:2] != k[:2] or q[3] != k[3]:
        problems.append(
            f"query codes {list(q)} and key codes {list(k)} must be [B, H_kv, G, w] and [B, H_kv, N, w]"
        )
    elif key_blocks is not None and _shape(key_blocks)[:2] != k[:2]:
        problems.append(f"code blocks {list(_shape(key_blocks))} do not match key codes {list(k)}")
    for name, codes in (("query codes", query_codes), ("key codes", key_codes)):
        if codes.dtype != torch.int64:  # a narrower word would be sign-extended into the popcount
            problems.append(f"{name} must be int64 words (as encode packs them), got {codes.dtype}")
    if len(k) == 4:
        _check_mask("valid", valid, (k[0], k[2]), problems)
    _fail("hamming_topk", problems)


def check_attention(
    query: torch.Tensor,
    keys: Rows,
    values: Rows,
    indices: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    key_codes: Rows | None = None,
) -> None:
    """``query [B, H_q, d]``, ``keys/values [B, H_kv, N, d]`` (``d_v`` may differ), ``indices
    [B, H_kv, K]`` within ``0..N-1`` (checked on CPU), ``keep [B, K]``, ``valid [B, N]``; with
    ``key_codes`` (the fused step) the codes must not describe more keys than K/V hold."""
    problems = []
    qs, ks, vs = tuple(query.shape), _shape(keys), _shape(values)
    if len(qs) != 3 or len(ks) != 4 or len(vs) != 4:
        problems.append(f"query {list(qs)}, keys {list(ks)}, values {list(vs)} must be 3-d, 4-d, 4-d")
        _fail("attention", problems)
    if ks[:3] != vs[:3] or ks[0] != qs[0] or ks[3] != qs[2] or qs[1] % ks[1]:
        problems.append(
            f"query {list(qs)}, keys {list(ks)}, values {list(vs)} must be [B, H_q, d] and [B, H_kv, N, d] "
            "with H_q a multiple of H_kv"
        )
    if indices is not None:
        if indices.dim() != 3 or tuple(indices.shape[:2]) != ks[:2]:
            problems.append(f"indices {list(indices.shape)} must be [B, H_kv, K] = [{ks[0]}, {ks[1]}, K]")
        elif indices.numel() and indices.device.type == "cpu":
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= ks[2]:
                problems.append(f"indices span {low}..{high}, outside the {ks[2]} rows of keys/values")
        if indices.dim() == 3:
            _check_mask("keep", keep, (ks[0], indices.shape[2]), problems)
    if key_codes is not None and _shape(key_codes)[2] > ks[2]:
        problems.append(f"key codes describe {_shape(key_codes)[2]} keys but keys/values hold {ks[2]}")
    _check_mask("valid", valid, (ks[0], ks[2]), problems)
    _fail("attention", problems)


def check_append(
    keys: GrowableBuffer, start: int, w: torch.Tensor, codes: GrowableBuffer, blocks: GrowableBuffer | None,
    block_bytes: int, block_keys: int,
) -> None:  # fmt: skip
    """The append kernel writes unchecked: refuse shapes it would write out of bounds with."""
    b, h, _, d = keys.data.shape
    words = codes.data.shape[3]
    problems = _projection_problems(w, h, d, words)
    if not 0 <= start <= keys.length <= codes.capacity:
        problems.append(f"keys {start}..{keys.length} do not fit codes of capacity {codes.capacity}")
    if tuple(codes.data.shape[:2]) != (b, h):
        problems.append(f"codes {list(codes.data.shape)} do not match keys {[b, h, d]}")
    if blocks is not None and (
        tuple(blocks.data.shape[:2]) != (b, h)
        or blocks.data.shape[3] != block_bytes
        or blocks.capacity * block_keys < keys.length
        or blocks.dtype != torch.uint8
    ):
        problems.append(f"code blocks {list(blocks.data.shape)} cannot hold {keys.length} keys' codes")
    _fail("append_codes", problems)
