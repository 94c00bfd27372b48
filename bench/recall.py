"""Recall on SmolLM2: compacted caches that recall exact KV from their lossless source, against
the full cache, compaction alone and retrieval alone, every method on the same tasks in one run.

Two task families, each context saved as a session in a fresh on-disk SessionStore:

* needle: the project's needle suite (bench/tasks.py: natural licence text, single- and multi-key
  needles, depths cycling 0.1/0.5/0.9/...), contexts of 1k, 2k, 4k and "8k" tokens. 8k is 7,936
  tokens: context + 64 continuation tokens + the question + the answer must fit SmolLM2's 8,192
  window, and so must the 128 self-study tokens of Attention Matching's reference queries;
* wiki: cloze questions about real Wikipedia articles (bench/wiki_tasks.py: the test dump inside
  the gensim 4.4.0 wheel, fetched once into .cache/wheels with pip; a year, number or name to
  complete in one sentence of the context, gold chosen by properties of the text only). When the
  wheel cannot be fetched the family is skipped with a printed reason.

No task is filtered on the full cache's answer: every row is scored on every task, and the
comparison with the full cache is a ratio of accuracies on the same tasks.

Rows (``--new-tokens`` greedy tokens each, the same for all):

* ``full``: the whole context's KV (generation only: the cache is resident);
* ``<method> <p>%``: compaction alone (compaction.service.compact_session into the store, then
  load_compacted) at 50/25/10/5% kept, for attention_matching (options {"causal": False}, the
  Compact RPC's default reference queries), streaming_llm and snapkv (the context's own prefill
  queries). Attention Matching's reference queries are made once per task and reused for every
  ratio; it skips 50% above 2k tokens and runs only up to ``--am-max-length`` (default 4k: at
  7,936 tokens its references alone take ~115 s per task and 25%/50% several minutes each);
* ``kv_retrieval <b>``: retrieval alone (retrieval.context.answer, RetrievalConfig(budget_tokens=b),
  the session restored from the store and its stored block index, representatives=4);
* ``<method> 10% + recall <b> / <double_count>``: the 10% compacted session plus
  retrieval.recall.recall of b tokens per layer (256, 512, and ``--share`` = 5% of the context:
  recall counts its budget exactly, margins included), for each double-count handling (none, drop,
  scale, drop_scale), for attention_matching and streaming_llm. Recall searches its own block
  index (RecallConfig: block size, representatives, margin); ``--recall-index b64r4m16,b16r0m8``
  runs each variant as its own rows on the same compacted sessions (every index is built and
  stored before any timing and held in memory, as the server's index LRU does).

Per row: accuracy (hits / tasks); bytes resident (the cache kept hot between questions: the full
KV; the compacted keys + values + biases; the same compacted bytes for recall; nothing for
retrieval alone, which loads the session per question); bytes read per question (full: the full
KV it attends; compaction alone: the compacted cache; retrieval alone: the full session it
restores; recall: ``Recalled.bytes_read``, the stored chunks it loads; the JSON also has
``layer_bytes``, what a per-layer read of the same chunks would load); seconds per question (wall
time: recall + generation, restore + retrieval + generation, or generation alone); the recall
share of the context (recalled tokens per layer / context tokens); and the ratios against the full
cache on the same tasks (accuracy ratio, seconds ratio). Block indexes are built once per session
before any timing (the server builds them on save).

Attention error (the double-count handlings): for each recalled cache, the relative L2 error of
the attention outputs (compaction.metrics.compacted_attention, per layer and KV head, the group's
query heads pooled, averaged over layers and heads, as compaction/metrics.py) over (the slots with
their adjusted biases + the recalled tokens) against the full cache, for the held-out queries (the
64 continuation tokens after the context, captured with compaction.queries.capture_queries on
context + continuation) and, as a second view, the question's own queries over the full cache.

Goal (printed at the end, per context length): compacted at 10% + recall of at most 5% of the
context reaches >= 95% of the full cache's accuracy at <= 1.2x its seconds per question.

The full run works to a time budget (``--budget-min``, default 40): the needle and wiki tasks are
interleaved, each task runs only while its projected cost fits, and each finished task is written
to the result file at once. The model runs on two torch threads (generation over an 8k cache is
~1.5x faster than on one); compaction runs on one (bench/compaction.py: MKL's two-thread LU in
Attention Matching's value refit is many times slower when other processes compete for the cores).

    python -m bench.recall --quick            # CI smoke (< 3 min): one needle + one wiki 1k task, streaming_llm, 10%
    python -m bench.recall                    # full run (~40 min on 2 cores) -> bench/results/recall.json, recall.md
    python -m bench.recall --render bench/results/recall.json   # tables again from the stored records
    python -m bench.recall --name recall_fine --ratios 0.1 --recall-budgets '' --retrieval-budgets '' \
        --double-counts drop_scale --recall-index b64r4m16,b16r0m8   # only what the 5% goal needs, two recall indexes
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the torch import (bench/compaction.py)

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import MB, MODEL_CACHE, RESULTS_DIR, disk_tempdir, environment, format_table, pin_threads, write_result  # noqa: E402

NAME = "recall"
AM, SL, SNAP = "attention_matching", "streaming_llm", "snapkv"
METHODS = (AM, SL, SNAP)
RECALL_METHODS = (AM, SL)
METHOD_OPTIONS = {AM: {"causal": False}}
RATIOS = (0.5, 0.25, 0.1, 0.05)
RECALL_RATIO = 0.1
RECALL_BUDGETS = (256, 512)
RETRIEVAL_BUDGETS = (256, 512)
DOUBLE_COUNTS = ("none", "drop", "scale", "drop_scale")  # retrieval.recall.DOUBLE_COUNT (imported lazily there: faiss)
SHARE = 0.05  # the goal's recall share; also run as a per-task budget (at least one block)

NEEDLE_LENGTHS = (1024, 2048, 4096, 7936)
WIKI_LENGTHS = (1024, 2048)
NEW_TOKENS = 10
AM_SKIP_HALF_ABOVE = 2048
GOAL_ACC, GOAL_SECONDS = 0.95, 1.2
TENANT = "bench"
SHORT = {AM: "am", SL: "sl", SNAP: "snapkv"}


# ---------------------------------------------------------------------------- tasks
def needle_plan(lengths: Sequence[int], count: int) -> list[dict]:
    from bench.tasks import task_plan

    return [{"family": "needle", "kind": kind, "length": length, "depth": depth, "seed": seed}
            for kind, length, depth, seed in task_plan(list(lengths), count)]


def interleave(*plans: list) -> list:
    """Round-robin over the plans (so a budget cut never removes a family or a length wholesale)."""
    out = []
    for i in range(max((len(p) for p in plans), default=0)):
        out += [p[i] for p in plans if i < len(p)]
    return out


def score(task: Any, text: str) -> bool:
    if hasattr(task, "score"):
        return task.score(text)
    from bench.tasks import score_answer

    return score_answer(text, task.code)


# ---------------------------------------------------------------------------- measurement helpers
def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


class AttentionReference:
    """Full-cache attention outputs of fixed query sets, per layer and KV head, for error measurements."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], queries: dict[str, list[torch.Tensor]]):
        from compaction.metrics import compacted_attention

        self.heads, self.head_dim = keys[0].shape[0], keys[0].shape[2]
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.queries = {name: [self._grouped(q) for q in qs] for name, qs in queries.items()}
        self.full = {name: [[compacted_attention(q[h], keys[l][h].float(), values[l][h].float(), None, self.scale) for h in range(self.heads)]
                            for l, q in enumerate(qs)] for name, qs in self.queries.items()}

    def _grouped(self, q: torch.Tensor) -> torch.Tensor:
        """[Hq, n, D] -> [H, g * n, D] (CompactionInput.grouped_queries)."""
        return q.float().reshape(self.heads, (q.shape[0] // self.heads) * q.shape[1], q.shape[2])

    def errors(self, keys: list[torch.Tensor], values: list[torch.Tensor], bias: list[torch.Tensor | None]) -> dict[str, float]:
        """Mean over layers and KV heads of ||O - O_full|| / ||O_full|| for each query set."""
        from compaction.metrics import compacted_attention

        out = {}
        for name, qs in self.queries.items():
            errs = []
            for l, q in enumerate(qs):
                for h in range(self.heads):
                    b = bias[l][h].float() if bias[l] is not None else None
                    approx = compacted_attention(q[h], keys[l][h].float(), values[l][h].float(), b, self.scale)
                    full = self.full[name][l][h]
                    errs.append(float((approx - full).norm() / full.norm().clamp_min(1e-12)))
            out[name] = float(np.mean(errs))
        return out


def question_queries(model, keys, values, question_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer [Hq, n, D]: the question's queries over the full cache."""
    from compaction.queries import recording_queries
    from kvmem.hf_cache import layers_to_cache

    cache = layers_to_cache([(k.clone(), v.clone()) for k, v in zip(keys, values)], model.config)
    with torch.no_grad(), recording_queries(model) as queries:
        model(question_ids.view(1, -1), cache=cache, use_cache=True)
    return [queries[l].float() for l in range(len(keys))]


def layer_bytes(source, tokens: list[np.ndarray]) -> int:
    """Bytes a per-layer read of the chunks holding each layer's recalled tokens would load."""
    spec = source.spec
    per_token_layer = spec.bytes_per_token // spec.num_layers
    total = 0
    for chosen in tokens:
        for ref in source.blocks:
            if np.any((chosen >= ref.start) & (chosen < ref.end)):
                total += (ref.end - ref.start) * per_token_layer
    return int(total)


# ---------------------------------------------------------------------------- one task
def run_task(model, tokenizer, store, task, info: dict, config: dict, log: Callable[[str], None]) -> dict:
    from compaction.base import Target
    from compaction.queries import capture_queries
    from compaction.references import reference_queries
    from compaction.service import compact_session
    from kvstore.spec import ModelSpec
    from retrieval.block_index import BlockIndexConfig
    from retrieval.context import RetrievalConfig, SessionKV, answer as retrieval_answer
    from retrieval.executors import generate_on
    from retrieval.recall import RecallConfig, load_compacted, recall
    from retrieval.rope import Rope
    from retrieval.service import block_index

    started = time.perf_counter()
    new_tokens = config["new_tokens"]
    length = task.context_ids.shape[1]
    question = task.question_ids.view(-1)
    spec = ModelSpec.from_model(model)
    rope = Rope.from_model(model)
    index_config = BlockIndexConfig(representatives=4)
    record: dict[str, Any] = {"family": info["family"], "task": task.describe(), "length": length, "gold": task.code, "runs": []}

    def decode(ids: list[int]) -> str:
        eos = tokenizer.eos_token_id
        if eos is not None and eos in ids:
            ids = ids[: ids.index(eos)]
        return tokenizer.decode(ids, skip_special_tokens=True)

    def add(row: str, kind: str, text: str, seconds: float, resident: int, read: int, **extra) -> dict:
        run = {"row": row, "kind": kind, "correct": score(task, text), "answer": text, "seconds": seconds,
               "resident_bytes": int(resident), "read_bytes": int(read), **extra}
        record["runs"].append(run)
        err = run.get("attn_err")
        log(f"    {row:<40} {'OK ' if run['correct'] else 'BAD'} {text[:28]!r:<32} {seconds:6.2f}s  read {read / MB:7.1f} MB"
            + (f"  err {err['held_out']:.3f}/{err['question']:.3f}" if err else "")
            + (f"  needle in {run['needle_cover']:.0%} of layers" if run.get("needle_cover") is not None else ""))
        return run

    # the context's KV and the queries everything is measured with: one causal pass over context + continuation
    t0 = time.perf_counter()
    captured = capture_queries(model, torch.cat([task.context_ids, task.continuation_ids], dim=1))
    keys = [layer.keys[0, :, :length].contiguous() for layer in captured.cache.layers]
    values = [layer.values[0, :, :length].contiguous() for layer in captured.cache.layers]
    context_queries = [q[:, :length].contiguous() for q in captured.queries]
    held_out = [q[:, length:].contiguous() for q in captured.queries]
    del captured
    reference = AttentionReference(keys, values, {"held_out": held_out, "question": question_queries(model, keys, values, question)})
    record["prefill_seconds"] = time.perf_counter() - t0

    sid = task.name
    pieces = store.new_pieces(spec, 0, length)
    for layer, (k, v) in enumerate(zip(keys, values)):
        pieces.add_tensors(layer, 0, k, v)
    store.save(TENANT, sid, spec, task.context_ids[0].numpy().astype(np.uint32), pieces, overwrite=True)
    loaded = block_index(store, rope, TENANT, sid, index_config)  # built and stored once, before any timing
    record["index_bytes"] = int(sum(len(loaded.index.layer_to_bytes(l)) for l in range(loaded.index.num_layers)))
    recall_indexes = {}  # recall's own index per variant: built and stored once before any timing, then held in memory (the server's LRU)
    for name, settings in config["recall_indexes"].items():
        wanted = RecallConfig(**settings).index_config(index_config)
        recall_indexes[name] = loaded.index if wanted == index_config else block_index(store, rope, TENANT, sid, wanted).index
    record["recall_index_bytes"] = {name: int(index.nbytes) for name, index in recall_indexes.items()}
    full_bytes = length * spec.bytes_per_token

    # full cache
    t0 = time.perf_counter()
    ids = generate_on(model, list(zip(keys, values)), [None] * len(keys), length, question, new_tokens)
    add("full", "full", decode(ids), time.perf_counter() - t0, full_bytes, full_bytes)

    # retrieval alone: restore the session, its stored index, retrieve, generate
    for budget in config["retrieval_budgets"]:
        if budget >= length:
            continue
        t0 = time.perf_counter()
        plan = store.restore(TENANT, sid)
        kv = SessionKV.from_plan(plan)
        index = block_index(store, rope, TENANT, sid, index_config).index
        out = retrieval_answer(model, kv, index, question, RetrievalConfig(budget_tokens=budget), max_new_tokens=new_tokens)
        seconds = time.perf_counter() - t0
        add(f"kv_retrieval {budget}", "retrieval", decode(out.token_ids.tolist()), seconds, 0, plan.record.kv_bytes,
            budget=budget, recall_share=float(np.mean(out.selection.tokens_per_layer)) / length)
        del plan, kv

    # compaction alone at every ratio, then recall on the 10% sessions
    refs = None
    compacted_ids = []
    for method in config["methods"]:
        ratios = [r for r in config["ratios"] if method != AM or ((r < 0.5 or length <= AM_SKIP_HALF_ABOVE) and length <= config["am_max_length"])]
        if method == AM and ratios and refs is None:
            t0 = time.perf_counter()
            refs = reference_queries(model, tokenizer, task.context_ids)  # the Compact RPC's default; never sees the question
            record["reference_seconds"] = time.perf_counter() - t0
        for ratio in ratios:
            queries = refs.queries if method == AM else (context_queries if method == SNAP else None)
            t0 = time.perf_counter()
            torch.set_num_threads(config["compact_threads"])
            try:
                report = compact_session(store, None, TENANT, sid, method, Target(ratio=ratio), queries=queries, held_out=held_out,
                                             options=METHOD_OPTIONS.get(method), overwrite=True)
            finally:
                torch.set_num_threads(config["threads"])
            compact_seconds = time.perf_counter() - t0
            cid = report.record.session_id
            compacted_ids.append(cid)
            compacted = load_compacted(store, TENANT, cid)
            resident = tensor_bytes(compacted.keys) + tensor_bytes(compacted.values) + tensor_bytes(compacted.bias)
            label = f"{SHORT[method]} {100 * ratio:g}%"
            errors = reference.errors(compacted.keys, compacted.values, compacted.bias)
            t0 = time.perf_counter()
            ids = generate_on(model, list(zip(compacted.keys, compacted.values)), compacted.bias, length, question, new_tokens)
            add(label, "compaction", decode(ids), time.perf_counter() - t0, resident, resident, method=method, ratio=ratio,
                compact_seconds=compact_seconds, attn_err=errors)
            if ratio != RECALL_RATIO or method not in config["recall_methods"]:
                continue
            budgets = [b for b in config["recall_budgets"] if b < length]
            if config["share"]:  # recall counts its budget exactly (margins included): 5% is 5%
                budgets.append(max(1, int(config["share"] * length)))
            variants = config["recall_indexes"]
            for budget in budgets:
                for variant, settings in variants.items():
                    for handling in config["double_counts"]:
                        recall_config = RecallConfig(budget_tokens=budget, double_count=handling, **settings)
                        t0 = time.perf_counter()
                        recalled = recall(model, store, compacted, question, recall_config, index_config, recall_indexes[variant])
                        ids = generate_on(model, list(zip(recalled.keys, recalled.values)), recalled.bias, recalled.logical_length, question, new_tokens)
                        seconds = time.perf_counter() - t0
                        errors = reference.errors(recalled.keys, recalled.values, recalled.bias)
                        named = f"{budget}" if budget in config["recall_budgets"] else f"{100 * config['share']:g}%"
                        tag = f" {variant}" if len(variants) > 1 else ""
                        add(f"{SHORT[method]} 10% + recall {named}{tag} / {handling}", "recall", decode(ids), seconds, resident, recalled.bytes_read,
                            method=method, ratio=ratio, budget=budget, budget_name=named, double_count=handling, applied=recalled.double_count,
                            recall_index=variant, index_bytes=record["recall_index_bytes"][variant],
                            recalled_tokens=recalled.recalled_tokens, recall_share=float(np.mean([len(t) for t in recalled.tokens])) / length,
                            layer_bytes=layer_bytes(recalled.source, recalled.tokens), stage_seconds=dict(recalled.seconds), attn_err=errors,
                            needle_cover=needle_cover(task, tokenizer, recalled.tokens))
                        del recalled
            del compacted
            gc.collect()
    for cid in compacted_ids:
        store.delete(TENANT, cid)
    store.delete(TENANT, sid)
    record["seconds"] = time.perf_counter() - started
    return record


def needle_cover(task, tokenizer, tokens_per_layer: list[np.ndarray]) -> float | None:
    """Needle tasks: the share of layers whose recalled tokens hold the whole asked needle
    sentence (None for other tasks): tells a recall that missed from an answer that failed."""
    from bench.tasks import needle_sentence

    needle = next((n for n in getattr(task, "needles", None) or [] if n["asked"]), None)
    if needle is None:
        return None
    width = len(tokenizer(needle_sentence(needle["word"], needle["code"]), add_special_tokens=False).input_ids)
    span = np.arange(needle["position"], needle["position"] + width)
    return float(np.mean([np.isin(span, np.asarray(tokens)).all() for tokens in tokens_per_layer]))


# ---------------------------------------------------------------------------- aggregation
def row_order(label: str) -> tuple:
    if label == "full":
        return (0,)
    if label.startswith("kv_retrieval"):
        return (2, int(label.split()[1]))
    parts = label.split()
    method = parts[0]
    if "recall" in label:
        budget = parts[4]
        variant = parts[5] if parts[5] != "/" else ""
        return (3, method, 1 if budget.endswith("%") else 0, int(budget) if budget.isdigit() else 0, variant,
                ("none", "drop", "scale", "drop_scale").index(parts[-1]))
    return (1, method, -float(parts[1].rstrip("%")))


def aggregate(records: list[dict], family: str | None = None, length: int | None = None) -> list[dict]:
    """One row per label over the chosen tasks; ratios against the full cache on the same tasks."""
    chosen = [r for r in records if (family is None or r["family"] == family) and (length is None or r["length"] == length)]
    full_by_task = {r["task"]["name"]: next(run for run in r["runs"] if run["row"] == "full") for r in chosen}
    labels = sorted({run["row"] for r in chosen for run in r["runs"]}, key=row_order)
    rows = []
    for label in labels:
        pairs = [(r, run) for r in chosen for run in r["runs"] if run["row"] == label]
        runs = [run for _, run in pairs]
        fulls = [full_by_task[r["task"]["name"]] for r, _ in pairs]
        acc = sum(run["correct"] for run in runs) / len(runs)
        full_acc = sum(f["correct"] for f in fulls) / len(fulls)
        seconds = statistics.fmean(run["seconds"] for run in runs)
        full_seconds = statistics.fmean(f["seconds"] for f in fulls)
        row = {
            "row": label, "n": len(runs), "hits": sum(run["correct"] for run in runs), "acc": acc, "full_acc": full_acc,
            "acc_ratio": acc / full_acc if full_acc else None,
            "resident_mb": statistics.fmean(run["resident_bytes"] for run in runs) / MB,
            "read_mb": statistics.fmean(run["read_bytes"] for run in runs) / MB,
            "seconds": seconds, "seconds_median": statistics.median(run["seconds"] for run in runs), "full_seconds": full_seconds,
            "seconds_ratio": seconds / full_seconds if full_seconds else None,
            "recall_share": statistics.fmean(run["recall_share"] for run in runs) if all("recall_share" in run for run in runs) else None,
            "lengths": sorted({r["length"] for r, _ in pairs}),
        }
        if all("index_bytes" in run for run in runs):
            row["index_mb"] = statistics.fmean(run["index_bytes"] for run in runs) / MB
        if all("layer_bytes" in run for run in runs):
            row["layer_read_mb"] = statistics.fmean(run["layer_bytes"] for run in runs) / MB
        if all("attn_err" in run for run in runs):
            row["attn_err_held_out"] = statistics.fmean(run["attn_err"]["held_out"] for run in runs)
            row["attn_err_question"] = statistics.fmean(run["attn_err"]["question"] for run in runs)
        rows.append(row)
    return rows


def double_count_summary(records: list[dict]) -> dict:
    """Per recall method: each handling's mean attention errors and accuracy over every recall run, and the best."""
    from retrieval.recall import DOUBLE_COUNT

    out: dict[str, Any] = {}
    runs = [run for r in records for run in r["runs"] if run["kind"] == "recall"]
    for method in sorted({run["method"] for run in runs}):
        per = {}
        for handling in DOUBLE_COUNT:
            mine = [run for run in runs if run["method"] == method and run["double_count"] == handling]
            if mine:
                per[handling] = {"n": len(mine), "attn_err_held_out": statistics.fmean(run["attn_err"]["held_out"] for run in mine),
                                 "attn_err_question": statistics.fmean(run["attn_err"]["question"] for run in mine),
                                 "acc": sum(run["correct"] for run in mine) / len(mine),
                                 "applied": sorted({run["applied"] for run in mine})}
        if per:
            best = min(per, key=lambda h: per[h]["attn_err_held_out"])
            ranked = sorted(per, key=lambda h: per[h]["attn_err_held_out"])
            runner = ranked[1] if len(ranked) > 1 else best
            out[method] = {"handlings": per, "best_held_out": best, "runner_up": runner,
                           "margin": per[runner]["attn_err_held_out"] - per[best]["attn_err_held_out"],
                           "best_question": min(per, key=lambda h: per[h]["attn_err_question"]),
                           "best_acc": [h for h in per if per[h]["acc"] == max(p["acc"] for p in per.values())]}
    return out


def goal_checks(records: list[dict]) -> list[dict]:
    """Per context length: every '10% + recall' row with a recall share <= 5% against the goal."""
    checks = []
    for length in sorted({r["length"] for r in records}):
        rows = aggregate(records, length=length)
        full = next((row for row in rows if row["row"] == "full"), None)
        recall_rows = [row for row in rows if "+ recall" in row["row"]]
        eligible = [row for row in recall_rows if row["recall_share"] is not None and row["recall_share"] <= SHARE + 1e-9]
        check: dict[str, Any] = {"length": length, "n": full["n"] if full else 0, "full_acc": full["acc"] if full else None,
                                 "full_seconds": full["seconds"] if full else None, "rows": []}
        for row in eligible:
            met = row["acc_ratio"] is not None and row["acc_ratio"] >= GOAL_ACC and row["seconds_ratio"] <= GOAL_SECONDS
            check["rows"].append({"row": row["row"], "acc": row["acc"], "acc_ratio": row["acc_ratio"], "seconds": row["seconds"],
                                  "seconds_ratio": row["seconds_ratio"], "recall_share": row["recall_share"], "met": met})
        if not full or not full["hits"]:
            check["verdict"] = "undetermined"
            check["why"] = f"the full cache solves 0 of {check['n']} tasks at this length"
        elif not eligible:
            check["verdict"] = "not applicable"
            smallest = min((row["recall_share"] for row in recall_rows), default=None)
            check["why"] = ("no recall row recalls <= 5% of the context" + (f" (the smallest recalls {100 * smallest:.1f}%)" if smallest is not None else ""))
            closest = [row for row in recall_rows if row["recall_share"] == smallest]
            check["closest"] = [{"row": row["row"], "acc": row["acc"], "acc_ratio": row["acc_ratio"], "seconds_ratio": row["seconds_ratio"],
                                 "recall_share": row["recall_share"]} for row in closest]
        else:
            best = max(check["rows"], key=lambda c: (c["met"], c["acc_ratio"] or 0, -c["seconds_ratio"]))
            check["best"] = best
            check["verdict"] = "met" if best["met"] else "not met"
        checks.append(check)
    return checks


# ---------------------------------------------------------------------------- output
def _ratio(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_rows(rows: list[dict]) -> list[list[Any]]:
    out = []
    for row in rows:
        err = row.get("attn_err_held_out")
        out.append([row["row"], row["n"], f"{row['hits']}/{row['n']}", f"{100 * row['acc']:.0f}%", _ratio(row["acc_ratio"]),
                    row["resident_mb"], row["read_mb"], row["seconds"], _ratio(row["seconds_ratio"]),
                    "-" if row["recall_share"] is None else f"{100 * row['recall_share']:.1f}%", "-" if err is None else f"{err:.3f}",
                    "-" if row.get("index_mb") is None else row["index_mb"]])
    return out


HEADERS = ["row", "n", "hits", "acc", "acc/full", "resident MB", "read MB/q", "s/q", "s/full", "recall share", "attn err", "recall index MB"]


def render_text(result: dict) -> str:
    records = result["records"]
    parts = []
    families = sorted({r["family"] for r in records})
    lengths = sorted({r["length"] for r in records})
    counts = ", ".join(f"{sum(r['family'] == f for r in records)} {f}" for f in families)
    title = (f"Recall on SmolLM2-135M-Instruct: {len(records)} tasks ({counts}; "
             f"lengths {', '.join(map(str, lengths))}), {result['config']['new_tokens']} greedy tokens; all families")
    parts.append(format_table(HEADERS, table_rows(aggregate(records)), title=title))
    if len(families) > 1:
        for family in families:
            parts.append(format_table(HEADERS, table_rows(aggregate(records, family=family)), title=f"{family} tasks only"))
    per_length = []
    for length in lengths:
        for row in aggregate(records, length=length):
            if row["row"] == "full" or row["row"].startswith("kv_retrieval") or "recall" in row["row"] and row["row"].endswith(("/ none", "/ drop_scale")) \
                    or row["row"].endswith(" 10%"):
                per_length.append([length] + table_rows([row])[0])
    parts.append(format_table(["length"] + HEADERS, per_length, title="Per context length (full, retrieval, 10% compaction, recall with none / drop_scale)"))
    dc = result.get("double_count", {})
    lines = ["Double-count handling (mean over every recall run of the method: budgets 256, 512 and 5%; held-out = continuation queries):"]
    dc_rows = []
    for method, summary_ in dc.items():
        for handling, stats in summary_["handlings"].items():
            dc_rows.append([method, handling, stats["n"], f"{stats['attn_err_held_out']:.4f}", f"{stats['attn_err_question']:.4f}",
                            f"{100 * stats['acc']:.0f}%", ",".join(stats["applied"]),
                            "best" if handling == summary_["best_held_out"] else ""])
    parts.append(format_table(["method", "double_count", "runs", "attn err held-out", "attn err question", "acc", "applied", ""], dc_rows, title=lines[0]))
    verdicts = []
    for method, summary_ in dc.items():
        h = summary_["handlings"]
        b, r = summary_["best_held_out"], summary_["runner_up"]
        verdicts.append(f"  {method}: best '{b}' (held-out err {h[b]['attn_err_held_out']:.4f}; runner-up '{r}' {h[r]['attn_err_held_out']:.4f}, "
                        f"{100 * summary_['margin'] / max(h[b]['attn_err_held_out'], 1e-12):.1f}% higher"
                        + (f"; 'none' {h['none']['attn_err_held_out']:.4f}, {100 * (h['none']['attn_err_held_out'] / h[b]['attn_err_held_out'] - 1):.1f}% higher" if "none" in h and b != "none" else "")
                        + f"); best on question queries '{summary_['best_question']}', "
                        f"best accuracy {'/'.join(summary_['best_acc'])} ({100 * h[summary_['best_acc'][0]]['acc']:.0f}%)")
    parts.append("\n".join(verdicts))
    goal = [f"Goal: compacted at 10% + recall of at most {100 * SHARE:g}% of the context reaches >= {100 * GOAL_ACC:g}% of full-cache accuracy "
            f"at <= {GOAL_SECONDS}x the full cache's seconds per question"]
    for check in result.get("goal_checks", []):
        head = f"  {check['length']:>5} tokens (n={check['n']}, full {100 * (check['full_acc'] or 0):.0f}%, {check['full_seconds'] or 0:.2f} s/q): "
        if "best" in check:
            b = check["best"]
            goal.append(head + f"{check['verdict'].upper()} - best row {b['row']!r}: acc {100 * b['acc']:.0f}% = {_ratio(b['acc_ratio'])}x full, "
                        f"{b['seconds']:.2f} s/q = {_ratio(b['seconds_ratio'])}x full, recall {100 * b['recall_share']:.1f}% of the context")
            for c in check["rows"]:
                if c is not b:
                    goal.append(f"        {c['row']:<36} acc {_ratio(c['acc_ratio'])}x  s {_ratio(c['seconds_ratio'])}x  {'met' if c['met'] else 'not met'}")
        else:
            goal.append(head + f"{check['verdict'].upper()} ({check['why']})")
            for c in check.get("closest", []):
                goal.append(f"        for reference: {c['row']:<32} acc {_ratio(c['acc_ratio'])}x  s {_ratio(c['seconds_ratio'])}x  recall {100 * c['recall_share']:.1f}%")
    parts.append("\n".join(goal))
    notes = result.get("notes", [])
    if notes:
        parts.append("Notes:\n" + "\n".join(f"  - {n}" for n in notes))
    return "\n\n".join(parts)


def markdown(result: dict) -> str:
    def md_table(headers, rows):
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        from bench.common import _cell

        lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
        return "\n".join(lines)

    records = result["records"]
    out = ["# Recall benchmark (bench/recall.py)", "",
           f"Model SmolLM2-135M-Instruct, {len(records)} tasks, {result['config']['new_tokens']} greedy tokens per answer, "
           f"torch threads {result['config']['threads']}, git {result['environment'].get('git_commit', '')}, "
           f"total {result.get('total_seconds', 0) / 60:.1f} min. Command: `{result['config']['command']}`.", "",
           "Columns: acc/full and s/full are ratios against the full cache on the same tasks; resident = the cache kept hot between questions; "
           "read = bytes read per question (full/compacted: the cache attended; retrieval: the session restored; recall: stored chunks loaded); "
           "recall share = recalled tokens per layer / context tokens; attn err = relative attention-output error vs the full cache on the "
           "64 held-out continuation queries; recall index MB = recall's block index of the source, held in memory (the server's index LRU).", "", "## All tasks", "", md_table(HEADERS, table_rows(aggregate(records)))]
    for family in sorted({r["family"] for r in records}):
        out += ["", f"## {family} tasks", "", md_table(HEADERS, table_rows(aggregate(records, family=family)))]
    for length in sorted({r["length"] for r in records}):
        out += ["", f"## {length}-token contexts", "", md_table(HEADERS, table_rows(aggregate(records, length=length)))]
    text = render_text(result)
    tail = text[text.index("Double-count handling"):]
    out += ["", "## Double counting, goal check, notes", "", "```", tail, "```", ""]
    return "\n".join(out)


def finish(result: dict, quick: bool, name: str = NAME) -> str:
    result["double_count"] = double_count_summary(result["records"])
    result["goal_checks"] = goal_checks(result["records"])
    result["rows"] = aggregate(result["records"])
    result["rows_by_family"] = {f: aggregate(result["records"], family=f) for f in sorted({r["family"] for r in result["records"]})}
    result["rows_by_length"] = {str(n): aggregate(result["records"], length=n) for n in sorted({r["length"] for r in result["records"]})}
    text = render_text(result)
    result["table"] = text
    write_result(name, result)
    if not quick:
        (RESULTS_DIR / f"{name}.md").write_text(markdown(result))
    return text


# ---------------------------------------------------------------------------- main
def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke (< 3 min): one 1k needle + one 1k wiki task, streaming_llm at 10%%, recall 256")
    parser.add_argument("--repeats", type=int, default=0, help="accepted for uniformity with the other benchmarks; unused")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the model (prefill, generation, recall)")
    parser.add_argument("--compact-threads", type=int, default=1, help="torch threads inside compaction (default 1: see bench/compaction.py)")
    parser.add_argument("--budget-min", type=float, default=40.0, help="wall-clock budget of the full run in minutes")
    parser.add_argument("--needle-lengths", default=",".join(map(str, NEEDLE_LENGTHS)))
    parser.add_argument("--needle-tasks", type=int, default=12)
    parser.add_argument("--wiki-lengths", default=",".join(map(str, WIKI_LENGTHS)))
    parser.add_argument("--wiki-tasks", type=int, default=8)
    parser.add_argument("--methods", default=",".join(METHODS), help="compaction methods (comma-separated)")
    parser.add_argument("--am-max-length", type=int, default=4096, help="longest context Attention Matching runs on (cost)")
    parser.add_argument("--share", type=float, default=SHARE, help="also recall this share of the context (0 = off)")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--name", default=NAME, help="result files bench/results/<name>.{json,md} (a partial run: another name)")
    parser.add_argument("--ratios", default=",".join(map(str, RATIOS)), help="compaction ratios (comma-separated; recall runs on 0.1)")
    parser.add_argument("--recall-budgets", default=",".join(map(str, RECALL_BUDGETS)), help="fixed recall budgets in tokens ('' = only --share)")
    parser.add_argument("--retrieval-budgets", default=",".join(map(str, RETRIEVAL_BUDGETS)), help="kv_retrieval budgets ('' = none)")
    parser.add_argument("--double-counts", default=",".join(DOUBLE_COUNTS), help="double-count handlings recall runs with")
    parser.add_argument("--recall-index", default="",
                        help="recall index variants b<block>r<representatives>m<margin>, comma-separated (e.g. b64r4m16,b16r0m8), each its own "
                             "rows; '' = RecallConfig's defaults")
    parser.add_argument("--render", metavar="JSON", help="recompute the tables and checks from a result file's records (no model runs)")
    return parser.parse_args(argv)


def recall_variants(spec: str) -> dict[str, dict]:
    """'b16r0m8,b64r4m16' -> {name: RecallConfig keyword arguments}; '' -> RecallConfig's defaults."""
    import re

    from retrieval.recall import RecallConfig

    if not spec:
        d = RecallConfig()
        return {f"b{d.block_tokens}r{d.representatives}m{d.margin_tokens}": {}}
    out = {}
    for name in spec.split(","):
        match = re.fullmatch(r"b(\d+)r(\d+)m(\d+)", name.strip())
        if not match:
            raise SystemExit(f"--recall-index: {name!r} is not b<block>r<representatives>m<margin>")
        block, reps, margin = map(int, match.groups())
        out[name.strip()] = {"block_tokens": block, "representatives": reps, "margin_tokens": margin}
    return out


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.render:
        result = json.loads(Path(args.render).read_text())
        print(finish(result, bool(result.get("quick")), args.name), flush=True)
        return 0
    pin_threads(args.threads)
    run_started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - run_started:7.1f}s] {message}", flush=True)

    from bench.tasks import TaskFactory
    from bench.wiki_tasks import WikiUnavailable, make_tasks
    from kvstore.store import SessionStore, StoreConfig
    from modelhost.models import load_model
    from retrieval.executors import generate_on

    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2-135m-instruct", cache_dir=MODEL_CACHE)
    generate_on(model, [(torch.zeros(3, 4, 64), torch.zeros(3, 4, 64))] * model.config.num_hidden_layers, [None] * model.config.num_hidden_layers, 4,
                torch.tensor([1, 2, 3]), 2)  # warm-up: the first generate pays one-time costs
    notes: list[str] = []
    if args.quick:
        config = {"methods": [SL], "recall_methods": [SL], "ratios": [RECALL_RATIO], "recall_budgets": [256], "retrieval_budgets": [256],
                  "share": 0.0, "am_max_length": 0, "new_tokens": args.new_tokens, "double_counts": list(DOUBLE_COUNTS),
                  "recall_indexes": recall_variants(args.recall_index)}
        config.update(threads=args.threads, compact_threads=args.compact_threads)
        needle, wiki_lengths, wiki_count, budget = [{"family": "needle", "kind": "single", "length": 1024, "depth": 0.5, "seed": 0}], [1024], 1, math.inf
    else:
        methods = [m for m in args.methods.split(",") if m]
        config = {"methods": methods, "recall_methods": [m for m in RECALL_METHODS if m in methods], "ratios": [float(x) for x in args.ratios.split(",") if x],
                  "recall_budgets": _ints(args.recall_budgets), "retrieval_budgets": _ints(args.retrieval_budgets), "share": args.share,
                  "double_counts": [h for h in args.double_counts.split(",") if h], "recall_indexes": recall_variants(args.recall_index),
                  "am_max_length": args.am_max_length, "new_tokens": args.new_tokens, "threads": args.threads, "compact_threads": args.compact_threads}
        needle = needle_plan([int(x) for x in args.needle_lengths.split(",")], args.needle_tasks)
        wiki_lengths, wiki_count, budget = [int(x) for x in args.wiki_lengths.split(",") if x], args.wiki_tasks, args.budget_min * 60
    if AM in config["methods"] and any(t["length"] > config["am_max_length"] for t in needle):
        notes.append(f"attention_matching runs on contexts up to {config['am_max_length']} tokens only (its reference queries take ~115 s per "
                     f"7,936-token task and its 25%/50% fits minutes each); longer contexts have streaming_llm/snapkv rows only")
    if AM in config["methods"]:
        notes.append(f"attention_matching skips 50% above {AM_SKIP_HALF_ABOVE} tokens (cost, as bench/compaction.py)")
    factory = TaskFactory(tokenizer)
    wiki: list = []
    if wiki_count:
        try:
            wiki = make_tasks(tokenizer, wiki_lengths, wiki_count, log=log)
        except WikiUnavailable as exc:
            message = f"wiki family SKIPPED: {exc}"
            print(message, flush=True)
            notes.append(message)
    plan = interleave(needle, [{"family": "wiki", "task": t, "length": t.length} for t in wiki])
    log(f"model loaded; {len(needle)} needle + {len(wiki)} wiki tasks planned; methods {', '.join(config['methods'])}; budget "
        f"{'none' if math.isinf(budget) else f'{budget / 60:.0f} min'}")

    records: list[dict] = []
    skipped: list[str] = []
    cost: dict[int, list[float]] = {}

    def payload(final: bool) -> dict:
        return {"benchmark": NAME, "quick": args.quick, "final": final, "environment": environment(),
                "config": {**config, "model": "smollm2-135m-instruct", "budget_s": None if math.isinf(budget) else budget,
                           "index": "BlockIndexConfig(representatives=4)", "store": "SessionStore on disk, default StoreConfig (256-token chunks)",
                           "command": "python -m bench.recall" + (" --quick" if args.quick else "") + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]) if a != "--quick"),
                           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
                "notes": notes + ([f"{len(skipped)} planned task(s) skipped to stay within the time budget: {', '.join(skipped)}"] if skipped else []),
                "skipped": skipped, "records": records, "total_seconds": time.perf_counter() - run_started}

    with disk_tempdir("kvmem-bench-recall-") as data_dir:
        store = SessionStore.open(StoreConfig(data_dir=data_dir))
        try:
            for item in plan:
                length = item["length"]
                known = cost.get(length) or [c * (length / n) ** 1.3 for n, cs in cost.items() for c in cs]
                estimate = statistics.fmean(known) if known else 90.0 * (length / 1024) ** 1.2
                elapsed = time.perf_counter() - run_started
                if item["family"] == "needle":
                    task = factory.make(item["kind"], length, item["depth"], item["seed"])
                else:
                    task = item["task"]
                if elapsed + estimate > budget:
                    skipped.append(f"{task.name} (est. {estimate:.0f}s, {budget - elapsed:.0f}s left)")
                    log(f"skip {task.name}: estimated {estimate:.0f}s, {budget - elapsed:.0f}s left")
                    continue
                log(f"task {task.name} ({item['family']}, {length} tokens, gold {task.code!r}; estimated {estimate:.0f}s)")
                record = run_task(model, tokenizer, store, task, item, config, log)
                records.append(record)
                cost.setdefault(length, []).append(record["seconds"])
                log(f"  task done in {record['seconds']:.0f}s")
                write_result(args.name, payload(final=False))
                gc.collect()
        finally:
            store.close()
    result = payload(final=True)
    if not records:
        print("no task ran", file=sys.stderr)
        return 1
    print("\n" + finish(result, args.quick, args.name), flush=True)
    log(f"results written to {RESULTS_DIR / (args.name + ('.quick.json' if args.quick else '.json'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
