"""Recall: a compacted session answers with exact KV recalled from its lossless original.

Compaction keeps t << T slots per layer and head, and whatever it dropped is gone from them: a
7-digit code in the middle of a licence is rarely among the kept keys. kvmem still holds the
original (a compacted record names it in its labels ``source`` and ``source_version``), so for a
question it recalls the exact tokens the question needs:

1. *Probe*: the question runs once over the compacted cache (what the answer would see) and its
   keys are taken per layer, rotated back to position 0 (retrieval/context.py says why keys).
2. *Select*: the original's block index for recall's own settings (``RecallConfig.block_tokens``
   and ``representatives``: every key scored by default, a separate stored index from the Retrieve
   RPC's unless their settings agree; retrieval/block_index.py) scores its blocks with those
   probes; blocks are taken best first, each widened by ``margin_tokens``, until their union holds
   exactly ``budget_tokens`` tokens per layer (the margins count; the last block may be cut:
   retrieval/context.select).
3. *Read*: only the stored chunks holding the chosen tokens are read (``bytes_read`` counts them).
4. *Combine*: per layer, the compacted slots (with their biases) plus the recalled tokens at their
   original positions (post-RoPE keys as stored, bias 0). Every key already sits at its original
   position, so nothing is rotated and the question starts at the original length.

The double count. The compacted slots already stand for the attention mass of the whole context,
the recalled tokens' share included; attending to both counts that share twice.
``RecallConfig.double_count`` picks the handling (bench/recall.py measures each):

* ``none``: the slots as they are;
* ``drop``: a slot that *is* a recalled token (compaction keeps a subset of the original keys and
  records which: aux ``compaction/slots``) is masked. For token eviction (slots are original tokens
  at bias 0) slots plus recalled tokens are then exactly a subset of the context;
* ``scale``: every slot's bias is shifted by log(1 - r/T), as if each slot stood for an equal share
  of the T tokens;
* ``drop_scale``: drop, then shift the remaining slots by the share of the context they still
  stand for. With w_i = exp(bias_i) normalised to sum to T (the tokens slot i stands for, under
  Attention Matching's mass-matching biases) and D the dropped slots' share, the remaining slots
  stand for T - D tokens of which max(r - D, 0) are now attended exactly:
  bias += log((T - max(r, D)) / (T - D)). Only sessions whose biases are not all zero (mass-
  matching compaction) are shifted; eviction slots stand for themselves and keep ``drop``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from compaction.inference import CompactedCache
from compaction.naming import COMPACTION_LABEL
from compaction.slots import SLOTS_AUX, slots_from_bytes
from kvstore.errors import CorruptData, FailedPrecondition, InvalidRequest, NotFound
from kvstore.records import SessionRecord
from kvstore.store import SessionStore
from retrieval.actqkv import Probe
from retrieval.context import RetrievalConfig, Selection, select
from retrieval.reads import read_tokens
from retrieval.rope import Rope

DOUBLE_COUNT = ("none", "drop", "scale", "drop_scale")
MAX_RECALL_TOKENS = 1 << 20  # what a request may ask for; clipped to the session's length below this
MAX_RECALL_BLOCK_TOKENS = 4096
# Recall's index defaults (bench/recall.py --recall-index, docs/recall.md "Measured"): at 2k-4k
# tokens 5% of the context is ~100-200 tokens, and a block ranked by 4 representative keys (the
# Retrieve RPC's default) misses the needle where one ranked by every key finds it. Scoring every
# key is what mattered most. Block size matters where the budget is small: a 64-token block with
# 16-token margins is a 96-token span, more than 5% of a 1k-2k context; 32-token blocks with 8-token
# margins (48 tokens a span) answered 17 of 24 recall runs there against 10
# (bench/results/recall_small.md), at 4k-8k as well as 64 (bench/results/recall_goal.md), reading
# somewhat more 256-token store chunks. With [retrieval] representatives = 0 the Retrieve RPC and
# recall share one stored index.
BLOCK_TOKENS = 32
REPRESENTATIVES = 0
MARGIN_TOKENS = 8


@dataclass(frozen=True)
class RecallConfig:
    budget_tokens: int = 256  # exact tokens recalled per layer, margins included (the last block may be cut)
    double_count: str = "drop_scale"
    method: str = "actqkv"  # probe weighting (retrieval/actqkv.py)
    margin_tokens: int = MARGIN_TOKENS  # each recalled block is widened by this many tokens on both sides
    block_tokens: int = BLOCK_TOKENS  # recall's own index: tokens per block (the Retrieve RPC's settings are separate)
    representatives: int = REPRESENTATIVES  # recall's own index: keys per block and head; 0 = every key scored (exact best match)
    dynamic: bool = False  # False: every layer recalls the same tokens (one ranking over layers, equal counts), so
    #                        a restore can name them and the bytes read are the budget's; True: spread by entropy (whole blocks)

    def __post_init__(self) -> None:
        if self.double_count not in DOUBLE_COUNT:
            raise InvalidRequest(f"unknown double-count handling {self.double_count!r}; use one of {', '.join(DOUBLE_COUNT)}")
        if not 1 <= self.budget_tokens <= MAX_RECALL_TOKENS:
            raise InvalidRequest(f"recall budget must be in 1..{MAX_RECALL_TOKENS} tokens, got {self.budget_tokens}")
        if self.margin_tokens < 0:
            raise InvalidRequest(f"margin_tokens must be >= 0, got {self.margin_tokens}")
        if not 1 <= self.block_tokens <= MAX_RECALL_BLOCK_TOKENS or self.representatives < 0:
            raise InvalidRequest(f"recall index block_tokens must be in 1..{MAX_RECALL_BLOCK_TOKENS} (got {self.block_tokens}) "
                                 f"and representatives >= 0 (got {self.representatives})")

    def index_config(self, base: Any = None) -> Any:
        """The BlockIndexConfig recall searches: its own block size and representatives, the
        search structure (flat up to ``exact_max_vectors``, then HNSW) of ``base`` (the server's
        BlockIndexConfig) when given."""
        from retrieval.block_index import BlockIndexConfig

        more = {} if base is None else {"exact_max_vectors": base.exact_max_vectors, "hnsw_neighbors": base.hnsw_neighbors}
        return BlockIndexConfig(block_tokens=self.block_tokens, representatives=self.representatives, **more)


@dataclass
class CompactedKV:
    """A compacted session in memory: per layer keys/values [H, t, D], bias [H, t] float32, and
    the original token index of each slot, int64 [H, t] (-1 padding), or None when not stored."""

    record: SessionRecord
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    bias: list[torch.Tensor]
    slots: list[torch.Tensor] | None

    @property
    def logical_length(self) -> int:
        return int(self.record.logical_length)


@dataclass
class Recalled:
    """The cache to answer from: per layer keys/values [H, t + r, D] and bias [H, t + r] (the
    compacted slots first, then the recalled tokens; layers recalling fewer are padded with -inf),
    standing for ``logical_length`` positions."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    bias: list[torch.Tensor]
    logical_length: int
    tokens: list[np.ndarray]  # per layer: recalled token indices into the source, ascending
    selection: Selection
    source: SessionRecord
    bytes_read: int
    double_count: str  # the handling applied (may be weaker than asked: see ``load_compacted``)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def recalled_tokens(self) -> int:
        """Recalled tokens per layer, averaged."""
        return int(round(float(np.mean([len(t) for t in self.tokens])))) if self.tokens else 0

    def cache_for(self, model: Any, device: Any = None) -> CompactedCache:
        """A CompactedCache for ``model.generate`` (installs the bias-aware attention)."""
        device = device if device is not None else model.device
        layers = [(k.to(device, copy=True), v.to(device, copy=True)) for k, v in zip(self.keys, self.values)]
        return CompactedCache.for_model(model, layers, [b.to(device) for b in self.bias], self.logical_length)


