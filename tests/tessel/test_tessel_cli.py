"""The tessel CLI: figures on stdout, files on request, one-line errors for user mistakes."""

import json

import pytest

from lmexec.cli import main
from lmexec.tessel.placement import Placement


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_placements_lists_every_builtin(capsys, tmp_path):
    code, out, _ = run(capsys, "tessel", "placements", "--json", str(tmp_path / "p.json"))
    assert code == 0 and "kshape" in out and "zerobubble" in out
    names = [p["name"] for p in json.loads((tmp_path / "p.json").read_text())["placements"]]
    assert "alphafold" in names and len(names) == 10


def test_show_draws_and_exports(capsys, tmp_path):
    code, out, _ = run(capsys, "tessel", "show", "-p", "mshape", "-d", "4", "--png", str(tmp_path / "m.png"),
                       "--export", str(tmp_path / "m.json"))  # fmt: skip
    assert code == 0 and "embed.f" in out
    assert (tmp_path / "m.png").stat().st_size > 1000
    assert Placement.load(tmp_path / "m.json").name == "mshape"


def test_baseline_writes_json_png_trace_and_a_valid_schedule(capsys, tmp_path):
    code, out, _ = run(
        capsys, "tessel", "baseline", "--placement", "vshape", "--devices", "4", "--micro-batches", "8",
        "--schedule", "1f1b", "--png", str(tmp_path / "o.png"), "--json", str(tmp_path / "o.json"),
        "--trace", str(tmp_path / "t.json"), "--save", str(tmp_path / "s.json"),
    )  # fmt: skip
    assert code == 0 and "44" in out
    data = json.loads((tmp_path / "o.json").read_text())
    assert data["schedules"]["1f1b"]["metrics"]["makespan"] == 44 and data["lower_bound"] == 44
    assert (tmp_path / "o.png").stat().st_size > 1000
    trace = json.loads((tmp_path / "t.json").read_text())
    assert sum(e["ph"] == "X" for e in trace["traceEvents"]) == 8 * 8
    code, out, _ = run(capsys, "tessel", "validate", str(tmp_path / "s.json"))
    assert code == 0 and out.startswith("valid")


def test_baseline_all_marks_memory_violations(capsys, tmp_path):
    code, out, _ = run(capsys, "tessel", "baseline", "-p", "vshape", "-d", "4", "-n", "8", "-m", "4",
                       "--json", str(tmp_path / "o.json"))  # fmt: skip
    data = json.loads((tmp_path / "o.json").read_text())["schedules"]
    assert data["1f1b"]["violations"] == []
    assert data["gpipe"]["violations"] and "exceeds capacity 4" in data["gpipe"]["violations"][0]


