"""Binary hash codes: ``code(x) = sign(x @ W[kv_head])`` packed into 64-bit words, and Hamming scores.

Bit order (version 1, documented in docs/hata.md): bit ``j`` (``j = 0 .. bits-1``) of a code is
``x @ W[:, j] >= 0``; it lives in word ``j // 64`` at bit position ``j % 64`` (least-significant bit
first). Words are ``torch.int64`` (torch has no full uint64 arithmetic); bit 63 is the sign bit, which
is harmless for XOR and popcount. 32-bit codes use one word whose upper 32 bits are zero.
"""

from __future__ import annotations

import torch

from lmexec.errors import UserError

VALID_BITS = (32, 64, 128, 256)
BIT_ORDER_VERSION = 1
WORD_BITS = 64


def n_words(bits: int) -> int:
    """Number of int64 words holding a ``bits``-bit code."""
    return (bits + WORD_BITS - 1) // WORD_BITS


def code_bytes(bits: int) -> int:
    """Bytes one key's code takes in the cache (whole int64 words: 8 at 32 bits)."""
    return n_words(bits) * WORD_BITS // 8


def check_bits(bits: int) -> int:
    """Return ``bits`` if supported, else raise a UserError naming the allowed values."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
        allowed = ", ".join(map(str, VALID_BITS))
        raise UserError(f"hash bits must be one of {allowed}, got {bits!r}")
    return bits


def check_projection(
    w: torch.Tensor, n_kv_heads: int, head_dim: int, bits: int | None = None
) -> torch.Tensor:
    """Validate a projection ``W [n_kv_heads, head_dim, bits]`` against the model; return it as fp32."""
    if not isinstance(w, torch.Tensor):
        raise UserError(f"hash projection must be a tensor, got {type(w).__name__}")
    if w.dim() != 3 or w.shape[0] != n_kv_heads or w.shape[1] != head_dim:
        raise UserError(
            f"hash projection has shape {list(w.shape)} but the model needs "
            f"[n_kv_heads={n_kv_heads}, head_dim={head_dim}, bits]"
        )
    check_bits(int(w.shape[2]))
    if bits is not None and w.shape[2] != bits:
        raise UserError(f"hash projection has {w.shape[2]} bits but {bits} were requested")
    if not torch.isfinite(w).all():
        raise UserError("hash projection contains NaN or infinite values")
    return w.float()


def random_projection(n_kv_heads: int, head_dim: int, bits: int, seed: int) -> torch.Tensor:
    """Gaussian ``W ~ N(0, 1)``: untrained HATA, i.e. SimHash (random-hyperplane LSH)."""
    check_bits(bits)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_kv_heads, head_dim, bits, generator=generator)


def sign_bits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Unpacked bits ``x @ W[h] >= 0`` for ``x [B, H_kv, N, d]`` and ``W [H_kv, d, r]`` -> bool ``[B, H_kv, N, r]``."""
    projected = torch.einsum("bhnd,hdr->bhnr", x.float(), w.float())
    return projected >= 0


_SHIFTS = torch.arange(WORD_BITS, dtype=torch.int64)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack bool ``[..., r]`` into int64 ``[..., ceil(r/64)]`` (bit j -> word j//64, position j%64)."""
    r = bits.shape[-1]
    words = n_words(r)
    padded = torch.zeros(*bits.shape[:-1], words * WORD_BITS, dtype=torch.int64, device=bits.device)
    padded[..., :r] = bits.to(torch.int64)
    grouped = padded.view(*bits.shape[:-1], words, WORD_BITS)
    # Shifted bits never overlap, so the sum is an OR; 1 << 63 wraps to the sign bit as intended.
    return (grouped << _SHIFTS.to(bits.device)).sum(dim=-1)


def unpack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int64 ``[..., words]`` -> bool ``[..., bits]``."""
    expanded = (codes.unsqueeze(-1) >> _SHIFTS.to(codes.device)) & 1
    return expanded.reshape(*codes.shape[:-1], -1)[..., :bits].bool()


def encode(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Packed codes of ``x [B, H_kv, N, d]`` under ``W [H_kv, d, r]`` -> int64 ``[B, H_kv, N, r/64]``."""
    return pack_bits(sign_bits(x, w))


def encode_queries(query: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Packed codes of decode queries ``[B, H_q, d]``; query head h uses KV head ``h // G`` -> ``[B, H_kv, G, words]``."""
    b, h_q, d = query.shape
    h_kv = w.shape[0]
    return encode(query.reshape(b, h_kv, h_q // h_kv, d), w)


_M1 = 0x5555555555555555
_M2 = 0x3333333333333333
_M4 = 0x0F0F0F0F0F0F0F0F
_H01 = 0x0101010101010101


def popcount(words: torch.Tensor) -> torch.Tensor:
    """Set bits per int64 word (SWAR; masks clear the sign-extended bits of arithmetic shifts)."""
    x = words - ((words >> 1) & _M1)
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4
    return (x * _H01) >> 56  # top byte holds the total (<= 64); int64 multiply wraps


def hamming(query_codes: torch.Tensor, key_codes: torch.Tensor) -> torch.Tensor:
    """Group-summed Hamming distance: ``[B, H_kv, G, w]`` vs ``[B, H_kv, N, w]`` -> int64 ``[B, H_kv, N]``.

    ``score[b, h, i] = sum_g popcount(q[b, h, g] XOR k[b, h, i])``; one score per KV head, so the query
    heads of a GQA group share one selection.
    """
    total = None
    for g in range(query_codes.shape[2]):  # loop keeps memory at one [B, H_kv, N, w] temporary
        distance = popcount(key_codes ^ query_codes[:, :, g : g + 1, :]).sum(dim=-1)
        total = distance if total is None else total + distance
    assert total is not None
    return total
