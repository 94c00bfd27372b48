"""Seeded cloze questions about real Wikipedia articles (the second task family of bench/recall.py).

The text: the English Wikipedia test dump packaged in the gensim 4.4.0 wheel
(``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``,
206 pages of 2016 wikitext). The wheel is fetched once with ``pip download --no-deps gensim==4.4.0``
into ``.cache/wheels`` (git-ignored) and read with zipfile + bz2; gensim is never installed or
imported. Without network or pip the family is unavailable (``load_articles`` raises
``WikiUnavailable`` with the reason; the benchmark prints it and skips the family).

Wikitext becomes plain text by code (``clean_wikitext``): references, templates, tables, files,
categories and HTML are removed, links keep their label, headings become lines of their own.
Redirects, non-article namespaces, subpages, lists and disambiguation pages are skipped.

A task of ``length`` tokens is the first ``length`` tokens of one article ("Title\\n\\n" + text)
whose plain text is long enough for the context and the 64-token continuation (held-out queries).
Its question is a cloze over one sentence of the context: the sentence's beginning up to a gold
token that is a year, a number of two or more digits, or a capitalised name inside the sentence:

    "\\n\\nQuestion: In the text above, complete the sentence: \\"<prefix> ...\\"\\nAnswer: <prefix>"

and the greedy answer must contain the gold token as a whole word (case-sensitive). Candidate
sentences are filtered on properties of the text only, never on any model's answer (a filter on
the full cache's answer would bias the comparison): the prefix is 6-30 words, its last 6 words
occur once in the context (the cloze points at one place), the gold occurs exactly once in the
context and not in the prefix (the answer cannot be copied from elsewhere), and the sentence ends
before the last 5% of the context. Of the candidates the one nearest the asked depth is taken
(depth = the gold's token position / length); numbers and years are preferred over names.
"""
from __future__ import annotations

import bz2
import html
import random
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
WHEEL_DIR = REPO / ".cache" / "wheels"
WHEEL_REQUIREMENT = "gensim==4.4.0"
MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CONTINUATION = 64
DEPTHS = (0.3, 0.5, 0.7, 0.4, 0.6)
MIN_PREFIX_WORDS, MAX_PREFIX_WORDS, ANCHOR_WORDS = 6, 30, 6
# capitalised words that are not names: sentence openers, pronouns, and months, days and "English" (too guessable as golds)
NOT_NAMES = {
    "The", "This", "That", "These", "Those", "In", "On", "At", "It", "He", "She", "They", "We", "His", "Her", "Their", "A", "An",
    "As", "By", "For", "From", "Of", "To", "With", "And", "But", "Or", "If", "When", "While", "After", "Before", "During", "Since",
    "I", "There", "Its", "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "English",
}


class WikiUnavailable(RuntimeError):
    """The gensim wheel could not be fetched or read: the wiki family is skipped."""


@dataclass
class WikiTask:
    name: str
    kind: str  # "cloze-year" | "cloze-number" | "cloze-name"
    length: int
    depth: float  # the gold's token position / length
    seed: int
    title: str
    prefix: str  # the sentence up to the gold
    code: str  # the gold token (named like NeedleTask.code so both families score alike)
    context_ids: torch.Tensor  # [1, length]
    continuation_ids: torch.Tensor  # [1, CONTINUATION]
    question_ids: torch.Tensor  # [1, q]
    sentence: str = ""
    extra: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "length": self.length, "depth": round(self.depth, 3), "seed": self.seed,
                "title": self.title, "prefix": self.prefix, "gold": self.code, "sentence": self.sentence}

    def score(self, text: str) -> bool:
        return score_cloze(text, self.code)


def score_cloze(text: str, gold: str) -> bool:
    """The answer contains the gold token as a whole word (digits: thousands separators ignored)."""
    if gold.isdigit():
        return gold in re.findall(r"\d+", text.replace(",", ""))
    return re.search(rf"(?<![\w]){re.escape(gold)}(?![\w])", text) is not None


# ---------------------------------------------------------------------------- the dump
def wheel_path(fetch: bool = True, log=print) -> Path:
    """The cached gensim wheel; downloaded with pip when missing (``fetch``)."""
    found = sorted(WHEEL_DIR.glob("gensim-4.4.0-*.whl"))
    if found:
        return found[0]
    if not fetch:
        raise WikiUnavailable(f"no gensim 4.4.0 wheel under {WHEEL_DIR}")
    WHEEL_DIR.mkdir(parents=True, exist_ok=True)
    log(f"fetching the {WHEEL_REQUIREMENT} wheel into {WHEEL_DIR} (pip download --no-deps) for its Wikipedia test dump")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL_REQUIREMENT, "-d", str(WHEEL_DIR)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as exc:
        raise WikiUnavailable(f"pip download {WHEEL_REQUIREMENT} failed: {exc}") from None
    found = sorted(WHEEL_DIR.glob("gensim-4.4.0-*.whl"))
    if done.returncode != 0 or not found:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise WikiUnavailable(f"pip download {WHEEL_REQUIREMENT} failed (exit {done.returncode}): {tail[0]}")
    return found[0]


