"""Text-chunk retrieval: chunking, the real all-MiniLM-L6-v2 embedder, the faiss index and its bytes."""
from __future__ import annotations

import re
import threading
import types
from pathlib import Path

import numpy as np
import pytest

from kvstore.errors import CorruptData, InvalidRequest, ModelMismatch
from retrieval.embedder import TextEmbedder
from retrieval.text_index import (
    _PREFIX,
    TextHit,
    TextIndex,
    _pack_blob,
    _unpack_blob,
    chunk_text,
    select_for_budget,
    text_digest,
)

GPL3 = Path(__file__).parent / "data" / "licenses" / "GPL-3"  # a verbatim copy of Debian's common-licenses/GPL-3
FACTS = {  # animal -> code; planted at about 20%, 50% and 80% of the text
    "heron": "5306284",
    "falcon": "4821937",
    "otter": "7719043",
}


@pytest.fixture(scope="module")
def embedder() -> TextEmbedder:
    return TextEmbedder.load()


def plant(text: str, sentence: str, fraction: float) -> str:
    """Insert ``sentence`` after the first sentence end past ``fraction`` of the text."""
    match = re.compile(r"\.\s+").search(text, int(len(text) * fraction))
    return text[: match.end()] + sentence + " " + text[match.end() :]


@pytest.fixture(scope="module")
def haystack() -> str:
    text = GPL3.read_text(encoding="utf-8")
    for (animal, code), fraction in zip(FACTS.items(), (0.2, 0.5, 0.8)):
        text = plant(text, f"The secret code for {animal} is {code}.", fraction)
    return text


@pytest.fixture(scope="module")
def index(haystack, embedder) -> TextIndex:
    return TextIndex.build(haystack, embedder)


def chunk_with(index: TextIndex, needle: str) -> int:
    (found,) = [c.index for c in index.chunks if needle in c.text]
    return found


# ---------------------------------------------------------------------------------------------
# chunking

def assert_tiles(text: str, chunks, overlapping: bool = False) -> None:
    assert chunks[0].start_char == 0 and chunks[-1].end_char == len(text)
    for i, chunk in enumerate(chunks):
        assert chunk.index == i and chunk.text == text[chunk.start_char : chunk.end_char]
    for before, after in zip(chunks, chunks[1:]):
        if overlapping:
            assert before.start_char < after.start_char <= before.end_char
        else:
            assert after.start_char == before.end_char


def sentences_text(seed: int = 0, paragraphs: int = 12) -> str:
    rng = np.random.default_rng(seed)
    out = []
    for p in range(paragraphs):
        sentences = [" ".join(f"w{p}s{s}x{j}" for j in range(rng.integers(4, 30))) + "." for s in range(rng.integers(1, 6))]
        out.append(" ".join(sentences))
    return "\n\n".join(out)


def test_chunks_cover_text_and_respect_word_limit():
    text = GPL3.read_text(encoding="utf-8")
    chunks = chunk_text(text, max_words=150)
    assert_tiles(text, chunks)
    words = [len(c.text.split()) for c in chunks]
    assert max(words) <= 150 and sum(words) == len(text.split())
    assert np.median(words) >= 100


def test_chunks_end_at_sentence_ends():
    text = sentences_text()
    sentence_spans = [m.span() for m in re.finditer(r"[^.\s][^.]*\.", text)]
    chunks = chunk_text(text, max_words=40)
    assert_tiles(text, chunks)
    for chunk in chunks[:-1]:
        assert not any(start < chunk.end_char < end for start, end in sentence_spans), "a sentence was cut"
        assert text[: chunk.end_char].rstrip().endswith(".")


def test_chunks_prefer_paragraph_breaks():
    paragraph = "Alpha beta gamma delta epsilon zeta eta theta iota kappa. " * 4  # 40 words
    text = "\n\n".join(paragraph.strip() for _ in range(6))
    chunks = chunk_text(text, max_words=100)
    assert_tiles(text, chunks)
    assert [len(c.text.split()) for c in chunks] == [80, 80, 80]
    assert all(c.text.endswith("\n\n") for c in chunks[:-1])


def test_overlong_sentence_is_cut_at_words():
    text = "  " + " ".join(f"word{i}" for i in range(1000)) + "  "
    chunks = chunk_text(text, max_words=150)
    assert_tiles(text, chunks)
    assert [len(c.text.split()) for c in chunks] == [150] * 6 + [100]
    assert all(re.fullmatch(r"(\s*word\d+)+\s*", c.text) for c in chunks)


