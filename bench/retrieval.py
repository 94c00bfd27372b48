"""Needle accuracy and block recall of KV-block retrieval on SmolLM2-135M (8k window), side by side.

For contexts of 8k, 16k and 32k tokens (single and multi-key needle tasks from bench/tasks.py) and
budgets of 1k, 2k and 4k tokens, every method answers the same tasks:

* ``actqkv``, ``mean``, ``last``: retrieved-context generation (retrieval/context.py) with the three
  probe weightings (default config otherwise: shared ranking, entropy-spread depth, 32-token margins);
* ``rag``: text-chunk retrieval (all-MiniLM-L6-v2, ~150-word chunks) filling the budget, chunks in
  document order, then the question;
* ``truncate``: the last ``budget`` tokens of the context, then the question;
* ``full``: the whole context where it fits the window (8k only), the reference.

Sessions past the window are built with ``windowed_prefill`` (sinks + 2,048-token sliding window);
8k sessions with a plain prefill. Recall (8k only): per layer, the blocks a method selects against
the blocks that receive the most attention from the question over the full cache (same count, same
retrievable region), averaged over layers.

    python -m bench.retrieval                 # full run (~45 min on 2 CPU cores)
    python -m bench.retrieval --quick         # CI smoke: one 4k task, one budget
    python -m bench.retrieval --resume        # continue an interrupted run
    python -m bench.retrieval --render        # tables and plot again from bench/results/retrieval.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from bench.common import RESULTS_DIR, environment, format_table, pin_threads, write_result
from bench.tasks import DEPTHS, TaskFactory, score_answer

NAME = "retrieval"
NEW_TOKENS = 24
PROBES = ("actqkv", "mean", "last")
METHODS = PROBES + ("rag", "truncate", "full")


def build_session(model, task, window: int):
    """SessionKV + BlockIndex of a task's context, and the seconds the prefill took."""
    from kvmem.hf_cache import cache_to_layers
    from retrieval.block_index import BlockIndex
    from retrieval.context import SessionKV
    from retrieval.long_prefill import windowed_prefill
    from retrieval.rope import Rope

    started = time.perf_counter()
    length = task.context_ids.shape[1]
    if length + task.question_ids.shape[1] + NEW_TOKENS <= window:
        with torch.no_grad():
            layers = cache_to_layers(model(task.context_ids, use_cache=True).cache)
        keys, values = [k.clone() for k, _ in layers], [v.clone() for _, v in layers]
    else:
        keys, values = windowed_prefill(model, task.context_ids, window_tokens=2048)
    prefill = time.perf_counter() - started
    kv = SessionKV(keys, values, torch.arange(length))
    return kv, BlockIndex.build(keys, kv.positions, Rope.from_model(model)), prefill


def greedy(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, ids.shape[1]:]


def rag_answer(model, tokenizer, embedder, task, budget: int) -> str:
    from retrieval.text_index import TextIndex, select_for_budget

    text = tokenizer.decode(task.context_ids[0])
    index = TextIndex.build(text, embedder)
    hits = index.search(f"What is the secret code for {task.word}?", embedder, len(index))
    room = budget - task.question_ids.shape[1]
    chosen = select_for_budget(hits, room, lambda s: len(tokenizer(s, add_special_tokens=False).input_ids))
    context = tokenizer("\n".join(h.text for h in chosen), return_tensors="pt", add_special_tokens=False).input_ids[:, :room]
    return tokenizer.decode(greedy(model, torch.cat([context, task.question_ids], 1)))