def dump_xml(fetch: bool = True, log=print) -> str:
    path = wheel_path(fetch, log)
    try:
        with zipfile.ZipFile(path) as wheel:
            return bz2.decompress(wheel.read(MEMBER)).decode("utf-8")
    except (OSError, KeyError, zipfile.BadZipFile, ValueError) as exc:
        raise WikiUnavailable(f"cannot read {MEMBER} from {path.name}: {exc}") from None


_PAGE = re.compile(r"<page>.*?<title>(.*?)</title>.*?<ns>(\d+)</ns>.*?<text[^>]*>(.*?)</text>", re.S)


def load_articles(fetch: bool = True, log=print) -> list[tuple[str, str]]:
    """(title, plain text) of every article page of the dump, in dump order."""
    out = []
    for match in _PAGE.finditer(dump_xml(fetch, log)):
        title, ns, raw = html.unescape(match.group(1)), match.group(2), html.unescape(match.group(3))
        if ns != "0" or "/" in title or "(disambiguation)" in title or title.startswith("List of") or raw.lstrip().upper().startswith("#REDIRECT"):
            continue
        text = clean_wikitext(raw)
        if len(text) > 2000:
            out.append((title, text))
    return out


def _strip_nested(text: str, pattern: str) -> str:
    """Remove innermost matches of ``pattern`` until none is left (nested templates, tables)."""
    regex = re.compile(pattern, re.S)
    while True:
        new = regex.sub("", text)
        if new == text:
            return new
        text = new


def _link(match: re.Match) -> str:
    target, label = match.group(1), match.group(2)
    head = target.split(":", 1)[0].strip().lower() if ":" in target else ""
    if head in ("file", "image", "category", "media", "wikipedia", "wp", "help", "portal", "template", "wikt", "wiktionary") or re.fullmatch(r"[a-z]{2,3}(-[a-z]+)?", head or "-"):
        return ""
    return label if label is not None else target


