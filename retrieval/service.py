"""Retrieval over stored sessions: block indexes and text indexes kept beside them, rebuilt on need.

Indexes live in the store as aux records of their session (kvstore/store.py), tagged with the
session generation they were built from. ``block_index``/``text_index`` load them, and rebuild
(and store) them when missing, stale (the session was appended to or replaced) or damaged: a
damaged index is never searched, and never fails a request.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch

from kvstore.errors import Conflict, CorruptData, FailedPrecondition, InvalidRequest, KvmemError
from kvstore.records import SessionRecord
from kvstore.store import SessionStore
from retrieval.block_index import BlockIndex, BlockIndexConfig
from retrieval.context import RetrievalConfig, Selection, SessionKV, question_probes, select, model_window
from retrieval.rope import Rope

log = logging.getLogger("kvmem.retrieval")

TEXT_INDEX = "index/text"


def index_config_from(settings: Any) -> BlockIndexConfig:
    """The BlockIndexConfig of kvmem.config.RetrievalSettings: one for Retrieve, Answer and
    background indexing alike, so they read and store the same index."""
    return BlockIndexConfig(block_tokens=settings.block_tokens, representatives=settings.representatives, exact_max_vectors=settings.exact_max_vectors)


def block_meta_name(config: BlockIndexConfig) -> str:
    """Aux name of the stored index's header for ``config`` (one index per configuration)."""
    return f"index/blocks/{config.tag}/meta"


def _layer_name(config: BlockIndexConfig, layer: int) -> str:
    return f"index/blocks/{config.tag}/{layer}"


@dataclass
class Loaded:
    """An index and whether this call had to (re)build it."""

    index: Any
    rebuilt: bool
    reason: str = ""  # why it was rebuilt: "missing", "stale", "corrupt: ..."


def _load_block_index(store: SessionStore, tenant: str, session_id: str, record: SessionRecord, config: BlockIndexConfig) -> BlockIndex:
    meta = store.get_aux(tenant, session_id, block_meta_name(config))
    if meta is None:
        raise LookupError("missing")
    if not meta.matches(record):
        raise LookupError("stale")
    layers = json.loads(meta.payload)["layers"]
    raw = []
    for layer in range(layers):
        aux = store.get_aux(tenant, session_id, _layer_name(config, layer))
        if aux is None or not aux.matches(record):
            raise LookupError("missing layer")
        raw.append(aux.payload)
    index = BlockIndex.from_layer_bytes(raw)
    if index.config != config:  # every layer records the settings it was built with
        raise CorruptData(f"the index stored for settings {config.tag} was built with {index.config.tag}")
    if index.num_tokens != record.num_tokens:
        raise CorruptData(f"index covers {index.num_tokens} tokens, the session {record.num_tokens}")
    return index


def block_index_stored(store: SessionStore, tenant: str, session_id: str, config: BlockIndexConfig) -> bool:
    """Whether an index for ``config`` is stored beside the session (it may still be stale)."""
    return store.get_aux(tenant, session_id, block_meta_name(config)) is not None


def _load_source(store: SessionStore, tenant: str, session_id: str) -> tuple[SessionRecord, SessionKV]:
    plan = store.restore(tenant, session_id)
    return plan.record, SessionKV.from_plan(plan)


def layer_keys(store: SessionStore, record: SessionRecord, layer: int) -> torch.Tensor:
    """Keys [H, T, D] of one layer of a stored session, read chunk by chunk (that layer's blocks
    only, left out of the memory tiers: a whole-session scan must not evict the hot blocks)."""
    from kvstore.pieces import tensor_raw_view

    spec = record.spec
    keys = torch.empty((spec.num_kv_heads, record.num_tokens, spec.head_dim), dtype=spec.torch_dtype)
    raw = tensor_raw_view(keys)
    for ref in record.blocks:
        (block,) = store.load_chunk(record, ref, [layer], cache=False)
        raw[:, ref.start:ref.end] = block.raw_arrays()[0]
    return keys


