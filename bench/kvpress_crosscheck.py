"""Cross-check: our snapkv and streaming_llm keep the same positions as NVIDIA kvpress.

kvpress pins an older transformers, so it lives in its own virtualenv (outside the repo):

    python3 -m venv /work/kvpress-venv
    /work/kvpress-venv/bin/pip install torch==2.13.0 && /work/kvpress-venv/bin/pip install kvpress

One real text (the start of the GPL-3, ``--tokens`` tokens) through SmolLM2-135M-Instruct:

* kvpress side (this file run by the kvpress venv's python, ``--kvpress-side``): a full prefill
  gives the original keys; a prefill under ``SnapKVPress`` / ``StreamingLLMPress``
  (compression_ratio 0.5) gives the pruned cache, and each kept key is matched (exactly) to its
  original position. Each press's scores are recorded too.
* our side: ``capture_queries`` on the same token ids, then ``snapkv`` / ``streaming_llm`` with
  the budget kvpress keeps (``int(T * (1 - ratio))``).

Agreement per layer and KV head = |ours ∩ kvpress| / t. Both index sets go to
bench/results/kvpress_crosscheck.json.

    python -m bench.kvpress_crosscheck [--tokens 512] [--kvpress-python /work/kvpress-venv/bin/python]

Only the standard library is imported at module level: the kvpress venv runs this file too.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO / ".cache" / "models" / "smollm2-135m-instruct"
KVPRESS_PYTHON = Path("/work/kvpress-venv/bin/python")
TEXT = Path("/usr/share/common-licenses/GPL-3")
NAME = "kvpress_crosscheck"
RATIO = 0.5  # kvpress compression_ratio (fraction removed)
METHODS = {"snapkv": "SnapKVPress", "streaming_llm": "StreamingLLMPress"}  # ours -> kvpress


# ---------------------------------------------------------------------------- kvpress side
def kvpress_side(ids_path: Path, out_dir: Path, model_dir: Path) -> None:
    """Runs in the kvpress venv. Writes kvpress.json (indices [L][H][t], versions) and scores.safetensors."""
    import importlib.metadata

    import kvpress
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(2)
    ids = torch.tensor(json.loads(ids_path.read_text()), dtype=torch.long).view(1, -1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():
        full = model(ids, past_key_values=DynamicCache(), use_cache=True).past_key_values
    original = [layer.keys[0] for layer in full.layers]  # [H, T, D] per layer
    result = {"versions": {"kvpress": importlib.metadata.version("kvpress"), "transformers": transformers.__version__, "torch": torch.__version__}, "indices": {}}
    tensors = {}
    for ours, press_name in METHODS.items():
        press = getattr(kvpress, press_name)(compression_ratio=RATIO)
        scores: list = []
        score = press.score

        def recording(*args, _score=score, _scores=scores, **kwargs):
            out = _score(*args, **kwargs)
            _scores.append(out[0].detach().clone())  # [H, T]
            return out

        press.score = recording
        with torch.no_grad(), press(model):
            pruned = model(ids, past_key_values=DynamicCache(), use_cache=True).past_key_values
        per_layer = []
        for layer, cached in enumerate(pruned.layers):
            heads = []
            for h in range(cached.keys.shape[1]):
                kept = cached.keys[0, h]  # [t, D]
                same = (kept[:, None, :] == original[layer][h][None, :, :]).all(-1)  # [t, T]
                if not bool((same.sum(-1) == 1).all()):
                    raise RuntimeError(f"{press_name}: layer {layer} head {h}: a kept key does not match exactly one original key")
                heads.append(sorted(same.int().argmax(-1).tolist()))
            per_layer.append(heads)
        result["indices"][ours] = per_layer
        for layer, s in enumerate(scores):
            tensors[f"{ours}.{layer}"] = s.float().contiguous()
    for layer, k in enumerate(original):
        tensors[f"keys.{layer}"] = k.contiguous()
    save_file(tensors, str(out_dir / "kvpress.safetensors"))
    (out_dir / "kvpress.json").write_text(json.dumps(result))


# ---------------------------------------------------------------------------- our side
def ours_side(ids: list[int]) -> tuple[dict, dict]:
    """Our kept indices {method: [L][H][t]} and scores {method: [per layer [H, T]]} on ``ids``."""
    import torch

    from compaction.base import CompactionInput, Target, make_compactor
    from compaction.queries import capture_queries
    from modelhost.models import load_model

    model, _ = load_model(MODEL_DIR.name, cache_dir=MODEL_DIR.parent)
    captured = capture_queries(model, torch.tensor(ids).view(1, -1))
    keys = [layer.keys[0] for layer in captured.cache.layers]
    values = [layer.values[0] for layer in captured.cache.layers]
    inputs = CompactionInput(keys, values, captured.queries)
    kept = max(1, int(len(ids) * (1 - RATIO)))  # kvpress's compute_n_kept
    indices, scores = {}, {}
    for method in METHODS:
        compactor = make_compactor(method)
        result = compactor.compact(inputs, Target(budget=kept))
        indices[method] = [layer.indices.tolist() for layer in result.layers]
        scores[method] = [compactor.score(inputs, layer) for layer in range(inputs.num_layers)]
    return indices, scores | {"keys": keys}


def agreement(a: list, b: list) -> list[list[float]]:
    """[L][H] fraction of positions kept by both."""
    return [[len(set(x) & set(y)) / max(1, len(x)) for x, y in zip(la, lb)] for la, lb in zip(a, b)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512, help="context length T (tokens of the GPL-3)")
    parser.add_argument("--kvpress-python", type=Path, default=KVPRESS_PYTHON)
    parser.add_argument("--kvpress-side", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ids", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.kvpress_side:
        kvpress_side(args.ids, args.out, MODEL_DIR)
        return 0
    if not args.kvpress_python.exists():
        print(f"{NAME}: no kvpress virtualenv at {args.kvpress_python}; create it with\n"
              "  python3 -m venv /work/kvpress-venv && /work/kvpress-venv/bin/pip install torch==2.13.0 "
              "&& /work/kvpress-venv/bin/pip install kvpress\nSkipping the cross-check.")
        return 2
    if not MODEL_DIR.is_dir():
        print(f"{NAME}: model folder {MODEL_DIR} is missing; run: python -m modelhost.models prepare --cache-dir {MODEL_DIR.parent}")
        return 2

    import torch
    from safetensors.torch import load_file

    from modelhost.models import load_model

    torch.set_num_threads(2)
    _, tokenizer = load_model(MODEL_DIR.name, cache_dir=MODEL_DIR.parent)
    ids = tokenizer(TEXT.read_text(), add_special_tokens=False).input_ids[: args.tokens]
    with tempfile.TemporaryDirectory(prefix="kvpress-crosscheck-") as tmp:
        tmp_dir = Path(tmp)
        (tmp_dir / "ids.json").write_text(json.dumps(ids))
        command = [str(args.kvpress_python), str(Path(__file__).resolve()), "--kvpress-side", "--ids", str(tmp_dir / "ids.json"), "--out", str(tmp_dir)]
        run = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if run.returncode != 0:
            print(f"{NAME}: the kvpress side failed (exit {run.returncode}):\n{run.stderr[-4000:]}")
            return 1
        theirs = json.loads((tmp_dir / "kvpress.json").read_text())
        their_tensors = load_file(str(tmp_dir / "kvpress.safetensors"))
    ours, our_tensors = ours_side(ids)

    key_diff = max(float((k - their_tensors[f"keys.{i}"]).abs().max()) for i, k in enumerate(our_tensors["keys"]))
    payload = {"name": NAME, "tokens": len(ids), "compression_ratio": RATIO, "kept_per_head": len(ours["snapkv"][0][0]),
               "kvpress_side": theirs["versions"], "max_key_diff_between_venvs": key_diff, "methods": {}}
    print(f"{NAME}: T={len(ids)} tokens of {TEXT}, kept {payload['kept_per_head']} per head; kvpress {theirs['versions']}")
    print(f"  keys of the two transformers versions differ by at most {key_diff:.2e}")
    for method in METHODS:
        frac = agreement(ours[method], theirs["indices"][method])
        flat = [x for row in frac for x in row]
        score_diff = None
        if method == "snapkv":  # kvpress pads the window with max + 1: compare the scored part only
            window = 64
            score_diff = max(float((s[:, :-window] - their_tensors[f"{method}.{i}"][:, :-window]).abs().max()) for i, s in enumerate(our_tensors[method]))
        payload["methods"][method] = {
            "identical_heads": sum(x == 1.0 for x in flat), "heads": len(flat), "mean_agreement": sum(flat) / len(flat),
            "min_agreement": min(flat), "agreement_per_layer_head": frac, "max_score_diff": score_diff,
            "ours": ours[method], "kvpress": theirs["indices"][method],
        }
        extra = f", max score diff {score_diff:.2e}" if score_diff is not None else ""
        print(f"  {method:14s} identical kept sets in {payload['methods'][method]['identical_heads']}/{len(flat)} (layer, head) pairs; "
              f"mean agreement {sum(flat) / len(flat):.4f}, min {min(flat):.4f}{extra}")
    out = REPO / "bench" / "results" / f"{NAME}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(payload) + "\n")
    tmp_out.replace(out)
    print(f"  wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
