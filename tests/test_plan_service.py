"""Plan and Answer over gRPC on the real model: decisions, every executor, bad input."""
from __future__ import annotations

import pytest
import torch

from kvmem.client import Client
from kvstore import errors
from kvstore.spec import ModelSpec
from retrieval.executors import OPTIONS
from retrieval.ttt import query_weights_digest
from tests.conftest import TOY_SPEC, random_layers

pytestmark = pytest.mark.slow  # every test plans or answers on the hosted SmolLM2

FACT = "The secret code for falcon is 4821937."
QUESTION = "\n\nQuestion: What is the secret code for falcon? Answer: The secret code for falcon is"


@pytest.fixture(scope="module")
def needle_session(smollm2, long_text):
    """(token ids [1, T], cache, text) of ~700 tokens of licence text with FACT in the middle."""
    model, tokenizer = smollm2
    text = long_text[:1800] + "\n" + FACT + "\n" + long_text[1800:3400]
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
    return ids, cache, text


@pytest.fixture
def planner_client(service, smollm2, needle_session):
    model, _ = smollm2
    ids, cache, text = needle_session
    with Client(f"127.0.0.1:{service.port}", spec=ModelSpec.from_model(model)) as client:
        client.save("doc", cache, ids, text=text)
        yield client


def _sessions(client) -> dict[str, tuple]:
    return {s.session_id: (s.num_tokens, s.kv_bytes) for s in client.list()}


def test_plan_decides_without_running_anything(planner_client, needle_session):
    ids, _, _ = needle_session
    before = _sessions(planner_client)
    decision = planner_client.plan("doc", QUESTION, expected_followups=3)
    assert decision.choice in OPTIONS and decision.reason and not decision.forced
    assert [o.option for o in decision.options] == list(OPTIONS)
    assert all(o.feasible and o.seconds > 0 and 0 <= o.quality <= 1 and o.quality_basis for o in decision.options)
    features = decision.features
    assert features.context_tokens == ids.shape[1] and features.window == 8192 and features.query_type == "lookup"
    assert features.has_text and features.HasField("top1") and features.top1 > 0.3 and features.expected_followups == 3
    assert _sessions(planner_client) == before  # a dry run stores no compacted session and changes nothing


def test_answer_runs_every_option_on_the_hosted_model(planner_client, service):
    with service.host.use() as (model, _):
        digest = query_weights_digest(model)
    doc = _sessions(planner_client)["doc"]
    stages = {}
    for option in OPTIONS:
        response = planner_client.answer("doc", QUESTION, force=option, max_new_tokens=12)
        assert response.decision.choice == option and response.decision.forced
        assert response.text.strip() and len(response.token_ids) <= 12
        assert response.seconds == pytest.approx(sum(response.stages.values()))
        stages[option] = set(response.stages)
        if option == "full":
            assert "4821937" in response.text
    assert {"train", "generate"} <= stages["ttt"] and {"compact", "generate"} <= stages["compacted"]
    assert "index" in stages["kv_retrieval"]  # built on first use
    with service.host.use() as (model, _):
        assert query_weights_digest(model) == digest  # test-time training never touched the hosted weights
    sessions = _sessions(planner_client)
    assert sessions["doc"] == doc and "doc@streaming_llm-r0.5" in sessions
    again = planner_client.answer("doc", QUESTION, force="compacted", max_new_tokens=4)
    assert "compact" not in again.stages  # stored beside the session, reused
    assert planner_client.plan("doc", QUESTION).features.compacted_stored


def test_answer_without_override_executes_the_planned_choice(planner_client):
    planner_client.plan("doc", QUESTION)  # the first plan builds the text index its signals need, which makes rag cheaper after it
    decision = planner_client.plan("doc", QUESTION)
    response = planner_client.answer("doc", QUESTION, max_new_tokens=8)
    assert response.decision.choice == decision.choice and not response.decision.forced
    assert response.decision.reason and response.stages


def test_bad_planner_requests_get_clear_errors_and_change_nothing(planner_client, smollm2):
    model, _ = smollm2
    spec = ModelSpec.from_model(model)
    # 64 kept slots standing for 9,000 positions (a compacted session): past the 8k window
    positions = list(range(0, 9000, 9000 // 64))[:64]
    planner_client.save("long", random_layers(spec, 64), list(range(64)), spec=spec, positions=positions, logical_length=9000,
                        bias=[torch.zeros(spec.num_kv_heads, 64)] * spec.num_layers)
    planner_client.save("toy", random_layers(TOY_SPEC, 32), list(range(32)), spec=TOY_SPEC)
    before = _sessions(planner_client)
    with pytest.raises(errors.InvalidRequest, match="query is empty"):
        planner_client.answer("doc", "   ")
    with pytest.raises(errors.NotFound):
        planner_client.plan("missing", QUESTION)
    with pytest.raises(errors.InvalidRequest, match="unknown option 'magic'"):
        planner_client.plan("doc", QUESTION, force="magic")
    with pytest.raises(errors.FailedPrecondition, match="below every option's estimate; the cheapest is"):
        planner_client.answer("doc", QUESTION, latency_budget_s=0.001)
    with pytest.raises(errors.FailedPrecondition, match="cannot force full.*window is 8192"):
        planner_client.answer("long", QUESTION, force="full")
    with pytest.raises(errors.FailedPrecondition, match="cannot force rag.*without text"):
        planner_client.answer("long", QUESTION, force="rag")
    with pytest.raises(errors.InvalidRequest, match="max_new_tokens"):
        planner_client.answer("doc", QUESTION, max_new_tokens=1000)
    with pytest.raises(errors.FailedPrecondition, match="session's model"):
        planner_client.plan("toy", QUESTION)
    long_plan = planner_client.plan("long", QUESTION)
    assert long_plan.choice == "kv_retrieval" and not long_plan.features.has_text
    assert _sessions(planner_client) == before


def test_cli_answer_dry_run_prints_the_decision(planner_client, service, capsys):
    import json

    from kvmem.cli import main

    address = f"127.0.0.1:{service.port}"
    assert main(["--address", address, "answer", "doc", QUESTION, "--dry-run", "--followups", "2"]) == 0
    decision = json.loads(capsys.readouterr().out)
    assert decision["choice"] in OPTIONS and len(decision["options"]) == len(OPTIONS)
    assert decision["features"]["expected_followups"] == 2
    assert main(["--address", address, "answer", "doc", QUESTION, "--force", "magic"]) == 1
    assert "unknown option 'magic'" in capsys.readouterr().err
    assert main(["--address", address, "answer", "doc", QUESTION, "--force", "rag", "--rag-budget", "9000"]) == 1
    assert "rag_budget_tokens=9000" in capsys.readouterr().err  # a per-request budget reaches the server, checked there
