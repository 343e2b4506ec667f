"""HATA inside transformers generate(): tiny random Llama/Qwen2 models (fast) and SmolLM2 (slow)."""

from __future__ import annotations

import warnings

import pytest
import torch

from lmexec.errors import UserError
from lmexec.hata import enable
from lmexec.hata.budget import Budget
from lmexec.hata.codes import random_projection
from lmexec.hata.hf.attention import select_valid
from lmexec.hata.hf.cache import HataCache
from lmexec.hata.selection import METHODS

transformers = pytest.importorskip("transformers")


def tiny(family: str = "llama", layers: int = 4, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
    )
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=None))
    return model.to(dtype).eval()


def hash_weights(
    layers: int, kv_heads: int = 2, head_dim: int = 16, bits: int = 64
) -> dict[int, torch.Tensor]:
    return {layer: random_projection(kv_heads, head_dim, bits, 100 + layer) for layer in range(layers)}


def greedy(model, ids, steps=12, **kwargs):
    return model.generate(ids, max_new_tokens=steps, do_sample=False, pad_token_id=0, **kwargs)


def check_full_budget_equals_dense(model, ids, method: str) -> None:
    """With a budget covering the context, ``method`` decodes ``ids`` (12 greedy steps) to dense's tokens
    while every decode step of layers 1..3 goes through the sparse path."""
    dense = greedy(model, ids)
    weights = hash_weights(4) if method == "hata" else None
    handle = enable(model, weights=weights, budget=4096, method=method, bits=64, dense_layers=1)
    cache = handle.cache()
    out = greedy(model, ids, cache=cache)
    assert torch.equal(out, dense)
    if method != "dense":
        assert cache.settings.stats["steps"] == (12 - 1) * 3
    handle.disable()


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_budget_covering_context_equals_dense(family, method):
    ids = torch.randint(1, 96, (1, 120), generator=torch.Generator().manual_seed(1))
    check_full_budget_equals_dense(tiny(family), ids, method)


def test_small_budget_goes_sparse_and_sampling_works():
    model = tiny()
    ids = torch.randint(1, 96, (2, 200), generator=torch.Generator().manual_seed(2))
    handle = enable(
        model, method="simhash", budget=16, bits=64, dense_layers=1, sink=2, recent=4, record_recall=True
    )
    cache = handle.cache()
    out = greedy(model, ids, steps=8, cache=cache)
    assert out.shape == (2, 208)
    assert 0 < cache.settings.mean_recall < 1
    # sampling: a budget covering the context reproduces dense sampling under the same seed
    full = enable(model, method="simhash", budget=0.99999, bits=64, dense_layers=1)
    kwargs = dict(max_new_tokens=10, do_sample=True, top_k=20, temperature=1.5, pad_token_id=0)
    torch.manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = model.generate(ids, **kwargs)  # no HataCache: dense decode (warns)
    torch.manual_seed(7)
    sampled = model.generate(ids, cache=full.cache(), **kwargs)
    assert torch.equal(sampled, reference)


