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

Large layers (``COARSE_MIN_VECTORS`` and up, on CPU, when the shortlist is at most a 32nd of the
blocks) are scanned in two steps instead: an int8
copy of the vectors (``CoarseCodes``, a quarter of their bytes) is scored against int8 probes by
one integer product per head (``torch._int_mm``: VNNI on this EPYC),
and only the blocks whose approximate score lies within ``COARSE_SIGMAS`` standard deviations of
the rounding error of the k-th best (``coarse_then_exact``) are scored again exactly, from the
float32 vectors. The rounding error is known: codes are rounded per dimension (steps s_d) and
probes per vector (step t_i, residual r_i = q_i * s - t_i * codes_i). For one representative,
the code's rounding (uniform, variance s_d^2 / 12 per dimension) moves a block's weighted score
with standard deviation sqrt(sum_ij |w_i w_j cov_ij|), cov_ij = sum_d q_id q_jd s_d^2 / 12: probes
close to one another err alike and their errors add up, independent ones cancel. The probes'
own rounding adds |sum_i |w_i| r_i| * |code| / sqrt(D) (a code of the largest norm at a random
angle). The margin is ``COARSE_SIGMAS`` = 5 of these, averaged over heads; on random and
outlier-dimension keys, with independent and near-identical probes, the largest error seen over
every block of 2,520 layers was 2.2 of them (0.44 of the margin; bench/coarse_scan.py measures it
on every run). The k
best by approximation are scored exactly first; the k-th of those exact scores bounds the true
k-th best from below, so only blocks whose approximate score comes within the margin of it are
scored too. Ranking and ties are then the exact path's; what is given up is a proof: a block
could in principle be missed when rounding errors conspire at five sigmas
(tests/test_flat_search.py compares both paths; bench/coarse_scan.py times both side by side and
counts the layers where they differ).
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

_CHUNK_ELEMENTS = 1 << 24  # products per batched CUDA call (bounds its transient memory)
COARSE_MIN_VECTORS = 1 << 15  # per (layer, head): from here (512k tokens at 4 representatives, 32k with every key) an int8 scan may go first on CPU
COARSE_MIN_RATIO = 32  # and only where the shortlist is at most 1/32 of the blocks: the k blocks rescored exactly cost the same at every length (bench/coarse_scan.py; at 256k, 1/18, the search gained 1.1-1.3x in process but nothing end to end: bench/retrieve_e2e.py)
COARSE_SIGMAS = 5.0  # shortlist margin in standard deviations of the int8 rounding error (module docstring)


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
    """Make numpy's OpenBLAS (its thread-local setting, OpenBLAS >= 0.3.27) and OpenMP (torch's
    integer products; the setting is per thread) run this thread's calls on this thread alone;
    nothing where they are not found."""
    try:
        import ctypes

        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if ".so" in line and ("openblas" in line.lower() or "gomp" in line)}
        for path in sorted(paths):
            lib = ctypes.CDLL(path)
            if hasattr(lib, "openblas_set_num_threads_local"):
                lib.openblas_set_num_threads_local(1)
            if hasattr(lib, "omp_set_num_threads"):
                lib.omp_set_num_threads(1)
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


