"""Retrieved-context inference: attention sinks + retrieved blocks + a recent window, per layer.

Given a stored session (per layer keys/values [H, T, D] post-RoPE at ``positions``), its block
index and a question, ``answer`` runs a causal LM over only ``budget_tokens`` of context per layer
(on average):

1. *Probe pass*: the question is run over the sinks and the recent window alone and its query
   states are recorded per layer (rotated back to position 0).
2. *Selection*: per layer, the probe (retrieval/actqkv.py) scores the blocks in the index; the
   retrieval budget is spread over layers by the entropy of those scores (dynamic cut-off) or
   evenly, and each layer keeps its best blocks.
3. *Generation*: the model runs on a CompactedCache holding, per layer, sinks + that layer's blocks
   + the recent window, each token at its position in the layout below, and the question.

Positions (``Layout``): when the session plus question and answer fit the model's window, every
token keeps its original position (nothing is rotated). Past the window, the kept tokens are
packed in their original order: sinks at [0, s), the layer's retrieved blocks right-aligned in
[s, s + C) where C is the largest per-layer retrieval, the recent window in [s + C, s + C + W),
and the question from s + C + W on. Relative order is kept, distances inside a block and inside
the recent window are exact, and every position stays below the model's window. Keys are moved to
their new positions by a RoPE rotation (retrieval/rope.py), exactly.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from compaction.inference import CompactedCache, generation_inputs
from compaction.queries import recording_queries
from kvstore.errors import FailedPrecondition, InvalidRequest
from retrieval.actqkv import METHODS, BudgetSpread, Probe, normalised_entropy
from retrieval.block_index import BlockIndex
from retrieval.rope import Rope


@dataclass(frozen=True)
class RetrievalConfig:
    method: str = "actqkv"  # probe: actqkv | mean | last
    budget_tokens: int = 2048  # context tokens each layer sees on average: sinks + blocks + recent
    sink_tokens: int = 4
    recent_tokens: int = 256  # at most a quarter of the budget
    packed: bool = True  # pack positions even when the session fits the window (measured better, see Layout)
    margin_tokens: int = 32  # each retrieved block is widened by this many tokens on both sides (facts cut by a block edge)
    shared: bool = True  # one ranking for all layers (mean z-scored score over layers); False: each layer its own
    dynamic: bool = True  # spread blocks over layers by score entropy (False: same count per layer)
    spread: BudgetSpread = field(default_factory=BudgetSpread)
    int8_first_scan: bool = True  # large indexes on CPU: an int8 scan, then exact scores near the cut (retrieval/flat_search.py); False: exact scan of every block

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidRequest(f"unknown retrieval method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.budget_tokens <= 0:
            raise InvalidRequest(f"budget_tokens must be positive, got {self.budget_tokens}")

    @property
    def recent(self) -> int:
        return min(self.recent_tokens, self.budget_tokens // 4)


@dataclass
class SessionKV:
    """A session's KV in memory, whole or in part. keys, values: per layer [H, n, D] post-RoPE of
    the tokens it holds: every token (``held`` None, n = T) or the session indices ``held``
    (ascending, n = len(held): what a request read, retrieval/reads.py); positions int64 [T]
    of every token of the session."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: torch.Tensor
    held: np.ndarray | list[np.ndarray] | None = None  # one array for every layer, or one per layer
    bytes_read: int = 0  # stored bytes read to hold this (0: not counted)

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def logical_length(self) -> int:
        return int(self.positions.max()) + 1 if self.num_tokens else 0

    @property
    def num_heads(self) -> int:
        return int(self.keys[0].shape[0])

    def take(self, layer: int, tokens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values [H, n, D] of session tokens ``tokens`` (ascending indices) at ``layer``."""
        if self.held is None:
            index = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
        else:
            held = self.held[layer] if isinstance(self.held, list) else self.held
            at = np.searchsorted(held, tokens)
            if len(tokens) and (at.max() >= len(held) or np.any(held[at] != tokens)):
                raise ValueError("asked for tokens this partial KV does not hold")
            index = torch.from_numpy(at.astype(np.int64))
        return self.keys[layer][:, index], self.values[layer][:, index]

    @classmethod
    def from_plan(cls, plan: Any) -> "SessionKV":
        """From a kvstore RestorePlan (plain sessions: a compacted one has biases, refused)."""
        if plan.record.has_bias:
            raise FailedPrecondition("retrieval runs on plain sessions; this one is compacted (it has attention biases)")
        keys, values, _ = plan.tensors()
        return cls(keys, values, torch.from_numpy(plan.positions.copy()))


@dataclass
class LayerSelection:
    """What one layer sees. blocks: retrieved block ids (ascending); scores: theirs; tokens: indices
    into the session of sinks + blocks + recent window, ascending; spans: per block the token range
    it brought in (its core and the margins taken beside it; tokens inside a span that another
    block brought are selected too)."""

    blocks: np.ndarray
    scores: np.ndarray
    entropy: float
    tokens: np.ndarray
    spans: np.ndarray | None = None  # int64 [len(blocks), 2]: [start, end) each block took, margins included


@dataclass
class Selection:
    layers: list[LayerSelection]
    sink_end: int  # tokens [0, sink_end) are sinks
    recent_start: int  # tokens [recent_start, T) are the recent window
    retrieved_cap: int  # most retrieved tokens in any layer (C in the layout)

    @property
    def tokens_per_layer(self) -> list[int]:
        return [len(layer.tokens) for layer in self.layers]


def retrievable_blocks(index: BlockIndex, sink_end: int, recent_start: int) -> np.ndarray:
    """bool [nb]: blocks entirely outside the sinks and the recent window."""
    return (index.blocks[:, 0] >= sink_end) & (index.blocks[:, 1] <= recent_start)


def always_kept(total: int, config: RetrievalConfig) -> tuple[int, int, np.ndarray]:
    """(sink_end, recent_start, their token indices int64 [s + r]) for a session of ``total`` tokens."""
    sink_end = min(config.sink_tokens, total)
    recent_start = max(sink_end, total - config.recent)
    return sink_end, recent_start, np.concatenate([np.arange(sink_end), np.arange(recent_start, total)]).astype(np.int64)


def select(index: BlockIndex, probes: list[Probe], config: RetrievalConfig, exact_tokens: int | None = None) -> Selection:
    """Per-layer selection from one probe per layer; see the module docstring.

    ``exact_tokens`` (equal counts per layer only: ``config.dynamic`` False): each layer's chosen
    blocks with their margins hold exactly this many tokens (at most the whole blocks the budget
    allows), the last block cut, instead of whole blocks' worth (recall's budget accounting)."""
    if exact_tokens is not None and config.dynamic:
        raise InvalidRequest("exact_tokens needs equal counts per layer (dynamic=False)")
    total = index.num_tokens
    if config.budget_tokens > total:
        raise InvalidRequest(f"budget of {config.budget_tokens} tokens exceeds the session's {total} tokens; use the full cache instead")
    if len(probes) != index.num_layers:
        raise InvalidRequest(f"{len(probes)} probes for {index.num_layers} layers")
    sink_end, recent_start, fixed = always_kept(total, config)
    allowed = retrievable_blocks(index, sink_end, recent_start)
    available = int(allowed.sum())
    block_tokens = index.config.block_tokens
    mean_blocks = max(0, config.budget_tokens - sink_end - (total - recent_start)) / block_tokens
    cap = config.spread.cap(mean_blocks, available) if config.dynamic else min(available, int(mean_blocks))
    shortlist = min(index.num_blocks, 4 * max(cap, 1) + int((~allowed).sum()))
    ranked = []
    for ids, scores in index.search_layers([(p.vectors, p.weights) for p in probes], shortlist, config.int8_first_scan):  # = index.search per layer
        keep = allowed[ids]
        ranked.append((ids[keep], scores[keep]))
    entropies = [normalised_entropy(scores, config.spread.temperature) for _, scores in ranked]
    if config.shared:  # one ranking for every layer; how deep each layer goes still follows its entropy
        ranked = [_consensus(ranked, index.num_blocks)] * len(ranked)
    total_blocks = int(round(mean_blocks * index.num_layers))
    if config.dynamic:
        counts = config.spread.spread(entropies, total_blocks, available)
    else:
        counts = [min(available, int(mean_blocks))] * index.num_layers
    layers = []
    steps: dict[int, list] = {}  # per distinct ranking (shared: one for every layer): its widening steps
    wants = [count * block_tokens if exact_tokens is None else min(count * block_tokens, exact_tokens) for count in counts]
    for (ids, scores), entropy, wanted in zip(ranked, entropies, wants):
        if id(ids) not in steps:
            deepest = max(w for (other, _), w in zip(ranked, wants) if other is ids)
            steps[id(ids)] = _widening_steps(index, ids, deepest, config.margin_tokens, sink_end, recent_start)
        chosen, taken, spans = _widened(steps[id(ids)], wanted)
        score_of = np.zeros(index.num_blocks, dtype=np.float32)
        score_of[ids] = scores
        tokens = np.sort(np.concatenate([fixed, taken]))  # taken lies in [sink_end, recent_start): no overlap with fixed
        layers.append(LayerSelection(chosen, score_of[chosen], entropy, tokens.astype(np.int64), spans))
    cap_tokens = max((len(l.tokens) - len(fixed) for l in layers), default=0)
    return Selection(layers, sink_end, recent_start, cap_tokens)


def _widening_steps(index: BlockIndex, ranked_ids: np.ndarray, budget: int, margin: int, lo: int, hi: int) -> list[tuple[int, np.ndarray, tuple[int, int]]]:
    """Take blocks best first, each widened by ``margin`` tokens on both sides (within [lo, hi)),
    until their union holds at least ``budget`` tokens: per block taken, (block, the tokens it
    adds, int64 ascending by preference: its own tokens first, then its margins closest first, so
    what is taken beside a block always touches it; the [start, end) they span). A smaller budget takes a prefix of the same
    steps (``_widened``), so layers sharing a ranking share one walk."""
    mask = np.zeros(index.num_tokens, dtype=bool)
    steps = []
    remaining = budget
    for block in ranked_ids:
        if remaining <= 0:
            break
        start, end = (int(x) for x in index.blocks[block])
        core = np.arange(max(lo, start), min(hi, end))
        left = np.arange(max(lo, start) - 1, max(lo, start - margin) - 1, -1)  # nearest first
        right = np.arange(min(hi, end), min(hi, end + margin))
        margins = np.concatenate([left, right])[np.argsort(np.concatenate([np.arange(len(left)), np.arange(len(right))]), kind="stable")]
        take = np.concatenate([core[~mask[core]], margins[~mask[margins]]])
        if len(take) == 0:
            continue
        mask[take] = True
        remaining -= len(take)
        steps.append((int(block), take.astype(np.int64), (int(take.min()), int(take.max()) + 1)))
    return steps


def _widened(steps: list[tuple[int, np.ndarray, tuple[int, int]]], budget: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first of ``steps`` (``_widening_steps``) until they hold exactly ``budget`` tokens (the
    last one cut). Returns (chosen block ids ascending, the tokens taken int64 (unordered), int64
    [chosen, 2] span each took)."""
    chosen, takes, spans = [], [], {}
    remaining = budget
    for block, take, span in steps:
        if remaining <= 0:
            break
        if len(take) > remaining:  # the last block, cut
            take = take[:remaining]
            span = (int(take.min()), int(take.max()) + 1)
        remaining -= len(take)
        chosen.append(block)
        takes.append(take)
        spans[block] = span
    ordered = np.sort(np.asarray(chosen, dtype=np.int64))
    taken = np.concatenate(takes) if takes else np.zeros(0, dtype=np.int64)
    return ordered, taken, np.asarray([spans[int(b)] for b in ordered], dtype=np.int64).reshape(-1, 2)


