"""A session's KV cut into blocks whose keys are searchable in faiss.

Per layer and KV head, every block of ``block_tokens`` consecutive tokens is represented by unit
vectors taken from its keys after rotating them back to position 0 (so a block is found by what it
holds, not by where it sits). By default every key represents itself (``representatives=0``): a
block's score is then the exact best match of a probe vector among its keys. Measured on needle
tasks, that is what finds a rare word in 16k tokens of text; summaries lose it
(bench/retrieval.py). Smaller indexes keep ``representatives`` vectors per block:

* the block's mean key direction (its gist), then
* greedily, the key farthest (by cosine) from every representative chosen so far: the outliers a
  query would single out (a name, a number) rather than the filler around them.

No query states are needed, so an index can be built from stored KV alone, whoever computed it.

Indexes are exact (``IDMap2,Flat``, inner product on unit vectors) up to ``exact_max_vectors`` per
layer and head, and HNSW above it (see bench/retrieval_latency.py for where flat search stops
meeting the latency goal). They serialise to bytes (faiss's own format inside a checked kvmem
envelope) and are stored per layer beside the session (retrieval/service.py).
"""
from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from typing import Any

import faiss
import numpy as np
import torch

from kvstore.errors import CorruptData, InvalidRequest
from retrieval.rope import Rope
from retrieval.flat_search import COARSE_MIN_RATIO, COARSE_MIN_VECTORS, CoarseCodes, DeviceVectors, coarse_then_exact, search_layers


@dataclass(frozen=True)
class BlockIndexConfig:
    block_tokens: int = 64  # tokens per retrievable block
    representatives: int = 0  # unit vectors per block and KV head; 0 = every key (exact max), 1 = the mean direction
    exact_max_vectors: int = 1 << 15  # above this many vectors per (layer, head) index: HNSW (flat p99 passes 5 ms near 65k; bench/retrieval_latency.py)
    hnsw_neighbors: int = 32

    def __post_init__(self) -> None:
        if self.block_tokens < 1 or self.representatives < 0:
            raise InvalidRequest(f"block_tokens ({self.block_tokens}) must be >= 1 and representatives ({self.representatives}) >= 0")

    @property
    def per_block(self) -> int:
        """Vectors per block and head."""
        return self.representatives or self.block_tokens

    @property
    def tag(self) -> str:
        """Names this configuration's stored index: sessions keep one index per configuration,
        so requests with different settings never share (or overwrite) each other's."""
        return f"b{self.block_tokens}-r{self.representatives}-x{self.exact_max_vectors}-n{self.hnsw_neighbors}"


def block_ranges(num_tokens: int, block_tokens: int) -> np.ndarray:
    """int64 [nb, 2]: (start, end) of each block; the last one may be short."""
    starts = np.arange(0, num_tokens, block_tokens, dtype=np.int64)
    return np.stack([starts, np.minimum(starts + block_tokens, num_tokens)], axis=1)


