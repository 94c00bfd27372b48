"""The Compact RPC and the batch command: results round-trip through the store, bad requests
change nothing, and compacted sessions restore into a cache that generate can use."""
import grpc
import pytest
import torch

from kvmem.cli import main as cli
from kvmem.client import Client
from kvstore import errors
from kvstore.spec import ModelSpec
from tests.conftest import TOY_SPEC, random_layers

H, D, L = TOY_SPEC.num_kv_heads, TOY_SPEC.head_dim, TOY_SPEC.num_layers


def toy_queries(n=40, seed=0, heads=2 * H):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(heads, n, D, generator=generator) for _ in range(L)]


@pytest.fixture
def toy(client):
    layers = random_layers(TOY_SPEC, 120, seed=3)
    client.save("ctx", layers, list(range(120)))
    return layers


@pytest.mark.parametrize("method", ["attention_matching", "snapkv", "h2o", "tova", "knorm", "streaming_llm", "random"])
def test_every_method_round_trips_through_the_store(client, toy, method):
    response = client.compact("ctx", method, ratio=0.25, queries=toy_queries(), held_out=toy_queries(seed=1))
    info = response.session
    assert info.session_id == f"ctx@{method}-r0.25" and info.has_bias and info.logical_length == 120
    assert info.labels["compaction"] == method and info.labels["source"] == "ctx"
    assert response.kept_tokens == pytest.approx(30) and response.slots >= 30 and response.bytes_after < response.bytes_before
    assert response.heldout_attention_error >= 0
    restored = client.restore(info.session_id, build_cache=False)  # a toy spec: no model to run it
    assert len(restored.layers) == L and restored.layers[0][0].shape == (H, response.slots, D)
    assert restored.bias is not None and restored.bias[0].shape == (H, response.slots)
    original = client.restore("ctx")  # the original is untouched
    assert all(torch.equal(a[0], b[0]) for a, b in zip(original.layers, toy))