def source_of(store: SessionStore, record: SessionRecord) -> SessionRecord:
    """The lossless original a compacted ``record`` was made from, exactly as it was compacted."""
    if COMPACTION_LABEL not in record.labels:
        raise FailedPrecondition(f"session {record.session_id!r} is not compacted; recall is for compacted sessions (restore it whole instead)")
    source_id = record.labels.get("source", "")
    if not source_id:
        raise FailedPrecondition(f"compacted session {record.session_id!r} keeps no source (it was compacted with drop_source); nothing to recall from")
    try:
        source = store.get(record.tenant, source_id)
    except NotFound:
        raise FailedPrecondition(f"the source {source_id!r} of compacted session {record.session_id!r} was deleted; nothing to recall from") from None
    created = record.labels.get("source_created_ms")
    if str(source.version) != record.labels.get("source_version", "") or (created is not None and created != str(source.created_at_ms)):
        raise FailedPrecondition(f"source {source_id!r} changed since {record.session_id!r} was compacted from it (saved again, appended to or "
                                 "replaced); its tokens may differ, so nothing is recalled from it: compact it again")
    source.spec.require_same(record.spec, f"source {source_id!r}")
    if source.num_tokens != record.logical_length:
        raise CorruptData(f"source {source_id!r} holds {source.num_tokens} tokens, the compacted session stands for {record.logical_length}")
    return source


