"""Run every answer option on every task of the planner suite once: the outcome matrix.

For each task (bench/planner_tasks.py) the context is prefilled once (plainly inside the model's
window, with ``windowed_prefill`` past it), saved with its text into a real LMDB store, and then
every option of retrieval/executors.py answers the task's question from the store, exactly as the
server's Answer RPC would. Per task and option the matrix keeps the answer, its score, the seconds
of every stage (preparation such as index builds or compaction kept apart from per-question work),
or the reason the option is infeasible. The prefill time and the text-search signals are kept too.

    python -m bench.planner_matrix                     # full suite (~80 min on 2 CPU cores)
    python -m bench.planner_matrix --quick             # CI smoke: two 1k tasks, results not kept
    python -m bench.planner_matrix --resume            # continue an interrupted run
    python -m bench.planner_matrix --merge compacted_recall   # add one option's runs to the stored matrix

Writes bench/data/planner_outcomes.jsonl, one JSON object per task, flushed as each task finishes.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from bench.common import RESULTS_DIR, disk_tempdir, environment, pin_threads

DATA = Path(__file__).resolve().parent / "data" / "planner_outcomes.jsonl"
LENGTHS = [1000, 2000, 4000, 8000, 16000, 32000]
SEEDS = {1000: 4, 2000: 4, 4000: 4, 8000: 4, 16000: 2, 32000: 2}


def prefill(model, context_ids: torch.Tensor, window: int) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """Keys, values per layer [H, T, D] of the context and the seconds it took."""
    from kvmem.hf_cache import cache_to_layers
    from retrieval.long_prefill import windowed_prefill

    started = time.perf_counter()
    if context_ids.shape[1] <= window:
        with torch.no_grad():
            layers = cache_to_layers(model(context_ids, use_cache=True).cache)
        keys, values = [k.clone() for k, _ in layers], [v.clone() for _, v in layers]
    else:
        keys, values = windowed_prefill(model, context_ids, window_tokens=2048)
    return keys, values, time.perf_counter() - started


def save_session(store, spec, session_id: str, token_ids: np.ndarray, keys, values, text: str) -> None:
    pieces = store.new_pieces(spec, 0, len(token_ids))
    for layer, (k, v) in enumerate(zip(keys, values)):
        pieces.add_tensors(layer, 0, k.contiguous(), v.contiguous())
    store.save("bench", session_id, spec, token_ids.astype(np.uint32), pieces, text=text, overwrite=True)


def run_task(model, tokenizer, embedder, store, factory, family: str, length: int, seed: int, settings, options: Sequence[str] = ()) -> dict:
    from kvstore.errors import FailedPrecondition
    from kvstore.spec import ModelSpec
    from bench.planner_tasks import score
    from retrieval.executors import OPTIONS, AnswerRequest, execute, model_window

    task = factory.make(family, length, seed)
    window = model_window(model)
    keys, values, prefill_s = prefill(model, task.context_ids, window)
    ids = task.context_ids[0].numpy()
    save_session(store, ModelSpec.from_model(model), task.name, ids, keys, values, tokenizer.decode(task.context_ids[0]))
    record = {**task.describe(), "context_tokens": int(len(ids)), "question_tokens": int(len(tokenizer(task.question, add_special_tokens=False).input_ids)),
              "window": window, "prefill_s": prefill_s, "outcomes": {}}
    for option in options or OPTIONS:
        request = AnswerRequest(model, tokenizer, store, "bench", task.name, task.question, settings, embedder=lambda: embedder)
        try:
            run = execute(option, request)
        except FailedPrecondition as exc:
            record["outcomes"][option] = {"feasible": False, "reason": str(exc)}
            continue
        record["outcomes"][option] = {
            "feasible": True, "quality": score(family, run.text, task.answer), "text": run.text[:80], "stages": run.stages,
            "prepared": run.prepared, "details": {k: v for k, v in run.details.items() if k != "losses"},
        }
    return record


def summary(outcomes: dict) -> str:
    """One progress line's worth: option=score/seconds, or option=x when infeasible."""
    return " ".join(f"{o}={r['quality']:.0f}/{sum(r['stages'].values()):.1f}s" if r["feasible"] else f"{o}=x" for o, r in outcomes.items())


