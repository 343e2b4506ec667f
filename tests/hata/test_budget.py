import pytest
import torch

from lmexec.errors import UserError
from lmexec.hata.budget import Budget, parse_budget
from lmexec.hata.selection import top_k_indices


def test_ratio_and_absolute_budgets():
    assert Budget(0.25).tokens(100) == 25
    assert Budget(0.0625).tokens(4096) == 256
    assert Budget(256).tokens(4096) == 256
    assert Budget(256).tokens(100) == 100  # absolute budget capped at the context
    assert Budget(0.001).tokens(10) == 1  # never below one token
    assert Budget(0.01, sink=4, recent=4).tokens(100) == 8  # forced tokens always fit


@pytest.mark.parametrize("value", [0, -1, -0.5, float("nan"), float("inf"), 1.5, "8", True])
def test_bad_budget_values(value):
    with pytest.raises(UserError, match="budget"):
        Budget(value)


def test_budget_zero_message_says_what_is_allowed():
    with pytest.raises(UserError, match=r"budget must be > 0 \(a ratio below 1 or a token count"):
        Budget(0)


def test_sink_recent_must_fit_inside_an_absolute_budget():
    with pytest.raises(UserError, match="count inside the budget"):
        Budget(8, sink=4, recent=5)
    with pytest.raises(UserError, match="recent must be"):
        Budget(8, recent=-1)


def test_parse_budget():
    assert parse_budget("256") == 256 and isinstance(parse_budget("256"), int)
    assert parse_budget("0.125") == 0.125
    with pytest.raises(UserError, match="must be a number"):
        parse_budget("lots")
    for text in ("inf", "-inf", "1e400", "nan"):
        with pytest.raises(UserError, match="must be a finite number"):
            parse_budget(text)


@pytest.mark.parametrize(("k", "sink", "recent"), [(8, 2, 3), (5, 0, 5), (12, 4, 1), (3, 3, 0)])
def test_sink_and_recent_always_selected_and_counted_inside_budget(k, sink, recent):
    n = 40
    scores = torch.randn(2, 3, n)
    scores[..., :sink] = -1e9  # the worst scores: only forcing can select them
    scores[..., n - recent :] = -1e9
    idx = top_k_indices(scores, Budget(k, sink=sink, recent=recent))
    assert idx.shape == (2, 3, k)
    forced = set(range(sink)) | set(range(n - recent, n))
    for row in idx.reshape(-1, k).tolist():
        assert len(set(row)) == k
        assert forced <= set(row)
        # the rest are the best-scoring free positions
        free = [i for i in row if i not in forced]
        assert len(free) == k - len(forced)


def test_selection_is_top_scores_otherwise():
    scores = torch.arange(30.0).repeat(1, 1, 1)
    idx = top_k_indices(scores, Budget(5, sink=0, recent=1))
    assert sorted(idx[0, 0].tolist()) == [25, 26, 27, 28, 29]
    idx = top_k_indices(-scores, Budget(5, sink=1, recent=1))
    assert sorted(idx[0, 0].tolist()) == [0, 1, 2, 3, 29]


def test_invalid_positions_are_never_selected():
    scores = torch.arange(10.0).repeat(2, 1, 1)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 6:9] = False  # batch row 1 has padding at 6..8
    idx = top_k_indices(scores, Budget(4, recent=0), valid=valid)
    assert sorted(idx[0, 0].tolist()) == [6, 7, 8, 9]
    assert sorted(idx[1, 0].tolist()) == [3, 4, 5, 9]