def load_compacted(store: SessionStore, tenant: str, session_id: str) -> CompactedKV:
    """A compacted session with its slot indices (None when the session predates them or they
    are damaged: recall then cannot ``drop`` and falls back to ``scale``)."""
    plan = store.restore(tenant, session_id)
    keys, values, bias = plan.tensors()
    record = plan.record
    if bias is None:
        bias = [torch.zeros(k.shape[:2]) for k in keys]
    slots = None
    try:
        aux = store.get_aux(tenant, session_id, SLOTS_AUX)
        if aux is not None and aux.matches(record):
            slots = slots_from_bytes(aux.payload, len(keys), keys[0].shape[0], keys[0].shape[1])
    except CorruptData:
        slots = None
    return CompactedKV(record, keys, values, bias, slots)


def question_keys(model: Any, compacted: CompactedKV, question_ids: torch.Tensor, rope: Rope) -> list[torch.Tensor]:
    """Run the question [n] over the compacted cache; its keys per layer [H, n, D], rotated back to position 0."""
    cache = CompactedCache.for_model(model, [(k.clone(), v.clone()) for k, v in zip(compacted.keys, compacted.values)], compacted.bias,
                                     compacted.logical_length)
    ids = question_ids.view(1, -1)
    n = ids.shape[1]
    positions = torch.arange(compacted.logical_length, compacted.logical_length + n)
    with torch.no_grad():
        model(input_ids=ids.to(model.device), cache=cache, position_ids=positions[None].to(model.device), use_cache=True)
    return [rope.rotate(cache.layers[l].keys[0, :, -n:].float().cpu(), -positions) for l in range(len(compacted.keys))]


def adjusted_bias(bias: torch.Tensor, slots: torch.Tensor | None, recalled: np.ndarray, total: int, handling: str) -> torch.Tensor:
    """The compacted slots' bias [H, t] for one layer once ``recalled`` tokens (indices into the
    context of ``total`` tokens) are attended exactly; see the module docstring."""
    out = bias.float().clone()
    real = torch.isfinite(out)
    r = len(recalled)
    if handling == "none" or r == 0:
        return out
    if handling == "scale":
        return out + float(np.log(max(total - r, 1) / total))
    member = torch.from_numpy(np.isin(slots.numpy(), recalled)) & real  # [H, t]
    out = out.masked_fill(member, float("-inf"))
    if handling == "drop" or not bool((bias.float()[real] != 0).any()):
        return out
    weights = torch.where(real, bias.float(), torch.full_like(out, float("-inf"))).exp()  # [H, t]
    shares = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-30) * total  # tokens each slot stands for
    dropped = (shares * member).sum(dim=1, keepdim=True)  # [H, 1]
    remaining = (total - dropped).clamp_min(1e-6)
    shift = torch.log(((total - torch.clamp(dropped, min=r)).clamp_min(1e-6)) / remaining)  # [H, 1]
    return out + shift