def build_block_index(store: SessionStore, rope: Rope, tenant: str, session_id: str, config: BlockIndexConfig,
                      source: tuple[SessionRecord, SessionKV] | None = None) -> tuple[SessionRecord, BlockIndex]:
    """Build a session's block index from its stored KV and store it beside the session.

    ``source``: the record and KV the caller already loaded (the index is tagged with that
    record's generation, so an index of KV that changed meanwhile is refused by the store)."""
    if source is not None:
        record, kv = source
        index = BlockIndex.build(kv.keys, kv.positions, rope, config)
    else:  # layer by layer from the store: memory of one layer's keys, not the session's KV
        record = store.get(tenant, session_id)
        if record.has_bias:
            raise FailedPrecondition("retrieval runs on plain sessions; this one is compacted (it has attention biases)")
        index = BlockIndex.build_layers(lambda layer: layer_keys(store, record, layer), record.spec.num_layers,
                                        torch.from_numpy(record.positions_or_default().astype(np.int64)), rope, config)
    records = {_layer_name(config, l): index.layer_to_bytes(l) for l in range(index.num_layers)}
    records[block_meta_name(config)] = json.dumps({"layers": index.num_layers, "config": asdict(config)}).encode()
    try:
        store.put_aux(tenant, session_id, records, record)
    except Conflict:
        log.info("session changed while indexing; index not stored", extra={"fields": {"session": session_id}})
    del records
    _release_freed_memory()  # the build's layer keys and serialised layers (MBs each) would otherwise stay in the heap
    return record, index


