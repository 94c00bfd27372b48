"""The planner as a pure function, and a replay of the stored outcome matrix (no model runs)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kvstore import errors
from retrieval.executors import OPTIONS
from retrieval.planner import BUNDLED_MODEL, Curve, Features, PlannerModel, QualityCell, classify_query, decide
from retrieval.planner_eval import BASELINES, evaluate, measured_cost, oracle, quality, scenario

MATRIX = Path(__file__).resolve().parent.parent / "bench" / "data" / "planner_outcomes.jsonl"


def _model(quality: dict[str, float], seconds: dict[str, float], prep: dict[str, float] | None = None) -> PlannerModel:
    """A planner model with flat costs (seconds per option, preparation apart) and flat quality."""
    prep = prep or {}
    costs = {}
    for option in OPTIONS:
        costs[option] = {"generate": Curve(a=seconds[option])}
        if option in prep:
            costs[option]["compact" if option == "compacted" else "index"] = Curve(a=prep[option])
    return PlannerModel(costs=costs, prior=dict(quality))


def _features(**kw) -> Features:
    base = dict(context_tokens=2000, question_tokens=20, window=8192, query_type="lookup")
    base.update(kw)
    return Features(**base)


FLAT_Q = {"rag": 0.6, "kv_retrieval": 0.7, "full": 0.9, "compacted": 0.4, "compacted_recall": 0.8, "ttt": 0.92}
FLAT_S = {"rag": 2.0, "kv_retrieval": 3.0, "full": 2.5, "compacted": 1.5, "compacted_recall": 2.8, "ttt": 9.0}


def test_query_types_by_rules():
    assert classify_query("Which crate label appears most often in the notes?") == "aggregation"
    assert classify_query("VAR C is assigned through a chain of variables. What is the value of VAR C?") == "multihop"
    assert classify_query("What is the secret code for falcon? If the text does not give it, answer none.") == "unanswerable"
    assert classify_query("List all the codes for every key.") == "multikey"
    assert classify_query("What is the secret code for falcon?") == "lookup"


def test_curve_fit_recovers_nonnegative_coefficients():
    tokens = [1000, 2000, 4000, 8000, 16000]
    curve = Curve.fit(tokens, [0.5 + 0.2 * t / 1000 + 0.01 * (t / 1000) ** 2 for t in tokens])
    assert curve.a == pytest.approx(0.5, abs=1e-6) and curve.b == pytest.approx(0.2, abs=1e-6) and curve.c == pytest.approx(0.01, abs=1e-7)
    flat = Curve.fit(tokens, [3.0, 2.9, 3.1, 3.0, 3.0])  # a decreasing fit would need b < 0: kept >= 0
    assert min(flat.a, flat.b, flat.c) >= 0 and flat(4000) == pytest.approx(3.0, abs=0.1)


def test_cheapest_option_within_tolerance_of_the_best():
    decision = decide(_features(), _model(FLAT_Q, FLAT_S))
    assert decision.choice == "full"  # ttt is best (0.92) but full (0.90) is within 0.05 and 3.6x cheaper
    assert "within 0.05" in decision.reason and "ttt" in decision.reason
    assert [o.option for o in decision.options] == list(OPTIONS)
    strict = decide(_features(), _model(FLAT_Q, FLAT_S), tolerance=0.0)
    assert strict.choice == "ttt"


def test_window_rules_out_in_context_options_with_the_reason():
    decision = decide(_features(context_tokens=20000), _model(FLAT_Q, FLAT_S))
    assert decision.choice == "kv_retrieval"
    for option in ("full", "compacted", "ttt"):
        estimate = decision.estimate(option)
        assert not estimate.feasible and "window is 8192" in estimate.ruled_out
    with pytest.raises(errors.FailedPrecondition, match="cannot force full.*window"):
        decide(_features(context_tokens=20000), _model(FLAT_Q, FLAT_S), force="full")


def test_budget_rules_out_slow_options_and_refuses_when_nothing_fits():
    decision = decide(_features(), _model(FLAT_Q, FLAT_S), latency_budget_s=2.2)
    assert decision.choice == "rag" and "budget 2.20 s" in decision.estimate("full").ruled_out
    with pytest.raises(errors.FailedPrecondition, match="cheapest is compacted at 1.50 s"):
        decide(_features(), _model(FLAT_Q, FLAT_S), latency_budget_s=0.5)


def test_overrides_force_and_forbid():
    forced = decide(_features(), _model(FLAT_Q, FLAT_S), force="compacted", latency_budget_s=10)
    assert forced.choice == "compacted" and forced.forced and "forced" in forced.reason
    over = decide(_features(), _model(FLAT_Q, FLAT_S), force="ttt", latency_budget_s=1.0)
    assert over.choice == "ttt" and "over the 1.00 s budget" in over.reason
    assert decide(_features(), _model(FLAT_Q, FLAT_S), forbid=["full"]).choice == "ttt"
    with pytest.raises(errors.InvalidRequest, match="unknown option 'magic'"):
        decide(_features(), _model(FLAT_Q, FLAT_S), force="magic")
    with pytest.raises(errors.InvalidRequest, match="forced and forbidden"):
        decide(_features(), _model(FLAT_Q, FLAT_S), force="rag", forbid=["rag"])
    with pytest.raises(errors.InvalidRequest, match="> 0"):
        decide(_features(), _model(FLAT_Q, FLAT_S), latency_budget_s=0)
    with pytest.raises(errors.FailedPrecondition, match="no option"):
        decide(_features(), _model(FLAT_Q, FLAT_S), forbid=list(OPTIONS))


def test_preparation_is_shared_by_follow_ups_and_free_once_stored():
    quality_ = {"rag": 0.9, "kv_retrieval": 0.5, "full": 0.88, "compacted": 0.1, "compacted_recall": 0.5, "ttt": 0.1}
    seconds = {"rag": 1.0, "kv_retrieval": 3.0, "full": 2.5, "compacted": 1.5, "compacted_recall": 2.0, "ttt": 9.0}
    model = _model(quality_, seconds, prep={"rag": 6.0})
    alone = decide(_features(), model)
    assert alone.choice == "full" and alone.estimate("rag").seconds == pytest.approx(7.0)
    shared = decide(_features(expected_followups=9), model)
    assert shared.choice == "rag" and shared.estimate("rag").seconds == pytest.approx(1.6) and "shared by 10" in shared.reason
    stored = decide(_features(text_index_stored=True), model)
    assert stored.choice == "rag" and stored.estimate("rag").preparation_seconds == 0
    no_text = decide(_features(has_text=False, expected_followups=9), model)
    assert no_text.choice == "full" and "without text" in no_text.estimate("rag").ruled_out


def test_an_option_the_model_never_measured_is_ruled_out_unless_forced():
    model = _model(FLAT_Q, FLAT_S)
    del model.costs["compacted_recall"]
    decision = decide(_features(), model)
    unmeasured = decision.estimate("compacted_recall")
    assert decision.choice != "compacted_recall" and "not measured" in unmeasured.ruled_out
    assert decide(_features(), model, force="compacted_recall").choice == "compacted_recall"


def test_requests_set_their_own_budgets_within_bounds():
    from retrieval.executors import ExecutorSettings
    from retrieval.plan_service import Question

    server = ExecutorSettings()
    question = Question("t", "s", "What is it?", max_new_tokens=12, budgets={"rag_budget_tokens": 512, "kv_budget_tokens": 0, "recall_budget_tokens": 64})
    settings = question.settings(server, window=8192)
    assert (settings.rag_budget_tokens, settings.kv_budget_tokens, settings.recall_budget_tokens, settings.max_new_tokens) == (512, server.kv_budget_tokens, 64, 12)
    with pytest.raises(errors.InvalidRequest, match="window"):
        Question("t", "s", "q", budgets={"rag_budget_tokens": 8190}).settings(server, window=8192)
    for bad in ({"kv_budget_tokens": -1}, {"recall_budget_tokens": 1 << 40}, {"speed": 3}):
        with pytest.raises(errors.InvalidRequest):
            Question("t", "s", "q", budgets=bad)


def test_rag_searches_the_question_without_its_chat_template():
    from types import SimpleNamespace

    from retrieval.executors import search_query

    tokenizer = SimpleNamespace(all_special_tokens=["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    chat = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n"
            "<|im_start|>user\nWhat is the secret code for falcon?<|im_end|>\n<|im_start|>assistant\n")
    assert search_query(chat, tokenizer) == "What is the secret code for falcon?"
    plain = "\n\nQuestion: What is the secret code for falcon? Answer:"
    assert search_query(plain, tokenizer) == plain.strip()
    assert search_query("<|im_start|>user\nfirst<|im_end|><|im_start|>assistant\nok<|im_end|><|im_start|>user\nsecond", tokenizer) == "first second"


def test_quality_table_backs_off_to_coarser_situations():
    model = PlannerModel(prior={"rag": 0.5}, quality={"rag": {"lookup|short|clear": QualityCell(3, 3), "lookup|short|ambiguous": QualityCell(0, 1)}}, gap_threshold=0.1)
    exact, basis = model.quality_of("rag", _features(gap=0.3))
    assert exact == pytest.approx((3 + 0.5 * 2) / 5) and "3/3" in basis
    coarse, basis = model.quality_of("rag", _features())  # no signal: both cells of lookup|short
    assert coarse == pytest.approx((3 + 0.5 * 2) / 6) and "|*" in basis
    prior, basis = model.quality_of("rag", _features(query_type="aggregation"))
    assert prior == 0.5 and "overall rate 0.50" in basis


def test_planner_model_round_trips_and_refuses_garbage(tmp_path):
    model = _model(FLAT_Q, FLAT_S, prep={"rag": 4.0})
    model.quality = {"rag": {"lookup|short|clear": QualityCell(2, 3)}}
    model.save(tmp_path / "m.json")
    again = PlannerModel.load(tmp_path / "m.json")
    assert again.to_json() == model.to_json()
    (tmp_path / "bad.json").write_text('{"costs": 3}')
    with pytest.raises(errors.InvalidRequest, match="not a planner model"):
        PlannerModel.load(tmp_path / "bad.json")


# ---------------------------------------------------------------------------- replay of the stored matrix
@pytest.fixture(scope="module")
def tasks():
    return [json.loads(line) for line in MATRIX.read_text().splitlines() if line.strip()]


def test_matrix_covers_every_family_length_and_option(tasks):
    families = {t["family"] for t in tasks}
    assert families == {"lookup", "multikey", "multihop", "aggregation", "absent"}
    assert min(t["context_tokens"] for t in tasks) <= 1000 and max(t["context_tokens"] for t in tasks) >= 32000
    for task in tasks:
        assert set(task["outcomes"]) == set(OPTIONS)
        fits = task["context_tokens"] + task["question_tokens"] + 24 <= task["window"]
        for option in ("full", "ttt", "compacted"):
            assert task["outcomes"][option]["feasible"] == fits, (task["name"], option)
        assert task["outcomes"]["rag"]["feasible"] and task["outcomes"]["kv_retrieval"]["feasible"]


def _differences(a, b, rel: float = 1e-9, path: str = "") -> list[str]:
    """Where two JSON values differ: floats beyond a relative tolerance, anything else at all.

    Least-squares fits differ in their last bits by BLAS kernel, thread count and summation order,
    so fitted numbers are compared within ``rel``; keys, counts (ints), strings and booleans exactly.
    """
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path or '/'}: keys {sorted(a.keys() ^ b.keys())} on one side only"]
        return [d for key in sorted(a) for d in _differences(a[key], b[key], rel, f"{path}/{key}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} != {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, rel, f"{path}/{i}")]
    if isinstance(a, float) and isinstance(b, float):
        return [] if a == b or abs(a - b) <= rel * max(abs(a), abs(b)) else [f"{path}: {a!r} != {b!r}"]
    return [] if type(a) is type(b) and a == b else [f"{path}: {a!r} != {b!r}"]


def test_model_comparison_tolerates_last_bits_only():
    assert _differences({"b": 0.03683899886276334, "n": 3}, {"b": 0.0368389988627634, "n": 3}) == []
    assert _differences({"b": 0.0368389, "n": 3}, {"b": 0.0368390, "n": 3})
    assert _differences({"n": 3}, {"n": 4}) and _differences({"n": 3}, {"n": 3.0}) and _differences({"a": 1}, {"b": 1})


def test_bundled_planner_model_is_the_one_fitted_on_the_stored_matrix(tasks):
    bundled = PlannerModel.load(BUNDLED_MODEL)
    refit = PlannerModel.fit(tasks, meta=bundled.meta)
    assert _differences(json.loads(refit.to_json()), json.loads(bundled.to_json())) == []


def test_a_stale_bundled_model_fails_the_comparison(tasks):
    """Changing one stored outcome changes the fit beyond the tolerance: the check has teeth."""
    bundled = json.loads(PlannerModel.load(BUNDLED_MODEL).to_json())
    changed = json.loads(json.dumps(tasks))
    outcome = next(o for t in changed for o in t["outcomes"].values() if o.get("feasible") and o["quality"] == 1.0)
    outcome["quality"] = 0.0
    assert _differences(json.loads(PlannerModel.fit(changed, meta=bundled["meta"]).to_json()), bundled)
    changed = json.loads(json.dumps(tasks))
    stage = next(o for t in changed for o in t["outcomes"].values() if o.get("feasible"))["stages"]
    stage["generate"] *= 1.5
    assert _differences(json.loads(PlannerModel.fit(changed, meta=bundled["meta"]).to_json()), bundled)


def test_oracle_is_the_best_option_inside_the_budget(tasks):
    for task in tasks:
        scen = scenario(task)
        best = oracle(task, scen)
        inside = [o for o in OPTIONS if (c := measured_cost(task, o, scen.followups)) is not None and c <= scen.budget_s]
        if inside:
            assert best in inside
            assert quality(task, best) == max(quality(task, o) for o in inside)
        else:
            assert best is None  # nothing fits: the right answer is a refusal


def test_replay_scores_planner_and_baselines_consistently(tasks):
    evaluation = evaluate(tasks)
    planner = evaluation.policies["planner"]
    assert set(evaluation.policies) == {"planner", *BASELINES}
    assert len(planner.choices) == len(tasks) == len(evaluation.oracle.choices)
    assert evaluation.oracle.agreement == 1.0 and evaluation.oracle.regret == 0.0
    for choice in planner.choices:
        assert choice.option is None or choice.option in OPTIONS
        if choice.option is None:
            assert "budget" in choice.note  # refused only when no estimate fits the budget
    assert planner.regret == pytest.approx(np.mean([c.oracle_quality - c.quality for c in planner.choices]))
    # never an infeasible choice: every option the planner picked ran on that task
    by_name = {t["name"]: t for t in tasks}
    assert all(by_name[c.task]["outcomes"][c.option]["feasible"] for c in planner.choices if c.option)
    assert evaluate(tasks).policies["planner"].row() == planner.row()  # deterministic


def test_hindsight_ceiling_stays_inside_budgets_and_below_the_oracle(tasks):
    from retrieval.planner_eval import hindsight_ceiling

    ceiling = hindsight_ceiling(tasks)
    assert len(ceiling.choices) == len(tasks)
    assert ceiling.violations == 0
    assert ceiling.quality <= evaluate(tasks).oracle.quality
    # one fixed order for everything is among the orders it tried: never better than the ceiling
    for option in OPTIONS:
        strict = []
        for task in tasks:
            cost = measured_cost(task, option, scenario(task).followups)
            strict.append(quality(task, option) if cost is not None and cost <= scenario(task).budget_s else 0.0)
        assert ceiling.quality >= np.mean(strict) - 1e-9


def test_replayed_decisions_respect_budget_and_tolerance(tasks):
    """Every decision on a real matrix task, from a planner fitted on the other tasks: the choice
    is estimated inside the budget, within tolerance of the best estimate, and the cheapest such."""
    from retrieval.planner import task_features
    from retrieval.planner_eval import split

    parts = split(tasks)
    for held in range(2):
        model = PlannerModel.fit([t for i, p in enumerate(parts) if i != held for t in p])
        for task in parts[held]:
            scen = scenario(task)
            try:
                decision = decide(task_features(task, scen.followups), model, scen.budget_s)
            except errors.FailedPrecondition as exc:
                assert "below every option's estimate" in str(exc)
                continue
            open_ = [o for o in decision.options if not o.ruled_out]
            chosen = decision.estimate(decision.choice)
            assert chosen.seconds <= scen.budget_s and chosen in open_
            best = max(o.quality for o in open_)
            assert chosen.quality >= best - 0.05
            assert chosen.seconds == min(o.seconds for o in open_ if o.quality >= best - 0.05)


def test_compacted_recall_is_prepared_by_recalls_own_index_not_retrieves():
    """Recall searches an index with its own settings: a stored Retrieve index must not make the
    planner count compacted_recall's index build as done (nor the other way round)."""
    from retrieval.planner import Features

    retrieve_only = Features(context_tokens=2000, question_tokens=20, window=8192, query_type="lookup", block_index_stored=True)
    assert retrieve_only.stored("index", "kv_retrieval") and not retrieve_only.stored("index", "compacted_recall")
    recall_only = Features(context_tokens=2000, question_tokens=20, window=8192, query_type="lookup", recall_index_stored=True)
    assert recall_only.stored("index", "compacted_recall") and not recall_only.stored("index", "kv_retrieval")
    assert not recall_only.stored("index", "rag")