def clean_wikitext(raw: str) -> str:
    """Plain text of a page's wikitext (see the module docstring)."""
    text = re.sub(r"<!--.*?-->", "", raw, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = re.sub(r"<(gallery|math|timeline|imagemap|score|syntaxhighlight|source|pre)[^>]*>.*?</\1>", "", text, flags=re.S)
    text = _strip_nested(text, r"\{\{[^{}]*\}\}")
    text = _strip_nested(text, r"\{\|(?:(?!\{\|).)*?\|\}")
    while True:  # innermost links first: [[target]] / [[target|label]]
        new = re.sub(r"\[\[([^\[\]|]*)(?:\|([^\[\]]*))?\]\]", _link, text)
        if new == text:
            break
        text = new
    text = re.sub(r"\[(?:https?|ftp)://[^\s\]]+\s+([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[(?:https?|ftp)://[^\]]*\]", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"<[^<>]*>", "", text)
    text = html.unescape(text)
    lines = []
    for line in text.splitlines():
        line = line.strip()
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*\1", line)
        if heading:
            lines += ["", heading.group(2)]
            continue
        if line.startswith(("|", "!", "{", "}")) or line.lower().startswith(("thumb", "image:", "file:")):
            continue
        line = re.sub(r"^[*#:;]+\s*", "", line)
        line = re.sub(r"\s+", " ", line).strip()
        if line or (lines and lines[-1]):
            lines.append(line)
    text = "\n".join(lines)
    text = re.sub(r"\(\s*[,;]?\s*\)", "", text)  # "( )" left by removed templates
    text = re.sub(r" +([,.;:])", r"\1", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    # drop the trailing sections that are lists of links, not prose
    cut = re.search(r"\n\n(See also|References|External links|Notes|Further reading|Bibliography|Sources)\n", text)
    return (text[: cut.start()] if cut else text).strip()


# ---------------------------------------------------------------------------- questions
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]")
_WORD = re.compile(r"\S+")


def _candidates(sentence: str) -> list[tuple[str, int, int]]:
    """(kind, start, end) of gold tokens inside a sentence: years, numbers, names (not the first word)."""
    out = []
    words = list(_WORD.finditer(sentence))
    for i, w in enumerate(words):
        token = re.match(r"^[(\"']?([A-Za-z0-9][\w\-]*?)[)\"',.;:!?]*$", w.group(0))
        if not token or i < MIN_PREFIX_WORDS or i > MAX_PREFIX_WORDS:
            continue
        word = token.group(1)
        start = w.start() + w.group(0).index(word)
        if re.fullmatch(r"1[0-9]{3}|20[0-2][0-9]", word):
            out.append(("cloze-year", start, start + len(word)))
        elif re.fullmatch(r"\d{2,}", word):
            out.append(("cloze-number", start, start + len(word)))
        elif re.fullmatch(r"[A-Z][a-z]{3,}", word) and word not in NOT_NAMES:
            out.append(("cloze-name", start, start + len(word)))
    return out


class WikiTaskFactory:
    """Cloze tasks over the dump's articles (one tokenisation per article, done lazily)."""

    def __init__(self, tokenizer, articles: list[tuple[str, str]]):
        self.tokenizer = tokenizer
        self.articles = articles
        self._encoded: dict[int, tuple[str, list[int], list[tuple[int, int]]]] = {}

    def _encode(self, i: int):
        if i not in self._encoded:
            title, text = self.articles[i]
            doc = f"{title}\n\n{text}"
            enc = self.tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True)
            self._encoded[i] = (doc, list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]])
        return self._encoded[i]

    def eligible(self, length: int) -> list[int]:
        """Articles long enough for a ``length``-token context plus the continuation (cheap estimate first)."""
        out = []
        for i, (_, text) in enumerate(self.articles):
            if len(text) < 3 * (length + CONTINUATION):  # ~4 characters per token; be generous
                continue
            if len(self._encode(i)[1]) >= length + CONTINUATION:
                out.append(i)
        return out

    def make(self, length: int, depth: float, seed: int, exclude: set[int] | None = None) -> WikiTask:
        """A cloze task on an article chosen by ``seed`` (not in ``exclude``), gold nearest ``depth``."""
        rng = random.Random(f"wiki-{length}-{seed}")
        pool = [i for i in self.eligible(length) if not exclude or i not in exclude]
        rng.shuffle(pool)
        for i in pool:
            task = self._task(i, length, depth, seed)
            if task is not None:
                return task
        raise WikiUnavailable(f"no article yields a {length}-token cloze task (of {len(pool)} long enough)")

    def _task(self, i: int, length: int, depth: float, seed: int) -> WikiTask | None:
        doc, ids, offsets = self._encode(i)
        end_char = offsets[length - 1][1]
        context = doc[:end_char]
        usable = offsets[int(0.95 * length) - 1][1]
        token_starts = [o[0] for o in offsets[:length]]
        options = []
        for sentence in _SENTENCE.finditer(context[:usable]):
            text = sentence.group(0)
            lead = len(text) - len(text.lstrip())
            for kind, start, end in _candidates(text[lead:]):
                prefix = text[lead:lead + start].rstrip()
                gold = text[lead + start:lead + end]
                words = prefix.split()
                if not MIN_PREFIX_WORDS <= len(words) <= MAX_PREFIX_WORDS or gold in prefix:
                    continue
                anchor = " ".join(words[-ANCHOR_WORDS:])
                if context.count(anchor) != 1 or len(re.findall(rf"(?<![\w]){re.escape(gold)}(?![\w])", context)) != 1:
                    continue
                char = sentence.start() + lead + start
                token = next((t for t, s in enumerate(token_starts) if s >= char), length - 1)
                rank = 0 if kind != "cloze-name" else 1
                options.append((rank, abs(token / length - depth), token, kind, prefix, gold, text.strip()))
        if not options:
            return None
        rank, _, token, kind, prefix, gold, sentence = min(options)
        title = self.articles[i][0]
        question = self.tokenizer(f'\n\nQuestion: In the text above, complete the sentence: "{prefix} ..."\nAnswer: {prefix}',
                                  return_tensors="pt", add_special_tokens=False).input_ids
        name = f"wiki-{length}-{re.sub(r'[^A-Za-z0-9]+', '_', title)[:24]}-s{seed}"
        return WikiTask(name, kind, length, token / length, seed, title, prefix, gold,
                        torch.tensor(ids[:length]).view(1, -1), torch.tensor(ids[length:length + CONTINUATION]).view(1, -1),
                        question, sentence, {"article": i, "candidates": len(options)})


def task_plan(lengths: list[int], count: int, first_seed: int = 0) -> list[tuple[int, float, int]]:
    """(length, depth, seed) for ``count`` tasks: lengths and depths cycle."""
    return [(lengths[i % len(lengths)], DEPTHS[i % len(DEPTHS)], first_seed + i) for i in range(count)]


def make_tasks(tokenizer, lengths: list[int], count: int, log=print, fetch: bool = True) -> list[WikiTask]:
    """``count`` tasks on distinct articles; raises WikiUnavailable when the dump cannot be had."""
    factory = WikiTaskFactory(tokenizer, load_articles(fetch, log))
    used: set[int] = set()
    tasks = []
    for length, depth, seed in task_plan(lengths, count):
        task = factory.make(length, depth, seed, used)
        used.add(task.extra["article"])
        tasks.append(task)
    return tasks
