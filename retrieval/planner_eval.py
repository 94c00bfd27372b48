"""Scoring the planner against the oracle and single-option baselines on a stored outcome matrix.

Pure (numpy only): no model runs. Each task of the matrix gets a seeded scenario: a latency budget
and a number of expected follow-up questions (preparation such as index builds is shared by them).
An option's *measured* cost in a scenario is its per-question stage seconds plus its preparation
seconds divided by (1 + follow-ups). The oracle takes the best-quality option whose measured cost
fits the budget (ties to the cheaper), and refuses when none fits. The planner is fitted on one half of the tasks and scored on
the other (and the other way round: 2-fold cross-fitting, every task scored by a planner that did
not see it).
"""
from __future__ import annotations

import itertools
import random
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from kvstore.errors import FailedPrecondition
from retrieval.executors import OPTIONS
from retrieval.planner import PREPARATION, PlannerModel, classify_query, decide, length_bucket, task_features

BUDGETS_S = (4.0, 10.0, 30.0)
FOLLOWUPS = (0, 2, 8)
BASELINES = ("always-rag", "always-in-context", "always-ttt", "length-threshold", "random-same-mix")


@dataclass(frozen=True)
class Scenario:
    budget_s: float
    followups: int


def scenario(task: dict, seed: int = 0) -> Scenario:
    rng = random.Random(f"{seed}-{task['name']}")
    return Scenario(rng.choice(BUDGETS_S), rng.choice(FOLLOWUPS))


def measured_cost(task: dict, option: str, followups: int) -> float | None:
    """Seconds the option took on the task, preparation amortised; None when infeasible."""
    outcome = task["outcomes"].get(option)
    if not outcome or not outcome["feasible"]:
        return None
    total = 0.0
    for stage, seconds in outcome["stages"].items():
        total += seconds / (1 + followups) if stage in PREPARATION[option] else seconds
    return total


def quality(task: dict, option: str) -> float:
    outcome = task["outcomes"].get(option)
    return float(outcome["quality"]) if outcome and outcome["feasible"] else 0.0


def oracle(task: dict, scen: Scenario) -> str | None:
    """Best quality among options whose measured cost fits the budget, cheaper on ties; None
    (refuse, as the planner must) when none fits."""
    costs = {o: measured_cost(task, o, scen.followups) for o in OPTIONS}
    inside = [o for o, c in costs.items() if c is not None and c <= scen.budget_s]
    if not inside:
        return None
    return max(inside, key=lambda o: (quality(task, o), -costs[o]))


def split(tasks: Sequence[dict], folds: int = 2) -> list[list[dict]]:
    parts: list[list[dict]] = [[] for _ in range(folds)]
    for task in tasks:
        parts[zlib.crc32(task["name"].encode()) % folds].append(task)
    return parts


@dataclass
class Choice:
    task: str
    family: str
    option: str | None  # None: refused or infeasible
    quality: float
    cost: float
    budget_s: float
    oracle: str | None
    oracle_quality: float
    oracle_cost: float
    note: str = ""

    @property
    def violated(self) -> bool:
        return self.option is not None and self.cost > self.budget_s + 1e-9


@dataclass
class PolicyScore:
    name: str
    choices: list[Choice] = field(default_factory=list)

    def _mean(self, values) -> float:
        values = list(values)
        return float(np.mean(values)) if values else 0.0

    @property
    def quality(self) -> float:
        return self._mean(c.quality for c in self.choices)

    @property
    def cost(self) -> float:
        return self._mean(c.cost for c in self.choices)

    @property
    def agreement(self) -> float:
        return self._mean(float(c.option == c.oracle) for c in self.choices)

    @property
    def regret(self) -> float:
        return self._mean(c.oracle_quality - c.quality for c in self.choices)

    @property
    def violations(self) -> int:
        return sum(c.violated for c in self.choices)

    @property
    def unanswered(self) -> int:
        return sum(c.option is None for c in self.choices)

    @property
    def quality_per_second(self) -> float:
        return self.quality / self.cost if self.cost > 0 else 0.0

    def row(self) -> dict:
        return {"policy": self.name, "tasks": len(self.choices), "quality": self.quality, "cost_s": self.cost, "agreement": self.agreement,
                "regret": self.regret, "violations": self.violations, "unanswered": self.unanswered, "quality_per_s": self.quality_per_second}

    def by_family(self) -> dict[str, dict]:
        out = {}
        for family in sorted({c.family for c in self.choices}):
            mine = [c for c in self.choices if c.family == family]
            out[family] = {"quality": float(np.mean([c.quality for c in mine])), "oracle": float(np.mean([c.oracle_quality for c in mine])),
                           "cost_s": float(np.mean([c.cost for c in mine])), "oracle_cost_s": float(np.mean([c.oracle_cost for c in mine])),
                           "choices": {o: sum(c.option == o for c in mine) for o in {c.option for c in mine}}}
        return out