def representatives(keys: torch.Tensor, block_tokens: int, count: int) -> torch.Tensor:
    """Representative unit vectors of each block (count=0: every key; a short last block repeats
    its first key in the padding, which changes no maximum).

    keys: [H, T, D] position-free keys. Returns float32 [H, nb, count or block_tokens, D].
    """
    heads, total, dim = keys.shape
    nb = -(-total // block_tokens)
    padded = torch.zeros(heads, nb * block_tokens, dim, dtype=torch.float32)
    padded[:, :total] = keys.float()
    if total % block_tokens:
        padded[:, total:] = keys[:, (nb - 1) * block_tokens : (nb - 1) * block_tokens + 1].float()
    unit = torch.nn.functional.normalize(padded, dim=-1).view(heads, nb, block_tokens, dim)
    if count == 0:
        return unit
    valid = (torch.arange(nb * block_tokens) < total).view(1, nb, block_tokens)  # [1, nb, bt]
    counts = valid.sum(-1, keepdim=True).clamp(min=1)  # [1, nb, 1]
    mean = torch.nn.functional.normalize((unit * valid[..., None]).sum(2) / counts, dim=-1)  # [H, nb, D]
    chosen = [mean]
    closest = torch.einsum("hnd,hntd->hnt", mean, unit)  # best cosine to any representative [H, nb, bt]
    for _ in range(1, count):
        distance = (1 - closest).masked_fill(~valid, -1.0)
        pick = distance.argmax(-1)  # [H, nb]
        vector = torch.gather(unit, 2, pick[..., None, None].expand(heads, nb, 1, dim)).squeeze(2)  # [H, nb, D]
        chosen.append(vector)
        closest = torch.maximum(closest, torch.einsum("hnd,hntd->hnt", vector, unit))
    return torch.stack(chosen, dim=2)


class BlockIndex:
    """Searchable representatives of one session's blocks: one faiss index per layer and KV head.

    num_tokens: tokens covered; blocks: int64 [nb, 2] token ranges; faiss id = block * R + r.
    """

    def __init__(self, config: BlockIndexConfig, num_tokens: int, head_dim: int, indexes: list[list[faiss.Index]], coarse_min_vectors: int = COARSE_MIN_VECTORS,
                 coarse_min_ratio: float = COARSE_MIN_RATIO):
        self.config = config
        self.num_tokens = num_tokens
        self.head_dim = head_dim
        self.indexes = indexes  # [L][H]
        self.blocks = block_ranges(num_tokens, config.block_tokens)
        self._flat: dict[int, list[np.ndarray] | None] = {}  # per layer: views of flat indexes' vectors (search)
        self._device = DeviceVectors(torch.device("cuda")) if torch.cuda.is_available() else None  # CUDA: a GPU copy of the vectors (search_layers), made on first use
        self._coarse = CoarseCodes(self._flat_vectors, config.per_block, coarse_min_vectors, coarse_min_ratio)  # CPU: int8 codes of large layers for a first scan, made on first use

    @property
    def num_layers(self) -> int:
        return len(self.indexes)

    @property
    def num_heads(self) -> int:
        return len(self.indexes[0]) if self.indexes else 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def nbytes(self) -> int:
        """Memory the indexes hold: their vectors, plus HNSW's neighbour lists or the int8 codes
        of the first scan (large flat layers on CPU) where used."""
        total = 0
        for layer in self.indexes:
            for index in layer:
                links = 0
                inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
                if isinstance(inner, faiss.IndexHNSWFlat):
                    links = index.ntotal * 2 * self.config.hnsw_neighbors * 4
                elif self._device is None and isinstance(inner, faiss.IndexFlat) and index.ntotal >= self._coarse.min_vectors:
                    links = CoarseCodes.encoded_bytes(index.ntotal, self.head_dim)  # the int8 codes of the first scan
                total += index.ntotal * (self.head_dim * 4 + 8) + links  # vectors + their ids
        return total + self.blocks.nbytes

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, keys: list[torch.Tensor], positions: torch.Tensor, rope: Rope, config: BlockIndexConfig = BlockIndexConfig()) -> "BlockIndex":
        """keys: per layer [H, T, D] post-RoPE at ``positions`` [T] (int64)."""
        if not keys:
            raise InvalidRequest("cannot index a session without layers")
        heads, total, dim = keys[0].shape
        if positions.shape != (total,):
            raise InvalidRequest(f"{positions.shape[0]} positions for {total} tokens")
        indexes = [cls._layer_indexes(rope.rotate(layer.detach(), -positions), config) for layer in keys]
        return cls(config, total, dim, indexes)

    @classmethod
    def build_layers(cls, layer_keys: Any, num_layers: int, positions: torch.Tensor, rope: Rope, config: BlockIndexConfig = BlockIndexConfig()) -> "BlockIndex":
        """Like ``build`` with ``layer_keys(layer)`` -> keys [H, T, D] called one layer at a time,
        so only one layer's keys need be in memory."""
        indexes, total, dim = [], None, None
        for layer in range(num_layers):
            keys = layer_keys(layer)
            heads, total, dim = keys.shape
            if positions.shape != (total,):
                raise InvalidRequest(f"{positions.shape[0]} positions for {total} tokens")
            indexes.append(cls._layer_indexes(rope.rotate(keys.detach(), -positions), config))
            del keys
        if not indexes:
            raise InvalidRequest("cannot index a session without layers")
        return cls(config, total, dim, indexes)

    @staticmethod
    def _new_index(config: BlockIndexConfig, dim: int, vectors: int) -> faiss.Index:
        if vectors > config.exact_max_vectors:
            inner = faiss.IndexHNSWFlat(dim, config.hnsw_neighbors, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efSearch = 128
        else:
            inner = faiss.IndexFlatIP(dim)
        return faiss.IndexIDMap2(inner)

    @classmethod
    def _layer_indexes(cls, keys: torch.Tensor, config: BlockIndexConfig) -> list[faiss.Index]:
        """keys: [H, T, D] position-free. Returns one index per head."""
        reps = representatives(keys, config.block_tokens, config.representatives)  # [H, nb, R, D]
        heads, nb, count, dim = reps.shape
        ids = np.arange(nb * count, dtype=np.int64)  # id // count = block
        out = []
        for head in range(heads):
            index = cls._new_index(config, dim, nb * count)
            index.add_with_ids(np.ascontiguousarray(reps[head].reshape(nb * count, dim).numpy()), ids)
            out.append(index)
        return out

    # ------------------------------------------------------------------ search
    def search(self, layer: int, probe: torch.Tensor, candidates: int, weights: torch.Tensor | None = None, exhaustive: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Best blocks of ``layer`` for ``probe``: [H, D] (one vector per KV head) or [H, n, D]
        (n vectors per head, combined with ``weights`` [n], default uniform; any norm).

        Returns (block ids int64 [k], scores float32 [k]) with k = min(candidates, blocks), best
        first. Score: per head and probe vector the best cosine among the block's representatives,
        summed over vectors with their weights and averaged over heads. Flat indexes are scored
        exactly (one matrix product per head over a view of the vectors faiss holds: faster than
        faiss's top-k at the shortlists retrieval asks for); HNSW indexes search a shortlist, and
        outside a vector's shortlist a block counts that shortlist's minimum.
        """
        if not 0 <= layer < self.num_layers:
            raise InvalidRequest(f"layer {layer} outside 0..{self.num_layers - 1}")
        probe = self._checked_probe(probe)
        n = probe.shape[1]
        weights = torch.full((n,), 1.0 / n) if weights is None else weights.float()
        per_block = self.config.per_block
        k = min(self.num_blocks, max(int(candidates), 1))
        flat = self._flat_vectors(layer)
        if flat is not None:  # exact: every representative scored by one matrix product per head
            query = torch.nn.functional.normalize(probe.float(), dim=-1)  # [H, n, D]
            return coarse_then_exact(flat, self._coarse, layer, query.numpy(), weights.numpy(), per_block, k)
        shortlist = self.num_blocks * per_block if exhaustive else min(self.num_blocks * per_block, 4 * k)  # a block's best key is near the top
        query = np.ascontiguousarray(torch.nn.functional.normalize(probe.float(), dim=-1).numpy())  # [H, n, D]
        w = weights.numpy().astype(np.float32)
        scores = np.zeros(self.num_blocks, dtype=np.float32)
        for head, index in enumerate(self.indexes[layer]):
            sims, ids = index.search(query[head], shortlist)  # [n, shortlist]
            for i in range(n):
                keep = ids[i] >= 0
                hit_sims, blocks = sims[i][keep], ids[i][keep] // per_block
                floor = float(hit_sims.min()) if len(hit_sims) else -1.0
                best = np.full(self.num_blocks, floor, dtype=np.float32)
                np.maximum.at(best, blocks, hit_sims)  # best representative per block
                scores += w[i] * best
        scores /= self.num_heads
        order = np.argsort(-scores, kind="stable")[:k]
        return order.astype(np.int64), scores[order]

    def prepare_search(self) -> "BlockIndex":
        """Make what searching uses ahead of the first search (the int8 codes of large flat
        layers on CPU); for indexes kept for many requests."""
        if self._device is None:
            self._coarse.prepare(self.num_layers)
        return self

    def _checked_probe(self, probe: torch.Tensor) -> torch.Tensor:
        """probe [H, D] or [H, n, D] -> [H, n, D]; InvalidRequest on any other shape."""
        if probe.dim() == 2:
            probe = probe[:, None, :]
        if probe.dim() != 3 or probe.shape[0] != self.num_heads or probe.shape[2] != self.head_dim or probe.shape[1] == 0:
            raise InvalidRequest(f"probe shape {tuple(probe.shape)}, expected [{self.num_heads}, n, {self.head_dim}]")
        return probe

    def search_layers(self, probes: list[tuple[torch.Tensor, torch.Tensor | None]], candidates: int, int8_first_scan: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
        """``search(layer, vectors, candidates, weights)`` for every layer at once: probes holds
        per layer (vectors [H, n, D] or [H, D], weights [n] or None). The same blocks and scores,
        scored in one pass (retrieval/flat_search.py: on CUDA, all layers in a few batched products
        over a GPU copy of the vectors); indexes with HNSW layers are searched layer by layer.
        ``int8_first_scan`` False: large flat layers are scanned exactly too (the int8 scan's
        baseline; the blocks are the same, bench/coarse_scan.py)."""
        if len(probes) != self.num_layers:
            raise InvalidRequest(f"{len(probes)} probes for {self.num_layers} layers")
        checked = []
        for vectors, weights in probes:
            vectors = self._checked_probe(vectors)
            n = vectors.shape[1]
            checked.append((vectors, torch.full((n,), 1.0 / n) if weights is None else weights.float()))
        flat = [self._flat_vectors(layer) for layer in range(self.num_layers)]
        if any(layer is None for layer in flat):
            return [self.search(layer, vectors, candidates, weights) for layer, (vectors, weights) in enumerate(checked)]
        k = min(self.num_blocks, max(int(candidates), 1))
        return search_layers(flat, checked, k, self.config.per_block, self._device, self._coarse if int8_first_scan else None)

    def _flat_vectors(self, layer: int) -> list[np.ndarray] | None:
        """Per head a float32 [nb * R, D] view (no copy) of a layer's representatives when every
        head's index is flat (exact inner product over vectors added in id order), else None
        (HNSW: search it)."""
        if layer in self._flat:
            return self._flat[layer]
        heads = []
        for index in self.indexes[layer]:
            inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
            if not isinstance(inner, faiss.IndexFlat):
                self._flat[layer] = None
                return None
            ids = faiss.vector_to_array(index.id_map) if isinstance(index, faiss.IndexIDMap2) else np.arange(inner.ntotal)
            if not np.array_equal(ids, np.arange(inner.ntotal)):
                self._flat[layer] = None
                return None
            vectors = faiss.rev_swig_ptr(inner.get_xb(), inner.ntotal * inner.d)
            heads.append(vectors.reshape(inner.ntotal, inner.d))  # a view of faiss's memory, no copy
        self._flat[layer] = heads
        return heads

    def block_scores(self, layer: int, probe: torch.Tensor, weights: torch.Tensor | None = None) -> np.ndarray:
        """float32 [nb]: the score of every block of ``layer`` (exact, for small indexes and tests)."""
        ids, scores = self.search(layer, probe, self.num_blocks, weights, exhaustive=True)
        out = np.empty(self.num_blocks, dtype=np.float32)
        out[ids] = scores
        return out

    # ------------------------------------------------------------------ bytes
    _MAGIC = b"KVBI"
    _VERSION = 1
    _HEADER = struct.Struct("<4sHI")  # magic, version, json length

    def layer_to_bytes(self, layer: int) -> bytes:
        """One layer's indexes: header JSON + per head (u64 length, faiss bytes)."""
        meta = json.dumps({"config": asdict(self.config), "num_tokens": self.num_tokens, "head_dim": self.head_dim, "layer": layer, "heads": self.num_heads}).encode()
        parts = [self._HEADER.pack(self._MAGIC, self._VERSION, len(meta)), meta]
        for index in self.indexes[layer]:
            raw = faiss.serialize_index(index).tobytes()
            parts += [struct.pack("<Q", len(raw)), raw]
        return b"".join(parts)

    @classmethod
    def from_layer_bytes(cls, raw_layers: list[bytes]) -> "BlockIndex":
        """Inverse of ``layer_to_bytes`` for layers 0..L-1. Raises CorruptData on anything off."""
        try:
            config, num_tokens, head_dim, indexes = None, None, None, []
            for expected_layer, raw in enumerate(raw_layers):
                magic, version, meta_len = cls._HEADER.unpack_from(raw)
                if magic != cls._MAGIC or version != cls._VERSION:
                    raise ValueError("bad magic or version")
                offset = cls._HEADER.size
                meta = json.loads(raw[offset : offset + meta_len])
                offset += meta_len
                if meta["layer"] != expected_layer:
                    raise ValueError(f"layer {meta['layer']} where {expected_layer} was expected")
                layer_config = BlockIndexConfig(**meta["config"])
                if config is not None and (layer_config != config or meta["num_tokens"] != num_tokens):
                    raise ValueError("layers disagree on config or length")
                config, num_tokens, head_dim = layer_config, meta["num_tokens"], meta["head_dim"]
                heads = []
                for _ in range(meta["heads"]):
                    (size,) = struct.unpack_from("<Q", raw, offset)
                    offset += 8
                    if offset + size > len(raw):
                        raise ValueError("truncated")
                    heads.append(faiss.deserialize_index(np.frombuffer(raw, dtype=np.uint8, count=size, offset=offset)))
                    offset += size
                if offset != len(raw):
                    raise ValueError("trailing bytes")
                expected_vectors = -(-num_tokens // config.block_tokens) * config.per_block
                if any(index.ntotal != expected_vectors or index.d != head_dim for index in heads):
                    raise ValueError("index size does not match its header")
                indexes.append(heads)
        except CorruptData:
            raise
        except Exception as exc:  # faiss raises RuntimeError, struct/json their own: all mean corrupt
            raise CorruptData(f"block index failed to load ({exc}); it will be rebuilt") from exc
        if config is None:
            raise CorruptData("block index has no layers")
        return cls(config, num_tokens, head_dim, indexes)
