"""Prometheus metrics of a kvmem server, on their own registry (two servers in one process, as
in tests, never share counters).

Request metrics are recorded by the front end as calls end; store figures (sessions, blocks,
bytes per tenant and tier, LMDB map use, dedup ratio) are read from the store at scrape time,
so they cannot drift from what the store holds. ``[metrics] port`` serves them over HTTP.
"""
from __future__ import annotations

import logging
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("kvmem.metrics")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
WORK_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)


class StoreCollector:
    """Store figures at scrape time (a read transaction; no lock on the write path)."""

    def __init__(self, store, open_streams: Callable[[], int], max_tenants: int = 1000):
        self.store = store
        self.open_streams = open_streams
        self.max_tenants = max_tenants

    def describe(self):
        return []  # figures are read at collect time; nothing to register up front

    def collect(self):
        stats = self.store.stats()
        tenants = self.store.usage_by_tenant(self.max_tenants)
        per_tenant = {
            "sessions": GaugeMetricFamily("kvmem_tenant_sessions", "Sessions a tenant holds", labels=["tenant"]),
            "stored_bytes": GaugeMetricFamily("kvmem_tenant_stored_bytes", "Bytes of KV stored for a tenant after dedup", labels=["tenant"]),
            "logical_bytes": GaugeMetricFamily("kvmem_tenant_logical_bytes", "Bytes of KV a tenant's sessions refer to before dedup", labels=["tenant"]),
        }
        for usage in tenants:
            for name, family in per_tenant.items():
                family.add_metric([usage.tenant], getattr(usage, name))
        yield from per_tenant.values()
        for name, help_text in (("sessions", "Sessions stored"), ("chunks", "Distinct stored chunks"),
                                ("stored_bytes", "Bytes of KV stored after dedup"), ("logical_bytes", "Bytes of KV referenced before dedup")):
            yield GaugeMetricFamily(f"kvmem_{name}", help_text, value=stats[name])
        stored = stats["stored_bytes"]
        yield GaugeMetricFamily("kvmem_dedup_ratio", "logical_bytes / stored_bytes (1 when nothing is stored)", value=stats["logical_bytes"] / stored if stored else 1.0)
        yield GaugeMetricFamily("kvmem_lmdb_map_bytes", "LMDB map size", value=stats["lmdb_map_bytes"])
        yield GaugeMetricFamily("kvmem_lmdb_used_bytes", "LMDB pages in use", value=stats["lmdb_used_bytes"])
        yield GaugeMetricFamily("kvmem_lmdb_max_map_bytes", "LMDB map ceiling (store.lmdb_max_map_bytes)", value=self.store.config.lmdb_max_map_bytes)
        tier_bytes = GaugeMetricFamily("kvmem_tier_bytes", "Bytes held per tier", labels=["tier"])
        tier_capacity = GaugeMetricFamily("kvmem_tier_capacity_bytes", "Capacity per tier", labels=["tier"])
        tier_entries = GaugeMetricFamily("kvmem_tier_entries", "Entries per tier", labels=["tier"])
        counters = {name: CounterMetricFamily(f"kvmem_tier_{name}", f"Tier {name}", labels=["tier"]) for name in ("hits", "misses", "promotions", "evictions")}
        for tier in stats["tiers"]:
            tier_bytes.add_metric([tier["name"]], tier["bytes_used"])
            tier_capacity.add_metric([tier["name"]], tier["capacity_bytes"])
            tier_entries.add_metric([tier["name"]], tier["entries"])
            for name, family in counters.items():
                family.add_metric([tier["name"]], tier.get(name, 0))
        yield from (tier_bytes, tier_capacity, tier_entries, *counters.values())
        yield GaugeMetricFamily("kvmem_open_streams", "Save/Append/Restore/Retrieve streams open now", value=self.open_streams())
        yield GaugeMetricFamily("kvmem_inflight_bytes", "KV held in memory by unfinished writes (bounded by store.inflight_bytes)", value=stats["inflight_bytes"])
        yield CounterMetricFamily("kvmem_group_commits", "Durable (fsync'd) commits of the writer thread", value=stats["group_commits"])
        yield CounterMetricFamily("kvmem_group_commit_writes", "Writes those commits carried (/ commits = writes per fsync)", value=stats["group_commit_writes"])
        yield GaugeMetricFamily("kvmem_damaged_tenants", "Tenants whose session catalogue failed its check at start (see the log)", value=stats["damaged_tenants"])


class Metrics:
    """Everything the server reports; ``registry`` is what /metrics serves."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter("kvmem_requests", "Calls by method and status code", ["method", "code"], registry=r)
        self.latency = Histogram("kvmem_request_seconds", "Call latency by method (until the last message)", ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.received = Counter("kvmem_received_bytes", "Request bytes received, by method", ["method"], registry=r)
        self.sent = Counter("kvmem_sent_bytes", "Response bytes sent, by method", ["method"], registry=r)
        self.auth_failures = Counter("kvmem_auth_failures", "Calls refused for identity: unauthenticated or permission denied", ["reason"], registry=r)
        self.compaction = Histogram("kvmem_compaction_seconds", "Compaction time by method", ["method"], buckets=WORK_BUCKETS, registry=r)
        self.retrieval = Histogram("kvmem_retrieval_seconds", "Retrieve: selection time", ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.planner_choices = Counter("kvmem_planner_choices", "Options the planner chose (Plan and Answer)", ["choice", "rpc"], registry=r)
        self.answer_stages = Histogram("kvmem_answer_stage_seconds", "Answer execution time per option and stage (load, index, compact, train = qTTT, generate)",
                                       ["option", "stage"], buckets=WORK_BUCKETS, registry=r)
        self._http = None

    def watch_store(self, store, open_streams: Callable[[], int]) -> None:
        self.registry.register(StoreCollector(store, open_streams))

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics over HTTP; returns the bound port (port 0 picks one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        bound = server.server_address[1]
        log.info("metrics served", extra={"fields": {"host": host, "port": bound}})
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
