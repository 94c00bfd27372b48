"""The six ways kvmem can answer a question about a stored session, on the hosted model.

Every executor takes an ``AnswerRequest`` (model, tokenizer, store, session, question) and returns
an ``Execution``: the greedy answer and the seconds each stage took. Stages are split into
*preparation* that later questions on the same session reuse (building a block or text index,
compacting the cache; stored beside the session) and the per-question work, so the planner's cost
model can amortise preparation over expected follow-up questions.

* ``rag``: top text chunks (all-MiniLM-L6-v2) filling ``rag_budget_tokens``, in document order,
  then the question. Needs the session's text; no KV.
* ``kv_retrieval``: KV blocks chosen by ActQKV probes (retrieval/context.py) at
  ``kv_budget_tokens`` per layer, generation on them. Works past the model's window.
* ``full``: the whole stored cache in context. Only while context + question + answer fit the window.
* ``compacted``: the session's compacted version (``compact_method`` at ``compact_ratio``; made
  and stored on first use) in context.
* ``compacted_recall``: the compacted version plus ``recall_budget_tokens`` exact tokens per layer
  recalled from the lossless original for this question (retrieval/recall.py).
* ``ttt``: qTTT (retrieval/ttt.py) on the stored cache, then the full cache in context with the
  adapted query projections. Same window limit as ``full``.
"""
from __future__ import annotations

import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from compaction.inference import CompactedCache, generation_inputs
from kvstore.errors import FailedPrecondition, InvalidRequest, NotFound
from kvstore.store import SessionStore
from retrieval.ttt import TTTConfig

OPTIONS = ("rag", "kv_retrieval", "full", "compacted", "compacted_recall", "ttt")
OPTION_HELP = {
    "rag": "top-k text chunks in context",
    "kv_retrieval": "top-k KV blocks (ActQKV probes)",
    "full": "the full stored cache in context",
    "compacted": "the compacted cache in context",
    "compacted_recall": "the compacted cache plus exact KV recalled from its original",
    "ttt": "query-only test-time training, then the full cache",
}


def _default_block_index() -> Any:
    from retrieval.block_index import BlockIndexConfig  # faiss loads with it: only when settings are made

    return BlockIndexConfig()


@dataclass(frozen=True)
class ExecutorSettings:
    """How each option runs. Budgets are tokens of context the model attends to."""

    rag_budget_tokens: int = 1024
    kv_budget_tokens: int = 2048
    retrieval_method: str = "actqkv"
    compact_method: str = "streaming_llm"
    compact_ratio: float = 0.5
    recall_budget_tokens: int = 256  # compacted_recall: exact tokens per layer recalled from the original
    recall_double_count: str = "drop_scale"  # compacted_recall: retrieval/recall.py's double-count handling
    recall_block_tokens: int = 32  # compacted_recall: recall's own index (RecallConfig.block_tokens, representatives, margin_tokens)
    recall_representatives: int = 0
    recall_margin_tokens: int = 8
    ttt: TTTConfig = field(default_factory=TTTConfig)
    max_new_tokens: int = 24
    # kv_retrieval's block index settings (retrieval.block_index.BlockIndexConfig; the server
    # passes its own). The default is BlockIndexConfig(): every key indexed, what the committed
    # planner matrix (bench/planner_matrix.py) was measured with.
    block_index: Any = field(default_factory=_default_block_index)


@dataclass
class AnswerRequest:
    model: Any
    tokenizer: Any
    store: SessionStore
    tenant: str
    session_id: str
    question: str  # the text appended after the context (the caller formats it)
    settings: ExecutorSettings
    embedder: Callable[[], Any] | None = None  # lazily loads the text embedder (rag only)
    index_cache: Any = None  # retrieval.index_cache.IndexCache: block indexes kept in memory (the server's), or None

    @property
    def question_ids(self) -> torch.Tensor:
        """[n] token ids of the question, as appended to the context."""
        ids = self.tokenizer(self.question, return_tensors="pt", add_special_tokens=False).input_ids[0]
        if ids.numel() == 0:
            raise InvalidRequest("the question is empty; give the text to answer")
        return ids


@dataclass
class Execution:
    option: str
    text: str
    token_ids: list[int]
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage
    prepared: list[str] = field(default_factory=list)  # preparation stages that ran (not reused)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return float(sum(self.stages.values()))


class _Stages:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


def model_window(model: Any) -> int:
    return int(model.config.get_text_config().max_position_embeddings)


