"""Small random tensors shared by the HATA unit tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def qkv():
    """GQA shapes: batch 2, 6 query heads over 3 KV heads (group 2), 50 keys, head_dim 16."""
    g = torch.Generator().manual_seed(1234)
    q = torch.randn(2, 6, 16, generator=g)
    k = torch.randn(2, 3, 50, 16, generator=g) + 0.3  # a key mean, as in real models
    v = torch.randn(2, 3, 50, 16, generator=g)
    return q, k, v
