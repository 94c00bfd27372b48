"""Text-chunk retrieval for classic RAG: chunk a text, embed the chunks, search them with faiss.

- ``chunk_text`` cuts a text into chunks of whole sentences (about ``max_words`` words), preferring
  paragraph breaks; the chunks tile the text, so every character lies in some chunk.
- ``TextIndex`` holds the chunks and a faiss ``IndexIDMap2(IndexFlatIP(D))`` over their unit-norm
  embeddings (id = chunk index); a search returns ``TextHit``s, best first.
- ``TextIndex.to_bytes`` / ``from_bytes``: a versioned, checksummed binary format (no pickle).
- ``select_for_budget`` picks the hits that fit a prompt's token budget, in document order.

Character offsets are Python ``str`` indices (code points) into the indexed text.
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import faiss
import numpy as np

from kvstore.errors import CorruptData, InvalidRequest, ModelMismatch

DEFAULT_CHUNK_WORDS = 150
DEFAULT_OVERLAP_WORDS = 0


class Embedder(Protocol):
    """What a TextIndex needs from an embedder (``retrieval.embedder.TextEmbedder`` is one)."""

    name: str

    @property
    def dim(self) -> int: ...

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Unit-norm float32 [N, D]."""
        ...


@dataclass(frozen=True)
class TextChunk:
    """Characters [start_char, end_char) of the text; ``text`` is exactly that slice."""

    index: int
    start_char: int
    end_char: int
    text: str


@dataclass(frozen=True)
class TextHit:
    """One search result: chunk ``index`` with its similarity ``score`` (inner product of unit vectors)."""

    index: int
    score: float
    start_char: int
    end_char: int
    text: str


# ---------------------------------------------------------------------------------------------
# chunking

# a sentence ends at . ! ? (plus closing quotes/brackets) followed by whitespace; a paragraph at a blank line
_BOUNDARY = re.compile(r"[.!?]+[\"')\]]*\s+|\n[ \t]*\n\s*")
_WORD = re.compile(r"\S+\s*")


@dataclass(frozen=True)
class _Unit:
    """A sentence (or a piece of an over-long one): text[start:end], trailing whitespace included."""

    start: int
    end: int
    words: int
    paragraph_end: bool


def _sentence_units(text: str) -> list[_Unit]:
    """Sentences tiling text[0:len(text)]; whitespace-only stretches join the following sentence."""
    units: list[_Unit] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        end = match.end()
        paragraph_end = match.group().count("\n") >= 2
        units.append(_Unit(start, end, len(text[start:end].split()), paragraph_end))
        start = end
    if start < len(text):
        units.append(_Unit(start, len(text), len(text[start:].split()), True))
    return _merge_empty(units)


def _merge_empty(units: list[_Unit]) -> list[_Unit]:
    """Fold word-less units into their neighbour so every unit holds at least one word."""
    merged: list[_Unit] = []
    pending_start: int | None = None
    for unit in units:
        if unit.words == 0:
            pending_start = unit.start if pending_start is None else pending_start
            continue
        start = unit.start if pending_start is None else pending_start
        merged.append(_Unit(start, unit.end, unit.words, unit.paragraph_end))
        pending_start = None
    if pending_start is not None and merged:  # trailing whitespace joins the last unit
        last = merged[-1]
        merged[-1] = _Unit(last.start, units[-1].end, last.words, True)
    return merged


def _split_long(text: str, unit: _Unit, max_words: int) -> list[_Unit]:
    """Cut a unit of more than ``max_words`` words at word boundaries."""
    if unit.words <= max_words:
        return [unit]
    words = list(_WORD.finditer(text, unit.start, unit.end))
    pieces = []
    for first in range(0, len(words), max_words):
        group = words[first : first + max_words]
        start = unit.start if first == 0 else group[0].start()
        end = unit.end if first + max_words >= len(words) else group[-1].end()
        pieces.append(_Unit(start, end, len(group), unit.paragraph_end and end == unit.end))
    return pieces