BAD = {
    "unknown method": (dict(method="zip", ratio=0.5), grpc.StatusCode.INVALID_ARGUMENT, "unknown compaction method"),
    "ratio above 1": (dict(method="knorm", ratio=1.5), grpc.StatusCode.INVALID_ARGUMENT, "ratio"),
    "no ratio nor budget": (dict(method="knorm"), grpc.StatusCode.INVALID_ARGUMENT, "ratio"),
    "budget above length": (dict(method="knorm", budget=500), grpc.StatusCode.INVALID_ARGUMENT, "larger than the session"),
    "too few queries": (dict(method="attention_matching", ratio=0.5, queries=toy_queries(n=1, heads=H)), grpc.StatusCode.INVALID_ARGUMENT, "reference queries"),
    "nan queries": (dict(method="attention_matching", ratio=0.5, queries=[q.index_fill(1, torch.tensor([3]), float("nan")) for q in toy_queries()]), grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
    "inf queries": (dict(method="snapkv", ratio=0.5, queries=[q.index_fill(1, torch.tensor([0]), float("inf")) for q in toy_queries()]), grpc.StatusCode.INVALID_ARGUMENT, "Inf"),
    "model not hosted": (dict(method="attention_matching", ratio=0.5), grpc.StatusCode.FAILED_PRECONDITION, "supply reference queries"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_compactions_change_nothing(client, toy, case):
    kwargs, code, message = BAD[case]
    before = client.stats()
    with pytest.raises(errors.KvmemError) as info:
        client.compact("ctx", **kwargs)
    assert info.value.code == code and message in str(info.value), str(info.value)
    after = client.stats()
    assert (after.sessions, after.stored_bytes, after.logical_bytes) == (before.sessions, before.stored_bytes, before.logical_bytes)


def test_compacting_a_compacted_session_is_failed_precondition(client, toy):
    client.compact("ctx", "knorm", ratio=0.5)
    with pytest.raises(errors.FailedPrecondition, match="already compacted"):
        client.compact("ctx@knorm-r0.5", "attention_matching", ratio=0.5, queries=toy_queries())


def test_replace_swaps_the_session_in_place_and_keeps_the_lossless_original(client, toy):
    response = client.compact("ctx", "streaming_llm", ratio=0.5, replace=True)
    assert response.session.session_id == "ctx"
    info = client.get("ctx")
    assert info.labels["compaction"] == "streaming_llm" and info.num_tokens == 60
    assert info.labels["source"] == "ctx@source"
    source = client.get("ctx@source")
    assert info.labels["source_version"] == str(source.version)
    original = client.restore("ctx@source", build_cache=False)
    assert all(torch.equal(k, ref[0]) and torch.equal(v, ref[1]) for (k, v), ref in zip(original.layers, toy))  # bit-exact
    assert sorted(s.session_id for s in client.list()) == ["ctx", "ctx@source"]


def test_replace_with_drop_source_deletes_the_original(client, toy):
    client.compact("ctx", "streaming_llm", ratio=0.5, replace=True, drop_source=True)
    assert client.get("ctx").labels["source"] == "" and client.stats().sessions == 1
    with pytest.raises(errors.NotFound):
        client.get("ctx@source")


def test_a_compacted_copy_names_its_source_and_options_and_overwrite_decide_its_id(client, toy):
    plain = client.compact("ctx", "knorm", ratio=0.5)
    assert plain.session.session_id == "ctx@knorm-r0.5"
    assert plain.session.labels["source"] == "ctx" and plain.session.labels["source_version"] == str(client.get("ctx").version)
    first = client.compact("ctx", "attention_matching", ratio=0.5, queries=toy_queries(), options={"selection": "omp"})
    second = client.compact("ctx", "attention_matching", ratio=0.5, queries=toy_queries(), options={"selection": "rms"})
    assert first.session.session_id != second.session.session_id  # two variants at one ratio no longer collide
    assert first.session.session_id.startswith("ctx@attention_matching-r0.5-o")
    with pytest.raises(errors.AlreadyExists):
        client.compact("ctx", "knorm", ratio=0.5)
    with pytest.raises(errors.InvalidRequest, match="replace=true"):  # overwrite never bypasses keeping the original
        client.compact("ctx", "knorm", ratio=0.5, target_session_id="ctx", overwrite=True)
    assert "compaction" not in client.get("ctx").labels
    count = client.stats().sessions
    again = client.compact("ctx", "knorm", ratio=0.5, overwrite=True)
    assert again.session.session_id == "ctx@knorm-r0.5" and client.stats().sessions == count


def test_batch_command_resumes_without_redoing(client, service, capsys):
    for name in ("s1", "s2", "s3"):
        client.save(name, random_layers(TOY_SPEC, 64, seed=len(name)), list(range(64)))
    address = ["--address", f"127.0.0.1:{service.port}"]
    assert cli(address + ["compact", "--method", "knorm", "--ratio", "0.25", "--sessions", "s1", "s2"]) == 0
    first = capsys.readouterr().out
    assert "s1 -> s1@knorm-r0.25" in first and "done: 2 compacted" in first
    assert cli(address + ["compact", "--method", "knorm", "--ratio", "0.25", "--all"]) == 0
    second = capsys.readouterr().out
    assert "s1: already compacted" in second and "s3 -> s3@knorm-r0.25" in second and "done: 1 compacted, 2 already done" in second
    assert sorted(s.session_id for s in client.list()) == ["s1", "s1@knorm-r0.25", "s2", "s2@knorm-r0.25", "s3", "s3@knorm-r0.25"]


@pytest.mark.slow
def test_server_hosted_model_compacts_a_real_session_and_generate_continues(service, smollm2, long_text):
    model, tokenizer = smollm2
    ids = tokenizer(long_text, return_tensors="pt").input_ids[:, :400]
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
    with Client(f"127.0.0.1:{service.port}", spec=ModelSpec.from_model(model)) as client:
        client.save("doc", cache, ids)
        response = client.compact("doc", "attention_matching", ratio=0.25)  # queries from the hosted model
        assert 0 <= response.heldout_attention_error < 0.5
        restored = client.restore(response.session.session_id, model=model)
        assert restored.cache.get_seq_length() == 400
        from compaction.inference import generation_inputs

        prompt = generation_inputs(400, tokenizer(" This License", return_tensors="pt").input_ids)
        with torch.no_grad():
            out = model.generate(prompt, cache=restored.cache, max_new_tokens=12, do_sample=False)
        text = tokenizer.decode(out[0, 400:])
        assert len(text.split()) >= 4, text
        with pytest.raises(errors.InvalidRequest, match="model="):
            client.restore(response.session.session_id)  # a compacted cache needs the model


@pytest.mark.slow
def test_the_hosted_models_reference_queries_are_made_once_per_session_generation(service, smollm2, long_text):
    """A second compaction of the same session (another method and ratio) reuses the queries the
    hosted model made for the first; an append makes new ones; cached queries give the same
    result as freshly made ones."""
    from compaction.references import ReferenceCache

    model, tokenizer = smollm2
    ids = tokenizer(long_text, return_tensors="pt").input_ids[:, :300]
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
    references = service.frontend.servicer.references
    with Client(f"127.0.0.1:{service.port}", spec=ModelSpec.from_model(model)) as client:
        client.save("doc", cache, ids)
        client.compact("doc", "snapkv", ratio=0.5, target_session_id="doc-a")
        assert (references.hits, references.misses) == (0, 1)
        client.compact("doc", "tova", ratio=0.25)
        client.compact("doc", "snapkv", ratio=0.5, target_session_id="doc-b")
        assert (references.hits, references.misses) == (2, 1)
        a, b = client.restore("doc-a", model=model), client.restore("doc-b", model=model)
        service.frontend.servicer.references = ReferenceCache(1 << 30)  # made afresh for the next one
        client.compact("doc", "snapkv", ratio=0.5, target_session_id="doc-c")
        c = client.restore("doc-c", model=model)
        for (ka, va), (kb, vb), (kc, vc) in zip(a.layers, b.layers, c.layers):
            assert torch.equal(ka, kb) and torch.equal(va, vb) and torch.equal(ka, kc) and torch.equal(va, vc)
        with torch.no_grad():
            grown = model(torch.cat([ids, ids[:, :20]], 1), use_cache=True).cache
        client.append("doc", grown, ids[0, :20])
        client.compact("doc", "snapkv", ratio=0.5, target_session_id="doc-d")
        assert service.frontend.servicer.references.misses == 2  # the appended session: new queries


# ---------------------------------------------------------------------------- streamed references
def test_references_larger_than_a_message_are_streamed_and_give_the_inline_result(client, toy, service):
    """The service takes 8 MiB messages; 9.4 MiB of reference queries go by CompactStream in
    2 MiB pieces and compact exactly as the same queries sent inline (a smaller copy) would."""
    big = toy_queries(n=12_800)  # 4 layers x [6, 12800, 8] float32 = 9.8 MB
    with pytest.raises(grpc.RpcError) as info:  # inline, the same request is over the limit
        client._stub.Compact(_inline_request(client, big), **client._call)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    streamed = client.compact("ctx", "attention_matching", ratio=0.25, queries=big, target_session_id="streamed")
    assert streamed.session.labels["compaction"] == "attention_matching"
    small = [q[:, :2000] for q in big]
    inline = client.compact("ctx", "attention_matching", ratio=0.25, queries=small, target_session_id="inline")
    again = client.compact("ctx", "attention_matching", ratio=0.25, queries=small + [], target_session_id="inline-again")
    a, b = client.restore("inline", build_cache=False), client.restore("inline-again", build_cache=False)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a.layers, b.layers))  # deterministic: the comparison below means something
    from kvmem.reference_stream import reference_parts
    from kvmem.v1 import kvmem_pb2 as pb

    request = pb.CompactRequest(tenant=client.tenant, session_id="ctx", method="attention_matching", ratio=0.25, target_session_id="small-streamed")
    parts = [pb.CompactStreamRequest(request=request)] + [pb.CompactStreamRequest(references=p) for p in reference_parts(small, False, 100_000)]
    assert len(parts) > 1 + L  # several pieces per layer
    _stream(client, parts)
    c = client.restore("small-streamed", build_cache=False)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a.layers, c.layers))
    assert all(torch.equal(x, y) for x, y in zip(a.bias, c.bias))