def test_overlap_repeats_whole_sentences():
    text = sentences_text(seed=1, paragraphs=30)
    chunks = chunk_text(text, max_words=60, overlap_words=15)
    assert_tiles(text, chunks, overlapping=True)
    assert any(after.start_char < before.end_char for before, after in zip(chunks, chunks[1:]))
    assert max(len(c.text.split()) for c in chunks) <= 60


@pytest.mark.parametrize("text", ["", "   ", "\n\n \t\n"])
def test_blank_text_has_no_chunks(text):
    assert chunk_text(text) == []


@pytest.mark.parametrize("kwargs", [{"max_words": 0}, {"max_words": 10, "overlap_words": 10}, {"overlap_words": -1}])
def test_bad_chunk_parameters(kwargs):
    with pytest.raises(InvalidRequest):
        chunk_text("Some text.", **kwargs)


# ---------------------------------------------------------------------------------------------
# embedder

@pytest.mark.slow  # loads the text embedder
def test_embeddings_are_unit_norm_and_deterministic(embedder):
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse.", ""]
    first = embedder.embed(texts)
    assert first.shape == (4, embedder.dim) == (4, 384) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(first, embedder.embed(texts))
    np.testing.assert_allclose(first, embedder.embed(texts, batch_size=1), atol=1e-5)
    similarity = first @ first.T
    assert similarity[0, 1] == pytest.approx(0.755, abs=0.01)  # the model card's reference pair
    assert similarity[0, 1] > similarity[0, 2] + 0.3
    assert embedder.embed([]).shape == (0, 384)


@pytest.mark.slow  # loads the text embedder
def test_embedder_truncates_at_256_word_pieces(embedder):
    long = " ".join(f"token{i % 50}" for i in range(600))
    assert embedder.count_tokens(long) > 256
    a, b = embedder.embed([long, long + " and a very different ending about oceans"])
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.slow  # loads the text embedder
def test_embedder_is_safe_under_concurrent_callers(embedder):
    texts = [f"Sentence {i} about licences and freedom." for i in range(24)]
    expected = embedder.embed(texts)
    results: list[np.ndarray] = [None] * 4

    def work(slot: int) -> None:
        results[slot] = embedder.embed(texts, batch_size=5)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        np.testing.assert_allclose(result, expected, atol=1e-5)


@pytest.mark.slow  # loads the text embedder
@pytest.mark.parametrize("texts", ["a string", [1, 2], None])
def test_embedder_rejects_non_text(embedder, texts):
    with pytest.raises(InvalidRequest):
        embedder.embed(texts)


@pytest.mark.slow  # loads the text embedder
def test_default_chunks_fit_the_embedder_window(embedder):
    chunks = chunk_text(GPL3.read_text(encoding="utf-8"))
    assert max(embedder.count_tokens(c.text) for c in chunks) + 2 <= embedder.max_tokens


# ---------------------------------------------------------------------------------------------
# index and search

@pytest.mark.slow  # loads the text embedder
def test_planted_fact_is_top_hit(index, embedder):
    for animal, code in FACTS.items():
        hits = index.search(f"What is the secret code for {animal}?", embedder, k=5)
        assert hits[0].index == chunk_with(index, code), f"{animal}: top hit is chunk {hits[0].index}"
        assert code in hits[0].text
    falcon = index.search("What is the secret code for falcon?", embedder, k=5)
    assert "The secret code for falcon is 4821937." in falcon[0].text
    assert len({chunk_with(index, code) for code in FACTS.values()}) == 3


@pytest.mark.slow  # loads the text embedder
def test_hits_sorted_and_k_clipped(index, embedder):
    hits = index.search("What is the secret code for falcon?", embedder, k=10_000)
    assert len(hits) == len(index) > 20
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True) and all(isinstance(s, float) for s in scores)
    assert sorted(h.index for h in hits) == list(range(len(index)))
    for hit in hits[:3]:
        chunk = index.chunks[hit.index]
        assert (hit.start_char, hit.end_char, hit.text) == (chunk.start_char, chunk.end_char, chunk.text)


