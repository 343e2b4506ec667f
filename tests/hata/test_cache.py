import torch

from lmexec.hata.cache import GrowableBuffer, LayerCache


def test_append_writes_in_place_until_full():
    buf = GrowableBuffer(1, 2, 4, torch.float32, capacity=8, step=8)
    storage = buf.data.data_ptr()
    rows = [torch.full((1, 2, 1, 4), float(i)) for i in range(8)]
    for i, row in enumerate(rows):
        assert buf.append(row) == i
        assert buf.data.data_ptr() == storage  # no copy while capacity lasts
    assert buf.reallocations == 0
    assert torch.equal(buf.view(), torch.cat(rows, dim=2))


def test_growth_is_geometric_and_keeps_contents():
    buf = GrowableBuffer(2, 1, 3, torch.float32, capacity=4, step=4)
    expected = []
    for _ in range(1000):
        row = torch.randn(2, 1, 1, 3)
        expected.append(row)
        buf.append(row)
    assert torch.equal(buf.view(), torch.cat(expected, dim=2))
    assert buf.reallocations <= 9  # 4 -> 8 -> ... -> 1024: log2(1000/4) steps, not one per append


def test_view_is_a_view_not_a_copy():
    buf = GrowableBuffer(1, 1, 2, torch.float32, capacity=16)
    buf.append(torch.ones(1, 1, 3, 2))
    view = buf.view()
    assert view.data_ptr() == buf.data.data_ptr()
    assert view.shape == (1, 1, 3, 2)


def test_write_overwrites_the_tail():
    buf = GrowableBuffer(1, 1, 1, torch.float32, capacity=4)
    buf.append(torch.zeros(1, 1, 3, 1))
    buf.write(2, torch.ones(1, 1, 2, 1))
    assert buf.view().flatten().tolist() == [0.0, 0.0, 1.0, 1.0]


def test_decode_steps_do_not_copy_the_cache():
    k = torch.randn(1, 3, 100, 8)
    cache = LayerCache.from_prefill(k, k.clone())
    codes = cache.extra("codes", 2, torch.int64)
    codes.append(torch.zeros(1, 3, 100, 2, dtype=torch.int64))
    pointers = (cache.key_buffer.data.data_ptr(), cache.value_buffer.data.data_ptr(), codes.data.data_ptr())
    for _ in range(64):
        cache.append(torch.randn(1, 3, 1, 8), torch.randn(1, 3, 1, 8))
        codes.append(torch.zeros(1, 3, 1, 2, dtype=torch.int64))
    assert cache.length == 164
    assert (
        cache.key_buffer.data.data_ptr(),
        cache.value_buffer.data.data_ptr(),
        codes.data.data_ptr(),
    ) == pointers
