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


TINY = ["--hidden", "32", "--heads", "2", "--vocab", "64", "--seq-len", "8", "-n", "2", "--steps", "1",
        "--time-limit", "2"]  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lr", "nan"], "--lr: expected a positive finite number"),
        (["--lr", "-1"], "--lr: expected a positive finite number"),
        (["--timeout", "0"], "--timeout: expected a positive finite number"),
        (["--warmup", "-1"], "--warmup: expected a whole number >= 0"),
        (
            ["--layers", "2", "-d", "3", "-p", "vshape", "--split", "1,0,1"],
            "leaves stage(s) [1] without a layer",
        ),
        (
            ["--layers", "2", "-d", "2", "-p", "vshape", "--split", "1,2"],
            "must be non-negative and add up to 2",
        ),
        (["--layers", "2", "-d", "5", "-p", "vshape"], "5 stages need at least 3 layers"),
    ],
)
def test_train_mistakes_are_refused_before_any_rank_starts(capsys, monkeypatch, flags, message):
    import lmexec.tessel.runtime.launcher as launcher

    monkeypatch.setattr(launcher, "launch", lambda *a, **k: pytest.fail("a rank was started"))
    try:
        code = main(["tessel", "train", *TINY, *flags])
    except SystemExit as exit_info:  # flag errors leave through argparse
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_split_must_match_a_json_placement(tmp_path, capsys, monkeypatch):
    import lmexec.tessel.runtime.launcher as launcher
    from lmexec.tessel.shapes import build_placement

    monkeypatch.setattr(launcher, "launch", lambda *a, **k: pytest.fail("a rank was started"))
    path = tmp_path / "v2.json"
    build_placement("vshape", 2).to_json(path)
    assert (
        main(["tessel", "train", *TINY, "--layers", "3", "-p", str(path), "-s", "gpipe", "--split", "9,9,9"])
        == 2
    )
    assert "layer split lists 3 stages but the placement has 2" in capsys.readouterr().err
    assert main(["tessel", "train", *TINY, "--layers", "3", "-p", str(path), "--warmup", "3"]) == 2
    assert "--warmup apply when a built-in placement is profiled" in capsys.readouterr().err


def test_even_split_gives_every_middle_stage_a_layer():
    from lmexec.tessel.runtime.model import split_layers

    assert split_layers(2, 4, None) == [0, 1, 1, 0]
    assert split_layers(3, 4, None) == [0, 1, 1, 1]
    assert split_layers(8, 2, None) == [4, 4]
    assert all(c > 0 for c in split_layers(5, 7, None)[1:-1])
