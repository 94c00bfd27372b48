"""The planner's seeded task suite: five families of questions over natural filler text.

* ``lookup``: one needle "The secret code for <word> is <7 digits>.", asked for.
* ``multikey``: 3-4 such needles with different words (distractors), one asked for.
* ``multihop``: variable tracking: "VAR <A> = <5 digits>." then "VAR <B> = VAR <A>." and
  "VAR <C> = VAR <B>." at later depths; the question asks for VAR <C>'s value.
* ``aggregation``: eight "Inventory note: one crate is labelled <word>." sentences spread
  through the text: one label four times, two others twice each; the question asks which label
  appears most often.
* ``absent``: one needle for another word; the question asks for a word that is not there, and
  the right answer says so ("none").

Every question comes after the context and ends where the answer should start. Scoring is exact:
the first digit run (lookup, multikey, multihop), the first listed label (aggregation), or no
7-digit number and a "none"/"not" (absent).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from bench.tasks import DEPTHS, WORDS, TaskFactory

FAMILIES = ("lookup", "multikey", "multihop", "aggregation", "absent")
LABELS = ("amber", "cedar", "indigo", "juniper", "saffron", "topaz", "umber", "zinc")
VARS = ("QX", "RB", "TZ", "KM", "PL", "WD", "HN", "JF")


@dataclass
class SuiteTask:
    name: str
    family: str
    length: int
    seed: int
    context_ids: torch.Tensor  # [1, length]
    question: str
    answer: str  # the expected answer ("none" for absent)

    def describe(self) -> dict:
        return {"name": self.name, "family": self.family, "length": self.length, "seed": self.seed, "question": self.question, "answer": self.answer}


def score(family: str, text: str, answer: str) -> float:
    """1.0 when ``text`` (the greedy answer) is right for the family, else 0.0."""
    if family == "absent":
        said_none = bool(re.search(r"\b(none|not|no|unknown)\b", text.lower()))
        return float(said_none and not re.search(r"\d{5,}", text))
    if family == "aggregation":
        named = [w for w in re.findall(r"[a-z]+", text.lower()) if w in LABELS]
        return float(bool(named) and named[0] == answer)
    digits = re.findall(r"\d+", text.replace(",", ""))
    return float(bool(digits) and digits[0] == answer)


class SuiteFactory:
    def __init__(self, tokenizer):
        self.tasks = TaskFactory(tokenizer)
        self.tokenizer = tokenizer

    def _ids(self, text: str) -> torch.Tensor:
        return self.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]

    def make(self, family: str, length: int, seed: int) -> SuiteTask:
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}")
        rng = random.Random(f"planner-{family}-{length}-{seed}")
        depth = DEPTHS[seed % len(DEPTHS)]
        name = f"{family}-{length}-s{seed}"
        if family in ("lookup", "multikey"):
            needle = self.tasks.make("single" if family == "lookup" else "multi", length, depth, seed)
            question = f"\n\nQuestion: What is the secret code for {needle.word}? Answer: The secret code for {needle.word} is"
            return SuiteTask(name, family, length, seed, needle.context_ids, question, needle.code)
        if family == "absent":
            present, asked = rng.sample(WORDS, 2)
            inserts = [self._ids(f" The secret code for {present} is {rng.randint(1_000_000, 9_999_999)}.")]
            context, _, _ = self.tasks.plant(rng, length, inserts, [depth])
            question = (f"\n\nQuestion: What is the secret code for {asked}? If the text does not give it, answer none. "
                        f"Answer: The secret code for {asked} is")
            return SuiteTask(name, family, length, seed, context, question, "none")
        if family == "multihop":
            a, b, c = rng.sample(VARS, 3)
            value = str(rng.randint(10_000, 99_999))
            inserts = [self._ids(f" VAR {a} = {value}."), self._ids(f" VAR {b} = VAR {a}."), self._ids(f" VAR {c} = VAR {b}.")]
            first = rng.choice((0.1, 0.2, 0.3))
            context, _, _ = self.tasks.plant(rng, length, inserts, [first, first + 0.3, first + 0.6])
            question = f"\n\nQuestion: VAR {c} is assigned through a chain of variables. What is the value of VAR {c}? Answer: The value of VAR {c} is"
            return SuiteTask(name, family, length, seed, context, question, value)
        labels = rng.sample(LABELS, 3)
        sequence = [labels[0]] * 4 + [labels[1]] * 2 + [labels[2]] * 2
        rng.shuffle(sequence)
        inserts = [self._ids(f" Inventory note: one crate is labelled {w}.") for w in sequence]
        depths = [0.05 + 0.9 * i / (len(sequence) - 1) for i in range(len(sequence))]
        context, _, _ = self.tasks.plant(rng, length, inserts, depths)
        question = "\n\nQuestion: Which crate label appears most often in the inventory notes? Answer: The label that appears most often is"
        return SuiteTask(name, family, length, seed, context, question, labels[0])


def suite_plan(lengths: list[int], seeds_for: dict[int, int], first_seed: int = 0) -> list[tuple[str, int, int]]:
    """(family, length, seed) for every family at every length, ``seeds_for[length]`` seeds each."""
    return [(family, length, first_seed + s) for length in lengths for s in range(seeds_for.get(length, 1)) for family in FAMILIES]
