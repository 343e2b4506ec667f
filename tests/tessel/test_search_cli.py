"""``lmexec tessel search`` end to end: table, JSON, saved schedule, one-line errors."""

from __future__ import annotations

import json

from lmexec.cli import main
from lmexec.tessel.schedule import Schedule


def test_search_cli_writes_json_and_schedule(tmp_path, capsys) -> None:
    out, saved = tmp_path / "r.json", tmp_path / "s.json"
    code = main(["tessel", "search", "--placement", "vshape", "--devices", "4", "--memory", "4",
                 "--micro-batches", "8", "--time-limit", "4", "--json", str(out), "--save", str(saved)])  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert "tessel search" in text and "1f1b" in text and "optimal (proven)" in text
    data = json.loads(out.read_text())
    assert data["search"]["period"] == 4 and data["search"]["makespan"] == 44
    assert data["baselines"]["1f1b"]["makespan"] == 44
    assert Schedule.load(saved).validate() == []


def test_search_cli_infeasible_memory_is_one_line(capsys) -> None:
    code = main(["tessel", "search", "-p", "kshape", "-d", "4", "-m", "1", "--time-limit", "2"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "device 0" in err and err.count("\n") == 1


def test_search_cli_inference_and_z3(capsys) -> None:
    code = main(["tessel", "search", "-p", "xshape", "-d", "4", "--inference", "--solver", "z3", "-n", "4",
                 "--time-limit", "4"])  # fmt: skip
    assert code == 0
    assert "period 2 optimal" in capsys.readouterr().out
