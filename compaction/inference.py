"""Running transformers on a compacted cache.

A compacted cache holds t slots per layer and KV head (t < T), with per-slot attention-logit biases
(Attention Matching's beta = log B; -inf on padded slots) and the length of the original context.
Two pieces make a stock causal LM use it:

* ``CompactedCache`` (a DynamicCache) reports the *logical* length, so new tokens get the
  positions they would have had after the full context, and tags the keys it returns with the
  layer's bias;
* the ``kvmem_sdpa`` attention function adds that bias to the logits of the compacted slots and
  applies the causal mask among new tokens; for keys without a bias tag it is exactly transformers'
  SDPA attention, so installing it on a model changes nothing else.

``CompactedCache.for_model`` installs the attention function, so a cache built this way can go
straight into ``model(...)`` or ``model.generate(...)``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

ATTENTION_NAME = "kvmem_sdpa"


def kvmem_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """SDPA attention that honours ``key.kvmem_bias`` ([H_kv, t] for the first t key slots).

    query [B=1, Hq, q, D]; key, value [1, H_kv, k, D]. Returns ([1, q, Hq, D], None) like SDPA.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bias = getattr(key, "kvmem_bias", None)
    if bias is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    q_len, k_len, slots = query.shape[2], key.shape[2], bias.shape[-1]
    groups = query.shape[1] // key.shape[1]
    mask = torch.zeros(key.shape[1], q_len, k_len, dtype=torch.float32, device=query.device)  # [H_kv, q, k]
    mask[:, :, :slots] = bias.to(query.device, torch.float32)[:, None, :]
    appended = k_len - slots  # new tokens already in the cache, this step's included
    if appended:
        new_index = torch.arange(appended, device=query.device)
        query_index = torch.arange(appended - q_len, appended, device=query.device)
        future = new_index[None, :] > query_index[:, None]  # [q, appended]
        mask[:, :, slots:] = mask[:, :, slots:].masked_fill(future, float("-inf"))
    mask = mask.repeat_interleave(groups, dim=0)[None].to(query.dtype)  # [1, Hq, q, k]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def install_attention(model: Any) -> None:
    """Register ``kvmem_sdpa`` with transformers and make ``model`` use it (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, kvmem_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    if model.config._attn_implementation != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)


def _dynamic_cache_class():
    from transformers import DynamicCache

    return DynamicCache


class CompactedCache(_dynamic_cache_class()):
    """A DynamicCache over compacted slots: keys/values [1, H, t, D] per layer plus bias [H, t].

    ``get_seq_length`` counts positions, not slots: logical_length + tokens appended since.
    """

    def __init__(self, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], bias: Sequence[torch.Tensor | None], logical_length: int, config: Any = None):
        from kvmem.hf_cache import layers_to_cache

        super().__init__(config=config) if config is not None else super().__init__()
        filled = layers_to_cache(layers, config)
        self.layers = filled.layers
        self.slots = [keys.shape[1] for keys, _ in layers]  # stored slots per layer (may differ)
        self.bias = [b if b is not None else torch.zeros(keys.shape[0], keys.shape[1]) for (keys, _), b in zip(layers, bias)]
        self.logical_length = int(logical_length)  # usually > slots; may differ either way

    @classmethod
    def for_model(cls, model: Any, layers, bias, logical_length: int) -> "CompactedCache":
        """Build the cache and install the bias-aware attention on ``model``."""
        install_attention(model)
        return cls(layers, bias, logical_length, model.config)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(layer_idx) - self.slots[layer_idx] + self.logical_length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        keys.kvmem_bias = self.bias[layer_idx]
        return keys, values


def generation_inputs(logical_length: int, new_ids: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """input_ids for ``generate`` on a compacted cache: placeholders for the compacted context
    (never fed to the model: the cache stands in for them) followed by the new tokens [1, n].

    The output of ``generate`` then starts with those placeholders; slice them off with
    ``out[:, logical_length:]``.
    """
    new_ids = new_ids.view(1, -1)
    return torch.cat([torch.full((1, logical_length), pad_id, dtype=new_ids.dtype), new_ids], dim=1)
