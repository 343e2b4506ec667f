"""The eval machinery on a tiny random model (fast), the CLI's input errors, and the tasks."""

from __future__ import annotations

import pytest
import torch

from lmexec.cli import main
from lmexec.hata.budget import Budget
from lmexec.hata.hf.cache import HataSettings
from lmexec.hata.hf.evaluate import decode, plot_eval, prefill, summarize
from lmexec.hata.selection import SimHash

transformers = pytest.importorskip("transformers")


def test_shared_prefill_and_forks_reproduce_generate(tmp_path):
    from lmexec.hata import enable

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(1, 96, (300,), generator=torch.Generator().manual_seed(1))
    handle = enable(model, method="simhash", budget=24, bits=64, dense_layers=1)
    expected = model.generate(
        ids[None], max_new_tokens=10, do_sample=False, pad_token_id=0, cache=handle.cache()
    )
    base, first = prefill(model, ids, dense_layers=1)
    for _ in range(2):  # forks leave the shared prefill untouched
        settings = HataSettings(SimHash(bits=64), Budget(24), 1)
        tokens, logits, _ = decode(model, base.fork(settings), first, 10)
        assert torch.equal(tokens, expected[0, 300:])
        assert logits.shape == (9, 96)
    assert base.get_seq_length() == 300


def test_summary_counts_retention_against_dense(tmp_path):
    common = {"context": 1024, "prompt_tokens": 1024, "recall": None, "decode_s_per_token": 0.1}
    records = []
    for depth, dense_ok, hata_ok in ((0.1, True, True), (0.5, True, False), (0.9, False, True)):
        records.append(
            {
                **common,
                "task": "passkey",
                "depth": depth,
                "method": "dense",
                "budget": None,
                "budget_label": "all",
                "budget_tokens": 1024,
                "correct": dense_ok,
                "dense_correct": dense_ok,
            }
        )
        records.append(
            {
                **common,
                "task": "passkey",
                "depth": depth,
                "method": "hata",
                "budget": 0.0625,
                "budget_label": "1/16",
                "budget_tokens": 64,
                "correct": hata_ok,
                "dense_correct": dense_ok,
            }
        )
    rows = {r["method"]: r for r in summarize(records)}
    assert rows["dense"]["accuracy"] == pytest.approx(2 / 3) and rows["dense"]["retained"] == 1.0
    assert rows["hata"]["accuracy"] == pytest.approx(2 / 3) and rows["hata"]["retained"] == 0.5
    png = plot_eval(
        {"rows": list(rows.values()), "model": {"name": "t"}, "config": {"dense_layers": 2}},
        str(tmp_path / "p.png"),
    )
    assert (tmp_path / "p.png").stat().st_size > 1000 and png.endswith("p.png")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--task", "poem"], "unknown task 'poem'"),
        (["--budgets", "64,0"], "budget must be > 0"),
        (["--budgets", "-1"], "budget must be > 0"),
        (["--methods", "dense,magic"], "unknown method 'magic'"),
        (["--contexts", "1k"], "--contexts must be comma-separated whole numbers"),
        (["--depths", "1.5"], "depths must lie in [0, 1]"),
        (["--depths", ""], "--depths needs at least one value"),
        (["--task", ""], "--task needs at least one value"),
        (["--bits", "100"], "hash bits must be one of"),
        (["--dense-layers", "-1", "--methods", "simhash"], "--dense-layers must be >= 0"),
        (["--model", "gpt2-nowhere", "--contexts", "128"], "unknown model 'gpt2-nowhere'"),
    ],
)
def test_eval_bad_input_is_one_line_error(capsys, flags, message):
    assert main(["hata", "eval", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_tasks_are_deterministic_and_fit_the_context():
    from lmexec.hata.hf.tasks import lm_sample, niah_prompt, passkey_prompt

    class Chars:  # one token per character: enough to check lengths and placement
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 5000 for c in text]}

    tok = Chars()
    a, b = passkey_prompt(tok, 2000, 0.5, seed=3), passkey_prompt(tok, 2000, 0.5, seed=3)
    assert torch.equal(a.input_ids, b.input_ids) and a.answer == b.answer and len(a.answer) == 5
    assert a.input_ids.shape[0] <= 2000
    n = niah_prompt(tok, 3000, 0.9)
    text = "".join(chr(i) for i in n.input_ids.tolist())
    assert n.answer in text and text.index(n.answer) > 0.8 * len(text) * 0.9 and n.input_ids.shape[0] <= 3000
    lm = lm_sample(tok, 500, steps=16)
    assert lm.input_ids.shape[0] == 500 and lm.targets.shape[0] == 16
