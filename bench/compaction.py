"""KV compaction on SmolLM2: Attention Matching against every eviction method, side by side.

For seeded needle-in-a-haystack contexts (bench/tasks.py: natural licence text, single-key and
multi-key needles at several depths) of 2k, 4k and 6k tokens, and every method in ``REGISTRY`` at kept
ratios 50%, 25%, 10%, 5%, 2%, one run measures:

* attention error: ``mean_attention_error`` (relative L2 error of the attention outputs, mean over
  layers and KV heads) for held-out queries = the queries of the 64 tokens of natural text that
  follow the context in its document (captured on context + continuation with the full cache);
* continuation NLL: mean NLL of those continuation tokens 2..64 (token 1 is predicted by the
  context's last position, which compaction does not change) on the compacted cache, minus the
  same on the full cache (both through ``CompactedCache``, the full one with zero biases), and the
  mean KL(full || compacted) of the next-token distributions;
* needle accuracy: the question is fed *after* the compacted context (``generation_inputs``), 24
  greedy tokens, exact 7-digit match. Only tasks the model solves with the full cache are kept (the
  run reports generated vs kept), so the full-cache accuracy is 100% by construction and
  "fraction of full" equals the accuracy;
* compaction wall time (``time.perf_counter`` around ``compact``) and peak memory: the largest
  increase of the process RSS over its value at the call's start, sampled every 1 ms from
  /proc/self/statm in a background thread (torch's CPU allocations are invisible to tracemalloc;
  ru_maxrss is a lifetime high-water mark). During each call glibc is told (mallopt) to serve every
  block of 64 KiB or more with its own mmap (tensors freed inside the call leave the RSS at once),
  after ``malloc_trim(0)`` has handed the free heap pages back, so the call cannot hide its peak in
  memory freed earlier (outside the calls the threshold is 32 MiB). Peaks shorter than the
  sampling interval can still be missed.

Threads: torch is pinned to ONE thread by default (``--threads``). On this shared 2-core machine
MKL's two-thread LU (``torch.linalg.solve``, used by Attention Matching's ridge value refit) was
60-100x slower than one thread when other processes competed for the cores (502x502 with 64
right-hand sides: 127 ms vs 1.5 ms; Cholesky and matmul were unaffected), and matmuls gained
nothing from the second thread; Attention Matching on a 2k context, all five ratios: ~500 s with
two threads vs ~70 s with one. Every method runs under the same setting.

No method ever sees the question. Attention Matching gets ``reference_queries(context)``, the
references the server's Compact RPC uses by default (query-agnostic: 128 self-study tokens sampled
after the context + the context's recent queries); the eviction methods that use
queries (h2o, snapkv, tova) get the context's own prefill queries (positions < T of one causal
pass over context + continuation, so they do not depend on the continuation either); the
continuation's queries are used only to measure. Each context's prefill and reference queries are
computed once and reused across methods and ratios.

The full run works to a time budget (``--budget-min``, default 75): tasks run in a fixed seeded
order while the projected cost of the next one fits; each finished task is written to the result
file at once. Contexts longer than 2048 tokens skip the 50% ratio (Attention Matching at 50% of a
4k context alone takes ~200 s with one thread, five times its 25% cost), so the 50% row covers
the 2k tasks only.

    python -m bench.compaction [--quick] [--budget-min 75] [--lengths 2048,4096,6144]
"""
from __future__ import annotations

import os

# Shared 2-core machine: busy-waiting OpenMP workers degrade badly when other processes compete
# for the cores. Must be set before torch is imported; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import gc  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import torch  # noqa: E402

from bench.common import MODEL_CACHE, RESULTS_DIR, environment, format_table, pin_threads, summary, write_result  # noqa: E402
from bench.tasks import CONTINUATION, NeedleTask, TaskFactory, score_answer, task_plan  # noqa: E402

