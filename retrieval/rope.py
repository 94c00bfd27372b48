"""Moving post-RoPE keys and queries to other positions.

kvmem stores keys after RoPE, at the positions the model gave them. RoPE rotates each pair of
channels by ``position * inv_freq``; rotations compose, so a key computed at position p moves to
position q by one more rotation of ``q - p``, exactly, with no access to the pre-RoPE key. That is
how kvmem

* hands retrieved blocks to a model at positions it can handle (contexts past its window), and
* compares queries and keys by content alone (both rotated back to position 0) for retrieval.

Only plain rotary embeddings compose this way: ``attention_scaling`` must be 1 (default, linear,
dynamic, llama3 rope do; YaRN/LongRoPE scale magnitudes and are refused).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvstore.errors import FailedPrecondition


@dataclass(frozen=True)
class Rope:
    """inv_freq: float32 [D/2]; the model's rotate_half convention (Llama, Mistral, Qwen, Gemma)."""

    inv_freq: torch.Tensor

    @classmethod
    def from_model(cls, model: Any) -> "Rope":
        rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
        if rotary is None or not hasattr(rotary, "inv_freq"):
            raise FailedPrecondition(f"{type(model).__name__} has no rotary embedding kvmem can move; retrieval needs a RoPE model")
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        if abs(scaling - 1.0) > 1e-6:
            raise FailedPrecondition(f"rotary attention_scaling={scaling}: keys cannot be moved by rotation alone for this rope type")
        return cls(rotary.inv_freq.detach().float().cpu())

    @property
    def head_dim(self) -> int:
        return 2 * self.inv_freq.shape[0]

    def cos_sin(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, D] (float32) of a rotation by ``delta`` [T] positions, from float64 angles
        (exact even for positions in the hundreds of thousands)."""
        angles = delta.to(torch.float64)[:, None] * self.inv_freq.to(torch.float64)[None, :]  # [T, D/2]
        angles = torch.cat([angles, angles], dim=-1)  # [T, D]
        return angles.cos().float(), angles.sin().float()

    def rotate(self, x: torch.Tensor, delta: torch.Tensor | int, cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Rotate x [..., T, D] by ``delta`` positions (int, or [T] per token; may be negative).

        ``cos_sin``: precomputed ``self.cos_sin(delta)`` when many tensors share one delta.
        Returns a new tensor of x's dtype, computed in float32.
        """
        if isinstance(delta, int):
            delta = torch.full((x.shape[-2],), delta, dtype=torch.int64)
        cos, sin = cos_sin if cos_sin is not None else self.cos_sin(delta)
        cos, sin = cos.to(x.device), sin.to(x.device)
        xf = x.float()
        half = xf.shape[-1] // 2
        rotated_half = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
        return (xf * cos + rotated_half * sin).to(x.dtype)
