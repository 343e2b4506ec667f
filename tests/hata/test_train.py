"""Trainer on synthetic problems: loss goes down, learned codes beat SimHash, resume equals one run."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmexec.errors import UserError
from lmexec.hata.budget import Budget
from lmexec.hata.codes import random_projection
from lmexec.hata.training.data import LayerData, capture_layers, sample_positions
from lmexec.hata.training.recipes import get_recipe, train_layer
from lmexec.hata.training.trainer import Hooks, TrainConfig, partial_dir, train_layers
from lmexec.hata.training.validate import code_recall
from lmexec.hata.weights import load_for_model, load_hash_weights, model_signature, read_metadata

H_KV, G, D = 2, 2, 16


def synthetic(seed: int, texts: int = 2, length: int = 256, positions: int = 24, near: int = 8) -> LayerData:
    """q.k lives in dims 0..3; keys carry large nuisance dims 4..15 that spoil SimHash's angles.

    Each query (shared direction within a GQA group) has ``near`` keys generated close to it, so the
    top of every ranking is known, and the right ``W`` looks only at the signal subspace.
    """
    g = torch.Generator().manual_seed(seed)
    keys = torch.cat(
        [
            torch.randn(texts, H_KV, length, 4, generator=g),
            6 * torch.randn(texts, H_KV, length, D - 4, generator=g),
        ],
        dim=-1,
    )
    pos = torch.stack([sample_positions(length, positions, g) for _ in range(texts)])
    base = 2 * torch.randn(texts, H_KV, 1, positions, 4, generator=g)
    q_signal = (base + 0.3 * torch.randn(texts, H_KV, G, positions, 4, generator=g)).reshape(
        texts, H_KV * G, positions, 4
    )
    queries = torch.cat([q_signal, torch.zeros(texts, H_KV * G, positions, D - 4)], dim=-1)
    for b in range(texts):
        for p in range(positions):
            idx = torch.randperm(int(pos[b, p]) + 1, generator=g)[:near]
            keys[b, :, idx, :4] = 1.5 * base[b, :, 0, p, None, :] + 0.1 * torch.randn(
                H_KV, len(idx), 4, generator=g
            )
    return LayerData(queries, keys, pos)


@pytest.mark.parametrize("recipe_name", ["paper", "rank"])
def test_loss_decreases(recipe_name):
    data = synthetic(0)
    losses: list[float] = []
    recipe = get_recipe(recipe_name, epochs=20 if recipe_name == "rank" else 2)
    train_layer(recipe, data, 32, seed=1, tick=losses.append)
    assert len(losses) == recipe.steps(2) == (20 if recipe_name == "rank" else 40)
    assert losses[-1] < losses[0]
    assert sum(losses[-5:]) < sum(losses[:5])


def test_learned_codes_beat_simhash_on_held_out_data():
    train, held_out = synthetic(0, texts=4), synthetic(1)
    budget = Budget(8, 0, 1)
    simhash = code_recall(random_projection(H_KV, D, 32, 3), held_out, budget)
    for name in ("rank", "paper"):
        w = train_layer(get_recipe(name, epochs=20 if name == "rank" else 3), train, 32, seed=3)
        learned = code_recall(w, held_out, budget)
        assert learned.recall > simhash.recall + 0.04, name
        assert learned.mass > simhash.mass, name


def test_training_is_deterministic():
    data = synthetic(0)
    recipe = get_recipe("rank", epochs=3)
    assert torch.equal(train_layer(recipe, data, 64, seed=5), train_layer(recipe, data, 64, seed=5))
    assert not torch.equal(train_layer(recipe, data, 64, seed=5), train_layer(recipe, data, 64, seed=6))


class _Killed(Exception):
    pass


def _capture_log(log: list[list[int]]):
    def capture(todo):
        log.append(list(todo))
        return {layer: synthetic(10 + layer) for layer in todo}, {
            layer: synthetic(100 + layer, positions=6) for layer in todo
        }

    return capture


def test_resumed_run_equals_uninterrupted(tmp_path):
    config = TrainConfig(model="synthetic", bits=32, recipe="rank", epochs=1, dense_layers=1)
    whole = tmp_path / "whole.safetensors"
    train_layers(config, _capture_log([]), 5, "sig", whole, Hooks())

    out = tmp_path / "resumed.safetensors"
    seen: list[int] = []

    def kill_after_two(result):
        seen.append(result.layer)
        if len(seen) == 2:
            raise _Killed

    with pytest.raises(_Killed):
        train_layers(config, _capture_log([]), 5, "sig", out, Hooks(layer_done=kill_after_two))
    assert not out.exists()
    assert sorted(p.name for p in partial_dir(out).glob("layer-*")) == [
        "layer-001.safetensors",
        "layer-002.safetensors",
    ]

    log: list[list[int]] = []
    messages: list[str] = []
    result = train_layers(config, _capture_log(log), 5, "sig", out, Hooks(message=messages.append))
    assert log == [[3, 4]]  # only the unfinished layers are captured and trained again
    assert any("resuming: 2 of 4" in m for m in messages)
    assert [r.resumed for r in result.layers] == [True, True, False, False]
    assert not partial_dir(out).exists()
    a = load_hash_weights(whole, 5, H_KV, D, 32)
    b = load_hash_weights(out, 5, H_KV, D, 32)
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    assert all(torch.equal(a[layer], b[layer]) for layer in a)
    meta = read_metadata(out)
    assert meta["model_config"] == "sig" and '"name": "rank"' in meta["recipe"]


def test_changed_settings_start_afresh(tmp_path):
    out = tmp_path / "w.safetensors"
    config = TrainConfig(model="synthetic", bits=32, recipe="rank", epochs=1, dense_layers=3)

    def kill(result):
        raise _Killed

    with pytest.raises(_Killed):
        train_layers(config, _capture_log([]), 5, "sig", out, Hooks(layer_done=kill))
    log: list[list[int]] = []
    messages: list[str] = []
    other = dataclasses.replace(config, seed=1)
    train_layers(other, _capture_log(log), 5, "sig", out, Hooks(message=messages.append))
    assert log == [[3, 4]] and any("starting afresh" in m for m in messages)


def test_a_whole_budget_written_as_a_float_is_the_same_setting():
    """``--val-budget 128`` parses as 128.0; the default is 128: a rerun must still resume."""
    config = TrainConfig(model="synthetic", bits=32)
    assert dataclasses.replace(config, val_budget=128.0).fingerprint() == config.fingerprint()
    assert dataclasses.replace(config, val_budget=0.25).fingerprint() != config.fingerprint()


def _tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    config = LlamaConfig(**{**settings, **overrides})
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_tiny_model_weights_refused_by_another_model(tmp_path):
    model = _tiny_llama()
    ids = torch.randint(0, 64, (2, 128), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    positions = torch.stack([sample_positions(128, 16, g) for _ in range(2)])
    data = capture_layers(model, ids, [1, 2], positions)
    assert data[1].queries.shape == (2, 4, 16, 8) and data[1].keys.shape == (2, 2, 128, 8)
    config = TrainConfig(model="tiny", bits=32, recipe="rank", epochs=1, dense_layers=1)
    out = tmp_path / "tiny.safetensors"
    train_layers(
        config, lambda todo: (dict(data), dict(data)), 3, model_signature(model.config), out, Hooks()
    )
    assert load_for_model(out, model.config).keys() == {1, 2}

    same_shapes = _tiny_llama(vocab_size=128).config  # same layers and heads, another model
    with pytest.raises(UserError, match="trained for another model"):
        load_for_model(out, same_shapes)
    with pytest.raises(UserError, match="n_layers=3, but the model has n_layers=4"):
        load_for_model(out, _tiny_llama(num_hidden_layers=4).config)
    from lmexec.hata.weights import default_weights

    shipped = default_weights("smollm2", 128)
    if shipped is not None:
        with pytest.raises(UserError, match="n_layers=30, but the model has n_layers=3"):
            load_for_model(shipped, model.config)


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="unknown recipe"):
        TrainConfig(recipe="magic").validate()
    with pytest.raises(UserError, match="--epochs must be >= 1"):
        TrainConfig(epochs=0).validate()
    with pytest.raises(UserError, match="hash bits"):
        TrainConfig(bits=100).validate()
    with pytest.raises(UserError, match="--seed must be a whole number"):
        TrainConfig(seed=-1).validate()
    with pytest.raises(UserError, match="--positions must be at most"):
        TrainConfig(context=128, positions=100).validate()


@pytest.mark.slow
def test_shipped_weights_fit_smollm2():
    from transformers import AutoConfig

    from lmexec.hata.models import model_dir
    from lmexec.hata.weights import default_weights

    path = default_weights("smollm2", 128)
    assert path is not None
    weights = load_for_model(path, AutoConfig.from_pretrained(model_dir("smollm2")), 128)
    assert sorted(weights) == list(range(2, 30))
    assert '"name": "rank"' in read_metadata(path)["recipe"]