class CoarseCodes:
    """int8 codes of every layer's flat vectors for the first scan, made per layer on first use
    (thread-safe). Per layer and head: codes int8 [R * nb, D] ordered representative-major (row
    r * nb + b holds representative r of block b, so the max over a block's representatives is
    R elementwise maxima of contiguous rows), steps float32 [D] (v_d ~ codes_d * steps_d) and
    the largest squared norm of a code row (the probe rounding's error bound)."""

    def __init__(self, flat_of: Callable[[int], list[np.ndarray] | None], per_block: int, min_vectors: int = COARSE_MIN_VECTORS,
                 min_ratio: float = COARSE_MIN_RATIO):
        self._flat_of = flat_of  # layer -> its per-head float32 [nb * R, D] views, None when not flat
        self.per_block = per_block
        self.min_vectors = min_vectors  # layers with fewer vectors per head are scanned exactly
        self.min_ratio = min_ratio  # and so are searches whose shortlist is more than 1/min_ratio of the blocks
        self._layers: dict[int, list[tuple[torch.Tensor, np.ndarray, float]]] = {}
        self._lock = threading.Lock()

    def eligible(self, heads: list[np.ndarray] | None) -> bool:
        return heads is not None and len(heads) > 0 and heads[0].shape[0] >= self.min_vectors

    def layer(self, layer: int) -> list[tuple[torch.Tensor, np.ndarray, float]] | None:
        """Per head (codes, steps, max squared code norm), or None for a layer scanned exactly."""
        heads = self._flat_of(layer)
        if not self.eligible(heads):
            return None
        found = self._layers.get(layer)
        if found is None:
            with self._lock:
                found = self._layers.get(layer)
                if found is None:
                    found = [self._encode(vectors, self.per_block) for vectors in heads]
                    self._layers[layer] = found
        return found

    def prepare(self, layers: int) -> None:
        """Encode every eligible layer now (spread over the search workers), so that no request
        pays for it."""
        list(_workers().map(self.layer, range(layers)))

    @property
    def nbytes(self) -> int:
        return sum(self.encoded_bytes(*codes.shape) for heads in list(self._layers.values()) for codes, _, _ in heads)

    @staticmethod
    def encoded_bytes(count: int, dim: int) -> int:
        """Bytes of one head's codes for ``count`` vectors of ``dim``: int8 codes and a float32 step per dimension."""
        return count * dim + dim * 4

    @staticmethod
    def _encode(vectors: np.ndarray, per_block: int) -> tuple[torch.Tensor, np.ndarray, float]:
        """vectors float32 [nb * R, D] (block-major) -> codes int8 [R * nb, D] (representative-major)."""
        count, dim = vectors.shape
        steps = np.abs(vectors).max(0) / np.float32(127)  # [D]
        steps = np.where(steps > 0, steps, np.float32(1)).astype(np.float32)
        ordered = vectors.reshape(count // per_block, per_block, dim).transpose(1, 0, 2)  # [R, nb, D] view
        codes = np.empty((per_block, count // per_block, dim), dtype=np.int8)
        for r in range(per_block):  # a representative at a time: one [nb, D] float temporary, not [N, D]
            codes[r] = np.rint(ordered[r] / steps)
        codes = codes.reshape(count, dim)
        norm2 = float(np.square(codes, dtype=np.float32).sum(1).max())
        return torch.from_numpy(codes), steps, norm2


def coarse_then_exact(vectors: list[np.ndarray], coarse: "CoarseCodes | None", layer: int, query: np.ndarray, weights: np.ndarray,
                      per_block: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``top_blocks(layer_scores(vectors, query, weights, per_block), k)``, through an int8 scan
    where ``coarse`` has codes for ``layer`` and k is small enough for it to pay (module
    docstring): ids int64 [k] and exact scores float32 [k].

    vectors: per head float32 [nb * R, D]; query: unit float32 [H, n, D]; weights: float32 [n]."""
    nb = vectors[0].shape[0] // per_block
    codes = coarse.layer(layer) if coarse is not None and coarse.min_ratio * k <= nb else None  # made on first use
    if codes is None:
        return top_blocks(layer_scores(vectors, query, weights, per_block), k)
    approx, margin = coarse_scores(codes, query, weights, per_block)
    # Every block's approximate score is within ``margin`` of its exact one. Score exactly the k
    # best by approximation first: the k-th of their exact scores (tau) is a lower bound on the
    # exact k-th best, so only blocks with approx >= tau - margin can still enter; score those too.
    first = np.argpartition(approx, nb - k)[nb - k:]
    first_exact = _exact_scores(vectors, first, query, weights, per_block)
    tau = np.partition(first_exact, 0)[0]
    near = approx >= tau - margin
    near[first] = False
    rest = np.flatnonzero(near)
    candidates = np.concatenate([first, rest])
    exact = np.concatenate([first_exact, _exact_scores(vectors, rest, query, weights, per_block)])
    ordered = np.argsort(candidates, kind="stable")  # ascending ids: ties keep the exact path's order
    order, scores = top_blocks(exact[ordered], k)
    return candidates[ordered][order].astype(np.int64), scores


def coarse_scores(codes: list[tuple[torch.Tensor, np.ndarray, float]], query: np.ndarray, weights: np.ndarray, per_block: int) -> tuple[np.ndarray, float]:
    """(approximate block scores float32 [nb], margin): the int8 scan of one layer, and how far
    (``COARSE_SIGMAS`` standard deviations of its rounding error) a score may be from the exact one."""
    nb = codes[0][0].shape[0] // per_block
    approx = np.zeros(nb, dtype=np.float32)
    margin = 0.0
    abs_weights = np.abs(weights).astype(np.float64)
    for head, (head_codes, steps, norm2) in enumerate(codes):
        folded = query[head] * steps  # [n, D]: q_d * s_d, so q . v ~ folded . codes
        probe_steps = np.abs(folded).max(1) / np.float32(127)  # [n]
        probe_steps = np.where(probe_steps > 0, probe_steps, np.float32(1)).astype(np.float32)
        probe_codes = np.rint(folded / probe_steps[:, None]).astype(np.int8)  # [n, D]
        products = torch._int_mm(head_codes, torch.from_numpy(np.ascontiguousarray(probe_codes.T))).numpy()  # int32 [R * nb, n]
        ordered = products.reshape(per_block, nb, -1)
        best = ordered[0].copy()
        for r in range(1, per_block):
            np.maximum(best, ordered[r], out=best)
        approx += best.astype(np.float32) @ (weights * probe_steps).astype(np.float32)
        folded64 = folded.astype(np.float64)
        covariance = np.abs(folded64 @ folded64.T) / 12  # [n, n]: |cov| of two probes' errors from one code's rounding
        residual = folded64 - probe_steps[:, None].astype(np.float64) * probe_codes  # [n, D]: the probes' own rounding
        margin += math.sqrt(abs_weights @ covariance @ abs_weights) + float(np.linalg.norm(abs_weights @ residual)) * math.sqrt(norm2 / folded.shape[1])
    approx /= np.float32(len(codes))
    return approx, COARSE_SIGMAS * margin / len(codes)


def _exact_scores(vectors: list[np.ndarray], blocks: np.ndarray, query: np.ndarray, weights: np.ndarray, per_block: int) -> np.ndarray:
    """float32 [len(blocks)]: ``layer_scores`` of the given blocks only (their rows gathered)."""
    if len(blocks) == 0:
        return np.zeros(0, dtype=np.float32)
    dim = vectors[0].shape[1]
    gathered = [np.take(v.reshape(-1, per_block * dim), blocks, axis=0).reshape(-1, dim) for v in vectors]  # a block's R rows are adjacent: one copy each
    return layer_scores(gathered, query, weights, per_block)


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
                  device: DeviceVectors | None = None, coarse: "CoarseCodes | None" = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer the best k blocks (ids int64 [k], scores float32 [k], best first).

    flat: per layer and head float32 [nb * R, D]; probes: per layer (vectors [H, n_l, D] any norm,
    weights [n_l]); device: score on an accelerator instead (CUDA); coarse: int8 codes of the
    large layers (CPU: scanned first, see ``coarse_then_exact``)."""
    units = [torch.nn.functional.normalize(vectors.float(), dim=-1) for vectors, _ in probes]  # [H, n_l, D]
    if device is None:
        def one(layer: int) -> tuple[np.ndarray, np.ndarray]:
            return coarse_then_exact(flat[layer], coarse, layer, units[layer].numpy(), probes[layer][1].float().numpy(), per_block, k)

        return list(_workers().map(one, range(len(probes))))
    n = max(unit.shape[1] for unit in units)
    queries = torch.zeros((len(units), units[0].shape[0], n, units[0].shape[2]))
    weights = torch.zeros((len(units), n))
    for layer, (unit, (_, w)) in enumerate(zip(units, probes)):
        queries[layer, :, : unit.shape[1]] = unit
        weights[layer, : len(w)] = w.float()
    scores = device.scores(flat, queries, weights, per_block).numpy()
    return [top_blocks(layer, k) for layer in scores]