NAME = "compaction"
AM = "attention_matching"
RATIOS = (0.5, 0.25, 0.1, 0.05, 0.02)
QUICK_RATIOS = (0.25, 0.1)
NEW_TOKENS = 24
GOAL_NEEDLE = {0.1: 0.95, 0.02: 0.80}  # AM needle accuracy as a fraction of full-cache accuracy
GOAL_BEAT_MAX_RATIO = 0.25  # AM must beat the best eviction method at every ratio <= this
SKIP_HALF_ABOVE = 2048  # contexts longer than this skip the 50% ratio (cost)
METRICS = (("attn_err", "lower"), ("dnll", "lower"), ("acc", "higher"))


# ---------------------------------------------------------------------------- measurement helpers
class PeakRSS:
    """Peak increase of this process's resident set size while the block runs (bytes)."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self.base)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        _malloc_trim()  # give free heap pages back first: reusing them inside the call counts again
        self.exact = _mmap_threshold(64 << 10)  # during the call: new big blocks are mmaps, freed at once
        self.base = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss() - self.base)
        _mmap_threshold(32 << 20)  # outside: heap reuse (mmap for every block made decoding slow)


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _mmap_threshold(size: int) -> bool:
    """glibc mallopt(M_MMAP_THRESHOLD, size): blocks >= size get their own mmap (freed at once)."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, size))
    except (OSError, AttributeError):
        return False


def make_methods(only: Sequence[str] | None = None, am_window: bool = False) -> dict[str, Any]:
    """Every registered compactor (or those in ``only``), Attention Matching first. ``am_window``:
    Attention Matching also keeps 4 sinks and the most recent tokens (together half of each head's
    budget) exactly, fitting biases and values for the rest."""
    import compaction.attention_matching  # noqa: F401 - registers attention_matching
    import compaction.registry  # noqa: F401 - registers the eviction methods
    from compaction.base import REGISTRY, make_compactor

    names = sorted((n for n in REGISTRY if not only or n in only), key=lambda n: (n != AM, n))
    unknown = sorted(set(only or ()) - set(REGISTRY))
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(sorted(REGISTRY))}")
    am_options = {"causal": False, **({"sinks": 4, "recent": 1 << 30, "recent_share": 0.5} if am_window else {})}
    # the self-study references come after the context and see every key (their count may
    # equal T by chance, which the default would take for causal context queries)
    return {name: make_compactor(name, **(am_options if name == AM else {})) for name in names}


def answer(model, tokenizer, layers, biases, length: int, question: torch.Tensor) -> str:
    from compaction.inference import CompactedCache, generation_inputs

    cache = CompactedCache.for_model(model, layers, biases, length)
    with torch.no_grad():
        out = model.generate(generation_inputs(length, question), cache=cache, max_new_tokens=NEW_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, length + question.shape[1]:], skip_special_tokens=True)


def continuation_logits(model, layers, biases, length: int, continuation: torch.Tensor) -> torch.Tensor:
    """[n-1, V] float32 logits for continuation tokens 2..n given the (compacted) context."""
    from compaction.inference import CompactedCache

    cache = CompactedCache.for_model(model, layers, biases, length)
    with torch.no_grad():
        return model(input_ids=continuation[:, :-1], cache=cache, use_cache=True).logits[0].float()


