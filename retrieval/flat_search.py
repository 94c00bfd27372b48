"""Exact block scores over flat (every vector stored) indexes, for every layer in one call.

A block's score for a probe (unit vectors q_i [n, D], weights w_i) at one layer is
``mean over KV heads of sum_i w_i max_r cos(q_i, v_r)`` over the block's representatives v_r
(retrieval/block_index.py). At 256k tokens that is 90 products of [n, 64] probes with [16384, 64]
vectors per request (30 layers x 3 KV heads), most of a Retrieve's time; this module does them as
cheaply as exactness allows:

* per head one product vectors @ probes.T ([N, D] x [D, n], the shape BLAS runs fastest for a
  narrow n) over the vectors faiss holds (no copy), in numpy's OpenBLAS (AVX-512 on AMD and Intel
  alike: twice torch's MKL sgemm on an EPYC), its [N, n] result reduced over each block's
  representatives while still in cache;
* layers spread over a few worker threads, each running BLAS single-threaded (a request never
  waits on a BLAS thread that another process's load has descheduled, and several requests
  share the cores rather than fight over them);
* the best k blocks by a partial selection, ranked exactly as a stable full sort would rank them;
* on CUDA, a copy of every layer's vectors is kept on the GPU (once per index) and all layers'
  heads are scored in a few batched products.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

_CHUNK_ELEMENTS = 1 << 24  # products per batched CUDA call (bounds its transient memory)


def layer_scores(vectors: list[np.ndarray], query: np.ndarray, weights: np.ndarray, per_block: int) -> np.ndarray:
    """float32 [nb] block scores of one layer. vectors: per head float32 [nb * R, D]; query: unit
    float32 [H, n, D]; weights: float32 [n]; per_block: R."""
    total = None
    for head, head_vectors in enumerate(vectors):
        sims = np.dot(head_vectors, np.ascontiguousarray(query[head].T)).reshape(-1, per_block, query.shape[1])  # [nb, R, n]
        contribution = np.dot(_block_max(sims), weights)  # [nb]
        total = contribution if total is None else np.add(total, contribution, out=total)
    return (total / np.float32(len(vectors))).astype(np.float32, copy=False)


def _block_max(sims: np.ndarray) -> np.ndarray:
    """[nb, R, n] -> [nb, n]: the max over R (a few elementwise maxima beat a strided reduction)."""
    if sims.shape[1] > 8:
        return sims.max(1)
    best = np.maximum(sims[:, 0], sims[:, 1]) if sims.shape[1] > 1 else sims[:, 0].copy()
    for r in range(2, sims.shape[1]):
        np.maximum(best, sims[:, r], out=best)
    return best


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _openblas_single_thread() -> None:
    """Make numpy's OpenBLAS run this thread's calls on this thread alone (its thread-local
    setting, OpenBLAS >= 0.3.27); nothing where it is not found."""
    try:
        import ctypes

        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line}
        for path in sorted(paths):
            lib = ctypes.CDLL(path)
            if hasattr(lib, "openblas_set_num_threads_local"):
                lib.openblas_set_num_threads_local(1)
                return
    except (OSError, AttributeError, IndexError):
        pass


def _workers() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="kvmem-search", initializer=_openblas_single_thread)
        return _pool


def top_blocks(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [k], scores float32 [k]) of the k best of ``scores`` [nb], best first, ties by
    lower id: ``np.argsort(-scores, kind="stable")[:k]`` without sorting every block."""
    if k < len(scores):
        kth = np.partition(scores, len(scores) - k)[len(scores) - k]  # the k-th largest
        ids = np.flatnonzero(scores >= kth)  # ascending: every block tied with the k-th is here
    else:
        ids = np.arange(len(scores))
    order = np.argsort(-scores[ids], kind="stable")[:k]
    return ids[order].astype(np.int64), scores[ids[order]].astype(np.float32)


class DeviceVectors:
    """Every layer's flat vectors stacked on an accelerator, made on first use (thread-safe).

    vectors: [L, H, N, D] float32 on the device."""

    def __init__(self, device: torch.device):
        self.device = device
        self._lock = threading.Lock()
        self._vectors: torch.Tensor | None = None

    def get(self, flat: list[list[np.ndarray]]) -> torch.Tensor:
        if self._vectors is None:
            with self._lock:
                if self._vectors is None:
                    stacked = torch.empty((len(flat), len(flat[0]), *flat[0][0].shape), dtype=torch.float32, device=self.device)
                    for layer, heads in enumerate(flat):
                        for head, vectors in enumerate(heads):
                            stacked[layer, head].copy_(torch.from_numpy(vectors))
                    self._vectors = stacked
        return self._vectors

    def scores(self, flat: list[list[np.ndarray]], queries: torch.Tensor, weights: torch.Tensor, per_block: int) -> torch.Tensor:
        """float32 [L, nb] on CPU for unit queries [L, H, n, D] and weights [L, n] (zero-weight padding allowed)."""
        vectors = self.get(flat)
        layers, heads, count, _ = vectors.shape
        n = queries.shape[2]
        q = queries.to(self.device)
        w = weights.to(self.device)
        out = torch.empty((layers, count // per_block), dtype=torch.float32, device=self.device)
        step = max(1, _CHUNK_ELEMENTS // max(1, heads * count * n))
        for first in range(0, layers, step):
            last = min(layers, first + step)
            sims = torch.matmul(vectors[first:last], q[first:last].transpose(2, 3))  # [l, H, N, n]
            best = sims.view(last - first, heads, count // per_block, per_block, n).amax(3)  # [l, H, nb, n]
            out[first:last] = torch.einsum("lhbn,ln->lb", best, w[first:last]) / heads
        return out.cpu()


def search_layers(flat: list[list[np.ndarray]], probes: list[tuple[torch.Tensor, torch.Tensor]], k: int, per_block: int,
                  device: DeviceVectors | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer the best k blocks (ids int64 [k], scores float32 [k], best first).

    flat: per layer and head float32 [nb * R, D]; probes: per layer (vectors [H, n_l, D] any norm,
    weights [n_l]); device: score on an accelerator instead (CUDA)."""
    units = [torch.nn.functional.normalize(vectors.float(), dim=-1) for vectors, _ in probes]  # [H, n_l, D]
    if device is None:
        def one(layer: int) -> tuple[np.ndarray, np.ndarray]:
            return top_blocks(layer_scores(flat[layer], units[layer].numpy(), probes[layer][1].float().numpy(), per_block), k)

        return list(_workers().map(one, range(len(probes))))
    n = max(unit.shape[1] for unit in units)
    queries = torch.zeros((len(units), units[0].shape[0], n, units[0].shape[2]))
    weights = torch.zeros((len(units), n))
    for layer, (unit, (_, w)) in enumerate(zip(units, probes)):
        queries[layer, :, : unit.shape[1]] = unit
        weights[layer, : len(w)] = w.float()
    scores = device.scores(flat, queries, weights, per_block).numpy()
    return [top_blocks(layer, k) for layer in scores]
