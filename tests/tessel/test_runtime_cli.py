"""``lmexec tessel train`` end to end on 2 processes (tiny model): table, JSON, trace and picture."""

from __future__ import annotations

import json

import pytest

from lmexec.cli import main


@pytest.mark.slow
def test_train_cli_compares_schedules(tmp_path):
    out, trace, png, prof = (tmp_path / n for n in ("run.json", "trace.json", "gantt.png", "placement.json"))
    args = ["tessel", "train", "--devices", "2", "--placement", "zerobubble", "--layers", "2", "--hidden", "32",
            "--heads", "2", "--vocab", "64", "--seq-len", "8", "--micro-batches", "4", "--steps", "2",
            "--schedule", "searched,1f1b,gpipe,zbh1", "--repeats", "2", "--time-limit", "5", "--json", str(out),
            "--trace", str(trace), "--png", str(png), "--profile-out", str(prof)]  # fmt: skip
    assert main(args) == 0
    data = json.loads(out.read_text())
    runs = {r["name"]: r for r in data["runs"]}
    assert list(runs) == ["searched", "1f1b", "gpipe", "zbh1"]
    first = runs["searched"]["losses"]
    for run in runs.values():  # same model, data and maths: the order must not change the loss
        assert run["losses"] == pytest.approx(first, abs=1e-5)
        assert run["makespan_ratio"] > 0 and len(run["step_ms"]) == 2
        assert {e["kind"] for e in run["events"]} == {"F", "I", "W"}
    assert first[1] < first[0]  # it trains
    names = {
        e["args"]["name"] for e in json.loads(trace.read_text())["traceEvents"] if e["name"] == "process_name"
    }
    assert "searched: planned" in names and any(n.startswith("searched: measured") for n in names)
    assert png.stat().st_size > 10_000
    assert json.loads(prof.read_text())["name"] == "zerobubble-profiled"
