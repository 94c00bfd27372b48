"""Plan and Answer for stored sessions: features from the store, the decision, the execution."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from kvstore.errors import InvalidRequest, NotFound
from kvstore.store import SessionStore
from retrieval.executors import (AnswerRequest, Execution, ExecutorSettings, compacted_session_id, execute, model_window, recall_index_config,
                                 search_query)
from retrieval.planner import Decision, Features, PlannerModel, classify_query, decide
from retrieval.ttt import TTTConfig

MAX_NEW_TOKENS = 256
BUDGETS = ("rag_budget_tokens", "kv_budget_tokens", "recall_budget_tokens")  # what a request may set
MAX_BUDGET_TOKENS = 1 << 20


def executor_settings(settings: Any, max_new_tokens: int = 24, block_index: Any = None) -> ExecutorSettings:
    """ExecutorSettings from kvmem.config.PlannerSettings; ``block_index``: the server's
    BlockIndexConfig (the one Retrieve and background indexing use), so Answer's kv_retrieval
    reads the same stored index instead of building its own with other settings."""
    more = {"block_index": block_index} if block_index is not None else {}
    return ExecutorSettings(
        rag_budget_tokens=settings.rag_budget_tokens, kv_budget_tokens=settings.kv_budget_tokens, compact_method=settings.compact_method,
        compact_ratio=settings.compact_ratio, max_new_tokens=max_new_tokens, recall_budget_tokens=settings.recall_budget_tokens,
        recall_double_count=settings.recall_double_count, recall_block_tokens=settings.recall_block_tokens,
        recall_representatives=settings.recall_representatives, recall_margin_tokens=settings.recall_margin_tokens,
        ttt=TTTConfig(steps=settings.ttt_steps, span_tokens=settings.ttt_span_tokens, learning_rate=settings.ttt_learning_rate), **more,
    )


def load_planner_model(path: str | Path = "") -> PlannerModel:
    return PlannerModel.load(Path(path) if path else None)


@dataclass
class Question:
    tenant: str
    session_id: str
    query: str
    latency_budget_s: float | None = None
    force: str = ""
    forbid: Sequence[str] = ()
    expected_followups: int = 0
    max_new_tokens: int = 24
    budgets: dict[str, int] = field(default_factory=dict)  # per-request ExecutorSettings budgets (0 or absent: the server's)

    def __post_init__(self) -> None:
        if not self.query.strip():
            raise InvalidRequest("query is empty; give the question text to answer")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise InvalidRequest(f"max_new_tokens must be in 1..{MAX_NEW_TOKENS}, got {self.max_new_tokens}")
        for name, value in self.budgets.items():
            if name not in BUDGETS:
                raise InvalidRequest(f"unknown budget {name!r}; known: {', '.join(BUDGETS)}")
            if not 0 <= value <= MAX_BUDGET_TOKENS:
                raise InvalidRequest(f"{name} must be in 0..{MAX_BUDGET_TOKENS} (0 = the server's setting), got {value}")

    def settings(self, server: ExecutorSettings, window: int) -> ExecutorSettings:
        """The server's settings with this request's budgets; a rag budget must leave room for
        the answer in the model's window (kv_retrieval and recall budgets are checked where they
        run: they are clipped to the session, and a layout past the window is refused there)."""
        chosen = {name: value for name, value in self.budgets.items() if value}
        rag = chosen.get("rag_budget_tokens", 0)
        if rag and rag + self.max_new_tokens > window:
            raise InvalidRequest(f"rag_budget_tokens={rag} plus {self.max_new_tokens} answer tokens exceed the model's {window}-token window; "
                                 f"ask for at most {window - self.max_new_tokens}")
        return replace(server, max_new_tokens=self.max_new_tokens, **chosen)


def _stored(store: SessionStore, tenant: str, session_id: str) -> bool:
    try:
        store.get(tenant, session_id)
        return True
    except NotFound:
        return False


def features_for(store: SessionStore, model: Any, tokenizer: Any, question: Question, settings: ExecutorSettings,
                 embedder: Callable[[], Any] | None) -> tuple[Features, float]:
    """The planner's features for a question about a stored session, and the seconds they took.
    Text-search signals come from the session's text index (built and stored once if missing)."""
    from retrieval.service import TEXT_INDEX, block_index_stored, text_index

    started = time.perf_counter()
    record = store.get(question.tenant, question.session_id)
    has_text = store.session_text(question.tenant, question.session_id) is not None
    text_stored = has_text and store.get_aux(question.tenant, question.session_id, TEXT_INDEX) is not None
    block_stored = block_index_stored(store, question.tenant, question.session_id, settings.block_index)
    recall_stored = block_index_stored(store, question.tenant, question.session_id, recall_index_config(settings))
    top1 = gap = None
    if has_text and embedder is not None:
        emb = embedder()
        hits = text_index(store, emb, question.tenant, question.session_id).index.search(search_query(question.query, tokenizer), emb, 2)
        if hits:
            top1 = hits[0].score
            gap = hits[0].score - hits[1].score if len(hits) > 1 else hits[0].score
    features = Features(
        context_tokens=record.logical_length, question_tokens=len(tokenizer(question.query, add_special_tokens=False).input_ids),
        window=model_window(model), query_type=classify_query(question.query), has_text=has_text,
        compacted_stored=_stored(store, question.tenant, compacted_session_id(question.session_id, settings)),
        block_index_stored=block_stored, text_index_stored=text_stored, recall_index_stored=recall_stored, top1=top1, gap=gap,
        expected_followups=question.expected_followups, new_tokens=settings.max_new_tokens,
    )
    return features, time.perf_counter() - started


def plan(store: SessionStore, model: Any, tokenizer: Any, planner: PlannerModel, question: Question, settings: ExecutorSettings,
         embedder: Callable[[], Any] | None, tolerance: float) -> tuple[Decision, float]:
    features, seconds = features_for(store, model, tokenizer, question, settings, embedder)
    decision = decide(features, planner, question.latency_budget_s, question.force, question.forbid, tolerance)
    return decision, seconds


def run(store: SessionStore, model: Any, tokenizer: Any, decision: Decision, question: Question, settings: ExecutorSettings,
        embedder: Callable[[], Any] | None, index_cache: Any = None) -> Execution:
    request = AnswerRequest(model, tokenizer, store, question.tenant, question.session_id, question.query, settings, embedder, index_cache)
    return execute(decision.choice, request)
