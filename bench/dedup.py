"""Bytes stored for sessions sharing a 2k-token prefix with 256-token private tails, vs no dedup.

Random KV of SmolLM2 shape (46,080 bytes/token); the 2,048-token prefix (token ids and KV) is
generated once and identical in every session, each 256-token tail has its own token ids and KV.
Two servers, fed the same sessions side by side, each behind a loopback proxy that counts wire
bytes (HTTP/2 framing included):

    reuse_prefix=True    the client asks which prefix is stored and sends only the rest
    reuse_prefix=False   the client sends every token (the wire baseline); the store still
                         deduplicates by prefix-chain keys

Storage baseline: logical bytes, the sum of every session's KV (what a store without dedup holds
before headers). Reported from GetStats: logical_bytes, stored_bytes (block records, headers
included) and lmdb_used_bytes (pages in use).

    python -m bench.dedup [--quick]
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from bench.common import (
    MB,
    SMOLLM2_SPEC,
    CountingProxy,
    environment,
    format_table,
    median,
    parse_args,
    pin_threads,
    random_tokens,
    run_server,
    summary,
    timed,
    write_result,
)
from kvstore.codec import BLOCK_HEADER_BYTES

NAME = "dedup"
PREFIX_TOKENS = 2048
TAIL_TOKENS = 256


def main(argv=None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    pin_threads()
    spec = SMOLLM2_SPEC
    sessions = args.repeats or (5 if args.quick else 100)
    total = PREFIX_TOKENS + TAIL_TOKENS
    print(f"dedup: {sessions} sessions of {PREFIX_TOKENS} shared + {TAIL_TOKENS} private tokens, SmolLM2 shape ({spec.bytes_per_token:,} B/token)", flush=True)

    # KV buffer [L, 2, H, T, D]: the prefix part is filled once, the tail part refilled per session.
    generator = torch.Generator().manual_seed(0)
    kv = torch.randn((spec.num_layers, 2, spec.num_kv_heads, total, spec.head_dim), generator=generator)
    layers = [(kv[layer, 0], kv[layer, 1]) for layer in range(spec.num_layers)]  # views [H, T, D]
    prefix_ids = random_tokens(PREFIX_TOKENS, seed=0)

    def session_data(index: int) -> np.ndarray:
        """Refill the tail KV for session ``index`` (deterministic) and return its token ids [T]."""
        kv[:, :, :, PREFIX_TOKENS:, :].normal_(generator=torch.Generator().manual_seed(1000 + index))
        return np.concatenate([prefix_ids, random_tokens(TAIL_TOKENS, seed=1000 + index)])

    modes = {"reuse_prefix=True": True, "reuse_prefix=False": False}
    per_session = {mode: {"wire_up": [], "wire_down": [], "seconds": [], "dedup_tokens": [], "bytes_written": []} for mode in modes}
    stats = {}
    verified = {}
    with run_server("reuse") as reuse_server, run_server("full") as full_server:
        servers = {"reuse_prefix=True": reuse_server, "reuse_prefix=False": full_server}
        proxies = {mode: CountingProxy(server.port) for mode, server in servers.items()}
        clients = {mode: servers[mode].client(spec, address=proxies[mode].address) for mode in modes}
        for index in range(sessions):
            ids = session_data(index)
            for mode, reuse in modes.items():
                up0, down0 = proxies[mode].counter.snapshot()
                elapsed, response = timed(lambda: clients[mode].save(f"s{index:04d}", layers, ids, reuse_prefix=reuse))
                up1, down1 = proxies[mode].counter.snapshot()
                record = per_session[mode]
                record["wire_up"].append(up1 - up0)
                record["wire_down"].append(down1 - down0)
                record["seconds"].append(elapsed)
                record["dedup_tokens"].append(response.deduplicated_tokens)
                record["bytes_written"].append(response.bytes_written)
            if (index + 1) % max(1, sessions // 10) == 0 or index + 1 == sessions:
                print(f"  {index + 1}/{sessions} sessions saved", flush=True)
        # Correctness: the last and the first session restore to exactly what was saved.
        for index in sorted({sessions - 1, 0}, reverse=True):
            session_data(index)
            for mode, client in clients.items():
                restored = client.restore(f"s{index:04d}")
                same = all(torch.equal(k, rk) and torch.equal(v, rv) for (k, v), (rk, rv) in zip(layers, restored.layers))
                verified[f"{mode} s{index:04d}"] = same
                if not same:
                    raise RuntimeError(f"session {index} restored from the {mode} server differs from what was saved")
        for mode, client in clients.items():
            s = client.stats()
            stats[mode] = {"sessions": s.sessions, "chunks": s.chunks, "logical_bytes": s.logical_bytes, "stored_bytes": s.stored_bytes,
                           "lmdb_used_bytes": s.lmdb_used_bytes, "lmdb_map_bytes": s.lmdb_map_bytes}
            client.close()
        for proxy in proxies.values():
            proxy.close()

    chunk = 256  # store.chunk_tokens (default), reported by the server
    logical = sessions * total * spec.bytes_per_token
    block_record = spec.num_kv_heads * chunk * spec.head_dim * 4 * 2 + BLOCK_HEADER_BYTES
    expected_chunks = PREFIX_TOKENS // chunk + sessions * (TAIL_TOKENS // chunk)
    expected_stored = expected_chunks * spec.num_layers * block_record
    for mode, s in stats.items():
        if s["logical_bytes"] != logical:
            raise RuntimeError(f"{mode}: server reports logical_bytes {s['logical_bytes']}, expected {logical}")

    storage_rows = [["logical (no dedup, baseline)", "-", logical, logical / MB, 1.0, ""]]
    for mode, s in stats.items():
        storage_rows.append(["stored_bytes", mode, s["stored_bytes"], s["stored_bytes"] / MB, logical / s["stored_bytes"], "yes" if s["stored_bytes"] == expected_stored else f"NO (expected {expected_stored:,})"])
        storage_rows.append(["lmdb_used_bytes", mode, s["lmdb_used_bytes"], s["lmdb_used_bytes"] / MB, logical / s["lmdb_used_bytes"], ""])
    print()
    print(format_table(["measure", "server", "bytes", "MB", "x smaller than logical", "= expected"], storage_rows,
                       title=f"Storage: {sessions} sessions x ({PREFIX_TOKENS} shared + {TAIL_TOKENS} private) tokens; expected {expected_chunks} chunks"))

    baseline_up = sum(per_session["reuse_prefix=False"]["wire_up"])
    wire_rows = []
    for mode, record in per_session.items():
        up = sum(record["wire_up"])
        wire_rows.append([mode, up / MB, median(record["wire_up"][1:] or record["wire_up"]) / MB, sum(record["wire_down"]) / MB,
                          baseline_up / up, median(record["seconds"][1:] or record["seconds"]), sum(record["seconds"]), sum(record["dedup_tokens"])])
    print()
    print(format_table(["client", "sent MB (total)", "sent MB/session (median, after 1st)", "received MB", "x less sent", "save s (median)", "save s (total)", "dedup tokens (server)"], wire_rows,
                       title="Wire bytes client -> server through a counting proxy (HTTP/2 framing included)"))
    print(f"\nrestores verified bit-exact: {verified}")
    path = write_result(NAME, {
        "benchmark": NAME, "quick": args.quick, "sessions": sessions, "prefix_tokens": PREFIX_TOKENS, "tail_tokens": TAIL_TOKENS,
        "spec": spec.to_dict(), "bytes_per_token": spec.bytes_per_token, "logical_bytes": logical,
        "expected_chunks": expected_chunks, "expected_stored_bytes": expected_stored, "stats": stats,
        "wire": {mode: {"sent_bytes_total": sum(r["wire_up"]), "received_bytes_total": sum(r["wire_down"]), "sent_bytes_per_session": r["wire_up"],
                        "save_seconds": summary(r["seconds"]), "dedup_tokens_total": sum(r["dedup_tokens"]), "bytes_written_total": sum(r["bytes_written"])}
                 for mode, r in per_session.items()},
        "restores_verified": verified, "environment": environment(),
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