def true_top_blocks(model, kv, index, task, sink_end: int, recent_start: int) -> list[np.ndarray]:
    """Per layer: retrievable block ids by attention mass from the question over the full cache."""
    from compaction.queries import recording_queries
    from kvmem.hf_cache import layers_to_cache
    from retrieval.context import retrievable_blocks

    cache = layers_to_cache([(k.clone(), v.clone()) for k, v in zip(kv.keys, kv.values)], model.config)
    with torch.no_grad(), recording_queries(model) as queries:
        model(task.question_ids, cache=cache, use_cache=True)
    allowed = retrievable_blocks(index, sink_end, recent_start)
    out = []
    for layer, keys in enumerate(kv.keys):
        q = queries[layer]  # [Hq, n, D] post-RoPE at the question's real positions
        k = keys.repeat_interleave(q.shape[0] // keys.shape[0], 0)  # [Hq, T, D]
        logits = torch.einsum("hnd,htd->hnt", q, k) / q.shape[-1] ** 0.5
        full = torch.softmax(torch.cat([logits, torch.einsum("hnd,hmd->hnm", q, cache.layers[layer].keys[0, :, kv.num_tokens:].repeat_interleave(q.shape[0] // keys.shape[0], 0)) / q.shape[-1] ** 0.5], -1), -1)
        mass = full[..., : kv.num_tokens].mean((0, 1))  # [T]
        per_block = np.array([float(mass[a:b].sum()) for a, b in index.blocks])
        per_block[~allowed] = -1
        out.append(np.argsort(-per_block, kind="stable"))
    return out


def run_task(model, tokenizer, embedder, factory, spec: dict, budgets: list[int], window: int) -> dict:
    from retrieval.context import RetrievalConfig, answer, question_probes, select, model_window
    from retrieval.rope import Rope

    task = factory.make(spec["kind"], spec["length"], spec["depth"], spec["seed"])
    kv, index, prefill = build_session(model, task, window)
    record = {**spec, "code": task.code, "prefill_s": prefill, "answers": [], "recall": []}
    fits = spec["length"] + task.question_ids.shape[1] + NEW_TOKENS <= window
    if fits:
        started = time.perf_counter()
        text = tokenizer.decode(greedy(model, torch.cat([task.context_ids, task.question_ids], 1)))
        record["answers"].append({"method": "full", "budget": 0, "correct": score_answer(text, task.code), "seconds": time.perf_counter() - started, "text": text[:40]})
    for budget in budgets:
        for method in PROBES:
            config = RetrievalConfig(method=method, budget_tokens=budget)
            started = time.perf_counter()
            result = answer(model, kv, index, task.question_ids[0], config, max_new_tokens=NEW_TOKENS)
            text = tokenizer.decode(result.token_ids)
            record["answers"].append({"method": method, "budget": budget, "correct": score_answer(text, task.code), "seconds": time.perf_counter() - started, "text": text[:40]})
            if fits:
                if "truth" not in record:
                    truth = true_top_blocks(model, kv, index, task, result.selection.sink_end, result.selection.recent_start)
                    record["truth"] = True
                recalls = []
                for layer, chosen in enumerate(result.selection.layers):
                    k = len(chosen.blocks)
                    if k:
                        recalls.append(len(set(chosen.blocks.tolist()) & set(truth[layer][:k].tolist())) / k)
                record["recall"].append({"method": method, "budget": budget, "recall": float(np.mean(recalls)) if recalls else float("nan")})
        started = time.perf_counter()
        text = tokenizer.decode(greedy(model, torch.cat([task.context_ids[:, -(budget - task.question_ids.shape[1]):], task.question_ids], 1)))
        record["answers"].append({"method": "truncate", "budget": budget, "correct": score_answer(text, task.code), "seconds": time.perf_counter() - started, "text": text[:40]})
        started = time.perf_counter()
        text = rag_answer(model, tokenizer, embedder, task, budget)
        record["answers"].append({"method": "rag", "budget": budget, "correct": score_answer(text, task.code), "seconds": time.perf_counter() - started, "text": text[:40]})
    record.pop("truth", None)
    return record


def aggregate(records: list[dict]) -> list[dict]:
    rows: dict[tuple, dict] = {}
    for record in records:
        for a in record["answers"]:
            row = rows.setdefault((record["length"], a["method"], a["budget"]), {"length": record["length"], "method": a["method"], "budget": a["budget"], "n": 0, "correct": 0, "seconds": []})
            row["n"] += 1
            row["correct"] += int(a["correct"])
            row["seconds"].append(a["seconds"])
        for r in record["recall"]:
            row = rows[(record["length"], r["method"], r["budget"])]
            row.setdefault("recalls", []).append(r["recall"])
    out = []
    for row in rows.values():
        out.append({**row, "acc": row["correct"] / row["n"], "seconds": float(np.median(row["seconds"])),
                    "recall": float(np.nanmean(row["recalls"])) if row.get("recalls") else None})
        out[-1].pop("recalls", None)
    return sorted(out, key=lambda r: (r["length"], METHODS.index(r["method"]), r["budget"]))


def print_tables(rows: list[dict]) -> str:
    lengths = sorted({r["length"] for r in rows})
    budgets = sorted({r["budget"] for r in rows if r["budget"]})
    full = {r["length"]: r["acc"] for r in rows if r["method"] == "full"}
    reference = max(full.values()) if full else None
    table_rows = []
    for length in lengths:
        for method in METHODS:
            cells = {r["budget"]: r for r in rows if r["length"] == length and r["method"] == method}
            if not cells:
                continue
            accs = [cells[b]["acc"] if b in cells else None for b in budgets] if method != "full" else [cells[0]["acc"]] + [None] * (len(budgets) - 1)
            n = next(iter(cells.values()))["n"]
            ratio = cells[2048]["acc"] / reference if reference and 2048 in cells else None
            secs = float(np.median([c["seconds"] for c in cells.values()]))
            table_rows.append([length, method, n, *accs, ratio, secs])
    headers = ["tokens", "method", "tasks", *[f"acc @{b}" for b in budgets], "@2048 / full@8k", "s/answer"]
    text = format_table(headers, table_rows, "Needle accuracy (exact 7-digit code), SmolLM2-135M, 8k window")
    recall_rows = [[r["length"], r["method"], r["budget"], r["recall"]] for r in rows if r.get("recall") is not None]
    if recall_rows:
        text += "\n\n" + format_table(["tokens", "method", "budget", "recall of top-attention blocks"], recall_rows, "Block recall against the full cache's attention")
    print(text, flush=True)
    return text


def plot(rows: list[dict], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: plot skipped"
    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        for method in METHODS:
            points = sorted((r["budget"], r["acc"]) for r in rows if r["length"] == length and r["method"] == method and r["budget"])
            if points:
                ax.plot(*zip(*points), marker="o", label=method, linewidth=2.5 if method == "actqkv" else 1.2)
        full = [r["acc"] for r in rows if r["length"] == length and r["method"] == "full"]
        if full:
            ax.axhline(full[0], color="black", linestyle="--", label="full cache")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{length:,}-token contexts")
        ax.set_xlabel("budget (tokens per layer)")
        ax.set_ylabel("needle accuracy")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("KV-block retrieval on SmolLM2-135M-Instruct (8k window)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"plot in {path}"


def finish(payload: dict) -> None:
    payload["rows"] = aggregate(payload["records"])
    payload["table"] = print_tables(payload["rows"])
    path = write_result(NAME, payload)
    png = RESULTS_DIR / (f"{NAME}.quick.png" if payload.get("quick") else f"{NAME}.png")
    print(plot(payload["rows"], png))
    print(f"results in {path}", flush=True)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: one 4k-token task, budget 1024")
    parser.add_argument("--repeats", type=int, default=0, help="accepted for uniformity; unused")
    parser.add_argument("--lengths", default="8000,16000,32000")
    parser.add_argument("--budgets", default="1024,2048,4096")
    parser.add_argument("--tasks", type=int, default=4, help="tasks per length (single and multi alternate)")
    parser.add_argument("--minutes", type=float, default=60.0, help="stop starting new tasks after this long")
    parser.add_argument("--resume", action="store_true", help="keep the tasks already in bench/results/retrieval.json")
    parser.add_argument("--render", action="store_true", help="tables and plot from the saved result (no model runs)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    saved = RESULTS_DIR / f"{NAME}.json"
    if args.render:
        finish(json.loads(saved.read_text()))
        return 0
    pin_threads()
    from modelhost.models import load_model
    from retrieval.embedder import TextEmbedder

    model, tokenizer = load_model("smollm2-135m-instruct", cache_dir=Path(__file__).resolve().parent.parent / ".cache" / "models")
    window = int(model.config.max_position_embeddings)
    embedder = TextEmbedder.load()
    factory = TaskFactory(tokenizer)
    lengths = [4000] if args.quick else [int(x) for x in args.lengths.split(",")]
    budgets = [1024] if args.quick else [int(x) for x in args.budgets.split(",")]
    count = 1 if args.quick else args.tasks
    plan = [{"kind": "single" if i % 2 == 0 else "multi", "length": length, "depth": DEPTHS[(2 * i + 1) % len(DEPTHS)], "seed": 300 + i}
            for i in range(count) for length in lengths]  # interleaved: an interrupted run still covers every length
    payload: dict[str, Any] = {"quick": args.quick, "environment": environment(), "config": {"lengths": lengths, "budgets": budgets, "new_tokens": NEW_TOKENS}, "records": []}
    if args.resume and saved.exists():
        payload["records"] = json.loads(saved.read_text())["records"]
    done = {(r["kind"], r["length"], r["depth"], r["seed"]) for r in payload["records"]}
    started = time.perf_counter()
    for spec in plan:
        if (spec["kind"], spec["length"], spec["depth"], spec["seed"]) in done:
            continue
        if (time.perf_counter() - started) / 60 > args.minutes:
            print(f"time budget of {args.minutes} min reached; stopping (use --resume to continue)", flush=True)
            break
        record = run_task(model, tokenizer, embedder, factory, spec, budgets, window)
        payload["records"].append(record)
        summary = " ".join(f"{a['method']}@{a['budget']}={int(a['correct'])}" for a in record["answers"])
        print(f"{spec['kind']} {spec['length']} d{spec['depth']} s{spec['seed']} prefill {record['prefill_s']:.0f}s: {summary}", flush=True)
        write_result(NAME, {**payload, "rows": aggregate(payload["records"])})  # partial results survive an interruption
    finish(payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
