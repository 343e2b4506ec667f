import pytest
import torch

from lmexec.hata.cache import HUGE_PAGE_MIN_BYTES, GrowableBuffer, LayerCache


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


def _transparent_huge_pages() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "never"
    return text.split("[")[1].split("]")[0]


def _huge_kib_backing(t: torch.Tensor) -> int:
    """AnonHugePages (KiB) of the mappings that overlap ``t``'s memory (Linux ``/proc/self/smaps``; the
    advice splits the allocation's mapping at the 2 MiB boundaries)."""
    first, last = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    inside, total = False, 0
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start < last and first < end
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(
    _transparent_huge_pages() not in ("madvise", "always"), reason="no transparent huge pages"
)
def test_large_cpu_buffers_get_huge_pages():
    """K/V rows are gathered at random: large buffers ask for 2 MiB pages (fewer TLB misses), small ones
    and those that opt out do not, and a buffer that grows asks again."""
    rows = HUGE_PAGE_MIN_BYTES // (8 * 128 * 4) + 1
    big = GrowableBuffer(1, 8, 128, torch.float32, capacity=rows)
    assert big.huge_pages
    big.data.fill_(1.0)  # first touch: the kernel backs the advised range with huge pages
    assert _huge_kib_backing(big.data) >= 2048
    assert not GrowableBuffer(1, 8, 128, torch.float32, capacity=64).huge_pages
    assert not GrowableBuffer(1, 8, 128, torch.float32, capacity=rows, huge_pages=False).huge_pages
    small = GrowableBuffer(1, 8, 128, torch.float32, capacity=64)
    small.append(torch.zeros(1, 8, rows, 128))
    assert small.huge_pages and small.reallocations == 1


def test_derived_is_kept_until_the_storage_is_replaced():
    buf = GrowableBuffer(1, 2, 4, torch.float32, capacity=8)
    made = []

    def make(t):
        made.append(t)
        return t.numpy()

    first = buf.derived("np", make)
    buf.append(torch.ones(1, 2, 3, 4))
    assert buf.derived("np", make) is first and len(made) == 1  # in-place appends keep it
    buf.append(torch.ones(1, 2, 9, 4))  # grows: new storage
    grown = buf.derived("np", make)
    assert grown is not first and made[-1] is buf.data and grown[0, 0, 11, 0] == 1
    buf.data = buf.data.index_select(0, torch.tensor([0]))  # replaced from outside (a beam reorder)
    assert not buf._derived  # dropped at once: the old storage is not kept alive
    assert buf.derived("np", make) is not grown and len(made) == 3


def test_copies_make_their_own_derived_handles():
    import copy

    buf = GrowableBuffer(1, 1, 2, torch.float32, capacity=4)
    buf.derived("np", lambda t: t.numpy())
    for other in (copy.copy(buf), copy.deepcopy(buf)):
        handle = other.derived("np", lambda t: t.numpy())
        other.data[0, 0, 0, 0] = 7.0
        assert handle[0, 0, 0, 0] == 7.0  # the copy's handle sees the copy's storage


def test_make_room_refuses_gaps_and_grows():
    buf = GrowableBuffer(1, 1, 2, torch.float32, capacity=4, step=4)
    buf.append(torch.ones(1, 1, 3, 2))
    with pytest.raises(IndexError):
        buf.make_room(4, 5)
    assert buf.make_room(2, 9) == 9 and buf.capacity >= 9 and buf.length == 3  # length is the writer's
    assert buf.make_room(0, 1) == 3