def _release_freed_memory() -> None:
    """Give freed heap pages back to the system (glibc malloc_trim; nothing elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def block_index(store: SessionStore, rope: Rope, tenant: str, session_id: str, config: BlockIndexConfig,
                source: tuple[SessionRecord, SessionKV] | None = None, cache: Any = None, record: SessionRecord | None = None) -> Loaded:
    """The session's block index for ``config``: from ``cache`` (retrieval.index_cache.IndexCache)
    when it holds this generation's, else stored, else rebuilt (and stored) when missing, stale or
    corrupt; what was loaded or built is put in ``cache``. Each configuration has its own stored
    index (``BlockIndexConfig.tag``).

    With ``source`` (record, KV) or ``record`` the index must match that generation of the session."""
    from retrieval.index_cache import index_key

    record = source[0] if source is not None else (record or store.get(tenant, session_id))
    key = index_key(record, config.tag)
    if cache is not None:
        held = cache.get(key)
        if held is not None:
            return Loaded(held, False, "memory")
    try:
        index = _load_block_index(store, tenant, session_id, record, config)
        if cache is not None:
            cache.put(key, index.prepare_search())
        return Loaded(index, False)
    except LookupError as exc:
        reason = str(exc)
    except CorruptData as exc:
        reason = f"corrupt: {exc}"
        log.warning("block index damaged; rebuilding", extra={"fields": {"session": session_id, "error": str(exc)}})
    built_from, index = build_block_index(store, rope, tenant, session_id, config, source)
    if cache is not None and built_from.version == record.version and built_from.created_at_ms == record.created_at_ms:
        cache.put(key, index.prepare_search())
    return Loaded(index, True, reason)


@dataclass
class Retrieved:
    record: SessionRecord
    kv: SessionKV | None  # each layer's selected tokens' KV when asked for, else None
    selection: Selection
    index_rebuilt: bool
    bytes_read: int = 0  # stored KV bytes this request read (the probe's window, the selected tokens)


def retrieve(store: SessionStore, use_model: Callable[[], Any], tenant: str, session_id: str, config: RetrievalConfig, index_config: BlockIndexConfig,
             question_ids: torch.Tensor | None = None, query_vectors: list[torch.Tensor] | None = None, question_text: str = "",
             index_cache: Any = None, include_kv: bool = False, rope: Rope | None = None, window: int = 0) -> Retrieved:
    """Select blocks of a stored session for a question (token ids or text, run through the model)
    or for caller-supplied position-free query vectors (per layer [Hq, n, D]).

    Costs what it returns: the index comes from ``index_cache`` or the store (built from the whole
    session only when missing: preparation), the probe pass reads only the sinks and the recent
    window, and ``include_kv`` reads each layer's chunks for its own selected tokens. ``use_model()`` is a context manager
    yielding (model, tokenizer) (the server's model lock); it is held only for the probe pass, so
    searching and reading run beside other requests' model work (and with query vectors, plus the
    model's ``rope`` and ``window``, it is never taken)."""
    record = store.get(tenant, session_id)
    if record.has_bias:
        raise FailedPrecondition("retrieval runs on plain sessions; this one is compacted (it has attention biases)")
    if config.budget_tokens > record.num_tokens:  # before any index is built or stored
        raise InvalidRequest(f"budget of {config.budget_tokens} tokens exceeds the session's {record.num_tokens} tokens; restore the full session instead")
    spec = record.spec
    if query_vectors is not None and len(query_vectors) != spec.num_layers:
        raise InvalidRequest(f"query vectors for {len(query_vectors)} layers; the session has {spec.num_layers}")
    if query_vectors is None and (question_ids is None or question_ids.numel() == 0) and not question_text:
        raise InvalidRequest("give a query: token ids, text, or query vectors")
    if rope is None or not window:
        with use_model() as (model, _):
            rope, window = Rope.from_model(model), model_window(model)
    loaded = block_index(store, rope, tenant, session_id, index_config, cache=index_cache, record=record)
    bytes_read = 0
    if query_vectors is not None:
        from retrieval.actqkv import probes_for_layers

        probes = probes_for_layers(query_vectors, spec.num_kv_heads, config.method)
    else:
        from retrieval.reads import probe_window

        window_kv = probe_window(store, record, config)
        bytes_read += window_kv.bytes_read
        with use_model() as (model, tokenizer):
            if question_text:
                question_ids = tokenizer(question_text, return_tensors="pt", add_special_tokens=False).input_ids[0]
                if question_ids.numel() == 0:
                    raise InvalidRequest("query_text has no tokens; give the question to retrieve for")
            probes = question_probes(model, window_kv, question_ids.view(-1), config, rope, window)
    selection = select(loaded.index, probes, config)
    kv = None
    if include_kv:
        from retrieval.reads import selected_kv

        kv = selected_kv(store, record, [layer.tokens for layer in selection.layers])  # each layer reads its own selection
        bytes_read += kv.bytes_read
    return Retrieved(record, kv, selection, loaded.rebuilt, bytes_read)


def text_index(store: SessionStore, embedder: Any, tenant: str, session_id: str) -> Loaded:
    """The session's text-chunk index, rebuilt when missing, damaged or built from other text."""
    from retrieval.text_index import TextIndex, text_digest

    text = store.session_text(tenant, session_id)
    if text is None:
        raise FailedPrecondition(f"session {session_id!r} was saved without text; save it with text to search it")
    reason = "missing"
    try:
        aux = store.get_aux(tenant, session_id, TEXT_INDEX)
    except CorruptData as exc:
        aux, reason = None, f"corrupt: {exc}"
        log.warning("text index damaged; rebuilding", extra={"fields": {"session": session_id, "error": str(exc)}})
    if aux is not None:
        try:
            index = TextIndex.from_bytes(aux.payload)
            if index.text_digest == text_digest(text) and index.embedder_name == embedder.name:
                return Loaded(index, False)
            reason = "stale"
        except CorruptData as exc:
            reason = f"corrupt: {exc}"
            log.warning("text index damaged; rebuilding", extra={"fields": {"session": session_id, "error": str(exc)}})
    index = TextIndex.build(text, embedder)
    try:
        store.put_aux(tenant, session_id, {TEXT_INDEX: index.to_bytes()}, store.get(tenant, session_id))
    except Conflict:
        pass
    return Loaded(index, True, reason)


class IndexBuilder:
    """Builds indexes in the background after saves and appends (one worker thread).

    ``submit`` never blocks a save; a failed build is logged and left to the next request, which
    rebuilds on demand.
    """

    def __init__(self, store: SessionStore, rope_for: Any, config: BlockIndexConfig, max_pending: int = 64):
        self.store = store
        self.rope_for = rope_for  # callable(spec) -> Rope | None (None: no hosted model for this spec)
        self.config = config
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._thread = threading.Thread(target=self._run, name="kvmem-indexer", daemon=True)
        self._thread.start()

    def submit(self, tenant: str, session_id: str) -> bool:
        try:
            self._queue.put_nowait((tenant, session_id))
            return True
        except queue.Full:
            return False

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Block until every submitted build has finished (tests, shutdown)."""
        done = threading.Event()
        self._queue.put(("", done), timeout=timeout)
        done.wait(timeout)

    def _run(self) -> None:
        while True:
            tenant, item = self._queue.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            try:
                record = self.store.get(tenant, item)
                if record.has_bias:
                    continue
                rope = self.rope_for(record.spec)
                if rope is not None:
                    block_index(self.store, rope, tenant, item, self.config)
            except KvmemError as exc:
                log.info("background index build skipped", extra={"fields": {"session": item, "error": str(exc)}})
            except Exception:  # keep the worker alive; the next request rebuilds on demand
                log.exception("background index build failed")

    def close(self, timeout: float = 120.0) -> None:
        """Stop after the build in progress (it runs native code that must not be cut off at
        interpreter exit); queued builds are dropped: indexes are derived data, rebuilt on demand."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(("", None))
        self._thread.join(timeout=timeout)