def test_left_padded_batch_equals_each_sequence():
    model = tiny(dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    lengths = [90, 61, 77]
    seqs = [torch.randint(1, 96, (n,), generator=g) for n in lengths]
    width = max(lengths)
    batch = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, seq in enumerate(seqs):
        batch[row, width - len(seq) :] = seq
        mask[row, width - len(seq) :] = 1
    for method, budget in (("simhash", 12), ("oracle", 0.2), ("hata", 0.15)):
        weights = hash_weights(4) if method == "hata" else None
        handle = enable(
            model, weights=weights, method=method, budget=budget, bits=64, sink=3, recent=2, dense_layers=1
        )
        together = greedy(model, batch, steps=10, attention_mask=mask, cache=handle.cache())
        for row, seq in enumerate(seqs):
            alone = greedy(model, seq[None], steps=10, cache=handle.cache())
            assert torch.equal(together[row, width:], alone[0, len(seq) :]), (method, row)


@pytest.mark.parametrize("method", ["quest", "loki"])
def test_what_the_padding_holds_does_not_move_the_selection(method):
    """Quest's page min/max and Loki's prefill-fitted basis summarise several keys: built at prefill,
    before the padding is known, they took the pad tokens' keys in, so the pad id changed the tokens of
    the padded row (Quest) and of the unpadded one (Loki's basis is shared by the batch)."""
    model = tiny(dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(1, 96, (n,), generator=g) for n in (80, 37)]
    mask = torch.zeros(2, 80, dtype=torch.long)
    mask[0], mask[1, 43:] = 1, 1
    outputs = []
    for pad_id in (0, 61):
        batch = torch.full((2, 80), pad_id)
        batch[0], batch[1, 43:] = seqs[0], seqs[1]
        handle = enable(model, method=method, budget=0.1, sink=0, recent=1, dense_layers=1)
        out = model.generate(
            batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=pad_id,
            cache=handle.cache(), output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        handle.disable()
        outputs.append((out.sequences[:, 80:], torch.stack(out.logits, 1)))
    (tokens_a, logits_a), (tokens_b, logits_b) = outputs
    assert torch.equal(tokens_a, tokens_b)
    torch.testing.assert_close(logits_a, logits_b, atol=1e-9, rtol=1e-9)


def test_padding_is_never_selected_and_budgets_count_valid_tokens():
    n = 40
    valid = torch.ones(3, n, dtype=torch.bool)
    valid[0, :25] = False
    valid[1, :5] = False
    scores = torch.zeros(3, 2, n)
    scores[:, :, :10] = 5.0  # padding scores high: must still lose
    budget = Budget(0.25, sink=2, recent=1)
    indices, keep = select_valid(scores, budget, valid)
    for row, count in enumerate(valid.sum(-1).tolist()):
        chosen = indices[row][:, keep[row]] if keep is not None else indices[row]
        assert chosen.shape[-1] == budget.tokens(count)
        assert valid[row][chosen].all()
        first_valid = n - count
        assert {first_valid, first_valid + 1, n - 1} <= set(chosen[0].tolist())  # sink (valid) + recent


def test_decode_at_4k_context_never_copies_the_cache():
    model = tiny(layers=3)
    ids = torch.randint(1, 96, (1, 4096), generator=torch.Generator().manual_seed(4))
    handle = enable(model, method="simhash", budget=256, bits=64, dense_layers=1)
    cache = handle.cache()
    seen: list[tuple[list[int], int, int]] = []

    class Probe(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            ptrs = [layer.storage.key_buffer.data.data_ptr() for layer in cache.layers]
            ptrs += [layer.storage.value_buffer.data.data_ptr() for layer in cache.layers]
            ptrs += [b.data.data_ptr() for layer in cache.layers for b in layer.storage.extras.values()]
            seen.append((ptrs, cache.reallocations, cache.get_seq_length()))
            return scores

    out = model.generate(
        ids,
        max_new_tokens=64,
        min_new_tokens=64,
        do_sample=False,
        cache=cache,
        logits_processor=transformers.LogitsProcessorList([Probe()]),
        pad_token_id=0,
    )
    assert out.shape[1] == 4096 + 64 and len(seen) == 64
    assert seen[-1][2] == 4096 + 63
    assert all(ptrs == seen[0][0] for ptrs, _, _ in seen)  # same storage every step: no copy, no growth
    assert all(realloc == 0 for _, realloc, _ in seen)
    assert cache.settings.stats["steps"] == 63 * 2


def test_growth_is_amortised_and_output_stays_right():
    model = tiny(layers=2)
    ids = torch.randint(1, 96, (1, 30), generator=torch.Generator().manual_seed(5))
    dense = greedy(model, ids, steps=40)
    handle = enable(model, method="oracle", budget=4096, dense_layers=0, capacity=8)
    cache = handle.cache()
    cache.settings.capacity = 0
    for layer in cache.layers:  # start tiny so the decode crosses a reallocation
        layer.settings.capacity = 0
    out = greedy(model, ids, steps=40, cache=cache)
    assert torch.equal(out, dense)


def test_no_hata_cache_decodes_densely_with_a_warning():
    model = tiny()
    ids = torch.randint(1, 96, (1, 50), generator=torch.Generator().manual_seed(6))
    dense = greedy(model, ids)
    enable(model, method="simhash", budget=4)
    import lmexec.hata.hf.attention as attention

    attention._warned = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = greedy(model, ids)
    assert torch.equal(out, dense)
    assert any("without a HataCache" in str(w.message) for w in caught)


def test_bad_input_errors_name_the_problem(tmp_path):
    from lmexec.hata.weights import save_hash_weights

    model = tiny()
    with pytest.raises(UserError, match="budget must be > 0"):
        enable(model, method="simhash", budget=0)
    with pytest.raises(UserError, match="budget must be > 0"):
        enable(model, method="simhash", budget=-0.5)
    with pytest.raises(UserError, match="unknown selection method"):
        enable(model, method="nope")
    with pytest.raises(UserError, match="dense_layers"):
        enable(model, method="simhash", dense_layers=9)
    other = save_hash_weights(
        tmp_path / "other.safetensors", {i: random_projection(2, 32, 64, i) for i in range(4)}, 4
    )
    with pytest.raises(UserError, match="head_dim=32, but the model has head_dim=16"):
        enable(model, weights=other)
    deeper = save_hash_weights(tmp_path / "deep.safetensors", hash_weights(30), 30)
    with pytest.raises(UserError, match="n_layers=30, but the model has n_layers=4"):
        enable(model, weights=deeper)
    partial = {0: random_projection(2, 16, 64, 0)}
    with pytest.raises(UserError, match="no projection for sparse layer"):
        enable(model, weights=partial)
    with pytest.raises(UserError, match="needs learned hash weights"):
        enable(model, method="hata")
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    )
    with pytest.raises(UserError, match="model family 'gpt2' is not supported"):
        enable(gpt2, method="simhash")
    windowed = tiny("mistral")
    windowed.config.sliding_window = 16  # Mistral's window is on whenever it is set
    with pytest.raises(UserError, match="sliding attention window is not supported"):
        enable(windowed, method="simhash")
    qwen = tiny("qwen2")
    qwen.config.sliding_window, qwen.config.use_sliding_window = 16, False  # off: accepted
    enable(qwen, method="simhash").disable()


def test_cache_is_a_transformers_cache():
    model = tiny()
    handle = enable(model, method="quest", budget=32)
    cache = handle.cache()
    assert isinstance(cache, transformers.Cache) and isinstance(cache, HataCache)
    model(torch.randint(1, 96, (1, 20)), cache=cache, use_cache=True)
    assert cache.get_seq_length() == 20 and cache.get_max_length() == -1
    assert cache.get_mask_sizes(1, 0) == (21, 0)


@pytest.mark.slow
def test_smollm2_full_budget_generate_equals_dense():
    from lmexec.hata.hf.enable import default_weights_file
    from lmexec.hata.hf.tasks import passkey_prompt
    from lmexec.hata.models import load_model

    torch.set_num_threads(2)
    model, tokenizer = load_model("smollm2")
    sample = passkey_prompt(tokenizer, 1024, depth=0.4, seed=0)
    ids = sample.input_ids[None]
    dense = greedy(model, ids, steps=16)
    weights = default_weights_file(model)
    method = "hata" if weights else "simhash"
    handle = enable(model, method=method, budget=ids.shape[1] + 16)
    out = greedy(model, ids, steps=16, cache=handle.cache())
    handle.disable()
    assert torch.equal(out, dense)


@pytest.mark.parametrize("sink,recent", [(0, 1), (3, 2)])
def test_fused_hash_selection_equals_select_valid_without_padding(sink, recent):
    """Decode without padding takes the fused score + top-k kernel; it must choose exactly what
    ``select_valid`` chooses from the scores (ties to the earlier key: 32-bit codes tie often)."""
    from lmexec.hata.cache import LayerCache
    from lmexec.hata.selection import SimHash

    gen = torch.Generator().manual_seed(9)
    keys, values = torch.randn(2, 3, 777, 16, generator=gen), torch.randn(2, 3, 777, 16, generator=gen)
    query = torch.randn(2, 6, 16, generator=gen)
    cache = LayerCache.from_prefill(keys, values)
    method = SimHash(bits=32)
    method.prepare(cache, 0)
    for budget in (Budget(40, sink, recent), Budget(0.1, sink, recent), Budget(5000, sink, recent)):
        fused = method.select(query, cache, 0, budget)
        want, keep = select_valid(method.scores(query, cache, 0), budget, None)
        assert keep is None
        assert torch.equal(fused, want)


def test_fused_attend_equals_the_select_then_gather_path():
    """Without padding a hash method's decode step is one fused kernel (``attend``); with
    ``record_recall`` the integration needs the indices and takes select + gather. Same logits."""
    model = tiny()
    ids = torch.randint(1, 96, (2, 300), generator=torch.Generator().manual_seed(5))
    runs = []
    for record in (False, True):
        handle = enable(
            model,
            method="simhash",
            budget=24,
            bits=64,
            dense_layers=1,
            sink=1,
            recent=2,
            record_recall=record,
        )
        cache = handle.cache()
        out = model.generate(
            ids, max_new_tokens=6, do_sample=False, pad_token_id=0, cache=cache,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        assert cache.settings.stats["steps"] == 5 * 3
        runs.append(out)
        handle.disable()
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for fused, separate in zip(runs[0].logits, runs[1].logits, strict=True):
        torch.testing.assert_close(fused, separate, atol=1e-5, rtol=1e-5)


def test_a_weights_file_must_match_the_asked_bits_and_the_model(tmp_path):
    from lmexec.hata.weights import model_signature, save_hash_weights

    model = tiny()
    w64 = {i: random_projection(2, 16, 64, i) for i in range(4)}
    path = save_hash_weights(tmp_path / "w64.safetensors", w64, 4)
    assert enable(model, weights=path).method.bits == 64  # no bits asked: the file's own width
    with pytest.raises(UserError, match="hold 64-bit codes, but 128 bits were asked for"):
        enable(model, weights=path, bits=128)
    other = tiny(layers=4, seed=1)
    other.config.rope_theta = 1234.0
    foreign = save_hash_weights(
        tmp_path / "foreign.safetensors", w64, 4, extra={"model_config": model_signature(other.config)}
    )
    with pytest.raises(UserError, match="trained for another model"):
        enable(model, weights=foreign)


def test_enable_refuses_empty_or_mismatched_weights_and_bad_capacity():
    model = tiny()
    with pytest.raises(UserError, match="hold no layers"):
        enable(model, weights={}, dense_layers=4)
    with pytest.raises(UserError, match="64 bits but 128 were requested"):
        enable(model, weights=hash_weights(4), bits=128)
    assert enable(model, weights=hash_weights(4)).method.bits == 64
    from lmexec.hata.selection import Hata

    with pytest.raises(UserError, match="no projection for sparse layer"):  # an instance is checked too
        enable(model, method=Hata(hash_weights(2)), dense_layers=1)
    with pytest.raises(UserError, match=r"shape \[3, 16, 64\] but the model needs \[n_kv_heads=2"):
        enable(model, method=Hata(hash_weights(4, kv_heads=3)))
    assert enable(model, method=Hata(hash_weights(4)[3])).method.bits == 64  # one W for every layer
    from lmexec.hata.selection import Loki, SparQ

    for method in (Loki(rank=1000), SparQ(rank=17)):  # head_dim 16
        with pytest.raises(UserError, match="rank must be between 1 and head_dim=16"):
            enable(model, method=method)
    for capacity in ("10", 5000.5, -1, True):
        with pytest.raises(UserError, match="capacity must be a whole number"):
            enable(model, method="simhash", capacity=capacity)


def test_disable_restores_the_implementation_from_before_the_first_enable():
    model = tiny()
    model.set_attn_implementation("eager")
    first = enable(model, method="simhash")
    second = enable(model, method="simhash")
    second.disable()
    assert model.config._attn_implementation == "eager"
    first.disable()
    assert model.config._attn_implementation == "eager"


def test_handle_generate_uses_a_cache_passed_as_past_key_values():
    """``handle.generate(..., past_key_values=c)`` set its own fresh cache beside it, so transformers
    ignored ``c`` (with a warning) and ``c`` recorded nothing."""
    model = tiny()
    handle = enable(model, method="oracle", budget=16, dense_layers=1)
    ids = torch.randint(1, 96, (1, 40), generator=torch.Generator().manual_seed(1))
    cache = handle.cache()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, past_key_values=cache)
    assert not [w for w in caught if "ignoring" in str(w.message)]
    assert cache.settings.stats["steps"] == 4 * 3 and cache.get_seq_length() == 44
    handle.disable()
