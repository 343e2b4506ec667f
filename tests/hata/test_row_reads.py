"""The random-row read probe behind the bench's access bound: it reads exactly the lines of the rows
asked for, samples distinct sorted rows, and reports a rate per row size after an eviction per read."""

from __future__ import annotations

import numpy as np
import pytest

from lmexec.hata.row_reads import _touch_rows, measure_row_bandwidths, random_rows


def _lines(start: int, width: int) -> set[int]:
    return set(range(start // 64, (start + width - 1) // 64 + 1))


def _expected(flat: np.ndarray, width: int, idx: np.ndarray) -> tuple[int, set[int]]:
    """The sum the probe returns and the 64-byte lines its touches cover."""
    total, lines = 0, set()
    for i in idx:
        start = int(i) * width
        touched = list(range(start, start + width, 64)) + ([start + width - 1] if width % 64 else [])
        total += int(flat[touched].astype(np.int64).sum())
        lines |= {t // 64 for t in touched}
    return total, lines


@pytest.mark.parametrize("width", [32, 64, 152, 200, 512])
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_touch_reads_one_byte_of_every_line_a_row_overlaps(width, parts):
    rng = np.random.default_rng(width)
    flat = rng.integers(0, 256, size=97 * width, dtype=np.uint8)
    idx = random_rows(97, 41, seed=width)
    total, lines = _expected(flat, width, idx)
    assert _touch_rows(flat.reshape(97, width), idx, parts) == total
    # every line a chosen row overlaps is read (rows straddle lines when the width is no multiple of 64)
    assert lines == set().union(*(_lines(int(i) * width, width) for i in idx))


def test_random_rows_are_distinct_and_sorted():
    idx = random_rows(1000, 300, seed=3)
    assert idx.shape == (300,) and len(set(idx.tolist())) == 300
    assert (np.diff(idx) > 0).all() and idx[0] >= 0 and idx[-1] < 1000
    assert random_rows(5, 5).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        random_rows(5, 6)


@pytest.mark.parametrize("huge_pages", [True, False])
def test_rates_per_row_size(huge_pages):
    evictions = []
    rates = measure_row_bandwidths(
        [256, 512, 256], lambda: evictions.append(1), count=64, gib=0.01, repeats=3, huge_pages=huge_pages
    )
    assert set(rates) == {256, 512}
    assert all(rate > 0 and np.isfinite(rate) for rate in rates.values())
    assert len(evictions) == 2 * 3  # every timed read comes after an eviction


def test_buffer_grows_to_hold_count_distinct_rows():
    # 1000 rows of 128 B need more than the 1 KiB asked for: the buffer holds exactly them
    rates = measure_row_bandwidths([128], lambda: None, count=1000, gib=2**-20, repeats=1)
    assert rates[128] > 0


@pytest.mark.parametrize(("sizes", "count"), [([], 8), ([0], 8), ([64], 0)])
def test_bad_arguments(sizes, count):
    with pytest.raises(ValueError):
        measure_row_bandwidths(sizes, lambda: None, count=count)
