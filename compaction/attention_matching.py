"""Attention Matching (Zweiger, Fu, Guo, Kim, "Fast KV Compaction via Attention Matching",
arXiv 2602.16284), per layer and KV head.

Given reference queries Q [n, D] (pooled over the query heads of the KV group) and the full cache
K, V [T, D], with S = Q K^T / sqrt(D), m = rowmax(S), E = exp(S - m) [n, T]:

1. keep t keys I: the highest attention aggregated by RMS over the queries, or greedy OMP on the
   attention-mass fit below;
2. biases: B >= 0 [t] from the bounded non-negative least squares fit
   ``min || E[:, I] B - rowsum(E) ||`` (the compacted keys carry the attention *mass* of the full
   cache), beta = log B;
3. values: C_v [t, D] by ridge-regularised least squares so that
   ``softmax(Q K_I^T / sqrt(D) + beta) C_v ~ softmax(S) V``, shrunk towards V_I; the ridge
   strength is chosen per head on held-out queries.

With ``nonuniform=True`` budgets differ across the heads of a layer (same total): a head gets keys
in the order of their marginal attention coverage, capped at ``max_head_factor`` times the uniform
share; heads are padded to the layer's largest count with masked slots. It is off by default:
on SmolLM2 it did not lower error or NLL (bench/am_ablation.py) and the padding costs storage. Queries
are processed in chunks, so memory stays O(chunk * T) whatever the number of queries.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from compaction.base import CompactionInput, CompactionResult, Target, pad_layer, pad_layers, register
from kvstore.errors import InvalidRequest

RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclass
class HeadStats:
    """Per-head attention statistics over the reference queries."""

    rms: torch.Tensor  # [T] RMS of attention probabilities per key
    mean: torch.Tensor  # [T] mean attention probability per key (sums to 1)


def _largest_eigenvalue(matrix: torch.Tensor, iterations: int = 30) -> float:
    """Power-iteration estimate (slightly inflated, so a safe step size) of a PSD matrix's top eigenvalue."""
    vector = torch.ones(matrix.shape[0], dtype=matrix.dtype) / math.sqrt(matrix.shape[0])
    value = 0.0
    for _ in range(iterations):
        product = matrix @ vector
        value = float(product.norm())
        if value <= 1e-30:
            return 1e-12
        vector = product / value
    return value * 1.05


