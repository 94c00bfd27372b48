"""Attention Matching ablation on one real context: which reference queries and which fitting steps
matter, measured by held-out attention error AND continuation NLL, beside every eviction method.

SmolLM2-135M, a 768-token slice of Debian's licence texts (tokens 2000..2768) and its true 64-token
continuation. Held-out queries are the continuation's own queries (never used for fitting); NLL is
of the continuation given the compacted cache. 10% kept (``--ratio``).

    python -m bench.am_ablation [--quick] [--ratio 0.1]
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from bench.common import MODEL_CACHE, environment, format_table, pin_threads, write_result

CONTEXT, CONTINUATION, OFFSET = 768, 64, 2000


LICENSES = Path(__file__).resolve().parent.parent / "tests" / "data" / "licenses"  # Debian's texts, shipped verbatim

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer variants, a 256-token context (CI smoke run)")
    parser.add_argument("--ratio", type=float, default=0.1)
    args = parser.parse_args(argv)
    pin_threads()
    from compaction.attention_matching import AttentionMatching
    from compaction.base import CompactionInput, Target, available_methods, make_compactor
    from compaction.inference import CompactedCache
    from compaction.metrics import mean_attention_error
    from compaction.queries import capture_queries
    from compaction.references import reference_queries
    from modelhost.models import load_model

    model, tokenizer = load_model("smollm2-135m-instruct", cache_dir=MODEL_CACHE)
    context_len = 256 if args.quick else CONTEXT
    text = "\n\n".join((LICENSES / n).read_text() for n in ("GPL-3", "Apache-2.0", "MPL-2.0"))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, OFFSET : OFFSET + context_len + CONTINUATION]
    context, continuation = ids[:, :context_len], ids[:, context_len:]
    full = capture_queries(model, ids)
    keys = [layer.keys[0][:, :context_len].clone() for layer in full.cache.layers]
    values = [layer.values[0][:, :context_len].clone() for layer in full.cache.layers]
    context_queries = [q[:, :context_len] for q in full.queries]
    held_out = [q[:, context_len:] for q in full.queries]
    target = Target(ratio=args.ratio)

    def nll(cache) -> float:
        with torch.no_grad():
            logits = model(continuation, cache=cache, use_cache=True).logits[0, :-1]
        return float(torch.nn.functional.cross_entropy(logits, continuation[0, 1:]))

    with torch.no_grad():
        full_cache = model(context, use_cache=True).cache
        no_context = float(torch.nn.functional.cross_entropy(model(continuation).logits[0, :-1], continuation[0, 1:]))
    rows = [["full cache", "-", "-", 0.0, nll(copy.deepcopy(full_cache)), "-"], ["no context", "-", "-", "-", no_context, "-"]]

    def evaluate(name: str, refs: str, compactor, queries) -> None:
        inputs = CompactionInput(keys, values, queries, held_out)
        started = time.perf_counter()
        result = compactor.compact(inputs, target)
        seconds = time.perf_counter() - started
        cache = CompactedCache.for_model(model, [(l.keys, l.values) for l in result.layers], [l.bias for l in result.layers], context_len)
        rows.append([name, refs, f"{result.slots}", mean_attention_error(inputs, result), nll(cache), seconds])
        print(f"  {name} ({refs}): done in {seconds:.1f}s", flush=True)

    for method in available_methods():
        if method != "attention_matching":
            evaluate(method, "context prefill", make_compactor(method), context_queries)
    references = {
        "self-study + window": reference_queries(model, tokenizer, context),
        "repeat + window": reference_queries(model, tokenizer, context, self_study=0, use_repeat=True),
    }
    if not args.quick:
        references["self-study + repeat + window"] = reference_queries(model, tokenizer, context, use_repeat=True)
    for refs_name, refs in references.items():
        evaluate("attention_matching", refs_name, AttentionMatching(), refs.queries)
    default = references["self-study + window"].queries
    ablations = {
        "AM non-uniform head budgets": AttentionMatching(nonuniform=True),
        "AM no value refit": AttentionMatching(ridge=1e6),
        "AM beta = 0": AttentionMatching(beta_min=0.0, beta_max=0.0),
        "AM selection only (beta 0, original V, sinks+recent)": AttentionMatching(beta_min=0.0, beta_max=0.0, ridge=1e6, sinks=4, recent=64, recent_share=0.9),
        "AM + sinks/recent window": AttentionMatching(sinks=4, recent=64),
    }
    if args.quick:
        ablations = dict(list(ablations.items())[:1])
    for name, compactor in ablations.items():
        evaluate(name, "self-study + window", compactor, default)
    headers = ["method", "reference queries", "slots/head", "attn error", "continuation NLL", "compaction s"]
    print(format_table(headers, rows, title=f"SmolLM2-135M, {context_len}-token real context, {args.ratio:.0%} kept; held-out = true continuation queries"))
    write_result("am_ablation", {"quick": args.quick, "ratio": args.ratio, "context_tokens": context_len, "headers": headers, "rows": rows, "environment": environment()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