def _score(task: dict, scen: Scenario, option: str | None, note: str = "") -> Choice:
    best = oracle(task, scen)
    cost = measured_cost(task, option, scen.followups) if option else None
    if cost is None:  # infeasible or refused: no answer, nothing spent
        option_q, cost, option = 0.0, 0.0, None
    else:
        option_q = quality(task, option)
    return Choice(task["name"], task["family"], option, option_q, cost, scen.budget_s, best,
                  quality(task, best) if best else 0.0, measured_cost(task, best, scen.followups) or 0.0 if best else 0.0, note)


def planner_policy(model: PlannerModel, tolerance: float) -> Callable[[dict, Scenario], tuple[str | None, str]]:
    def choose(task: dict, scen: Scenario) -> tuple[str | None, str]:
        try:
            decision = decide(task_features(task, scen.followups), model, scen.budget_s, tolerance=tolerance)
        except FailedPrecondition as exc:
            return None, str(exc)
        return decision.choice, decision.reason
    return choose


def fixed_policy(option: str) -> Callable[[dict, Scenario], tuple[str | None, str]]:
    return lambda task, scen: (option, "")


def threshold_policy(task: dict, scen: Scenario) -> tuple[str | None, str]:
    fits = task["context_tokens"] + task["question_tokens"] + 24 <= task["window"]
    return ("full" if fits else "rag"), ""


def hindsight_ceiling(tasks: Sequence[dict], seed: int = 0) -> PolicyScore:
    """The best any policy seeing only (query class, length bucket) could do: per situation, the
    preference order of options that answers most of its tasks in hindsight, each task taking the
    first option of the order whose measured cost fits its budget. In-sample on purpose: a ceiling,
    not a policy."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for task in tasks:
        groups[(classify_query(task["question"]), length_bucket(task["context_tokens"], task["window"]))].append(task)
    scenarios = {task["name"]: scenario(task, seed) for task in tasks}
    score = PolicyScore("hindsight-by-situation")

    def first_inside(task: dict, order: Sequence[str]) -> str | None:
        scen = scenarios[task["name"]]
        for option in order:
            cost = measured_cost(task, option, scen.followups)
            if cost is not None and cost <= scen.budget_s:
                return option
        return None

    def answered_then_cheaper(picks: list[tuple[dict, str | None]]) -> tuple[float, float]:
        answered = [(task, option) for task, option in picks if option]
        return (sum(quality(task, option) for task, option in answered),
                -sum(measured_cost(task, option, scenarios[task["name"]].followups) for task, option in answered))

    for group in groups.values():
        picks = max(([(task, first_inside(task, order)) for task in group] for order in itertools.permutations(OPTIONS)), key=answered_then_cheaper)
        for task, option in picks:
            score.choices.append(_score(task, scenarios[task["name"]], option))
    return score


@dataclass
class Evaluation:
    policies: dict[str, PolicyScore]
    oracle: PolicyScore
    tolerance: float
    ceiling: PolicyScore | None = None

    def goals(self) -> dict:
        planner, oracle = self.policies["planner"], self.oracle
        in_context = self.policies["always-in-context"]
        singles = [self.policies[n] for n in ("always-rag", "always-in-context", "always-ttt")]
        return {
            "quality_within_5pct_of_oracle": planner.quality >= 0.95 * oracle.quality,
            "cost_at_most_half_of_in_context": planner.cost <= 0.5 * in_context.cost,
            "better_quality_per_cost_than_every_single_option": all(planner.quality_per_second > s.quality_per_second for s in singles),
        }


def evaluate(tasks: Sequence[dict], tolerance: float = 0.05, folds: int = 2, seed: int = 0, strength: float = 2.0, use_signals: bool = True) -> Evaluation:
    """Cross-fitted planner, oracle and baselines over every task of the matrix."""
    parts = split(tasks, folds)
    scores = {name: PolicyScore(name) for name in ("planner",) + BASELINES}
    oracle_score = PolicyScore("oracle")
    for held in range(folds):
        train = [t for i, part in enumerate(parts) if i != held for t in part]
        model = PlannerModel.fit(train, strength=strength, use_signals=use_signals)
        policy = planner_policy(model, tolerance)
        for task in parts[held]:
            scen = scenario(task, seed)
            option, note = policy(task, scen)
            scores["planner"].choices.append(_score(task, scen, option, note))
            oracle_score.choices.append(_score(task, scen, oracle(task, scen)))
            for name, fixed in (("always-rag", "rag"), ("always-in-context", "full"), ("always-ttt", "ttt")):
                scores[name].choices.append(_score(task, scen, fixed))
            scores["length-threshold"].choices.append(_score(task, scen, threshold_policy(task, scen)[0]))
    mix = [c.option for c in scores["planner"].choices if c.option]
    rng = random.Random(seed)
    for choice in scores["planner"].choices:
        task = next(t for t in tasks if t["name"] == choice.task)
        scores["random-same-mix"].choices.append(_score(task, scenario(task, seed), rng.choice(mix) if mix else None))
    return Evaluation(scores, oracle_score, tolerance, hindsight_ceiling(tasks, seed))
