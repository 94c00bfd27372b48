"""vLLM with kvmem: the second run of this script (a new process, a new engine) takes the long
prompt's KV from kvmem instead of recomputing its prefill.

    make serve                                            # terminal 1: kvmem on 127.0.0.1:50051
    make vllm-env                                         # once: .venv-vllm with vLLM's CPU build
    .venv-vllm/bin/python examples/vllm_offline.py        # run it twice; compare "cached" and the time

The settings that matter: kv_connector / kv_connector_module_path name the connector,
kv_role="kv_both" (load and save), kv_load_failure_policy="recompute" (a failed kvmem load is
recomputed, never served), and kvmem_* keys in kv_connector_extra_config (kvmem/vllm/settings.py
lists them). On this CPU: dtype float32 (bf16 is ~4x slower on AVX2), enforce_eager, and
VLLM_CPU_KVCACHE_SPACE (GiB of paged KV).
"""
from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="data/models/smollm2-135m-instruct", help="a transformers model folder (make serve prepares this one)")
    parser.add_argument("--kvmem", default="127.0.0.1:50051")
    parser.add_argument("--session", default="", help="keep the request's tokens in this kvmem session too")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    llm = LLM(
        model=args.model, dtype="float32", max_model_len=4096, enforce_eager=True,
        kv_transfer_config=KVTransferConfig(
            kv_connector="KVMemConnector", kv_connector_module_path="kvmem.vllm.connector", kv_role="kv_both",
            kv_load_failure_policy="recompute", kv_connector_extra_config={"kvmem_address": args.kvmem},
        ),
    )
    tokenizer = llm.get_tokenizer()
    licence = "\n".join(f"Clause {i}: the licensee keeps the notice of clause {i} in every copy." for i in range(120))
    messages = [{"role": "user", "content": licence + "\n\nWhat must the licensee keep according to clause 7?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    params = {"kvmem_session": args.session} if args.session else None
    sampling = SamplingParams(max_tokens=40, temperature=0.0, extra_args={"kv_transfer_params": params} if params else None)
    started = time.perf_counter()
    output = llm.generate([{"prompt_token_ids": prompt}], sampling, use_tqdm=False)[0]
    print(f"prompt {len(prompt)} tokens, cached {output.num_cached_tokens}, {time.perf_counter() - started:.2f} s")
    print("kvmem:", output.kv_transfer_params)
    print(output.outputs[0].text.strip())


if __name__ == "__main__":
    main()