def merge(out: Path, options: list[str]) -> int:
    """Run ``options`` on every task of the matrix at ``out`` (re-prefilled, same seeds) and write
    their outcomes into the records; tasks already holding them are skipped, so it resumes. Each
    task is rewritten in place as it finishes (the file is replaced atomically)."""
    from bench.planner_tasks import SuiteFactory
    from dataclasses import replace
    from modelhost.models import load_model
    from kvstore.store import SessionStore, StoreConfig
    from retrieval.embedder import TextEmbedder
    from retrieval.executors import OPTIONS, ExecutorSettings
    from retrieval.planner import IN_WINDOW_ONLY

    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise SystemExit(f"unknown option(s) {', '.join(unknown)}; options are {', '.join(OPTIONS)}")
    records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    model, tokenizer = load_model("smollm2-135m-instruct", cache_dir=Path(".cache/models"))
    embedder = TextEmbedder.load()
    factory = SuiteFactory(tokenizer)
    settings = ExecutorSettings()
    started = time.perf_counter()

    def write() -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(out)

    with disk_tempdir("kvmem-planner-") as data_dir:
        store = SessionStore.open(replace(StoreConfig(), data_dir=data_dir))
        try:
            for number, record in enumerate(records, 1):
                missing = [o for o in options if o not in record["outcomes"]]
                if not missing:
                    continue
                t0 = time.perf_counter()
                if record["context_tokens"] + record["question_tokens"] + settings.max_new_tokens > record["window"] and set(missing) <= set(IN_WINDOW_ONLY):
                    reason = f"keeps the session's {record['context_tokens']} positions, past the model's window of {record['window']}"
                    record["outcomes"].update({o: {"feasible": False, "reason": f"{o} {reason} (not prefilled: the executor refuses it)"} for o in missing})
                    write()
                    continue
                fresh = run_task(model, tokenizer, embedder, store, factory, record["family"], record["length"], record["seed"], settings, missing)
                if fresh["context_tokens"] != record["context_tokens"] or fresh["question"] != record["question"]:
                    raise SystemExit(f"task {record['name']} no longer regenerates the same context and question; rerun the whole matrix")
                record["outcomes"].update(fresh["outcomes"])
                write()
                print(f"[{number}/{len(records)}] {record['name']} {summary(fresh['outcomes'])} ({time.perf_counter() - t0:.0f}s)", flush=True)
        finally:
            store.close()
    print(f"merged {', '.join(options)} into {out} ({time.perf_counter() - started:.0f}s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two 1k-token tasks; nothing written to bench/data")
    parser.add_argument("--resume", action="store_true", help="skip tasks already in the output file")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--merge", default="", metavar="OPTIONS",
                        help="comma-separated options to run on every task already in the output file and merge into it (a new option joins the matrix without rerunning the others)")
    args = parser.parse_args(argv)
    pin_threads()
    from bench.planner_tasks import SuiteFactory, suite_plan
    from modelhost.models import load_model
    from kvstore.store import SessionStore, StoreConfig
    from retrieval.embedder import TextEmbedder
    from retrieval.executors import ExecutorSettings

    out = args.out or (RESULTS_DIR / "planner_outcomes.quick.jsonl" if args.quick else DATA)
    out.parent.mkdir(parents=True, exist_ok=True)
    plan = [("lookup", 1000, 0), ("absent", 1000, 0)] if args.quick else suite_plan(LENGTHS, SEEDS)
    if args.merge:
        return merge(out, [o.strip() for o in args.merge.split(",") if o.strip()])
    done = set()
    if args.resume and out.exists():
        done = {json.loads(line)["name"] for line in out.read_text().splitlines() if line.strip()}
    elif out.exists():
        out.unlink()
    model, tokenizer = load_model("smollm2-135m-instruct", cache_dir=Path(".cache/models"))
    embedder = TextEmbedder.load()
    factory = SuiteFactory(tokenizer)
    settings = ExecutorSettings()
    env = environment()
    started = time.perf_counter()
    from dataclasses import replace

    with disk_tempdir("kvmem-planner-") as data_dir:
        store = SessionStore.open(replace(StoreConfig(), data_dir=data_dir))
        try:
            for number, (family, length, seed) in enumerate(plan, 1):
                name = f"{family}-{length}-s{seed}"
                if name in done:
                    continue
                t0 = time.perf_counter()
                record = run_task(model, tokenizer, embedder, store, factory, family, length, seed, settings)
                record["environment"] = {"cpu_count": env.get("cpu_count"), "threads": env.get("torch_threads"), "commit": env.get("commit")}
                with out.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
                print(f"[{number}/{len(plan)}] {name} prefill {record['prefill_s']:.1f}s {summary(record['outcomes'])} ({time.perf_counter() - t0:.0f}s)", flush=True)
        finally:
            store.close()
    print(f"outcome matrix: {out} ({time.perf_counter() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