def _stream(client, messages):
    """CompactStream with the client's errors (kvmem exceptions, not raw gRPC ones)."""
    from kvmem.status import from_rpc_error

    try:
        return client._stub.CompactStream(iter(messages), **client._call)
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from None


def _inline_request(client, queries):
    from kvmem.v1 import kvmem_pb2 as pb

    request = pb.CompactRequest(tenant=client.tenant, session_id="ctx", method="attention_matching", ratio=0.25, target_session_id="inline-big")
    request.queries.num_query_heads, request.queries.num_queries = queries[0].shape[0], queries[0].shape[1]
    request.queries.layers.extend(q.contiguous().numpy().tobytes() for q in queries)
    return request


STREAM_BAD = {
    "a layer missing": (lambda parts: [p for p in parts if p.layer != 2], "cover layers 0, 1, 3"),
    "a piece twice": (lambda parts: parts + parts[:1], "expected"),
    "a gap": (lambda parts: parts[1:], "starts at query 20, expected 0"),
    "wrong bytes": (lambda parts: [parts[0].__class__(layer=0, num_query_heads=6, num_queries=10, data=b"\0" * 12)] + parts[1:], "bytes, expected"),
    "heads not grouped": (lambda parts: [parts[0].__class__(layer=p.layer, num_query_heads=4, num_queries=p.num_queries, query_start=p.query_start,
                                                             data=p.data[: 4 * p.num_queries * D * 4]) for p in parts], "multiple of 3"),
    "no queries": (lambda parts: [parts[0].__class__(layer=0, num_query_heads=6, num_queries=0)], "no queries"),
}