def check_fits(option: str, tokens: int, question_tokens: int, new_tokens: int, window: int) -> None:
    need = tokens + question_tokens + new_tokens
    if need > window:
        raise FailedPrecondition(
            f"{option} needs the whole context in the model's window: {tokens} context + {question_tokens} question + "
            f"{new_tokens} answer tokens = {need} > {window}; use kv_retrieval or rag for this session"
        )


def generate_on(model: Any, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], bias: Sequence[torch.Tensor | None], logical_length: int,
                question_ids: torch.Tensor, max_new_tokens: int) -> list[int]:
    """Greedy answer to question_ids [n] continuing a cache of per-layer keys/values [H, t, D]
    (with optional per-slot bias [H, t]) that stands for ``logical_length`` positions."""
    device = model.device
    cache = CompactedCache.for_model(model, [(k.to(device, copy=True), v.to(device, copy=True)) for k, v in layers],
                                     [b.to(device) if b is not None else None for b in bias], logical_length)
    inputs = generation_inputs(logical_length, question_ids.view(1, -1)).to(device)
    with torch.no_grad():
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), cache=cache, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs.shape[1]:].tolist()


def _finish(option: str, request: AnswerRequest, ids: list[int], stages: _Stages, prepared: list[str], **details: Any) -> Execution:
    eos = request.tokenizer.eos_token_id
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return Execution(option, request.tokenizer.decode(ids, skip_special_tokens=True), ids, stages.seconds, prepared, details)


def _load_full(request: AnswerRequest, stages: _Stages, option: str):
    record = request.store.get(request.tenant, request.session_id)
    if record.logical_length != record.num_tokens or record.has_bias:
        raise FailedPrecondition(f"session {request.session_id!r} is itself compacted; {option} needs a full cache (answer from its source session)")
    question_ids = request.question_ids
    check_fits(option, record.num_tokens, question_ids.numel(), request.settings.max_new_tokens, model_window(request.model))
    with stages("load"):
        plan = request.store.restore(request.tenant, request.session_id)
        keys, values, _ = plan.tensors()
    return plan.record, keys, values, question_ids


def run_full(request: AnswerRequest) -> Execution:
    stages = _Stages()
    record, keys, values, question_ids = _load_full(request, stages, "full")
    with stages("generate"):
        ids = generate_on(request.model, list(zip(keys, values)), [None] * len(keys), record.num_tokens, question_ids, request.settings.max_new_tokens)
    return _finish("full", request, ids, stages, [])


def run_ttt(request: AnswerRequest) -> Execution:
    from retrieval.ttt import adapt

    stages = _Stages()
    record, keys, values, question_ids = _load_full(request, stages, "ttt")
    context_ids = torch.from_numpy(record.token_ids.astype(np.int64))
    keys = [k.to(request.model.dtype) for k in keys]
    values = [v.to(request.model.dtype) for v in values]
    with stages("train"):
        shadow, report = adapt(request.model, context_ids, keys, values, request.settings.ttt)
    with stages("generate"):
        ids = generate_on(shadow, list(zip(keys, values)), [None] * len(keys), record.num_tokens, question_ids, request.settings.max_new_tokens)
    return _finish("ttt", request, ids, stages, [], losses=report.losses, weights_unchanged=report.weights_unchanged)


def compacted_session_id(session_id: str, settings: ExecutorSettings) -> str:
    from compaction.base import Target
    from compaction.service import default_target_id

    return default_target_id(session_id, settings.compact_method, Target(ratio=settings.compact_ratio))


def _compacted_target(request: AnswerRequest, stages: _Stages, option: str) -> tuple[str, list[str]]:
    """The compacted session ``option`` answers from: the session itself when it is compacted,
    else its compacted version (``compact_method`` at ``compact_ratio``), made and stored on first
    use. Returns (its id, the preparation stages that ran)."""
    from compaction.base import Target
    from compaction.service import COMPACTION_LABEL, QUERY_METHODS_WITHOUT_HOST, compact_session

    settings = request.settings
    record = request.store.get(request.tenant, request.session_id)
    if COMPACTION_LABEL in record.labels:
        target_id = request.session_id  # already a compacted session: use it as it is
    else:
        target_id = compacted_session_id(request.session_id, settings)
    window = model_window(request.model)
    if record.logical_length + request.question_ids.numel() + settings.max_new_tokens > window:
        raise FailedPrecondition(f"{option} keeps the session's {record.logical_length} positions, past the model's window of {window}; use kv_retrieval or rag")
    try:
        request.store.get(request.tenant, target_id)
        return target_id, []
    except NotFound:
        pass
    queries = held_out = None
    if settings.compact_method not in QUERY_METHODS_WITHOUT_HOST:
        from compaction.references import reference_queries

        with stages("compact"):
            refs = reference_queries(request.model, request.tokenizer, torch.from_numpy(record.token_ids.astype(np.int64)))
        queries, held_out = refs.queries, refs.held_out
    with stages("compact"):
        compact_session(request.store, None, request.tenant, request.session_id, settings.compact_method, Target(ratio=settings.compact_ratio),
                        target_session_id=target_id, queries=queries, held_out=held_out)
    return target_id, ["compact"]


