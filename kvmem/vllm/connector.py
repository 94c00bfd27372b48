"""kvmem as a vLLM v1 KV connector: vLLM workers take stored prefixes from kvmem and save new
full blocks to it.

    from vllm import LLM
    from vllm.config import KVTransferConfig

    llm = LLM(model=folder, kv_transfer_config=KVTransferConfig(
        kv_connector="KVMemConnector", kv_connector_module_path="kvmem.vllm.connector",
        kv_role="kv_both", kv_load_failure_policy="recompute",
        kv_connector_extra_config={"kvmem_address": "127.0.0.1:50051"}))

vLLM makes two instances that share nothing but the step metadata and kvmem itself:

- scheduler half: ``get_num_new_matched_tokens`` asks kvmem's Lookup for the stored prefix of
  the prompt (whole vLLM blocks, at least one token left to compute); the allocation and each
  step become LoadJobs and SaveJobs (``kvmem.vllm.plan``).
- worker half: ``start_load_kv`` restores exactly the tokens vLLM lacks (its own prefix cache
  may hold the first ones) straight into the paged buffers; ``wait_for_save`` copies the new
  full blocks out and a background thread saves them (``kvmem.vllm.saver``), sending only what
  kvmem does not hold. A load that fails (kvmem down, the prefix deleted, damage on disk) is
  reported as invalid blocks, so vLLM recomputes them (``kv_load_failure_policy="recompute"``);
  KV is never taken from a failed or partial restore.

Layout conversion lives in ``kvmem.vllm.layout``; the model spec comes from vLLM's config
(``kvmem.vllm.settings.spec_from_vllm``), identical to ``ModelSpec.from_model`` of the same
checkpoint in transformers, so KV saved by either restores into the other.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole

from kvmem.vllm.layout import PagedLayout, positions_from_probe, region_order
from kvmem.vllm.plan import LoadJob, RequestState, SaveJob, loadable_tokens
from kvmem.vllm.saver import BackgroundSaver, SaveTask
from kvmem.vllm.settings import ConnectorSettings, spec_from_vllm

if TYPE_CHECKING:
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = logging.getLogger("vllm.kvmem")  # under vLLM's logger: its handler and format, INFO included
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


@dataclass
class KVMemConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadJob] = field(default_factory=list)
    saves: list[SaveJob] = field(default_factory=list)


def _layer_order(names: list[str]) -> list[str]:
    """Attention layer names in layer order ("model.layers.10.self_attn.attn" after "...9...")."""
    def index(name: str) -> int:
        match = _LAYER_INDEX.search(name)
        if match is None:
            raise ValueError(f"cannot tell the layer index of vLLM attention layer {name!r}")
        return int(match.group(1))

    return sorted(names, key=index)


class KVMemConnector(KVConnectorBase_V1):
    """See the module docstring. One instance per role; ``self.spec`` is the model's kvmem spec."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        from kvmem.client import Client

        self.settings = ConnectorSettings.from_extra_config(self._kv_transfer_config.kv_connector_extra_config)
        self.block_size = vllm_config.cache_config.block_size
        self.spec = spec_from_vllm(vllm_config, self.settings)
        if getattr(self._kv_transfer_config, "kv_load_failure_policy", "recompute") != "recompute":
            log.warning("kvmem: kv_load_failure_policy is %r: a failed kvmem load will fail the request; "
                        "set kv_load_failure_policy=\"recompute\" to recompute it instead",
                        self._kv_transfer_config.kv_load_failure_policy)
        timeout = self.settings.lookup_timeout_s if role == KVConnectorRole.SCHEDULER else self.settings.timeout_s
        self.client = Client(self.settings.address, token=self.settings.api_key(), tls=self.settings.tls_option(),
                             tenant=self.settings.tenant, spec=self.spec, timeout=timeout)
        # scheduler half
        self._states: dict[str, RequestState] = {}
        self._requests: dict[str, "Request"] = {}
        self._skip_until = 0.0
        # worker half
        self._kv_caches: list[torch.Tensor] = []
        self._layout: PagedLayout | None = None
        self._invalid_blocks: set[int] = set()
        self._invalid_lock = threading.Lock()
        self._saver: BackgroundSaver | None = None
        self.loaded_tokens = 0
        log.info("kvmem connector (%s) for %s at %s, block size %d", role.name.lower(), self.spec.name, self.settings.address, self.block_size)

    # ================================================================ scheduler half
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        params = request.kv_transfer_params or {}
        tokens = request.prompt_token_ids
        if (tokens is None or request.lora_request is not None or request.mm_features
                or params.get("kvmem_load") is False and params.get("kvmem_save") is False):
            return 0, False  # prompt embeddings, adapters and images change the KV of the same token ids
        state = self._states.get(request.request_id)
        if state is None:  # first call for this request (vLLM asks again while it waits for blocks, or after preemption)
            matched, chunk = self._lookup(tokens)
            if matched is None:
                return 0, False
            save = self.settings.save and params.get("kvmem_save") is not False
            session = params.get("kvmem_session") or ""
            if not isinstance(session, str):
                log.warning("kvmem: request %s: kvmem_session must be a string, got %r; not saving it", request.request_id, session)
                session, save = "", False
            state = RequestState.create(request.request_id, len(tokens), session, chunk, matched, save)
            self._states[request.request_id] = state
            self._requests[request.request_id] = request
        state.local_computed = num_computed_tokens  # vLLM's own prefix-cache hit: loading starts after it
        matched = state.stored
        if not self.settings.load or params.get("kvmem_load") is False:
            return 0, False
        external = loadable_tokens(matched, len(tokens), self.block_size) - num_computed_tokens
        return (external, False) if external > 0 else (0, False)

    def _lookup(self, tokens: list[int]) -> tuple[int | None, int]:
        """(stored prefix length, kvmem's chunk size), or (None, 0) while kvmem is unreachable."""
        now = time.monotonic()
        if now < self._skip_until:
            return None, 0
        try:
            return self.client.lookup_chunked(tokens)
        except Exception as exc:
            self._skip_until = now + self.settings.retry_after_s
            log.warning("kvmem: lookup failed (%s); computing prefills without kvmem for %.0f s", exc, self.settings.retry_after_s)
            return None, 0

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        state = self._states.get(request.request_id)
        if state is not None and num_external_tokens > 0:
            state.pending_load = (state.local_computed, state.local_computed + num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = KVMemConnectorMetadata()
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            state = self._states.get(new.req_id)
            if state is None:
                continue
            state.update_blocks(new.block_ids[0], replace=True)
            state.computed = new.num_computed_tokens + scheduled.get(new.req_id, 0)
            self._plan(state, meta)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._states.get(req_id)
            if state is None:
                continue
            new_blocks = cached.new_block_ids[i]
            state.update_blocks(new_blocks[0] if new_blocks else None, replace=req_id in cached.resumed_req_ids)
            state.computed = cached.num_computed_tokens[i] + scheduled.get(req_id, 0)
            self._plan(state, meta)
        return meta

    def _plan(self, state: RequestState, meta: KVMemConnectorMetadata) -> None:
        tokens = self._requests[state.req_id].all_token_ids
        load = state.take_load(tokens, self.block_size)
        if load is not None:
            meta.loads.append(load)
        save = state.take_save(tokens, self.block_size)
        if save is not None:
            meta.saves.append(save)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Forget the request; its saves were copied out during its steps, so no block is held."""
        state = self._states.pop(request.request_id, None)
        self._requests.pop(request.request_id, None)
        if state is None:
            return False, None
        params = {"kvmem_session": state.session_id if state.session_end else "", "kvmem_load_tokens": state.loaded,
                  "kvmem_saved_tokens": state.session_end}
        return False, params

    # ================================================================ worker half
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = _layer_order(list(kv_caches))
        if len(names) != self.spec.num_layers:
            raise ValueError(f"vLLM has {len(names)} attention layers with a KV cache, the model spec {self.spec.num_layers}")
        self._kv_caches = [kv_caches[name] for name in names]
        first = self._kv_caches[0]
        if first.dtype != self.spec.torch_dtype:
            raise ValueError(f"vLLM's KV cache is {first.dtype}, the model spec says {self.spec.dtype}")
        layout = PagedLayout.detect(first, self.block_size, self.spec.num_kv_heads, self.spec.head_dim)
        if layout.kind == "cpu":
            key_pos, value_pos = self._probe_cpu_positions(first.dtype)
            layout = PagedLayout.detect(first, self.block_size, self.spec.num_kv_heads, self.spec.head_dim, key_pos, value_pos)
        self._layout = layout
        self._saver = BackgroundSaver(self._send_save, self.settings.max_pending_save_bytes)

    def _probe_cpu_positions(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Where vLLM's CPU attention kernel puts each (token, dim) of a block: write one block
        of known values with its own cache-writing op (for this CPU's ISA) and read them back.
        Two passes, one encoding the token and one the dimension (small integers, exact in
        bf16 too), so the probe holds for every dtype the connector stores."""
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        size, heads, dim = self.block_size, self.spec.num_kv_heads, self.spec.head_dim
        if max(size, dim) > 255:
            raise ValueError(f"block_size {size} / head_dim {dim}: the layout probe encodes positions up to 255")
        isa = _get_attn_isa(dtype, size, dim)
        token = torch.arange(1, size + 1).view(size, 1, 1).expand(size, heads, dim)
        dimension = torch.arange(1, dim + 1).view(1, 1, dim).expand(size, heads, dim)
        regions = []
        for source in (token, dimension):
            scratch = torch.zeros(1, heads, size, 2 * dim, dtype=dtype)
            key_cache, value_cache = scratch.view(1, heads, 2 * size, dim).chunk(2, dim=2)
            filled = source.to(dtype).contiguous()
            ops.cpu_attn_reshape_and_cache(filled, filled, key_cache, value_cache, torch.arange(size, dtype=torch.long), isa)
            regions.append(scratch.view(heads, 2, size * dim))
        tokens, dims = regions
        key_pos = positions_from_probe(tokens[0, 0], dims[0, 0], size, dim)
        value_pos = positions_from_probe(tokens[0, 1], dims[0, 1], size, dim)
        for head in range(1, heads):
            if not (torch.equal(positions_from_probe(tokens[head, 0], dims[head, 0], size, dim), key_pos)
                    and torch.equal(positions_from_probe(tokens[head, 1], dims[head, 1], size, dim), value_pos)):
                raise ValueError("vLLM's CPU KV layout differs between heads; not supported")
        log.info("kvmem: CPU KV layout (isa %s): keys %s-major, values %s-major", isa,
                 region_order(key_pos, size, dim), region_order(value_pos, size, dim))
        return key_pos, value_pos

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, KVMemConnectorMetadata):
            return
        for job in meta.loads:
            self._load(job)

    def _load(self, job: LoadJob) -> None:
        """Restore tokens [start, end) into the request's blocks; blocks left without KV are
        reported invalid, so vLLM recomputes them."""
        assert self._layout is not None
        layout, caches = self._layout, self._kv_caches
        got = job.start

        def write(layer: int, token_start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
            layout.scatter(caches[layer], job.block_ids, token_start, keys, values)

        try:  # each chunk goes straight from the received message into the paged buffers
            _, got = self.client.restore_prefix_into(job.token_ids, write, start=job.start, end=job.end)
        except Exception as exc:  # chunks may have been written: every block of the job is recomputed
            got = job.start
            log.warning("kvmem: loading tokens [%d, %d) of request %s failed (%s); vLLM recomputes them", job.start, job.end, job.req_id, exc)
        if got < job.end:
            first_bad = got // self.block_size  # the block holding token `got` onwards (got == start: all of the job's)
            with self._invalid_lock:
                self._invalid_blocks.update(job.block_ids[first_bad:])
            if got > job.start:
                log.warning("kvmem: only tokens [%d, %d) of [%d, %d) of request %s were stored; vLLM recomputes the rest",
                            job.start, got, job.start, job.end, job.req_id)
        self.loaded_tokens += got - job.start

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv loads every layer before the forward pass

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # saved after the forward pass, all layers at once (wait_for_save)

    def wait_for_save(self) -> None:
        """Copy this step's new full blocks out of the paged buffers; a thread saves them."""
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, KVMemConnectorMetadata) or not meta.saves:
            return
        assert self._layout is not None and self._saver is not None
        for job in meta.saves:
            layers = [self._layout.gather(kv_cache, job.block_ids, job.start, job.end) for kv_cache in self._kv_caches]
            self._saver.submit(SaveTask(job.session_id, job.token_ids, job.start, layers))

    def _send_save(self, task: SaveTask) -> None:
        self.client.save(task.session_id, task.layers, task.token_ids, cache_start=task.start, overwrite=True,
                         ttl_seconds=self.settings.ttl_seconds)

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._invalid_lock:
            invalid, self._invalid_blocks = self._invalid_blocks, set()
        return invalid

    def wait_for_saves(self, timeout: float = 60.0) -> bool:
        """Block until every queued save has been sent (tests, benchmarks, shutdown)."""
        return self._saver.wait_idle(timeout) if self._saver is not None else True

    def shutdown(self) -> None:
        if self._saver is not None:
            self._saver.close(self.settings.timeout_s)
        self.client.close()