@pytest.mark.parametrize("case", sorted(STREAM_BAD))
def test_bad_streamed_references_are_invalid_and_store_nothing(client, toy, case):
    from kvmem.reference_stream import reference_parts
    from kvmem.v1 import kvmem_pb2 as pb

    change, message = STREAM_BAD[case]
    parts = change(list(reference_parts(toy_queries(n=40), False, 6 * 20 * D * 4)))  # two pieces per layer
    request = pb.CompactRequest(tenant=client.tenant, session_id="ctx", method="attention_matching", ratio=0.25)
    before = client.stats()
    with pytest.raises(errors.InvalidRequest) as info:
        _stream(client, [pb.CompactStreamRequest(request=request)] + [pb.CompactStreamRequest(references=p) for p in parts])
    assert message in str(info.value), str(info.value)
    after = client.stats()
    assert (after.sessions, after.stored_bytes) == (before.sessions, before.stored_bytes)


def test_streamed_references_past_the_servers_bound_are_resource_exhausted(start_service):
    from kvmem.reference_stream import reference_parts
    from kvmem.v1 import kvmem_pb2 as pb

    service = start_service(server={"max_reference_bytes": 4096})
    with Client(f"127.0.0.1:{service.port}", spec=TOY_SPEC) as small:
        small.save("ctx", random_layers(TOY_SPEC, 120, seed=3), list(range(120)))
        request = pb.CompactRequest(tenant=small.tenant, session_id="ctx", method="attention_matching", ratio=0.25)
        parts = [pb.CompactStreamRequest(references=p) for p in reference_parts(toy_queries(n=40), False, 1 << 20)]
        with pytest.raises(errors.KvmemError) as info:
            _stream(small, [pb.CompactStreamRequest(request=request)] + parts)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_reference_bytes" in str(info.value)
        assert [s.session_id for s in small.list()] == ["ctx"]