@register("attention_matching")
@dataclass
class AttentionMatching:
    """selection: "rms" or "omp"; nonuniform: per-head budgets; causal: the reference queries are
    the context's own queries (query i sees keys <= i) — None decides by n == T."""

    selection: str = "rms"
    nonuniform: bool = False  # per-head budgets; off by default: no gain measured on SmolLM2, and padding costs slots (bench/am_ablation.py)
    max_head_factor: float = 2.0
    min_keys: int = 2
    max_queries: int = 4096  # reference queries per KV head used for fitting (seeded subsample)
    chunk: int = 1024  # queries per chunk
    beta_min: float = -20.0  # bounds on beta = log B
    beta_max: float = 20.0
    ridge: float | None = None  # value ridge strength (relative); None = choose on held-out queries
    nnls_iters: int = 300
    causal: bool | None = None
    sinks: int = 0  # always keep the first tokens (attention sinks) ...
    recent: int = 0  # ... and the most recent ones (where generation continues) ...
    recent_share: float = 0.5  # ... together at most this share of a head's budget
    seed: int = 0
    name = "attention_matching"

    def __post_init__(self) -> None:
        if self.selection not in ("rms", "mean", "omp"):
            raise InvalidRequest(f"attention_matching selection must be 'rms', 'mean' or 'omp', got {self.selection!r}")

    # ------------------------------------------------------------------ driver
    def compact(self, inputs: CompactionInput, target: Target) -> CompactionResult:
        started = time.perf_counter()
        if inputs.queries is None:
            raise InvalidRequest("attention_matching needs reference queries (supply them, or let the server capture them from its model)")
        total = inputs.num_tokens
        budget = target.tokens(total)
        n_ref = inputs.queries[0].shape[1]
        if n_ref * (inputs.queries[0].shape[0] // inputs.num_heads) < max(8, self.min_keys):
            raise InvalidRequest(f"attention_matching needs at least 8 reference queries per KV head, got {n_ref}")
        causal = (n_ref == total) if self.causal is None else self.causal
        generator = torch.Generator().manual_seed(self.seed)
        layers, kept, errors = [], [], []
        for layer in range(inputs.num_layers):
            compacted, counts, error = self._compact_layer(inputs, layer, budget, causal, generator)
            layers.append(compacted)
            kept.append(counts)
            errors.append(error)
        layers = pad_layers(layers)
        return CompactionResult(
            self.name, layers, inputs.logical_length, torch.stack(kept), time.perf_counter() - started,
            details={"heldout_rel_error_fit": errors, "budget": budget, "causal": causal},
        )

    def _compact_layer(self, inputs: CompactionInput, layer: int, budget: int, causal: bool, generator: torch.Generator):
        keys, values = inputs.keys[layer].float(), inputs.values[layer].float()  # [H, T, D]
        queries = inputs.grouped_queries(layer)  # [H, g*n, D]
        heads, total, dim = keys.shape
        scale = 1.0 / math.sqrt(dim)
        group = queries.shape[1] // inputs.queries[layer].shape[1]
        # causal context queries repeat positions 0..T-1 once per query head of the group
        base_positions = torch.arange(inputs.queries[layer].shape[1]).repeat(group) if causal else None
        fit_q, hold_q, fit_pos, hold_pos = [], [], [], []
        for h in range(heads):
            order = torch.randperm(queries.shape[1], generator=generator)
            take = order[: min(self.max_queries, queries.shape[1])]
            hold_n = max(4, len(take) // 5)
            fit_idx, hold_idx = take[hold_n:], take[:hold_n]
            fit_q.append(queries[h, fit_idx].float())
            hold_q.append(queries[h, hold_idx].float())
            fit_pos.append(base_positions[fit_idx] if causal else None)
            hold_pos.append(base_positions[hold_idx] if causal else None)
        stats = [self._head_stats(fit_q[h], keys[h], scale, fit_pos[h]) for h in range(heads)]
        counts = self._allocate(stats, budget, total) if self.nonuniform else [budget] * heads
        out_k, out_v, out_b, out_i, errors = [], [], [], [], []
        for h in range(heads):
            idx = self._select(fit_q[h], keys[h], stats[h], counts[h], scale, fit_pos[h])
            beta = self._fit_beta(fit_q[h], keys[h], idx, scale, fit_pos[h])
            values_h, error = self._fit_values(fit_q[h], hold_q[h], keys[h], values[h], idx, beta, scale, fit_pos[h], hold_pos[h])
            out_k.append(keys[h, idx].to(inputs.keys[layer].dtype))
            out_v.append(values_h.to(inputs.values[layer].dtype))
            out_b.append(beta)
            out_i.append(idx)
            errors.append(error)
        return pad_layer(out_k, out_v, out_b, out_i), torch.tensor(counts), sum(errors) / len(errors)

    # ------------------------------------------------------------------ statistics and budgets
    def _chunks(self, q: torch.Tensor, positions: torch.Tensor | None):
        for start in range(0, q.shape[0], self.chunk):
            rows = q[start : start + self.chunk]
            yield rows, (None if positions is None else positions[start : start + self.chunk])

    def _logits(self, q, k, scale, pos):
        s = (q @ k.T) * scale
        if pos is not None:
            s = s.masked_fill(torch.arange(k.shape[0]).unsqueeze(0) > pos.unsqueeze(1), float("-inf"))
        return s

    def _head_stats(self, q: torch.Tensor, k: torch.Tensor, scale: float, pos) -> HeadStats:
        sq = torch.zeros(k.shape[0])
        mean = torch.zeros(k.shape[0])
        for rows, rows_pos in self._chunks(q, pos):
            probs = torch.softmax(self._logits(rows, k, scale, rows_pos), dim=-1)
            sq += (probs**2).sum(0)
            mean += probs.sum(0)
        n = max(q.shape[0], 1)
        return HeadStats(rms=(sq / n).sqrt(), mean=mean / n)

    def _allocate(self, stats: list[HeadStats], budget: int, total: int) -> list[int]:
        """Split heads * budget keys across heads by marginal attention coverage (greedy water-filling)."""
        heads = len(stats)
        cap = min(total, max(budget, int(math.ceil(self.max_head_factor * budget))))
        floor = min(budget, self.min_keys)
        gains = torch.stack([s.mean.sort(descending=True).values for s in stats])  # [H, T]
        counts = [floor] * heads
        candidates = gains[:, floor:cap]  # marginal gain of the (floor+1)-th .. cap-th key of each head
        extra = heads * budget - floor * heads
        if extra > 0 and candidates.numel():
            flat = candidates.reshape(-1)
            chosen = flat.topk(min(extra, flat.numel())).indices
            per_head = torch.bincount(chosen // candidates.shape[1], minlength=heads)
            counts = [floor + int(c) for c in per_head]
        return counts

    # ------------------------------------------------------------------ key selection
    def _forced(self, total: int, count: int) -> torch.Tensor:
        """Indices always kept: the sinks and the recent window, together at most recent_share of ``count``."""
        sinks = min(self.sinks, count // 4, total)
        recent = min(self.recent, int(self.recent_share * count) - sinks, total - sinks)
        return torch.cat([torch.arange(sinks), torch.arange(total - max(recent, 0), total)]).long()

    def _select(self, q, k, stats: HeadStats, count: int, scale: float, pos) -> torch.Tensor:
        total = k.shape[0]
        if count >= total:
            return torch.arange(total)
        forced = self._forced(total, count)
        if self.selection == "omp":
            chosen = self._omp(q, k, count, scale, pos, forced)
        else:
            scores = (stats.rms if self.selection == "rms" else stats.mean).clone()
            scores[forced] = float("inf")
            chosen = scores.topk(count).indices
        return chosen.sort().values

    def _omp(self, q, k, count: int, scale: float, pos, forced: torch.Tensor) -> torch.Tensor:
        """Greedy selection (after ``forced``) of keys whose exp-scores best reconstruct the attention mass."""
        s = self._logits(q, k, scale, pos)
        e = torch.exp(s - s.max(dim=1, keepdim=True).values)  # [n, T]
        mass = e.sum(1)
        residual = mass.clone()
        norms = e.norm(dim=0).clamp_min(1e-12)
        selected = torch.zeros(k.shape[0], dtype=torch.bool)
        selected[forced] = True
        step = max(1, count // 16)
        while int(selected.sum()) < count:
            corr = (e.T @ residual) / norms
            corr[selected] = float("-inf")
            pick = corr.topk(min(step, count - int(selected.sum()))).indices
            selected[pick] = True
            idx = selected.nonzero().squeeze(1)
            b = self._nnls(e[:, idx].T @ e[:, idx], e[:, idx].T @ mass, init=None)
            residual = mass - e[:, idx] @ b
        return selected.nonzero().squeeze(1)

    # ------------------------------------------------------------------ beta
    def _fit_beta(self, q, k, idx, scale: float, pos) -> torch.Tensor:
        gram = torch.zeros(len(idx), len(idx))
        rhs = torch.zeros(len(idx))
        for rows, rows_pos in self._chunks(q, pos):
            s = self._logits(rows, k, scale, rows_pos)
            e = torch.exp(s - s.max(dim=1, keepdim=True).values)
            e_kept = e[:, idx]
            gram += e_kept.T @ e_kept
            rhs += e_kept.T @ e.sum(1)
        b = self._nnls(gram, rhs, init=None)
        return b.clamp_min(math.exp(self.beta_min)).log().clamp(self.beta_min, self.beta_max)

    def _nnls(self, gram: torch.Tensor, rhs: torch.Tensor, init: torch.Tensor | None) -> torch.Tensor:
        """min 0.5 b^T G b - r^T b subject to exp(beta_min) <= b <= exp(beta_max), by FISTA."""
        lo, hi = math.exp(self.beta_min), math.exp(self.beta_max)
        lipschitz = _largest_eigenvalue(gram)
        if init is None:  # the best multiple of the all-ones vector
            ones = torch.ones_like(rhs)
            init = ones * (float(rhs.sum()) / max(float(gram.sum()), 1e-12))
        b = init.clamp(lo, hi)
        y, t = b.clone(), 1.0
        for _ in range(self.nnls_iters):
            b_next = (y - (gram @ y - rhs) / lipschitz).clamp(lo, hi)
            t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
            y = b_next + (t - 1) / t_next * (b_next - b)
            b, t = b_next, t_next
        return b

    # ------------------------------------------------------------------ values
    def _fit_values(self, q, q_hold, k, v, idx, beta, scale, pos, pos_hold):
        """Ridge least squares for C_v; returns (C_v [t, D], held-out relative error of the output)."""
        t = len(idx)
        gram = torch.zeros(t, t)
        cross = torch.zeros(t, v.shape[1])
        for rows, rows_pos in self._chunks(q, pos):
            target = torch.softmax(self._logits(rows, k, scale, rows_pos), dim=-1) @ v  # [c, D]
            weights = self._compact_probs(rows, k, idx, beta, scale, rows_pos)  # [c, t]
            gram += weights.T @ weights
            cross += weights.T @ target
        hold_target = torch.softmax(self._logits(q_hold, k, scale, pos_hold), dim=-1) @ v
        hold_weights = self._compact_probs(q_hold, k, idx, beta, scale, pos_hold)
        anchor = v[idx]
        level = float(gram.diagonal().mean().clamp_min(1e-12))
        best = None
        for strength in ([self.ridge] if self.ridge is not None else RIDGE_GRID):
            lam = strength * level
            # Cholesky, not LU: the system is SPD, and LAPACK's threaded LU was 60-100x slower on a
            # busy 2-core machine (measured in bench/compaction.py)
            factor = torch.linalg.cholesky(gram + lam * torch.eye(t))
            fitted = torch.cholesky_solve(cross + lam * anchor, factor)
            error = float((hold_weights @ fitted - hold_target).norm() / hold_target.norm().clamp_min(1e-12))
            if best is None or error < best[1]:
                best = (fitted, error)
        return best

    def _compact_probs(self, q, k, idx, beta, scale, pos) -> torch.Tensor:
        s = (q @ k[idx].T) * scale + beta
        if pos is not None:
            s = s.masked_fill(idx.unsqueeze(0) > pos.unsqueeze(1), float("-inf"))
            s = s.masked_fill(torch.isinf(s).all(dim=1, keepdim=True), 0.0)  # a query that sees no kept key
        return torch.softmax(s, dim=-1)