def run_compacted(request: AnswerRequest) -> Execution:
    stages = _Stages()
    settings = request.settings
    question_ids = request.question_ids
    target_id, prepared = _compacted_target(request, stages, "compacted")
    with stages("load"):
        plan = request.store.restore(request.tenant, target_id)
        keys, values, bias = plan.tensors()
    with stages("generate"):
        ids = generate_on(request.model, list(zip(keys, values)), bias or [None] * len(keys), plan.record.logical_length, question_ids, settings.max_new_tokens)
    return _finish("compacted", request, ids, stages, prepared, compacted_session=target_id, slots=plan.record.num_tokens)


def recall_config(settings: ExecutorSettings, budget_tokens: int):
    """compacted_recall's RecallConfig for a budget (retrieval/recall.py)."""
    from retrieval.recall import RecallConfig

    return RecallConfig(budget_tokens=budget_tokens, double_count=settings.recall_double_count, block_tokens=settings.recall_block_tokens,
                        representatives=settings.recall_representatives, margin_tokens=settings.recall_margin_tokens)


def recall_index_config(settings: ExecutorSettings):
    """The BlockIndexConfig compacted_recall searches (recall's own block size and representatives)."""
    return recall_config(settings, 1).index_config(settings.block_index)


def run_compacted_recall(request: AnswerRequest) -> Execution:
    """The compacted session plus ``recall_budget_tokens`` exact tokens per layer recalled from its
    lossless source for this question (retrieval/recall.py)."""
    from retrieval.recall import load_compacted, recall, source_of
    from retrieval.rope import Rope
    from retrieval.service import block_index

    stages = _Stages()
    settings = request.settings
    question_ids = request.question_ids
    target_id, prepared = _compacted_target(request, stages, "compacted_recall")
    with stages("load"):
        compacted = load_compacted(request.store, request.tenant, target_id)
        source = source_of(request.store, compacted.record)
    config = recall_config(settings, min(settings.recall_budget_tokens, source.num_tokens))
    with stages("index"):  # the source's block index for recall's settings, built once and stored beside it
        loaded = block_index(request.store, Rope.from_model(request.model), request.tenant, source.session_id,
                             config.index_config(settings.block_index), cache=request.index_cache, record=source)
    if loaded.rebuilt:
        prepared.append("index")
    else:
        stages.seconds["load"] += stages.seconds.pop("index")
    with stages("recall"):
        recalled = recall(request.model, request.store, compacted, question_ids, config, settings.block_index, loaded.index)
    with stages("generate"):
        ids = generate_on(request.model, list(zip(recalled.keys, recalled.values)), recalled.bias, recalled.logical_length, question_ids, settings.max_new_tokens)
    return _finish("compacted_recall", request, ids, stages, prepared, compacted_session=target_id, slots=compacted.record.num_tokens,
                   recalled_tokens=recalled.recalled_tokens, bytes_read=recalled.bytes_read, double_count=recalled.double_count)


