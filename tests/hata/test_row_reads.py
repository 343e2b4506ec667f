"""The random-row read probe behind the bench's access bound: it reads exactly the rows asked for, one
byte per 64-byte line, and reports a rate per row size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmexec.hata.row_reads import _touch_rows, measure_row_bandwidths


@pytest.mark.parametrize("width", [32, 64, 200, 512])
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_touch_reads_every_line_of_the_chosen_rows(width, parts):
    rng = np.random.default_rng(width)
    rows = rng.integers(0, 256, size=(97, width), dtype=np.uint8)
    idx = np.sort(rng.choice(97, size=41, replace=False)).astype(np.int64)
    expected = int(rows[idx][:, ::64].astype(np.int64).sum())
    assert _touch_rows(rows, idx, parts) == expected


def test_rates_per_row_size():
    evictions = []
    rates = measure_row_bandwidths(
        [256, 512, 256], lambda: evictions.append(1), count=64, gib=0.01, repeats=3
    )
    assert set(rates) == {256, 512}
    assert all(rate > 0 and np.isfinite(rate) for rate in rates.values())
    assert len(evictions) == 2 * 3  # every timed read comes after an eviction


@pytest.mark.parametrize(("sizes", "count"), [([], 8), ([0], 8), ([64], 0)])
def test_bad_arguments(sizes, count):
    with pytest.raises(ValueError):
        measure_row_bandwidths(sizes, lambda: None, count=count)


def test_probe_buffer_holds_the_rows_when_the_size_is_small():
    # gib too small for count rows: the buffer grows to hold them all (distinct rows, none repeated)
    torch.manual_seed(0)
    rates = measure_row_bandwidths([128], lambda: None, count=1000, gib=1e-6, repeats=1)
    assert rates[128] > 0