def test_file_placement_and_memory_list(capsys, tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"devices": 2, "blocks": [
        {"name": "a", "duration": 1, "memory": 1, "devices": [0]},
        {"name": "b", "duration": 2, "memory": 1, "devices": [1], "after": ["a"]},
        {"name": "c", "kind": "backward", "duration": 2, "memory": -1, "devices": [1], "after": ["b"]},
        {"name": "d", "kind": "backward", "duration": 2, "memory": -1, "devices": [0], "after": ["c"]},
    ]}))  # fmt: skip
    code, out, _ = run(capsys, "tessel", "baseline", "-p", str(path), "-n", "3", "-m", "3,2")
    assert code == 0 and "gpipe" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["tessel", "show", "-p", "nope", "-d", "4"], "unknown placement 'nope'"),
        (["tessel", "show", "-p", "vshape"], "needs --devices"),
        (["tessel", "show", "-p", "kshape", "-d", "3"], "even device count"),
        (["tessel", "baseline", "-p", "mshape", "-d", "4", "-s", "1f1b"], "does not apply"),
        (["tessel", "baseline", "-p", "vshape", "-d", "4", "--set", "B.duration"], "bad override"),
        (["tessel", "baseline", "-p", "vshape", "-d", "4", "-m", "0.5"], "needs memory 1 on device 0"),
        (["tessel", "show", "-p", "/no/such/file.json"], "cannot read placement file"),
        (["tessel", "baseline", "-p", "vshape", "-d", "4", "--png", "x.png"], "--png write one schedule"),
    ],
)
def test_user_mistakes_give_one_line_errors(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_malformed_json_file_is_one_line(capsys, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"devices": 2, "blocks": [{"name": "a", "duration": -1, "devices": [0]}]}')
    code, _, err = run(capsys, "tessel", "show", "-p", str(path))
    assert code == 2 and "non-positive duration" in err and err.count("\n") == 1


def test_schedule_file_without_a_key_names_it(capsys, tmp_path):
    path = tmp_path / "schedule.json"
    path.write_text('{"micro_batches": 2, "tasks": []}')
    code, _, err = run(capsys, "tessel", "validate", str(path))
    assert code == 2 and "missing the key 'placement'" in err and err.count("\n") == 1


def baseline_file(capsys, path, schedule="1f1b", output="--json"):
    """Run ``tessel baseline`` on vshape (4 devices, 4 micro-batches) writing ``path``; return it."""
    args = ("tessel", "baseline", "-p", "vshape", "-d", "4", "-n", "4", "-s", schedule, output, str(path))
    assert run(capsys, *args)[0] == 0
    return path


def test_validate_reads_the_one_schedule_of_a_baseline_report(capsys, tmp_path):
    report = baseline_file(capsys, tmp_path / "report.json")
    code, out, _ = run(capsys, "tessel", "validate", str(report))
    assert code == 0 and out.startswith("valid")


def test_validate_explains_reports_it_cannot_read(capsys, tmp_path):
    both = baseline_file(capsys, tmp_path / "both.json", "all")
    code, _, err = run(capsys, "tessel", "validate", str(both))
    assert code == 2 and "report of 2 schedules (gpipe, 1f1b)" in err and "--save" in err
    searched = tmp_path / "search.json"
    assert (
        run(capsys, "tessel", "search", "-p", "vshape", "-d", "2", "-n", "4", "--json", str(searched))[0] == 0
    )
    code, _, err = run(capsys, "tessel", "validate", str(searched))
    assert code == 2 and "search --json report" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tessel", "baseline", "-p", "vshape", "-n", "0"], "expected a positive integer, got 0"),
        (["tessel", "search", "-p", "vshape", "-n", "0"], "expected a positive integer, got 0"),
        (["tessel", "search", "-p", "vshape", "--workers", "0"], "expected a positive integer, got 0"),
        (["hata", "bench", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_flags_are_one_line_errors_too(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "--help" in err
    assert err.count("\n") == 1 and "usage:" not in err


def test_validate_flags_starts_that_are_not_finite(capsys, tmp_path):
    saved = baseline_file(capsys, tmp_path / "s.json", output="--save")
    data = json.loads(saved.read_text())
    data["tasks"][0]["start"] = float("nan")
    data["tasks"][1]["block"] = "no-such-block"
    saved.write_text(json.dumps(data))
    code, out, _ = run(capsys, "tessel", "validate", str(saved), "--png", str(tmp_path / "v.png"))
    assert code == 1 and "[bad-start]" in out and "[unknown]" in out and "INVALID" in out
    assert out.count("never runs") == 1  # the renamed task's; the NaN one is reported once, as bad-start
    data["tasks"][0]["micro_batch"] = 1.5
    saved.write_text(json.dumps(data))
    code, _, err = run(capsys, "tessel", "validate", str(saved))
    assert code == 2 and "micro_batch must be a whole number, got 1.5" in err


def test_memory_limits_that_are_not_numbers_are_refused(capsys, tmp_path):
    path = tmp_path / "p.json"
    path.write_text(
        '{"devices": 1, "capacity": NaN, "blocks": [{"name": "f", "duration": 1, "memory": 1, "devices": [0]}]}'
    )
    code, _, err = run(capsys, "tessel", "show", "-p", str(path))
    assert code == 2 and "capacity must be a number" in err
    with pytest.raises(SystemExit):
        main(["tessel", "search", "-p", "vshape", "-d", "2", "-m", "nan"])
    assert "memory must be a number" in capsys.readouterr().err


def test_static_memory_flag_keeps_the_files_capacity(capsys, tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"devices": 1, "capacity": 4, "blocks": [{"name": "f", "kind": "forward", "duration": 1, "memory": 1, "devices": [0]},'
                    ' {"name": "b", "kind": "backward", "duration": 1, "memory": -1, "devices": [0], "after": ["f"]}]}')  # fmt: skip
    code, out, _ = run(
        capsys,
        "tessel",
        "baseline",
        "-p",
        str(path),
        "-n",
        "8",
        "-s",
        "gpipe",
        "--static-memory",
        "1",
        "--json",
        str(tmp_path / "o.json"),
    )
    assert code == 0
    report = json.loads((tmp_path / "o.json").read_text())
    assert report["placement"]["capacity"] == [4.0] and report["placement"]["static_memory"] == [1.0]
    assert report["schedules"]["gpipe"]["violations"]


def test_output_paths_are_checked_before_the_work(capsys, tmp_path):
    for flag, value, message in [
        ("--png", str(tmp_path / "out.txt"), "a picture path ends in"),
        ("--json", str(tmp_path), "is a folder"),
        ("--save", str(tmp_path / "file.txt" / "x.json"), "not a writable folder"),
    ]:
        (tmp_path / "file.txt").write_text("")
        with pytest.raises(SystemExit):
            main(["tessel", "baseline", "-p", "vshape", "-d", "2", "-n", "2", flag, value])
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def test_user_names_with_brackets_print_as_given(capsys, tmp_path):
    path = tmp_path / "p.json"
    path.write_text(
        '{"name": "net[bold]", "devices": 1, "blocks": [{"name": "layer[x]", "duration": 1, "memory": 0, "devices": [0]}]}'
    )
    code, out, _ = run(capsys, "tessel", "show", "-p", str(path))
    assert code == 0 and "layer[x]" in out and "net[bold]" in out


def test_output_paths_may_be_existing_files_and_new_folders(capsys, tmp_path):
    from lmexec.reporting import output_path

    existing = tmp_path / "old.json"
    existing.write_text("{}")
    assert output_path(str(existing)) == str(existing)
    export = tmp_path / "new" / "folder" / "p.json"
    code, _, _ = run(capsys, "tessel", "show", "-p", "vshape", "-d", "2", "--export", str(export))
    assert code == 0 and json.loads(export.read_text())["devices"] == 2
