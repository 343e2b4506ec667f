import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmexec.errors import UserError
from lmexec.hata.codes import (
    VALID_BITS,
    check_bits,
    check_projection,
    encode,
    encode_queries,
    hamming,
    n_words,
    pack_bits,
    popcount,
    random_projection,
    sign_bits,
    unpack_bits,
)


@pytest.mark.parametrize("bits", VALID_BITS + (5, 100))
def test_pack_unpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    raw = torch.rand(3, 4, bits, generator=g) > 0.5
    packed = pack_bits(raw)
    assert packed.dtype == torch.int64 and packed.shape == (3, 4, n_words(bits))
    assert torch.equal(unpack_bits(packed, bits), raw)


@pytest.mark.parametrize("j", [0, 1, 31, 32, 63, 64, 65, 127, 200, 255])
def test_bit_order_is_lsb_first_in_word_j_div_64(j):
    raw = torch.zeros(256, dtype=torch.bool)
    raw[j] = True
    words = pack_bits(raw)
    expected = np.zeros(4, dtype=np.uint64)
    expected[j // 64] = np.uint64(1) << np.uint64(j % 64)
    assert np.array_equal(words.numpy().view(np.uint64), expected)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), min_size=1, max_size=20))
def test_popcount_matches_python(values):
    words = torch.tensor(values, dtype=torch.int64)
    expected = [bin(v & (2**64 - 1)).count("1") for v in values]
    assert popcount(words).tolist() == expected


@pytest.mark.parametrize("bits", VALID_BITS)
def test_hamming_on_packed_words_equals_pm1_distance(bits):
    g = torch.Generator().manual_seed(7)
    group, h_kv, d, n = 3, 2, 16, 40
    w = torch.randn(h_kv, d, bits, generator=g)
    q = torch.randn(2, h_kv * group, d, generator=g)
    k = torch.randn(2, h_kv, n, d, generator=g)
    got = hamming(encode_queries(q, w), encode(k, w))
    # reference: +-1 codes, ham = (r - s_q . s_k) / 2, summed over the group, per KV head
    s_q = torch.where(torch.einsum("bhgd,hdr->bhgr", q.reshape(2, h_kv, group, d), w) >= 0, 1.0, -1.0)
    s_k = torch.where(torch.einsum("bhnd,hdr->bhnr", k, w) >= 0, 1.0, -1.0)
    expected = ((bits - s_q @ s_k.transpose(-1, -2)) / 2).sum(dim=2)
    assert torch.equal(got, expected.long())


def test_sign_bit_is_xw_nonnegative():
    w = torch.eye(4).unsqueeze(0)[:, :, :4].repeat(1, 1, 8)  # [1, 4, 32]
    x = torch.tensor([[[[1.0, -1.0, 0.0, -0.5]]]])
    bits = sign_bits(x, w)[0, 0, 0, :4]
    assert bits.tolist() == [True, False, True, False]


def test_query_heads_use_their_kv_heads_projection():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(2, 8, 64, generator=g)
    q = torch.randn(1, 4, 8, generator=g)  # heads 0,1 -> kv 0; heads 2,3 -> kv 1
    codes = encode_queries(q, w)
    assert torch.equal(codes[0, 1, 0], encode(q[:, 2].reshape(1, 1, 1, 8), w[1:2])[0, 0, 0])


@pytest.mark.parametrize("bits", [0, 16, 48, 512, 128.0, True])
def test_bad_bits_are_user_errors(bits):
    with pytest.raises(UserError, match="bits must be one of 32, 64, 128, 256"):
        check_bits(bits)


def test_projection_shape_mismatch_names_the_model_shape():
    w = random_projection(3, 64, 128, seed=0)
    assert check_projection(w, 3, 64, 128).shape == (3, 64, 128)
    with pytest.raises(UserError, match=r"shape \[3, 64, 128\].*n_kv_heads=4, head_dim=64"):
        check_projection(w, 4, 64)
    with pytest.raises(UserError, match="head_dim=32"):
        check_projection(w, 3, 32)
    with pytest.raises(UserError, match="128 bits but 64"):
        check_projection(w, 3, 64, 64)
    with pytest.raises(UserError, match="one of"):
        check_projection(torch.randn(3, 64, 100), 3, 64)
    bad = w.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        check_projection(bad, 3, 64)
