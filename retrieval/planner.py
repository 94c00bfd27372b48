"""The context-aware planner: which way to answer a question about a stored session, and why.

``decide`` is a pure function of cheap ``Features`` (context length against the model's window,
what is stored for the session, the question's type, text-search score signals, expected follow-up
questions), a fitted ``PlannerModel`` (cost curves per option and stage, measured on this machine;
a quality table per option and situation, from the outcome matrix) and the request's constraints
(latency budget, forced or forbidden options). It returns a ``Decision``: every option's estimated
cost and quality, the options ruled out and why, the choice and the reason.

The rule: among feasible options inside the budget, take the cheapest whose expected quality is
within ``tolerance`` of the best expected quality.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from kvstore.errors import FailedPrecondition, InvalidRequest
from retrieval.executors import OPTIONS

QUERY_TYPES = ("lookup", "multikey", "aggregation", "multihop", "unanswerable")
# what each option needs prepared before its first question (stored beside the session afterwards)
PREPARATION = {"rag": ("index",), "kv_retrieval": ("index",), "compacted": ("compact",), "compacted_recall": ("compact", "index"), "full": (), "ttt": ()}
NEEDS_KV = ("kv_retrieval", "full", "compacted", "compacted_recall", "ttt")
IN_WINDOW_ONLY = ("full", "compacted", "compacted_recall", "ttt")
BUNDLED_MODEL = Path(__file__).resolve().parent / "planner_model.json"
DEFAULT_TOLERANCE = 0.05

_AGGREGATION = re.compile(r"\b(most often|most frequent|most common|how many|how often|count|total|average|majority|frequency)\b", re.I)
_MULTIHOP = re.compile(r"\b(chain|through|assigned|refers? to|points? to|indirect(ly)?|via)\b", re.I)
_MULTIKEY = re.compile(r"\b(each|every|all|both|list)\b.*\b(codes?|values?|keys?)\b", re.I)
_UNANSWERABLE = re.compile(r"\b(if (the text|it) does not|if not (given|stated|found)|answer none|may not be)\b", re.I)


def classify_query(question: str) -> str:
    """Query type by rules over the question text (one of QUERY_TYPES). Lookups and
    unanswerable questions often read alike; the retrieval signals tell them apart better."""
    if _AGGREGATION.search(question):
        return "aggregation"
    if _MULTIHOP.search(question):
        return "multihop"
    if _UNANSWERABLE.search(question):
        return "unanswerable"
    if _MULTIKEY.search(question):
        return "multikey"
    return "lookup"


@dataclass(frozen=True)
class Features:
    context_tokens: int
    question_tokens: int
    window: int
    query_type: str
    has_text: bool = True
    compacted_stored: bool = False
    block_index_stored: bool = False  # the session's block index with the server's settings (kv_retrieval)
    text_index_stored: bool = False
    recall_index_stored: bool = False  # the block index with recall's own settings (compacted_recall; the same one when they agree)
    top1: float | None = None  # best text-chunk similarity for the question
    gap: float | None = None  # top-1 minus top-2 similarity
    expected_followups: int = 0
    new_tokens: int = 24

    @property
    def fits_window(self) -> bool:
        return self.context_tokens + self.question_tokens + self.new_tokens <= self.window

    def stored(self, stage: str, option: str) -> bool:
        if stage == "compact":
            return self.compacted_stored
        if stage == "index":
            if option == "rag":
                return self.text_index_stored
            return self.recall_index_stored if option == "compacted_recall" else self.block_index_stored
        return False


@dataclass
class Curve:
    """seconds = a + b x + c x^2 with x = context tokens / 1000 (coefficients >= 0)."""

    a: float = 0.0
    b: float = 0.0
    c: float = 0.0
    samples: int = 0

    def __call__(self, tokens: int) -> float:
        x = tokens / 1000.0
        return self.a + self.b * x + self.c * x * x

    @classmethod
    def fit(cls, tokens: Sequence[int], seconds: Sequence[float]) -> "Curve":
        """Non-negative least squares over the three terms (active set by enumeration)."""
        x = np.asarray(tokens, dtype=np.float64) / 1000.0
        y = np.asarray(seconds, dtype=np.float64)
        basis = np.stack([np.ones_like(x), x, x * x], 1)
        best, best_err = np.zeros(3), float(np.sum(y ** 2))
        distinct = len(set(x.tolist()))
        for mask in ((1, 0, 0), (1, 1, 0), (0, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1), (0, 0, 1)):
            cols = [i for i, m in enumerate(mask) if m]
            if len(cols) > distinct:
                continue
            coef, *_ = np.linalg.lstsq(basis[:, cols], y, rcond=None)
            if np.any(coef < 0):
                continue
            full = np.zeros(3)
            full[cols] = coef
            err = float(np.sum((basis @ full - y) ** 2))
            if err < best_err - 1e-12:
                best, best_err = full, err
        return cls(float(best[0]), float(best[1]), float(best[2]), int(len(y)))


@dataclass
class QualityCell:
    right: float
    seen: int

    def mean(self, prior: float, strength: float) -> float:
        return (self.right + prior * strength) / (self.seen + strength)


def length_bucket(tokens: int, window: int) -> str:
    if tokens > window:
        return "beyond-window"
    return "short" if tokens <= 2048 else "in-window"


def signal_bucket(gap: float | None, threshold: float) -> str:
    if gap is None:
        return "unknown"
    return "clear" if gap >= threshold else "ambiguous"


@dataclass
class PlannerModel:
    """Cost curves per option and stage, prefill curve, and quality tables, with provenance."""

    costs: dict[str, dict[str, Curve]] = field(default_factory=dict)
    prefill: Curve = field(default_factory=Curve)
    quality: dict[str, dict[str, QualityCell]] = field(default_factory=dict)  # option -> situation key -> cell
    prior: dict[str, float] = field(default_factory=dict)  # option -> overall success rate
    pooled: dict[str, QualityCell] = field(default_factory=dict)  # situation -> every option's runs together
    overall: float = 0.0  # success rate of every run of every option
    gap_threshold: float = 0.05
    strength: float = 2.0  # pseudo-counts pulling a situation's rate towards its baseline
    use_signals: bool = True  # split situations by the text-search gap (clear / ambiguous)
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ estimates
    def situation(self, features: Features) -> str:
        signal = signal_bucket(features.gap, self.gap_threshold) if self.use_signals else "*"
        return f"{features.query_type}|{length_bucket(features.context_tokens, features.window)}|{signal}"

    @staticmethod
    def _lookup(table: dict[str, QualityCell], key: str) -> tuple[QualityCell | None, str]:
        """The cell of a situation, else the pooled cells of its type and length (any signal)."""
        if key in table:
            return table[key], key
        coarse = key.rsplit("|", 1)[0]
        cells = [c for k, c in table.items() if k.rsplit("|", 1)[0] == coarse]
        if cells:
            return QualityCell(sum(c.right for c in cells), sum(c.seen for c in cells)), coarse + "|*"
        return None, key

    def quality_of(self, option: str, features: Features) -> tuple[float, str]:
        """Expected quality in [0, 1] and what it rests on.

        The option's own record in the situation, shrunk towards a baseline: the option's overall
        rate scaled by how hard the situation is for every option together (so a situation no
        option ever answers pulls every estimate to 0, and one they all answer lifts them)."""
        prior = self.prior.get(option, 0.5)
        key = self.situation(features)
        pooled, _ = self._lookup(self.pooled, key)
        difficulty = pooled.mean(self.overall, self.strength) / self.overall if pooled is not None and self.overall > 0 else 1.0
        base = min(1.0, prior * difficulty)
        cell, where = self._lookup(self.quality.get(option, {}), key)
        if cell is None:
            return base, f"no {option} run on {key} tasks; its overall rate {prior:.2f} x situation difficulty {difficulty:.2f}"
        return cell.mean(base, self.strength), f"{cell.right:g}/{cell.seen} right on {where} tasks"

    def cost_of(self, option: str, features: Features) -> tuple[float, float, dict[str, float]]:
        """(per-question seconds, preparation seconds before amortisation, breakdown)."""
        curves = self.costs.get(option, {})
        breakdown, question, preparation = {}, 0.0, 0.0
        for stage, curve in curves.items():
            seconds = curve(features.context_tokens)
            if stage in PREPARATION[option]:
                if features.stored(stage, option):
                    continue
                preparation += seconds
            else:
                question += seconds
            breakdown[stage] = seconds
        return question, preparation, breakdown

    # ------------------------------------------------------------------ persistence
    def to_json(self) -> str:
        return json.dumps({
            "costs": {o: {s: asdict(c) for s, c in st.items()} for o, st in self.costs.items()},
            "prefill": asdict(self.prefill),
            "quality": {o: {k: asdict(c) for k, c in t.items()} for o, t in self.quality.items()},
            "prior": self.prior, "pooled": {k: asdict(c) for k, c in self.pooled.items()}, "overall": self.overall, "use_signals": self.use_signals, "gap_threshold": self.gap_threshold, "strength": self.strength, "meta": self.meta,
        }, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PlannerModel":
        try:
            raw = json.loads(text)
            return cls(
                costs={o: {s: Curve(**c) for s, c in st.items()} for o, st in raw["costs"].items()},
                prefill=Curve(**raw["prefill"]),
                quality={o: {k: QualityCell(**c) for k, c in t.items()} for o, t in raw["quality"].items()},
                prior=dict(raw["prior"]), pooled={k: QualityCell(**c) for k, c in raw["pooled"].items()}, overall=float(raw["overall"]), use_signals=bool(raw["use_signals"]), gap_threshold=float(raw["gap_threshold"]), strength=float(raw["strength"]), meta=dict(raw.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InvalidRequest(f"not a planner model file: {exc!r}") from exc

    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path | None = None) -> "PlannerModel":
        return cls.from_json(Path(path or BUNDLED_MODEL).read_text())

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, tasks: Iterable[dict], meta: dict | None = None, strength: float = 2.0, use_signals: bool = True) -> "PlannerModel":
        """Fit from outcome-matrix records (bench/planner_matrix.py): cost curves from the measured
        stage seconds, quality tables from the scores, per situation."""
        tasks = list(tasks)
        gaps = [task_signals(t)["gap"] for t in tasks if task_signals(t).get("gap") is not None]
        model = cls(gap_threshold=float(np.median(gaps)) if gaps else 0.05, strength=strength, use_signals=use_signals, meta=dict(meta or {}))
        samples: dict[tuple[str, str], list[tuple[int, float]]] = {}
        for task in tasks:
            tokens = task["context_tokens"]
            for option, outcome in task["outcomes"].items():
                if not outcome["feasible"]:
                    continue
                for stage, seconds in outcome["stages"].items():
                    samples.setdefault((option, stage), []).append((tokens, seconds))
        for (option, stage), pairs in samples.items():
            model.costs.setdefault(option, {})[stage] = Curve.fit([p[0] for p in pairs], [p[1] for p in pairs])
        model.prefill = Curve.fit([t["context_tokens"] for t in tasks], [t["prefill_s"] for t in tasks]) if tasks else Curve()
        for option in OPTIONS:
            scored = [(task_features(t), t["outcomes"][option]["quality"]) for t in tasks if t["outcomes"].get(option, {}).get("feasible")]
            model.prior[option] = float(np.mean([q for _, q in scored])) if scored else 0.0
            table: dict[str, QualityCell] = {}
            for features, quality in scored:
                key = model.situation(features)
                for cell in (table.setdefault(key, QualityCell(0.0, 0)), model.pooled.setdefault(key, QualityCell(0.0, 0))):
                    cell.right += quality
                    cell.seen += 1
            model.quality[option] = table
        runs = sum(c.seen for c in model.pooled.values())
        model.overall = sum(c.right for c in model.pooled.values()) / runs if runs else 0.0
        model.meta.setdefault("tasks", len(tasks))
        model.meta.setdefault("fitted_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        return model


def task_signals(task: dict) -> dict:
    """Text-search signals of an outcome-matrix task: top-1 similarity and the gap to the next
    (measured by its rag run; what the server computes before deciding)."""
    details = task["outcomes"].get("rag", {}).get("details", {})
    if "top1" not in details:
        return {}
    return {"top1": float(details["top1"]), "gap": float(details["gap"])}


def task_features(task: dict, followups: int = 0, stored: bool = False) -> Features:
    """Features of an outcome-matrix task as the server would see them for a freshly saved
    session (nothing prepared yet unless ``stored``)."""
    signals = task_signals(task)
    return Features(
        context_tokens=task["context_tokens"], question_tokens=task["question_tokens"], window=task["window"],
        query_type=classify_query(task["question"]), has_text=True, compacted_stored=stored, block_index_stored=stored,
        text_index_stored=stored, recall_index_stored=stored, top1=signals.get("top1"), gap=signals.get("gap"), expected_followups=followups,
    )


@dataclass
class OptionEstimate:
    option: str
    feasible: bool
    seconds: float = 0.0  # expected latency of this request (preparation amortised)
    question_seconds: float = 0.0
    preparation_seconds: float = 0.0  # before amortisation; 0 when stored
    quality: float = 0.0
    quality_basis: str = ""
    ruled_out: str = ""  # why it cannot be chosen ("" when it can)


@dataclass
class Decision:
    choice: str
    reason: str
    features: Features
    options: list[OptionEstimate]
    latency_budget_s: float | None
    forced: bool = False

    def estimate(self, option: str) -> OptionEstimate:
        return next(o for o in self.options if o.option == option)

    def as_dict(self) -> dict:
        return {"choice": self.choice, "reason": self.reason, "forced": self.forced, "latency_budget_s": self.latency_budget_s,
                "features": asdict(self.features), "options": [asdict(o) for o in self.options]}


def _feasibility(option: str, features: Features) -> str:
    if option in IN_WINDOW_ONLY and not features.fits_window:
        need = features.context_tokens + features.question_tokens + features.new_tokens
        return f"needs {need} tokens in context, the model's window is {features.window}"
    if option == "rag" and not features.has_text:
        return "the session was saved without text"
    return ""


def decide(features: Features, model: PlannerModel, latency_budget_s: float | None = None, force: str = "",
           forbid: Sequence[str] = (), tolerance: float = DEFAULT_TOLERANCE) -> Decision:
    """Choose an option (see the module doc). Raises InvalidRequest for unknown options and
    FailedPrecondition when nothing can run (naming the cheapest estimate)."""
    for name in [force, *forbid]:
        if name and name not in OPTIONS:
            raise InvalidRequest(f"unknown option {name!r}; options are {', '.join(OPTIONS)}")
    if latency_budget_s is not None and not latency_budget_s > 0:
        raise InvalidRequest(f"latency budget must be > 0 seconds, got {latency_budget_s}")
    if force and force in forbid:
        raise InvalidRequest(f"{force!r} is both forced and forbidden")
    share = 1 + max(0, features.expected_followups)
    estimates = []
    for option in OPTIONS:
        infeasible = _feasibility(option, features)
        question, preparation, _ = model.cost_of(option, features)
        quality, basis = model.quality_of(option, features)
        estimate = OptionEstimate(option, not infeasible, question + preparation / share, question, preparation, quality, basis)
        if infeasible:
            estimate.ruled_out = infeasible
        elif option not in model.costs and option != force:
            estimate.ruled_out = "not measured: the planner model has no runs of it (bench/planner_matrix.py, then bench/planner.py --fit); force it to run it"
        elif option in forbid:
            estimate.ruled_out = "forbidden by the request"
        elif latency_budget_s is not None and estimate.seconds > latency_budget_s and option != force:
            estimate.ruled_out = f"estimated {estimate.seconds:.2f} s > budget {latency_budget_s:.2f} s"
        estimates.append(estimate)
    if force:
        chosen = next(e for e in estimates if e.option == force)
        if not chosen.feasible:
            raise FailedPrecondition(f"cannot force {force}: it {chosen.ruled_out}")
        note = ""
        if latency_budget_s is not None and chosen.seconds > latency_budget_s:
            note = f" (estimated {chosen.seconds:.2f} s, over the {latency_budget_s:.2f} s budget)"
        return Decision(force, f"forced by the request{note}", features, estimates, latency_budget_s, forced=True)
    candidates = [e for e in estimates if not e.ruled_out]
    if not candidates:
        runnable = [e for e in estimates if e.feasible and e.option not in forbid]
        if runnable and latency_budget_s is not None:
            cheapest = min(runnable, key=lambda e: e.seconds)
            raise FailedPrecondition(f"latency budget {latency_budget_s:.2f} s is below every option's estimate; the cheapest is {cheapest.option} at {cheapest.seconds:.2f} s")
        reasons = "; ".join(f"{e.option}: {e.ruled_out}" for e in estimates)
        raise FailedPrecondition(f"no option can answer this request ({reasons})")
    best = max(e.quality for e in candidates)
    good = [e for e in candidates if e.quality >= best - tolerance]
    chosen = min(good, key=lambda e: (e.seconds, OPTIONS.index(e.option)))
    leader = max(candidates, key=lambda e: (e.quality, -e.seconds))
    if chosen is leader or math.isclose(chosen.quality, best):
        reason = f"{chosen.option}: highest expected quality ({chosen.quality:.2f}, {chosen.quality_basis}) and cheapest among those ({chosen.seconds:.2f} s)"
    else:
        reason = (f"{chosen.option}: expected quality {chosen.quality:.2f} is within {tolerance:.2f} of the best ({leader.option}, {best:.2f}) "
                  f"at {chosen.seconds:.2f} s instead of {leader.seconds:.2f} s")
    if share > 1 and chosen.preparation_seconds:
        reason += f"; its {chosen.preparation_seconds:.2f} s of preparation is shared by {share} expected questions"
    return Decision(chosen.option, reason, features, estimates, latency_budget_s)