def run_kv_retrieval(request: AnswerRequest) -> Execution:
    """Reads what it uses: the index (from memory or the store), the chunks of the sinks and the
    recent window for the probe pass, then each layer's chunks for its own selection."""
    from retrieval.context import RetrievalConfig, answer, question_probes, select
    from retrieval.reads import probe_window, selected_kv
    from retrieval.rope import Rope
    from retrieval.service import block_index

    stages = _Stages()
    settings = request.settings
    question_ids = request.question_ids
    with stages("load"):
        record = request.store.get(request.tenant, request.session_id)
        if record.has_bias:
            raise FailedPrecondition("retrieval runs on plain sessions; this one is compacted (it has attention biases)")
    budget = min(settings.kv_budget_tokens, record.num_tokens)
    config = RetrievalConfig(method=settings.retrieval_method, budget_tokens=budget)
    rope = Rope.from_model(request.model)
    with stages("index"):
        loaded = block_index(request.store, rope, request.tenant, request.session_id, settings.block_index, cache=request.index_cache, record=record)
    if not loaded.rebuilt:  # a stored index was only read: that is load time, not preparation
        stages.seconds["load"] += stages.seconds.pop("index")
    with stages("load"):
        window_kv = probe_window(request.store, record, config)
    with stages("generate"):
        probes = question_probes(request.model, window_kv, question_ids, config, rope, model_window(request.model))
        selection = select(loaded.index, probes, config)
    with stages("load"):
        kv = selected_kv(request.store, record, [layer.tokens for layer in selection.layers])
    with stages("generate"):
        result = answer(request.model, kv, loaded.index, question_ids, config, max_new_tokens=settings.max_new_tokens, selection=selection)
    return _finish("kv_retrieval", request, result.token_ids.tolist(), stages, ["index"] if loaded.rebuilt else [], budget_tokens=budget,
                   bytes_read=window_kv.bytes_read + kv.bytes_read)


_ROLE_HEADER = re.compile(r"^\s*(system|user|assistant|human|bot|tool)\s*(\n|:)", re.I)


def search_query(question: str, tokenizer: Any) -> str:
    """What rag searches the session's text with: the question's words without chat-template
    scaffolding. A question formatted with the model's chat template carries special tokens
    (<|im_start|>, <|im_end|>, ...), role headers and often a system prompt; those would pull the
    search towards whatever chunk shares them. Segments between special tokens are kept without
    their role header, and only the user's segments when roles are marked."""
    specials = sorted({t for t in getattr(tokenizer, "all_special_tokens", []) if t}, key=len, reverse=True)
    parts = re.split("|".join(re.escape(t) for t in specials), question) if specials else [question]
    segments = []  # (role or "", text)
    for part in parts:
        header = _ROLE_HEADER.match(part)
        role = header.group(1).lower() if header else ""
        text = part[header.end():] if header else part
        if text.strip():
            segments.append((role, text.strip()))
    if any(role == "user" for role, _ in segments):
        segments = [(role, text) for role, text in segments if role == "user"]
    query = " ".join(text for _, text in segments)
    return query or question.strip()


def run_rag(request: AnswerRequest) -> Execution:
    from retrieval.service import text_index
    from retrieval.text_index import select_for_budget

    if request.embedder is None:
        raise FailedPrecondition("rag needs the text embedder; this server has text search disabled")
    stages = _Stages()
    settings = request.settings
    tokenizer = request.tokenizer
    question_ids = request.question_ids
    with stages("index"):
        embedder = request.embedder()
        loaded = text_index(request.store, embedder, request.tenant, request.session_id)
    if not loaded.rebuilt:
        stages.seconds["load"] = stages.seconds.pop("index")
    with stages("generate"):
        hits = loaded.index.search(search_query(request.question, tokenizer), embedder, len(loaded.index))
        room = max(0, settings.rag_budget_tokens - question_ids.numel())
        chosen = select_for_budget(hits, room, lambda s: len(tokenizer(s, add_special_tokens=False).input_ids))
        context = tokenizer("\n".join(h.text for h in chosen), return_tensors="pt", add_special_tokens=False).input_ids[0, :room]
        prompt = torch.cat([context, question_ids]).view(1, -1).to(request.model.device)
        with torch.no_grad():
            out = request.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=settings.max_new_tokens, do_sample=False)
    ids = out[0, prompt.shape[1]:].tolist()
    top = [h.score for h in hits[:2]]
    return _finish("rag", request, ids, stages, ["index"] if loaded.rebuilt else [], chunks=len(chosen), top1=top[0] if top else 0.0,
                   gap=(top[0] - top[1]) if len(top) > 1 else 0.0)


EXECUTORS: dict[str, Callable[[AnswerRequest], Execution]] = {
    "rag": run_rag,
    "kv_retrieval": run_kv_retrieval,
    "full": run_full,
    "compacted": run_compacted,
    "compacted_recall": run_compacted_recall,
    "ttt": run_ttt,
}


def execute(option: str, request: AnswerRequest) -> Execution:
    if option not in EXECUTORS:
        raise InvalidRequest(f"unknown option {option!r}; choose one of {', '.join(OPTIONS)}")
    return EXECUTORS[option](request)