def nll_and_kl(logits: torch.Tensor, full_logprobs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    logprobs = torch.log_softmax(logits, dim=-1)
    nll = float(-logprobs.gather(1, targets.view(-1, 1)).mean())
    kl = float((full_logprobs.exp() * (full_logprobs - logprobs)).sum(-1).mean())
    return nll, kl


# ---------------------------------------------------------------------------- one task
def run_task(model, tokenizer, task: NeedleTask, methods: dict, ratios: Sequence[float], log) -> dict:
    """Full-cache check, then every method at every ratio on one context. Returns the task record."""
    from compaction.base import CompactionInput, Target
    from compaction.metrics import mean_attention_error
    from compaction.queries import capture_queries
    from compaction.references import reference_queries

    started = time.perf_counter()
    length = task.length
    ids = torch.cat([task.context_ids, task.continuation_ids], dim=1)
    captured = capture_queries(model, ids)  # one causal pass over context + continuation
    keys = [layer.keys[0, :, :length].contiguous() for layer in captured.cache.layers]
    values = [layer.values[0, :, :length].contiguous() for layer in captured.cache.layers]
    context_queries = [q[:, :length].contiguous() for q in captured.queries]
    held_out = [q[:, length:].contiguous() for q in captured.queries]
    del captured
    full_layers = list(zip(keys, values))
    record: dict[str, Any] = {"task": task.describe(), "runs": []}

    full_answer = answer(model, tokenizer, full_layers, [None] * len(keys), length, task.question_ids)
    record["full_answer"], record["full_correct"] = full_answer, score_answer(full_answer, task.code)
    log(f"  full cache: {full_answer!r} -> {'solved' if record['full_correct'] else 'NOT solved (task dropped)'}")
    if not record["full_correct"]:
        record["seconds"] = time.perf_counter() - started
        return record

    targets = task.continuation_ids[0, 1:]
    full_logits = continuation_logits(model, full_layers, [None] * len(keys), length, task.continuation_ids)
    full_logprobs = torch.log_softmax(full_logits, dim=-1)
    record["full_nll"] = nll_and_kl(full_logits, full_logprobs, targets)[0]

    t0 = time.perf_counter()
    refs = reference_queries(model, tokenizer, task.context_ids)  # the server's default; never sees the question
    record["reference_seconds"] = time.perf_counter() - t0
    record["reference_queries"] = int(refs.queries[0].shape[1])
    inputs = {
        "am": CompactionInput(keys, values, refs.queries, held_out, logical_length=length),
        "context": CompactionInput(keys, values, context_queries, held_out, logical_length=length),
    }
    for ratio in ratios:
        for name, compactor in methods.items():
            inp = inputs["am" if name == AM else "context"]
            gc.collect()
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                result = compactor.compact(inp, Target(ratio=ratio))
                seconds = time.perf_counter() - t0
            error = mean_attention_error(inp, result)
            layers = [(layer.keys, layer.values) for layer in result.layers]
            biases = [layer.bias for layer in result.layers]
            nll, kl = nll_and_kl(continuation_logits(model, layers, biases, length, task.continuation_ids), full_logprobs, targets)
            text = answer(model, tokenizer, layers, biases, length, task.question_ids)
            run = {
                "method": name, "ratio": ratio, "attn_err": error, "nll": nll, "dnll": nll - record["full_nll"], "kl": kl,
                "correct": score_answer(text, task.code), "answer": text, "seconds": seconds, "peak_mb": mem.peak / 1e6,
                "slots": result.slots, "kept_mean": float(result.kept.float().mean()),
            }
            record["runs"].append(run)
            log(f"  {ratio:>5} {name:<18} err {error:.3f}  dNLL {run['dnll']:+.3f}  KL {kl:.3f}  "
                f"{'OK ' if run['correct'] else 'BAD'} {text[:24]!r:<28} {seconds:6.1f}s {run['peak_mb']:7.1f}MB")
            del result, layers, biases
    record["seconds"] = time.perf_counter() - started
    return record


# ---------------------------------------------------------------------------- aggregation
def aggregate(records: list[dict], methods: Sequence[str], ratios: Sequence[float]) -> list[dict]:
    rows = []
    kept = [r for r in records if r.get("full_correct")]
    if kept:
        rows.append({"ratio": 1.0, "method": "full", "n": len(kept), "attn_err": 0.0, "dnll": 0.0, "kl": 0.0, "acc": 1.0, "frac_full": 1.0,
                     "seconds": 0.0, "peak_mb": 0.0, "lengths": sorted({r["task"]["length"] for r in kept})})
    for ratio in ratios:
        for name in methods:
            runs = [run for r in kept for run in r["runs"] if run["method"] == name and run["ratio"] == ratio]
            if not runs:
                continue
            acc = sum(run["correct"] for run in runs) / len(runs)
            rows.append({
                "ratio": ratio, "method": name, "n": len(runs),
                "attn_err": statistics.fmean(run["attn_err"] for run in runs),
                "dnll": statistics.fmean(run["dnll"] for run in runs),
                "kl": statistics.fmean(run["kl"] for run in runs),
                "acc": acc, "frac_full": acc / 1.0,  # full-cache accuracy is 1 on kept tasks
                "seconds": statistics.median(run["seconds"] for run in runs),
                "seconds_summary": summary([run["seconds"] for run in runs]),
                "peak_mb": statistics.median(run["peak_mb"] for run in runs),
                "peak_mb_max": max(run["peak_mb"] for run in runs),
            })
    return rows


def goal_checks(rows: list[dict], ratios: Sequence[float]) -> list[dict]:
    checks = []
    for ratio in ratios:
        at = {row["method"]: row for row in rows if row["ratio"] == ratio}
        if AM not in at:
            continue
        am = at[AM]
        evictions = [row for name, row in at.items() if name != AM]
        check: dict[str, Any] = {"ratio": ratio, "n": am["n"], "needle_goal": GOAL_NEEDLE.get(ratio), "am_frac_full": am["frac_full"]}
        passes = []
        if ratio in GOAL_NEEDLE:
            check["needle_pass"] = am["frac_full"] >= GOAL_NEEDLE[ratio]
            passes.append(check["needle_pass"])
        if ratio <= GOAL_BEAT_MAX_RATIO and evictions:
            for metric, direction in METRICS:
                pick = min if direction == "lower" else max
                best = pick(evictions, key=lambda row: row[metric])
                if direction == "lower":
                    verdict = "win" if am[metric] < best[metric] else ("tie" if am[metric] == best[metric] else "loss")
                else:
                    verdict = "win" if am[metric] > best[metric] else ("tie" if am[metric] == best[metric] else "loss")
                check[metric] = {"am": am[metric], "best_eviction": best["method"], "best": best[metric], "verdict": verdict}
                # a tie at the full-cache accuracy (100% on kept tasks) cannot be beaten: it counts as a
                # pass; any other tie (0% vs 0% included) is not a win
                passes.append(verdict == "win" or (metric == "acc" and verdict == "tie" and am[metric] >= 1.0))
        if passes:
            check["pass"] = all(passes)
            checks.append(check)
    return checks


def print_tables(rows: list[dict], checks: list[dict], tasks_info: dict) -> str:
    by_ratio = {c["ratio"]: c for c in checks}
    table_rows = []
    for row in rows:
        goal = ""
        if row["method"] == AM and row["ratio"] in by_ratio:
            goal = "PASS" if by_ratio[row["ratio"]]["pass"] else "FAIL"
        table_rows.append([f"{row['ratio']:.2f}", row["method"], row["n"], row["attn_err"], row["dnll"], row["kl"],
                           f"{100 * row['acc']:.0f}%", f"{100 * row['frac_full']:.0f}%", row["seconds"], row["peak_mb"], goal])
    out = [format_table(
        ["kept", "method", "n", "attn err", "dNLL", "KL", "needle acc", "of full", "compact s (med)", "peak MB (med)", "goal"], table_rows,
        title=(f"KV compaction on SmolLM2-135M-Instruct: {tasks_info['kept']} needle contexts kept of {tasks_info['generated']} generated "
               f"(lengths {tasks_info['lengths']}); attn err on the continuation's queries, dNLL/KL vs full cache on 63 continuation tokens"),
    )]
    crow = []
    for c in checks:
        cells = [f"{c['ratio']:.2f}", c["n"]]
        for metric, _ in METRICS:
            m = c.get(metric)
            cells.append(f"{m['verdict']} ({m['am']:.3g} vs {m['best_eviction']} {m['best']:.3g})" if m else "-")
        cells.append(f"{100 * c['am_frac_full']:.0f}% >= {100 * c['needle_goal']:.0f}%: {'PASS' if c['needle_pass'] else 'FAIL'}" if c.get("needle_goal") else "-")
        cells.append("PASS" if c["pass"] else "FAIL")
        crow.append(cells)
    out.append(format_table(["kept", "n", "attn err: AM vs best eviction", "dNLL", "needle acc", "needle goal", "overall"], crow,
                            title=("Goal checks (AM must beat the best eviction method per metric at kept <= 25%, a tie only passes at 100% accuracy; "
                                   "needle >= 95% of full at 10%, >= 80% at 2%)")))
    text = "\n\n".join(out)
    print("\n" + text, flush=True)
    return text


def plot(rows: list[dict], methods: Sequence[str], path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: plot skipped (pip install matplotlib)"
    panels = (("attn_err", "attention error (held-out)", False), ("dnll", "continuation NLL - full", False), ("kl", "KL(full || compacted)", False),
              ("acc", "needle accuracy", False), ("seconds", "compaction seconds (median)", True), ("peak_mb", "peak RSS increase, MB (median)", True))
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, (metric, label, logy) in zip(axes.flat, panels):
        for name in methods:
            points = sorted((row["ratio"], row[metric]) for row in rows if row["method"] == name)
            if points and logy:
                points = [(x, max(y, 1e-3)) for x, y in points]
            if points:
                ax.plot(*zip(*points), marker="o", label=name, linewidth=2.5 if name == AM else 1.2)
        ax.set_xscale("log")
        ticks = sorted({row["ratio"] for row in rows if row["method"] != "full"})
        ax.set_xticks(ticks, [f"{100 * t:g}%" for t in ticks])
        ax.minorticks_off()
        if logy:
            ax.set_yscale("log")
        if metric == "acc":
            ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("kept ratio")
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("KV compaction on SmolLM2-135M-Instruct (needle contexts, 2k-4k tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot written to {path}"


# ---------------------------------------------------------------------------- main
def render(path: str, name: str = NAME) -> int:
    """Re-aggregate a result file's per-run records (after a change to the tables or goal rules)."""
    import json
    from pathlib import Path

    result = json.loads(Path(path).read_text())
    ratios, methods = result["config"]["ratios"], result["config"]["methods"]
    result["rows"] = aggregate(result["records"], methods, ratios)
    result["goal_checks"] = goal_checks(result["rows"], ratios)
    info = {"generated": result["tasks"]["generated"], "kept": result["tasks"]["kept"],
            "lengths": ",".join(str(x) for x in sorted(set(result["tasks"]["lengths_kept"]))) or "-"}
    result["table"] = print_tables(result["rows"], result["goal_checks"], info)
    out = write_result(name, result)
    png = RESULTS_DIR / (f"{name}.quick.png" if result.get("quick") else f"{name}.png")
    print(plot(result["rows"], methods, png))
    print(f"results re-rendered into {out}", flush=True)
    return 0


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: one 1k context, one needle task, ratios 0.25 and 0.1 (< 90 s)")
    parser.add_argument("--repeats", type=int, default=0, help="accepted for uniformity with the other benchmarks; unused")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see the module docstring)")
    parser.add_argument("--budget-min", type=float, default=75.0, help="wall-clock budget of the full run in minutes")
    parser.add_argument("--lengths", default="2048,4096,6144", help="context lengths, cycled over the task plan")
    parser.add_argument("--render", metavar="JSON", help="recompute tables, goal checks and plot from a result file's records (no model runs)")
    parser.add_argument("--max-tasks", type=int, default=30, help="most needle tasks to generate")
    parser.add_argument("--methods", default="", help="comma-separated subset of the methods (default: every one)")
    parser.add_argument("--ratios", default="", help="comma-separated kept ratios (default 0.5,0.25,0.1,0.05,0.02)")
    parser.add_argument("--am-window", action="store_true", help="Attention Matching keeps 4 sinks + the recent window exactly (half its budget)")
    parser.add_argument("--name", default=NAME, help="result name: bench/results/<name>.json and .png")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.render:
        return render(args.render, args.name)
    pin_threads(args.threads)
    mmap_threshold = _mmap_threshold(32 << 20)
    run_started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - run_started:7.1f}s] {message}", flush=True)

    from modelhost.models import load_model

    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2-135m-instruct", cache_dir=MODEL_CACHE)
    methods = make_methods([m for m in args.methods.split(",") if m] or None, args.am_window)
    factory = TaskFactory(tokenizer)
    log(f"model loaded; methods: {', '.join(methods)}; filler text {len(factory.text_ids)} tokens")

    if args.quick:
        ratios, lengths, budget = QUICK_RATIOS, [1024], math.inf
        plan = [("single", 1024, depth, seed) for seed, depth in enumerate((0.5, 0.3, 0.7, 0.1))]
    else:
        ratios, budget = tuple(float(r) for r in args.ratios.split(",")) if args.ratios else RATIOS, args.budget_min * 60
        lengths = [int(x) for x in args.lengths.split(",")]
        plan = task_plan(lengths, args.max_tasks)

    records: list[dict] = []
    skipped: list[str] = []
    per_length_cost: dict[int, list[float]] = {}

    def payload(final: bool) -> dict:
        kept = [r for r in records if r.get("full_correct")]
        rows = aggregate(records, list(methods), ratios)
        checks = goal_checks(rows, ratios)
        return {
            "benchmark": NAME, "quick": args.quick, "final": final, "environment": environment(),
            "config": {
                "model": "smollm2-135m-instruct", "ratios": list(ratios), "methods": list(methods), "lengths": lengths,
                "budget_s": None if math.isinf(budget) else budget, "new_tokens": NEW_TOKENS, "continuation_tokens": CONTINUATION,
                "skip_half_above": SKIP_HALF_ABOVE, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                "am_references": "reference_queries(context): the Compact RPC's default (self-study + recent context queries); question never seen",
                "am_window": args.am_window,
                "eviction_queries": "the context's own causal prefill queries; question never seen",
                "held_out": "queries of the 64 continuation tokens (full cache)",
                "memory": "peak increase of process RSS during compact(), sampled every 1 ms from /proc/self/statm",
                "malloc_mmap_threshold_set": mmap_threshold,  # 64 KiB during compact(), 32 MiB outside
                "time": f"wall clock (perf_counter) of compact(), torch threads pinned to {args.threads}",
            },
            "tasks": {"generated": len(records), "kept": len(kept), "skipped_for_budget": skipped,
                      "lengths_kept": sorted(r["task"]["length"] for r in kept)},
            "rows": rows, "goal_checks": checks, "records": records,
            "total_seconds": time.perf_counter() - run_started,
        }

    for kind, length, depth, seed in plan:
        if args.quick and any(r.get("full_correct") for r in records):
            break
        elapsed = time.perf_counter() - run_started
        costs = per_length_cost.get(length) or [c * (length / known) ** 1.2 for known, cs in per_length_cost.items() for c in cs]
        estimate = statistics.fmean(costs) if costs else 200.0 * (length / 2048) ** 1.2
        if elapsed + estimate > budget:
            skipped.append(f"{kind}-{length}-d{depth}-s{seed} (estimated {estimate:.0f}s, {budget - elapsed:.0f}s left)")
            continue
        task = factory.make(kind, length, depth, seed)
        task_ratios = [r for r in ratios if not (r >= 0.5 and length > SKIP_HALF_ABOVE)]
        log(f"task {task.name}: asks {task.word} -> {task.code}, {len(task.needles)} needle(s), ratios {task_ratios} (estimated {estimate:.0f}s)")
        record = run_task(model, tokenizer, task, methods, task_ratios, log)
        records.append(record)
        if record["full_correct"]:
            per_length_cost.setdefault(length, []).append(record["seconds"])
        write_result(args.name, payload(final=False))
        gc.collect()

    result = payload(final=True)
    info = {"generated": result["tasks"]["generated"], "kept": result["tasks"]["kept"],
            "lengths": ",".join(str(x) for x in sorted(set(result["tasks"]["lengths_kept"]))) or "-"}
    if not result["tasks"]["kept"]:
        print("no task was solved with the full cache: nothing to compare", file=sys.stderr)
    result["table"] = print_tables(result["rows"], result["goal_checks"], info)
    if skipped:
        print(f"\n{len(skipped)} planned task(s) skipped to stay within the budget", flush=True)
    path = write_result(args.name, result)
    png = RESULTS_DIR / (f"{args.name}.quick.png" if args.quick else f"{args.name}.png")
    print(plot(result["rows"], list(methods), png))
    print(f"results written to {path}; total {result['total_seconds']:.0f}s", flush=True)
    return 0 if result["tasks"]["kept"] else 1


if __name__ == "__main__":
    sys.exit(main())
