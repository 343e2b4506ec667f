"""Selection methods: which cached keys a decode step attends to. One class per method, one interface."""

from __future__ import annotations

from lmexec.hata.selection.base import SelectionMethod, group_softmax_sum, top_k_indices
from lmexec.hata.selection.dense import Dense
from lmexec.hata.selection.hata import Hata
from lmexec.hata.selection.loki import Loki, fit_basis
from lmexec.hata.selection.oracle import Oracle
from lmexec.hata.selection.quest import Quest
from lmexec.hata.selection.simhash import SimHash
from lmexec.hata.selection.sparq import SparQ

METHODS: dict[str, type[SelectionMethod]] = {
    cls.name: cls for cls in (Dense, Oracle, SimHash, Hata, Loki, Quest, SparQ)
}

__all__ = [
    "METHODS",
    "Dense",
    "Hata",
    "Loki",
    "Oracle",
    "Quest",
    "SelectionMethod",
    "SimHash",
    "SparQ",
    "fit_basis",
    "group_softmax_sum",
    "top_k_indices",
]
