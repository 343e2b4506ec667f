"""Table cells keep the figures they show."""

import math

import pytest

from lmexec.reporting import fmt


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0.0004, "0.0004"),  # a bound of 0.0004 printed as 0
        (0.0052, "0.0052"),  # and 0.0052 as 0.005, beside a 0.0044 shown as 0.004
        (0.0044, "0.0044"),
        (123.4567, "123.457"),
        (1.5, "1.5"),
        (3.0, "3"),
        (math.inf, "inf"),
        (math.nan, "nan"),  # crashed (int(nan))
        (None, "-"),
    ],
)
def test_fmt_keeps_small_figures_apart(value, shown):
    assert fmt(value) == shown