def recall(model: Any, store: SessionStore, compacted: CompactedKV, question_ids: torch.Tensor, config: RecallConfig, index_config: Any = None,
           index: Any = None) -> Recalled:
    """Recall ``config.budget_tokens`` exact tokens per layer from the compacted session's source
    for ``question_ids`` [n] and combine them with its slots (see the module docstring).
    ``index_config``: the server's BlockIndexConfig (its search structure; recall's own block size
    and representatives come from ``config``: ``config.index_config(index_config)``). ``index``:
    the source's BlockIndex for those settings when the caller already loaded it (else it is loaded,
    or built and stored); an index built with other settings is refused, never searched."""
    from retrieval.service import block_index

    if question_ids.numel() == 0:
        raise InvalidRequest("the question to recall for is empty; give its token ids")
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    source = source_of(store, compacted.record)
    total = source.num_tokens
    rope = Rope.from_model(model)
    wanted = config.index_config(index_config)
    if index is None:
        index = block_index(store, rope, source.tenant, source.session_id, wanted).index
    if index.config != wanted:
        raise InvalidRequest(f"recall was given an index built with settings {index.config.tag}; it recalls with {wanted.tag}")
    if index.num_tokens != total:
        raise FailedPrecondition(f"the block index of {source.session_id!r} covers {index.num_tokens} tokens, the source {total}; retry")
    seconds["index"] = time.perf_counter() - started
    started = time.perf_counter()
    states = question_keys(model, compacted, question_ids, rope)
    probes = [Probe.from_states(keys, source.spec.num_kv_heads, config.method) for keys in states]
    block = index.config.block_tokens
    budget = min(total, config.budget_tokens)
    blocks = min(total, -(-budget // block) * block)  # enough whole blocks to hold the budget (never none)
    retrieval = RetrievalConfig(method=config.method, budget_tokens=blocks, sink_tokens=0, recent_tokens=0,
                                packed=False, margin_tokens=config.margin_tokens, dynamic=config.dynamic)
    selection = select(index, probes, retrieval, exact_tokens=None if config.dynamic else budget)
    seconds["probe"] = time.perf_counter() - started
    started = time.perf_counter()
    tokens = [layer.tokens for layer in selection.layers]
    keys, values, bytes_read = read_tokens(store, source, tokens)
    seconds["read"] = time.perf_counter() - started
    handling = config.double_count
    if handling in ("drop", "drop_scale") and compacted.slots is None:
        handling = "scale"  # no record of which tokens the slots are
    width = max(len(t) for t in tokens)
    out_k, out_v, out_b = [], [], []
    for layer, chosen in enumerate(tokens):
        slots = compacted.slots[layer] if compacted.slots is not None else None
        slot_bias = adjusted_bias(compacted.bias[layer], slots, chosen, total, handling)
        heads = slot_bias.shape[0]
        pad = width - len(chosen)
        extra_bias = torch.cat([torch.zeros(heads, len(chosen)), torch.full((heads, pad), float("-inf"))], 1)
        k, v = keys[layer].to(compacted.keys[layer].dtype), values[layer].to(compacted.values[layer].dtype)
        if pad:
            k = torch.cat([k, k.new_zeros(heads, pad, k.shape[2])], 1)
            v = torch.cat([v, v.new_zeros(heads, pad, v.shape[2])], 1)
        out_k.append(torch.cat([compacted.keys[layer], k], 1))
        out_v.append(torch.cat([compacted.values[layer], v], 1))
        out_b.append(torch.cat([slot_bias, extra_bias], 1))
    return Recalled(out_k, out_v, out_b, compacted.logical_length, tokens, selection, source, bytes_read, handling, seconds)