@pytest.mark.slow  # loads the text embedder
def test_search_vectors_matches_search(index, embedder):
    questions = ["What is the secret code for otter?", "Can I charge a fee for conveying copies?"]
    by_vectors = index.search_vectors(embedder.embed(questions), k=4)  # batched with padding
    one_by_one = [index.search(q, embedder, k=4) for q in questions]
    assert [[h.index for h in hits] for hits in by_vectors] == [[h.index for h in hits] for hits in one_by_one]
    np.testing.assert_allclose([[h.score for h in hits] for hits in by_vectors],
                               [[h.score for h in hits] for hits in one_by_one], atol=1e-5)


@pytest.mark.slow  # loads the text embedder
@pytest.mark.parametrize("k", [0, -3, 1.5, True])
def test_bad_k(index, embedder, k):
    with pytest.raises(InvalidRequest, match="k must be"):
        index.search("licence", embedder, k=k)


@pytest.mark.slow  # loads the text embedder
@pytest.mark.parametrize("query", ["", "   \n", None])
def test_empty_query(index, embedder, query):
    with pytest.raises(InvalidRequest, match="query_text"):
        index.search(query, embedder, k=3)


@pytest.mark.slow  # loads the text embedder
@pytest.mark.parametrize("vectors", [np.zeros((1, 383), np.float32), np.zeros(384, np.float32), np.full((1, 384), np.nan, np.float32)])
def test_bad_query_vectors(index, vectors):
    with pytest.raises(InvalidRequest):
        index.search_vectors(vectors, k=3)


@pytest.mark.slow  # loads the text embedder
def test_other_embedder_is_refused(index, embedder):
    impostor = types.SimpleNamespace(name="other-embedder", dim=embedder.dim, embed=embedder.embed)
    with pytest.raises(ModelMismatch, match="other-embedder"):
        index.search("licence", impostor, k=3)


@pytest.mark.slow  # loads the text embedder
def test_index_of_blank_text(embedder):
    empty = TextIndex.build("  \n", embedder)
    assert len(empty) == 0 and empty.search("anything", embedder, k=3) == []
    assert TextIndex.from_bytes(empty.to_bytes()).text == "  \n"


@pytest.mark.slow  # loads the text embedder
def test_text_digest(index, haystack):
    assert index.text_digest == text_digest(haystack) and len(index.text_digest) == 32
    assert index.matches(haystack) and not index.matches(haystack + " ")


# ---------------------------------------------------------------------------------------------
# bytes

@pytest.mark.slow  # loads the text embedder
def test_roundtrip_gives_identical_results(index, embedder):
    raw = index.to_bytes()
    assert raw[:4] == b"KVTX"
    loaded = TextIndex.from_bytes(raw)
    assert (loaded.text, loaded.chunks, loaded.text_digest) == (index.text, index.chunks, index.text_digest)
    assert (loaded.embedder_name, loaded.dim, loaded.chunk_words, loaded.overlap_words) == (
        "all-MiniLM-L6-v2", 384, index.chunk_words, index.overlap_words)
    for question in ["What is the secret code for falcon?", "termination of the licence"]:
        assert loaded.search(question, embedder, k=len(index)) == index.search(question, embedder, k=len(index))
    assert loaded.to_bytes() == raw


def faiss_offset(raw: bytes) -> int:
    _, _, header_len, text_len, _ = _PREFIX.unpack_from(raw)
    return _PREFIX.size + header_len + text_len


@pytest.mark.slow  # loads the text embedder
@pytest.mark.parametrize("where", ["faiss_start", "faiss_vectors", "header", "text", "checksum"])
def test_flipped_byte_is_corrupt(index, where):
    raw = bytearray(index.to_bytes())
    position = {
        "faiss_start": faiss_offset(raw) + 1,
        "faiss_vectors": (faiss_offset(raw) + len(raw)) // 2,
        "header": _PREFIX.size + 3,
        "text": faiss_offset(raw) - 10,
        "checksum": len(raw) - 1,
    }[where]
    raw[position] ^= 0x01
    with pytest.raises(CorruptData):
        TextIndex.from_bytes(bytes(raw))


@pytest.mark.slow  # loads the text embedder
def test_truncated_bytes_are_corrupt(index):
    raw = index.to_bytes()
    for cut in [*range(0, _PREFIX.size + 2), faiss_offset(raw), faiss_offset(raw) + 100, len(raw) - 17, len(raw) - 1]:
        with pytest.raises(CorruptData):
            TextIndex.from_bytes(raw[:cut])
    with pytest.raises(CorruptData):
        TextIndex.from_bytes(raw + b"\x00")


