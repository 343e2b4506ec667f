"""CLI input errors: one line on stderr, exit code 2, no traceback, before any model is loaded."""

import pytest

from lmexec.cli import main


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--budget", "0"], "budget must be > 0"),
        (["--budget", "-3"], "budget must be > 0"),
        (["--budget", "many"], "budget must be a number"),
        (["--budgets", "64,0"], "budget must be > 0"),
        (["--bits", "100"], "hash bits must be one of 32, 64, 128, 256"),
        (["--methods", "dense,magic"], "unknown method(s) magic"),
        (["--methods", "hata", "--bits", "64"], "lmexec hata train"),  # no shipped 64-bit weights
        (["--texts", "poetry"], "unknown text kind(s) poetry"),
        (["--positions", "0"], "--positions must be between 1"),
        (["--context", "8"], "--context must be at least 64"),
        (["--seed", str(2**80)], "--seed must be a whole number in 0..2**63-1"),
        (["--budget", "4", "--sink", "4", "--recent", "4"], "count inside the budget"),
        (["--methods", "simhash,simhash"], "--methods lists simhash more than once"),  # summed twice
        (["--context", "512", "--budgets", "64,1024"], "--budgets 1024 exceed --context 512"),  # was dropped
        (
            ["--model", "no-such-model", "--context", "64", "--positions", "1"],
            "unknown model 'no-such-model'",
        ),
    ],
)
def test_bad_input_is_one_line_error(capsys, flags, message):
    assert main(["hata", "fidelity", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_missing_weights_file_is_a_clear_error(capsys, tmp_path):
    missing = tmp_path / "w.safetensors"
    code = main(["hata", "fidelity", "--methods", "hata", "--hata-weights", str(missing), "--context", "64"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"hash weights file {missing} does not exist" in err and "lmexec hata train" in err


def test_help_lists_fidelity(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["hata", "--help"])
    assert exit_info.value.code == 0
    assert "fidelity" in capsys.readouterr().out


def test_tokens_past_the_position_table_are_refused():
    from types import SimpleNamespace

    from lmexec.errors import UserError
    from lmexec.hata.models import check_positions

    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=8192))
    check_positions(model, 8192, "--context")
    with pytest.raises(UserError, match="--context 8193 exceeds the model's 8192 positions"):
        check_positions(model, 8193, "--context")


def _model_folder(tmp_path, kind):
    from transformers import GPT2Config, LlamaConfig

    folder = tmp_path / kind
    folder.mkdir()
    if kind == "broken-json":
        (folder / "config.json").write_text("{not json")
    elif kind == "gpt2":
        GPT2Config(n_layer=1, n_embd=64, n_head=2).save_pretrained(folder)
    else:  # a llama config without its weights, or with a damaged weights file
        LlamaConfig(hidden_size=64, num_attention_heads=2, num_hidden_layers=1).save_pretrained(folder)
        if kind == "truncated-weights":
            (folder / "model.safetensors").write_bytes(b"\x10" * 200)
    return folder


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("broken-json", "cannot load the config in"),
        ("gpt2", "model family 'gpt2' is not supported"),
        ("config-only", "cannot load the model in"),
        ("truncated-weights", "cannot load the model in"),
    ],
)
@pytest.mark.parametrize("command", ["fidelity", "train"])
def test_model_folders_transformers_cannot_use_are_one_line_errors(capsys, tmp_path, kind, message, command):
    folder = _model_folder(tmp_path, kind)
    extra = ["--positions", "2"] + (["--out", str(tmp_path / "w.safetensors")] if command == "train" else [])
    assert main(["hata", command, "--model", str(folder), "--context", "64", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--budgets", "64,64"], "--budgets lists 64 more than once"),  # one sample printed as 2/2
        (["--methods", "oracle,oracle"], "--methods lists oracle more than once"),
        (["--contexts", "256,256"], "--contexts lists 256 more than once"),
    ],
)
def test_eval_refuses_a_list_that_repeats_a_value(capsys, flags, message):
    assert main(["hata", "eval", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_shipped_weights_are_found_for_our_converted_model_folder():
    """``fidelity --model <our smollm2 folder>`` refused the weights ``eval`` and ``enable`` found there."""
    from lmexec.hata.weights import default_weights

    shipped = default_weights("smollm2", 128)
    assert shipped is not None and shipped.is_file()
    assert default_weights("/root/.cache/lmexec/models/smollm2", 128) == shipped
    assert default_weights("smollm2", 64) is None and default_weights("/models/llama-3", 128) is None