def _overlap_tail(units: list[_Unit], overlap_words: int) -> list[_Unit]:
    """The last whole units of a chunk with at most ``overlap_words`` words (never all of them)."""
    tail: list[_Unit] = []
    words = 0
    for unit in reversed(units[1:]):
        if words + unit.words > overlap_words:
            break
        tail.insert(0, unit)
        words += unit.words
    return tail


def _words(units: list[_Unit]) -> int:
    return sum(unit.words for unit in units)


def _pack(units: list[_Unit], max_words: int, overlap_words: int) -> list[list[_Unit]]:
    """Greedy packing of sentences into chunks of <= max_words words.

    A chunk also ends at a paragraph break once it holds two thirds of ``max_words``.
    """
    groups: list[list[_Unit]] = []
    current: list[_Unit] = []
    carried = 0  # leading units of ``current`` that repeat the previous chunk (overlap)

    def flush() -> None:
        nonlocal current, carried
        groups.append(current)
        current = _overlap_tail(current, overlap_words) if overlap_words else []
        carried = len(current)

    for unit in units:
        if _words(current) + unit.words > max_words:
            if len(current) > carried:
                flush()
            if _words(current) + unit.words > max_words:  # the overlap does not fit: drop it
                current, carried = [], 0
        current.append(unit)
        if unit.paragraph_end and _words(current) * 3 >= max_words * 2:
            flush()
    if len(current) > carried:
        groups.append(current)
    return groups


def chunk_text(text: str, max_words: int = DEFAULT_CHUNK_WORDS, overlap_words: int = DEFAULT_OVERLAP_WORDS) -> list[TextChunk]:
    """Cut ``text`` into chunks of whole sentences with at most ``max_words`` words each.

    Chunks end at sentence ends (a sentence longer than ``max_words`` is cut at word boundaries),
    preferably at paragraph breaks. Consecutive chunks share up to ``overlap_words`` words of whole
    sentences. The chunks cover every character: the first starts at 0, the last ends at
    ``len(text)``, and each starts no later than the previous one ends. Whitespace-only text -> [].
    """
    if not isinstance(text, str):
        raise InvalidRequest(f"text must be a str, got {type(text).__name__}")
    if max_words <= 0:
        raise InvalidRequest(f"max_words must be positive, got {max_words}")
    if not 0 <= overlap_words < max_words:
        raise InvalidRequest(f"overlap_words must be in [0, max_words={max_words}), got {overlap_words}")
    units = [piece for unit in _sentence_units(text) for piece in _split_long(text, unit, max_words)]
    groups = _pack(units, max_words, overlap_words)
    return [
        TextChunk(i, group[0].start, group[-1].end, text[group[0].start : group[-1].end])
        for i, group in enumerate(groups)
    ]