@pytest.mark.parametrize("raw", [b"", b"KVTX", b"garbage" * 1000, bytes(range(256)) * 40, b"\x00" * 5000])
def test_garbage_is_corrupt(raw):
    with pytest.raises(CorruptData):
        TextIndex.from_bytes(raw)


@pytest.mark.slow  # loads the text embedder
def test_wrong_magic_and_version_are_corrupt(index):
    raw = bytearray(index.to_bytes())
    with pytest.raises(CorruptData, match="magic"):
        TextIndex.from_bytes(b"KVXX" + bytes(raw[4:]))
    header, text_bytes, index_bytes = _unpack_blob(bytes(raw))
    future = bytearray(_pack_blob(header, text_bytes, index_bytes))
    future[4:6] = (2).to_bytes(2, "little")
    with pytest.raises(CorruptData, match="version 2"):
        TextIndex.from_bytes(bytes(future))


def resealed_variants(raw: bytes):
    """Blobs with a valid checksum but damaged contents (as a buggy writer would make)."""
    header, text_bytes, index_bytes = _unpack_blob(raw)
    yield "faiss garbage", header, text_bytes, b"not a faiss index" * 10
    yield "faiss cut", header, text_bytes, index_bytes[: len(index_bytes) // 2]
    yield "text changed", header, text_bytes.replace(b"falcon", b"eagles"), index_bytes
    yield "bad utf-8", header, b"\xff\xfe" + text_bytes, index_bytes
    yield "chunk out of range", {**header, "chunks": [*header["chunks"][:-1], [0, 10**9]]}, text_bytes, index_bytes
    yield "chunk dropped", {**header, "chunks": header["chunks"][:-1]}, text_bytes, index_bytes
    yield "chunk table mistyped", {**header, "chunks": "nope"}, text_bytes, index_bytes
    yield "dim wrong", {**header, "dim": 383}, text_bytes, index_bytes
    for key in ("embedder", "dim", "chunks", "text_digest", "chunk_words"):
        yield f"missing {key}", {k: v for k, v in header.items() if k != key}, text_bytes, index_bytes


@pytest.mark.slow  # loads the text embedder
def test_resealed_damage_is_corrupt(index):
    accepted = []
    for name, header, text_bytes, index_bytes in resealed_variants(index.to_bytes()):
        try:
            TextIndex.from_bytes(_pack_blob(header, text_bytes, index_bytes))
            accepted.append(name)
        except CorruptData:
            pass
    assert accepted == []


# ---------------------------------------------------------------------------------------------
# prompt budget

def hit(index: int, score: float, words: int, start: int) -> TextHit:
    return TextHit(index, score, start, start + 10, " ".join(["w"] * words))


def word_count(text: str) -> int:
    return len(text.split())


def test_select_for_budget_takes_best_first_in_document_order():
    hits = [hit(3, 0.9, 50, 300), hit(1, 0.8, 40, 100), hit(7, 0.7, 30, 700), hit(0, 0.6, 5, 0), hit(1, 0.8, 40, 100)]
    assert [h.index for h in select_for_budget(hits, 100, word_count)] == [0, 1, 3]  # 7 does not fit; 0 does
    assert [h.index for h in select_for_budget(hits, 49, word_count)] == [0, 1]
    assert [h.index for h in select_for_budget(list(reversed(hits)), 50, word_count)] == [3]
    assert select_for_budget(hits, 0, word_count) == []
    with pytest.raises(InvalidRequest):
        select_for_budget(hits, -1, word_count)


@pytest.mark.slow  # loads the text embedder
def test_select_for_budget_on_real_hits(index, embedder):
    hits = index.search("What is the secret code for falcon?", embedder, k=10)
    budget = 600
    chosen = select_for_budget(hits, budget, embedder.count_tokens)
    assert sum(embedder.count_tokens(h.text) for h in chosen) <= budget
    assert [h.start_char for h in chosen] == sorted(h.start_char for h in chosen)
    assert hits[0] in chosen and len(chosen) < len(hits)
    skipped = [h for h in hits if h not in chosen]
    used = sum(embedder.count_tokens(h.text) for h in chosen)
    assert all(embedder.count_tokens(h.text) > budget - used for h in skipped)