def _consensus(ranked: list[tuple[np.ndarray, np.ndarray]], num_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """One ranking for all layers: each layer's shortlist scores z-scored (blocks off a shortlist
    get its minimum), averaged over layers."""
    total = np.zeros(num_blocks)
    seen = np.zeros(num_blocks, dtype=bool)
    for ids, scores in ranked:
        if len(scores) == 0:
            continue
        z = (scores - scores.mean()) / (scores.std() + 1e-6)
        layer = np.full(num_blocks, z.min())
        layer[ids] = z
        total += layer
        seen[ids] = True
    ids = np.nonzero(seen)[0]
    order = np.argsort(-total[ids], kind="stable")
    return ids[order], (total[ids] / max(len(ranked), 1))[order].astype(np.float32)


@dataclass(frozen=True)
class Layout:
    """Where kept tokens sit. original=True: their own positions; otherwise packed (module doc)."""

    original: bool
    question_start: int  # position of the first question token
    sink_end: int
    retrieved_cap: int
    recent_start: int  # session index where the recent window starts

    @classmethod
    def plan(cls, kv: SessionKV, selection: Selection, extra_tokens: int, window: int, packed: bool = False) -> "Layout":
        """extra_tokens: question + answer tokens that must also fit in ``window``; packed: pack
        even when the original positions would fit."""
        if not packed and kv.logical_length + extra_tokens <= window:
            return cls(True, kv.logical_length, selection.sink_end, selection.retrieved_cap, selection.recent_start)
        packed = selection.sink_end + selection.retrieved_cap + (kv.num_tokens - selection.recent_start)
        if packed + extra_tokens > window:
            raise InvalidRequest(f"budget ({packed} tokens) plus {extra_tokens} question/answer tokens exceed the model's {window}-token window; lower the budget")
        return cls(False, packed, selection.sink_end, selection.retrieved_cap, selection.recent_start)

    def positions(self, kv: SessionKV, tokens: np.ndarray) -> torch.Tensor:
        """int64 [n]: positions of the session tokens ``tokens`` (ascending indices) in this layout."""
        if self.original:
            return kv.positions[torch.from_numpy(tokens)]
        tokens_t = torch.from_numpy(tokens)
        sinks = tokens_t < self.sink_end
        recent = tokens_t >= self.recent_start
        middle = ~(sinks | recent)
        out = torch.empty_like(tokens_t)
        out[sinks] = tokens_t[sinks]
        n_mid = int(middle.sum())
        out[middle] = self.sink_end + self.retrieved_cap - n_mid + torch.arange(n_mid)
        out[recent] = self.sink_end + self.retrieved_cap + (tokens_t[recent] - self.recent_start)
        return out


def gather_layers(kv: SessionKV, selection: Selection, layout: Layout, rope: Rope) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) [H, n_l, D] of the kept tokens, keys rotated to their layout positions."""
    out = []
    for layer, chosen in enumerate(selection.layers):
        keys, values = kv.take(layer, chosen.tokens)
        if not layout.original:
            keys = rope.rotate(keys, layout.positions(kv, chosen.tokens) - kv.positions[torch.from_numpy(chosen.tokens)])
        out.append((keys, values))
    return out


@dataclass
class QuestionStates:
    """The question's states from the probe pass, per layer and rotated back to position 0:
    keys [H, n, D], and queries [Hq, n, D] when they were recorded."""

    keys: list[torch.Tensor]
    queries: list[torch.Tensor] | None


def probe_pass(model: Any, kv: SessionKV, question_ids: torch.Tensor, config: RetrievalConfig, rope: Rope, window: int, record_queries: bool = False) -> QuestionStates:
    """Run the question ([n]) once over the sinks and the recent window, in the layout generation
    would use, and return its states."""
    sink_end, recent_start, fixed = always_kept(kv.num_tokens, config)
    bare = Selection([LayerSelection(np.zeros(0, np.int64), np.zeros(0, np.float32), 0.0, fixed) for _ in kv.keys], sink_end, recent_start, 0)
    layout = Layout.plan(kv, bare, question_ids.numel(), window, config.packed)
    cache = CompactedCache.for_model(model, gather_layers(kv, bare, layout, rope), [None] * len(kv.keys), layout.question_start)
    ids = question_ids.view(1, -1)
    positions = torch.arange(layout.question_start, layout.question_start + ids.shape[1])
    with torch.no_grad(), recording_queries(model) if record_queries else contextlib.nullcontext({}) as recorded:
        model(input_ids=ids, cache=cache, position_ids=positions[None], use_cache=True)
    keys = [rope.rotate(cache.layers[l].keys[0, :, -ids.shape[1]:].float(), -positions) for l in range(len(kv.keys))]
    queries = [rope.rotate(recorded[l], -positions) for l in range(len(kv.keys))] if record_queries else None
    return QuestionStates(keys, queries)


def question_probes(model: Any, kv: SessionKV, question_ids: torch.Tensor, config: RetrievalConfig, rope: Rope, window: int) -> list[Probe]:
    """Probe pass: one Probe per layer from the question run over sinks + recent window.

    The probe vectors are the question's own *keys* at that layer (rotated back to position 0),
    weighted per token by ``config.method`` (ActQKV's activation bias by default). Keys live in
    the space the index searches, and a question word's key matches the same word's key in the
    context; measured against the question's query states (the ActQKV paper's choice), keys find
    the needle block in far more layers (docs/retrieval.md, bench/retrieval_probes.py).
    """
    states = probe_pass(model, kv, question_ids, config, rope, window)
    return [Probe.from_states(keys, kv.num_heads, config.method) for keys in states.keys]


def model_window(model: Any) -> int:
    return int(model.config.get_text_config().max_position_embeddings)


@dataclass
class Answer:
    token_ids: torch.Tensor  # [n] generated tokens
    selection: Selection
    layout: Layout


def answer(model: Any, kv: SessionKV, index: BlockIndex, question_ids: torch.Tensor, config: RetrievalConfig, max_new_tokens: int = 24,
           probes: list[Probe] | None = None, selection: Selection | None = None) -> Answer:
    """Greedy answer to ``question_ids`` [n] from ``budget_tokens`` of retrieved context per layer.
    ``selection``: the caller already selected (``kv`` may then hold only the selected tokens)."""
    if index.num_tokens != kv.num_tokens:
        raise FailedPrecondition(f"block index covers {index.num_tokens} tokens, the session {kv.num_tokens}; rebuild the index")
    rope = Rope.from_model(model)
    window = model_window(model)
    if selection is None:
        if probes is None:
            probes = question_probes(model, kv, question_ids, config, rope, window)
        selection = select(index, probes, config)
    layout = Layout.plan(kv, selection, question_ids.numel() + max_new_tokens, window, config.packed)
    layers = gather_layers(kv, selection, layout, rope)
    cache = CompactedCache.for_model(model, layers, [None] * len(layers), layout.question_start)
    inputs = generation_inputs(layout.question_start, question_ids.view(1, -1))
    with torch.no_grad():
        # an explicit all-ones mask: the placeholders must not be taken for padding (positions come from it)
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), cache=cache, max_new_tokens=max_new_tokens, do_sample=False)
    return Answer(out[0, inputs.shape[1] :], selection, layout)



def ranked_spans(layer: LayerSelection) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(order, spans): the layer's blocks best scored first and the token range each brought in,
    margins included: what the Retrieve RPC reports, so every token an answer attends to outside
    the sinks and the recent window lies in a reported range (a fact in a margin is retrieved too)."""
    order = np.argsort(-layer.scores, kind="stable")
    spans = layer.spans if layer.spans is not None else np.zeros((0, 2), dtype=np.int64)
    return order, [(int(spans[i, 0]), int(spans[i, 1])) for i in order]
