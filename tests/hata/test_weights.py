import pytest
import torch

from lmexec.errors import UserError
from lmexec.hata.selection import Hata
from lmexec.hata.weights import load_hash_weights, save_hash_weights


def test_round_trip(tmp_path):
    weights = {layer: torch.randn(3, 64, 128) for layer in range(2, 6)}
    path = save_hash_weights(tmp_path / "w.safetensors", weights, n_layers=6, model="test", dense_layers=2)
    loaded = load_hash_weights(path, n_layers=6, n_kv_heads=3, head_dim=64, bits=128)
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[i], weights[i]) for i in weights)
    method = Hata.from_file(path, 6, 3, 64)
    assert method.bits == 128


def test_mismatch_and_corruption_are_clear(tmp_path):
    path = save_hash_weights(tmp_path / "w.safetensors", {2: torch.randn(3, 64, 64)}, n_layers=30)
    with pytest.raises(UserError, match="n_kv_heads=3, but the model has n_kv_heads=4"):
        load_hash_weights(path, 30, 4, 64)
    with pytest.raises(UserError, match="n_layers=30, but the model has n_layers=24"):
        load_hash_weights(path, 24, 3, 64)
    with pytest.raises(UserError, match="hold 64-bit codes, but 128 bits were asked for"):
        load_hash_weights(path, 30, 3, 64, bits=128)
    with pytest.raises(UserError, match="does not exist"):
        load_hash_weights(tmp_path / "missing.safetensors", 30, 3, 64)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_hash_weights(broken, 30, 3, 64)


def _llama_config(**changes):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2)
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def test_weights_match_the_model_whether_or_not_its_config_names_the_architecture(tmp_path):
    from lmexec.hata.weights import load_for_model, model_signature

    bare = _llama_config(architectures=None)  # a config converted from GGUF names none
    named = _llama_config(architectures=["LlamaForCausalLM"])  # a Hub config does
    for made_for in (model_signature(bare), "LlamaForCausalLM" + model_signature(bare)[len("llama") :]):
        path = save_hash_weights(
            tmp_path / "w.safetensors", {1: torch.randn(1, 64, 64)}, 2, extra={"model_config": made_for}
        )
        for config in (bare, named):
            assert load_for_model(path, config, 64).keys() == {1}
    with pytest.raises(UserError, match="trained for another model"):
        load_for_model(path, _llama_config(vocab_size=1000), 64)


def test_damaged_bits_metadata_is_named(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    metadata = {
        "format": "lmexec-hata-weights",
        "bits": "abc",
        "n_layers": "2",
        "n_kv_heads": "1",
        "head_dim": "64",
    }
    save_file({"layers.1.hash_weight": torch.randn(1, 64, 64)}, str(path), metadata=metadata)
    with pytest.raises(UserError, match="metadata bits='abc' is not a bit width"):
        load_hash_weights(path, 2, 1, 64)
    del metadata["bits"]
    save_file({"layers.1.hash_weight": torch.randn(1, 64, 64)}, str(path), metadata=metadata)
    with pytest.raises(UserError, match="metadata bits=None is not a bit width"):
        load_hash_weights(path, 2, 1, 64)