def text_digest(text: str) -> str:
    """blake2b-16 hex digest of the text's UTF-8 bytes: tells whether an index was built from it."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


# ---------------------------------------------------------------------------------------------
# index

class TextIndex:
    """Chunks of one text and a faiss inner-product index over their unit-norm embeddings [N, D]."""

    def __init__(self, text: str, chunks: Sequence[TextChunk], index: faiss.Index, embedder_name: str,
                 chunk_words: int, overlap_words: int):
        self.text = text
        self.chunks = list(chunks)
        self.index = index  # IndexIDMap2(IndexFlatIP(D)); id = chunk index
        self.embedder_name = embedder_name
        self.dim = int(index.d)
        self.chunk_words = chunk_words
        self.overlap_words = overlap_words
        self.text_digest = text_digest(text)

    def __len__(self) -> int:
        return len(self.chunks)

    @classmethod
    def build(cls, text: str, embedder: Embedder, chunk_words: int = DEFAULT_CHUNK_WORDS,
              overlap_words: int = DEFAULT_OVERLAP_WORDS, batch_size: int = 64) -> "TextIndex":
        """Chunk ``text``, embed every chunk ([N, D]) and index the embeddings."""
        chunks = chunk_text(text, chunk_words, overlap_words)
        vectors = embedder.embed([c.text for c in chunks], batch_size=batch_size) if chunks else np.zeros((0, embedder.dim), np.float32)
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(embedder.dim))
        if chunks:
            index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.arange(len(chunks), dtype=np.int64))
        return cls(text, chunks, index, embedder.name, chunk_words, overlap_words)

    def matches(self, text: str) -> bool:
        """Whether this index was built from ``text``."""
        return text_digest(text) == self.text_digest

    def search(self, query_text: str, embedder: Embedder, k: int = 5) -> list[TextHit]:
        """The ``k`` chunks most similar to ``query_text`` (k clipped to the chunk count), best first."""
        if not isinstance(query_text, str) or not query_text.strip():
            raise InvalidRequest("query_text must be a non-empty string")
        _check_k(k)
        if embedder.name != self.embedder_name:
            raise ModelMismatch(f"index was built with embedder {self.embedder_name!r}, query embedder is {embedder.name!r}; "
                                "rebuild the index or query with the same embedder")
        return self.search_vectors(embedder.embed([query_text]), k)[0]

    def search_vectors(self, vectors: np.ndarray, k: int = 5) -> list[list[TextHit]]:
        """Hits for each query vector: vectors [Q, D] (unit-norm) -> Q lists of <= k hits, best first."""
        _check_k(k)
        queries = self._check_vectors(vectors)
        k = min(k, len(self.chunks))
        if k == 0 or len(queries) == 0:
            return [[] for _ in range(len(queries))]
        scores, ids = self.index.search(queries, k)  # [Q, k] each
        return [[self._hit(int(i), float(s)) for s, i in zip(row_s, row_i) if i >= 0] for row_s, row_i in zip(scores, ids)]

    def _hit(self, chunk_id: int, score: float) -> TextHit:
        chunk = self.chunks[chunk_id]
        return TextHit(chunk.index, score, chunk.start_char, chunk.end_char, chunk.text)

    def _check_vectors(self, vectors) -> np.ndarray:
        array = np.asarray(vectors)
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise InvalidRequest(f"query vectors must have shape [Q, {self.dim}], got {list(array.shape)}")
        if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
            raise InvalidRequest("query vectors must be finite floats")
        return np.ascontiguousarray(array, dtype=np.float32)

    # -----------------------------------------------------------------------------------------
    # serialization

    def to_bytes(self) -> bytes:
        """The index as bytes; see ``_pack_blob`` for the layout."""
        header = {
            "embedder": self.embedder_name,
            "dim": self.dim,
            "chunk_words": self.chunk_words,
            "overlap_words": self.overlap_words,
            "text_digest": self.text_digest,
            "chunks": [[c.start_char, c.end_char] for c in self.chunks],
        }
        return _pack_blob(header, self.text.encode("utf-8"), faiss.serialize_index(self.index).tobytes())

    @classmethod
    def from_bytes(cls, raw: bytes) -> "TextIndex":
        """Inverse of ``to_bytes``; any damage (truncation, flipped bit, wrong magic) -> CorruptData."""
        header, text_bytes, index_bytes = _unpack_blob(raw)
        try:
            return cls._from_parts(header, text_bytes, index_bytes)
        except CorruptData:
            raise
        except Exception as error:  # missing or mistyped header fields, bad UTF-8, faiss reader errors
            raise CorruptData(f"text index blob is malformed ({type(error).__name__}: {error}); rebuild the index") from error

    @classmethod
    def _from_parts(cls, header: dict, text_bytes: bytes, index_bytes: bytes) -> "TextIndex":
        text = text_bytes.decode("utf-8")
        if text_digest(text) != header["text_digest"]:
            raise CorruptData("text index text does not match its digest; rebuild the index")
        chunks = _chunks_from_table(text, header["chunks"])
        index = _read_index(index_bytes, len(chunks))
        if index.d != header["dim"]:
            raise CorruptData(f"text index vectors have {index.d} dims, its header says {header['dim']}")
        return cls(text, chunks, index, str(header["embedder"]), int(header["chunk_words"]), int(header["overlap_words"]))


def _check_k(k) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise InvalidRequest(f"k must be a positive integer, got {k!r}")


# Blob layout (little-endian):
#   magic b"KVTX" | version u16 | header length u32 | text length u64 | index length u64
#   | header JSON (UTF-8) | text (UTF-8) | faiss.serialize_index bytes | blake2b-16 of all before
MAGIC = b"KVTX"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sHIQQ")
_CHECKSUM_BYTES = 16


def _checksum(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=_CHECKSUM_BYTES, person=b"kvmem-textidx").digest()


def _pack_blob(header: dict, text_bytes: bytes, index_bytes: bytes) -> bytes:
    header_bytes = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes), len(text_bytes), len(index_bytes))
    body = prefix + header_bytes + text_bytes + index_bytes
    return body + _checksum(body)


def _unpack_blob(raw: bytes) -> tuple[dict, bytes, bytes]:
    """(header, text bytes, index bytes) of a blob whose framing and checksum are intact."""
    raw = bytes(raw)
    if len(raw) < _PREFIX.size + _CHECKSUM_BYTES:
        raise CorruptData(f"text index blob is truncated ({len(raw)} bytes)")
    magic, version, header_len, text_len, index_len = _PREFIX.unpack_from(raw)
    if magic != MAGIC:
        raise CorruptData(f"not a text index blob (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise CorruptData(f"text index format version {version} is not supported (this build reads {FORMAT_VERSION}); rebuild the index")
    expected = _PREFIX.size + header_len + text_len + index_len + _CHECKSUM_BYTES
    if len(raw) != expected:
        raise CorruptData(f"text index blob has {len(raw)} bytes, its framing says {expected}; it is truncated or damaged")
    body, checksum = raw[:-_CHECKSUM_BYTES], raw[-_CHECKSUM_BYTES:]
    if _checksum(body) != checksum:
        raise CorruptData("text index blob failed its checksum; rebuild the index")
    offset = _PREFIX.size
    try:
        header = json.loads(body[offset : offset + header_len].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise CorruptData(f"text index header is not valid JSON: {error}") from error
    if not isinstance(header, dict):
        raise CorruptData("text index header is not a JSON object")
    offset += header_len
    return header, body[offset : offset + text_len], body[offset + text_len :]


def _chunks_from_table(text: str, table) -> list[TextChunk]:
    chunks = []
    for i, (start, end) in enumerate(table):
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= len(text)):
            raise CorruptData(f"text index chunk {i} has invalid span [{start}, {end}) for a text of {len(text)} chars")
        chunks.append(TextChunk(i, start, end, text[start:end]))
    return chunks


def _read_index(index_bytes: bytes, count: int) -> faiss.Index:
    """Deserialize the faiss index and check it is an IndexIDMap2 with ids 0..count-1."""
    index = faiss.deserialize_index(np.frombuffer(index_bytes, dtype=np.uint8))
    if not isinstance(index, faiss.IndexIDMap2):
        raise CorruptData(f"text index holds a {type(index).__name__}, expected IndexIDMap2")
    ids = faiss.vector_to_array(index.id_map)
    if index.ntotal != count or not np.array_equal(ids, np.arange(count, dtype=ids.dtype)):
        raise CorruptData(f"text index has {index.ntotal} vectors for {count} chunks (or out-of-order ids)")
    return index


# ---------------------------------------------------------------------------------------------
# prompt budget

def select_for_budget(hits: Sequence[TextHit], budget_tokens: int, count_tokens: Callable[[str], int]) -> list[TextHit]:
    """Best hits that fit ``budget_tokens`` (counted by ``count_tokens(hit.text)``), in document order.

    Hits are taken by descending score; one that does not fit the remaining budget is skipped
    (a shorter, lower-ranked hit may still fit). A chunk index seen twice is taken once.
    """
    if budget_tokens < 0:
        raise InvalidRequest(f"budget_tokens must be >= 0, got {budget_tokens}")
    chosen: dict[int, TextHit] = {}
    used = 0
    for hit in sorted(hits, key=lambda h: -h.score):
        if hit.index in chosen:
            continue
        cost = count_tokens(hit.text)
        if used + cost <= budget_tokens:
            chosen[hit.index] = hit
            used += cost
    return sorted(chosen.values(), key=lambda h: (h.start_char, h.index))
