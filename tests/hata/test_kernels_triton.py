"""The Triton kernels equal the torch reference, run by the Triton interpreter on CPU tensors
(``TRITON_INTERPRET=1``, set here before triton is imported; CI has no GPU). Small shapes only: the
interpreter executes every program in numpy."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
if os.environ.get("TRITON_INTERPRET") in ("", "0") and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 and no GPU: nothing can run the Triton kernels", allow_module_level=True)

from lmexec.hata import kernels  # noqa: E402
from lmexec.hata.kernels import reference as ref  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") not in ("", "0") else "cuda"

SHAPES = [  # batch, kv heads, group, keys, head_dim, bits
    (1, 1, 1, 1, 16, 32),
    (2, 3, 3, 37, 16, 64),
    (1, 2, 4, 300, 32, 128),
    (2, 2, 2, 131, 8, 256),
]


@pytest.fixture(scope="module")
def gpu():
    from lmexec.hata.kernels import gpu

    return gpu


def _data(b, h, g, n, d, bits, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h, n, d, generator=gen) + 0.2
    values = torch.randn(b, h, n, d, generator=gen)
    query = torch.randn(b, h * g, d, generator=gen)
    w = torch.randn(h, d, bits, generator=gen)
    qc = ref.encode(query.reshape(b, h, g, d), w)
    kc = ref.encode(keys, w)
    return [t.to(DEVICE) for t in (query, keys, values, w, qc, kc)]


@pytest.mark.parametrize("shape", SHAPES)
def test_encode_and_scores(gpu, shape):
    query, keys, _, w, qc, kc = _data(*shape)
    got = gpu.encode(keys, w)
    if DEVICE == "cpu":
        assert torch.equal(got, kc)
    else:  # another summation order may flip only bits whose projection is ~0
        from lmexec.hata.codes import unpack_bits

        bits = w.shape[-1]
        differ = unpack_bits(got, bits) != unpack_bits(kc, bits)
        proj = torch.einsum("bhnd,hdr->bhnr", keys, w)
        assert not bool((differ & (proj.abs() > 1e-4)).any())
    assert torch.equal(gpu.hamming_scores(qc, kc), ref.hamming_scores(qc, kc))


@pytest.mark.parametrize("shape", SHAPES)
def test_topk_equals_reference(gpu, shape):
    _, keys, _, _, qc, kc = _data(*shape)
    n = keys.shape[2]
    for k in (1, 7, 64, n, n + 50):  # n + 50: budget beyond the context
        for sink, recent in ((0, 0), (2, 3)):
            assert torch.equal(
                gpu.hamming_topk(qc, kc, k, sink, recent), ref.hamming_topk(qc, kc, k, sink, recent)
            )
    gen = torch.Generator().manual_seed(2)
    valid = (torch.rand(keys.shape[0], n, generator=gen) > 0.4).to(DEVICE)
    valid[0, : n // 2] = False  # left padding
    for k in (1, 20, n):
        assert torch.equal(gpu.hamming_topk(qc, kc, k, 1, 1, valid), ref.hamming_topk(qc, kc, k, 1, 1, valid))


@pytest.mark.parametrize("scan", [256, 2])
def test_topk_over_several_key_blocks(gpu, monkeypatch, scan):
    """Past one program's block of keys (1024) the compaction offsets come from the earlier blocks' counts
    (summed ``scan`` blocks per loop step: 2 makes the loop run more than once); 32-bit codes tie often,
    so the ties must still go to the earliest keys across blocks."""
    monkeypatch.setattr(gpu, "COUNT_SCAN", scan)
    _, keys, _, _, qc, kc = _data(1, 2, 3, 4200, 16, 32, seed=5)
    for k in (1, 700, 1500, 4199):
        for sink, recent in ((0, 1), (3, 1100)):
            assert torch.equal(
                gpu.hamming_topk(qc, kc, k, sink, recent), ref.hamming_topk(qc, kc, k, sink, recent)
            )


def test_topk_with_padding_over_several_blocks_and_k_equal_to_n(gpu):
    _, keys, _, _, qc, kc = _data(2, 2, 3, 2600, 16, 32, seed=7)
    gen = torch.Generator().manual_seed(8)
    valid = torch.rand(2, 2600, generator=gen) > 0.5
    valid[0, :1500] = False  # left padding spanning the first block and part of the second
    for k in (1, 900, 1100, 2600):
        want = ref.hamming_topk(qc, kc, k, 2, 3, valid.to(DEVICE))
        assert torch.equal(gpu.hamming_topk(qc, kc, k, 2, 3, valid.to(DEVICE)), want)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # -inf - -inf, on purpose
def test_gather_attention_gives_nan_where_every_row_is_dropped_as_the_reference(gpu):
    query, keys, values, _, _, _ = _data(2, 2, 2, 300, 16, 64, seed=9)
    idx = torch.randint(0, 300, (2, 2, 100), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    keep = torch.ones(2, 100, dtype=torch.bool, device=DEVICE)
    keep[1] = False  # batch row 1 attends to nothing
    keep[0, 40:] = False  # batch row 0: only the first split's rows
    got = gpu.gather_attention(query, keys, values, idx, None, keep)
    want = ref.gather_attention(query, keys, values, idx, None, keep)
    assert bool(got[1].isnan().all()) and bool(want[1].isnan().all())
    torch.testing.assert_close(got[0], want[0])


def test_topk_reads_strided_cache_view(gpu):
    _, keys, _, w, qc, _ = _data(2, 2, 2, 90, 16, 128, seed=4)
    buffer = torch.zeros(2, 2, 200, 2, dtype=torch.int64, device=DEVICE)
    buffer[:, :, :90] = ref.encode(keys, w)
    view = buffer[:, :, :90]
    assert not view.is_contiguous()
    assert torch.equal(gpu.hamming_topk(qc, view, 33), ref.hamming_topk(qc, view.contiguous(), 33))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", SHAPES)
def test_gather_attention(gpu, shape, dtype, tol):
    query, keys, values, _, qc, kc = _data(*shape)
    query, keys, values = query.to(dtype), keys.to(dtype), values.to(dtype)
    for k in (1, 33, 100):
        idx = ref.hamming_topk(qc, kc, k, 0, 1)
        got = gpu.gather_attention(query, keys, values, idx)
        want = ref.gather_attention(query, keys, values, idx)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_gather_attention_masks(gpu):
    query, keys, values, _, _, _ = _data(2, 2, 3, 120, 16, 128, seed=6)
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 120, (2, 2, 90), generator=gen).to(DEVICE)
    keep = (torch.rand(2, 90, generator=gen) > 0.3).to(DEVICE)
    valid = (torch.rand(2, 120, generator=gen) > 0.2).to(DEVICE)
    keep[:, 0] = True
    valid[:, idx[:, :, 0].reshape(-1)] = True
    for scale in (None, 0.5):
        got = gpu.gather_attention(query, keys, values, idx, scale, keep, valid)
        torch.testing.assert_close(got, ref.gather_attention(query, keys, values, idx, scale, keep, valid))


def test_dispatch_runs_triton_backend():
    query, keys, values, w, qc, kc = _data(1, 2, 2, 50, 16, 128)
    with kernels.use_backend("triton"):
        assert kernels.backend_for(keys) == "triton"
        assert torch.equal(kernels.encode(keys, w), kc)
        idx = kernels.hamming_topk(qc, kc, 10)
        assert torch.equal(idx, ref.hamming_topk(qc, kc, 10))
        torch.testing.assert_close(
            kernels.gather_attention(query, keys, values, idx), ref.gather_attention(query, keys, values, idx)
        )
        # select + attend: on this backend the three kernels composed
        b, h, n, d = keys.shape
        want_idx = ref.hamming_topk(ref.encode(query.reshape(b, h, -1, d), w), kc, 10, 0, 1)
        torch.testing.assert_close(
            kernels.hamming_topk_attention(query, w, kc, keys, values, 10, 0, 1, scale=0.3),
            ref.gather_attention(query, keys, values, want_idx, 0.3),
        )


def test_dispatch_to_triton_handles_empty_selections_and_a_wider_v():
    query, keys, values, _, _, _ = _data(1, 2, 2, 50, 16, 128)
    wide = torch.randn(1, 2, 50, 24).to(DEVICE)
    idx = torch.randint(0, 50, (1, 2, 7)).to(DEVICE)
    with kernels.use_backend("triton"):
        empty = kernels.gather_attention(query, keys, values, idx[:, :, :0])
        assert torch.equal(empty, torch.zeros_like(query))
        got = kernels.gather_attention(query, keys, wide, idx)  # d_v != d: not the Triton kernel's shape
    assert got.shape == (1, 4, 24)
    torch.testing.assert_close(got, ref.gather_attention(query, keys, wide, idx))
