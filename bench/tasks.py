"""Seeded RULER-style needle-in-a-haystack tasks on natural text (Debian's licence texts).

A task is a context of exactly ``length`` tokens: a slice of the concatenated licence texts taken
from a seeded offset, with one or more needle sentences "The secret code for <word> is <7 digits>."
inserted after a line or sentence end near chosen depths. Multi-key tasks plant 3-4 needles with
different words (distractors) and ask for one. Every task also carries the 64 tokens of text that
follow its slice in the document (a natural continuation, for held-out queries and NLL) and the
question, asked *after* the context:

    "\\n\\nQuestion: What is the secret code for <word>? Answer: The secret code for <word> is"

Scoring: the first run of digits in the greedy answer must equal the 7-digit code exactly.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

TEXT_DIR = Path("/usr/share/common-licenses")
# Licence texts used as filler, in this order (the GPL/LGPL/GFDL/MPL/Apache family; others if present).
PREFERRED = ("GPL-3", "GFDL-1.3", "LGPL-2.1", "MPL-2.0", "Apache-2.0", "GPL-2", "LGPL-3", "MPL-1.1", "Artistic", "GFDL-1.2", "CC0-1.0")
WORDS = (
    "falcon", "lantern", "harbor", "meadow", "copper", "violin", "glacier", "pepper", "orchid", "saddle",
    "canyon", "marble", "thistle", "beacon", "walnut", "compass", "ember", "quartz", "willow", "anchor",
    "tundra", "parrot", "velvet", "summit", "cobalt", "raven", "prairie", "lemon", "barrel", "comet",
)
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
CONTINUATION = 64


def filler_text() -> str:
    """The licence texts (each file once, symlinks resolved), concatenated."""
    seen, parts = set(), []
    names = [n for n in PREFERRED if (TEXT_DIR / n).exists()]
    for path in [TEXT_DIR / n for n in names] + sorted(TEXT_DIR.iterdir()):
        real = path.resolve()
        if real.is_file() and real not in seen:
            seen.add(real)
            parts.append(real.read_text(errors="replace"))
    if not parts:
        raise FileNotFoundError(f"no text under {TEXT_DIR}")
    return "\n\n".join(parts)


@dataclass
class NeedleTask:
    name: str
    kind: str  # "single" or "multi"
    length: int
    depth: float  # depth of the asked needle (fraction of the context)
    seed: int
    word: str  # the asked key
    code: str  # the asked 7-digit code
    context_ids: torch.Tensor  # [1, length]
    continuation_ids: torch.Tensor  # [1, CONTINUATION] natural text following the slice
    question_ids: torch.Tensor  # [1, q]
    needles: list[dict] = field(default_factory=list)  # every planted needle: word, code, position

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "length": self.length, "depth": self.depth, "seed": self.seed,
                "word": self.word, "code": self.code, "needles": self.needles}



def needle_sentence(word: str, code: str) -> str:
    """The sentence planted in the context for one needle."""
    return f" The secret code for {word} is {code}."

class TaskFactory:
    """Builds tasks from one tokenisation of the filler text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text_ids = tokenizer(filler_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
        pieces = tokenizer.convert_ids_to_tokens(self.text_ids.tolist())
        # token index i is a boundary when token i ends a sentence or a line: a needle goes after it
        self.boundary = torch.tensor([bool(re.search(r"[.\n;:]$", p.replace("Ċ", "\n"))) for p in pieces])

    def _ids(self, text: str) -> torch.Tensor:
        return self.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]

    def plant(self, rng: random.Random, length: int, inserts: list[torch.Tensor], depths: list[float]) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        """A ``length``-token slice of the filler with each of ``inserts`` (token ids) placed after
        the line or sentence end nearest its depth. Returns (context [1, length], the position of
        every insert in the context (in the order given), continuation [1, CONTINUATION])."""
        hay_len = length - sum(len(n) for n in inserts)
        total = len(self.text_ids)
        # start in the first 60% of the text (the middle of some document), never in its first 200 tokens
        start = rng.randint(200, max(201, int(0.6 * total) - length - CONTINUATION))
        if start + hay_len + CONTINUATION > total:
            raise ValueError(f"filler text too short for a {length}-token task ({total} tokens)")
        hay = self.text_ids[start : start + hay_len]
        bounds = self.boundary[start : start + hay_len]
        candidates = torch.nonzero(bounds).squeeze(1) + 1
        candidates = [int(c) for c in candidates[(candidates > 0) & (candidates < hay_len)]]
        places = []  # insertion points in haystack coordinates: the boundary nearest each depth, distinct
        for d in depths:
            target = int(d * hay_len)
            free = [c for c in candidates if c not in places]
            places.append(min(free, key=lambda c: abs(c - target)) if free else target)
        order = sorted(range(len(inserts)), key=lambda i: (places[i], i))
        parts, positions, cursor, offset = [], [0] * len(inserts), 0, 0
        for i in order:
            parts.append(hay[cursor : places[i]])
            positions[i] = places[i] + offset
            parts.append(inserts[i])
            offset += len(inserts[i])
            cursor = places[i]
        parts.append(hay[cursor:])
        context = torch.cat(parts).view(1, -1)
        assert context.shape[1] == length, (context.shape, length)
        continuation = self.text_ids[start + hay_len : start + hay_len + CONTINUATION].view(1, -1)
        return context, positions, continuation

    def make(self, kind: str, length: int, depth: float, seed: int) -> NeedleTask:
        rng = random.Random(f"{kind}-{length}-{depth}-{seed}")
        keys = rng.sample(WORDS, 1 if kind == "single" else rng.choice((3, 4)))
        codes = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
        needle_ids = [self._ids(needle_sentence(w, c)) for w, c in zip(keys, codes)]
        depths = [depth] + [d for d in rng.sample([x for x in DEPTHS if abs(x - depth) > 0.05], len(keys) - 1)]
        context, positions, continuation = self.plant(rng, length, needle_ids, depths)
        needles = sorted(({"word": w, "code": c, "position": p, "asked": i == 0} for i, (w, c, p) in enumerate(zip(keys, codes, positions))), key=lambda n: n["position"])
        word = keys[0]
        question = self._ids(f"\n\nQuestion: What is the secret code for {word}? Answer: The secret code for {word} is").view(1, -1)
        return NeedleTask(f"{kind}-{length}-d{depth}-s{seed}", kind, length, depth, seed, word, codes[0], context, continuation, question, needles)


def score_answer(text: str, code: str) -> bool:
    """Exact match: the first run of digits in the answer is the code."""
    digits = re.findall(r"\d+", text.replace(",", ""))
    return bool(digits) and digits[0] == code


def task_plan(lengths: list[int], count: int, first_seed: int = 0) -> list[tuple[str, int, float, int]]:
    """(kind, length, depth, seed) for ``count`` tasks: single and multi-key alternate, depths cycle,
    lengths cycle with the first length most frequent (weights given by repetition in ``lengths``)."""
    plan = []
    for i in range(count):
        kind = "single" if i % 2 == 0 else "multi"
        plan.append((kind, lengths[i % len(lengths)], DEPTHS[(i * 2) % len(DEPTHS)], first_seed + i))
    return plan
