"""The real gRPC server on 127.0.0.1, spoken to only through gRPC."""

from __future__ import annotations

import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ttmm_vllm.client import TTMMClient, routing_options, sampling_options
from ttmm_vllm.stubs import SERVICE_NAME, pb2

TOPIC_PROMPTS = [
    "guitar piano melody chord the band song singer lyric",
    "rocket telescope orbit moon the planet star galaxy comet",
    "dough oven butter garlic the salt recipe chef spice",
    "striker goal keeper league the match referee penalty",
]
LOGPROB_TOL = 2e-3  # see tests/serve/test_engine.py


def _ids_weights(routing: pb2.Routing):
    return [e.expert_id for e in routing.experts], [e.weight for e in routing.experts]


def test_health_and_reflection(target):
    with grpc.insecure_channel(target) as ch:
        h = health_pb2_grpc.HealthStub(ch)
        for name in ("", SERVICE_NAME):
            resp = h.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        r = reflection_pb2_grpc.ServerReflectionStub(ch)
        reqs = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        names = {s.name for resp in r.ServerReflectionInfo(reqs, timeout=10)
                 for s in resp.list_services_response.service}
        assert SERVICE_NAME in names and "grpc.health.v1.Health" in names


def test_sixteen_concurrent_clients_get_the_reference_output(target, reference):
    prompts = [TOPIC_PROMPTS[i % 4] + (" the" * (i // 4)) for i in range(16)]

    def one(i):
        with TTMMClient(target) as c:
            return c.generate(prompts[i], max_tokens=10, max_active=1 + i % 3, timeout=120)

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, range(16)))
    tops = set()
    for i, resp in enumerate(responses):
        ids, ws = _ids_weights(resp.routing)
        assert ids and abs(sum(ws) - 1) < 1e-5
        tops.add(ids[int(np.argmax(ws))])
        prompt_ids = reference.tokenizer(prompts[i], add_special_tokens=False)["input_ids"]
        want = reference.greedy(prompt_ids, 10, ids, ws)
        assert list(resp.token_ids) == want, f"client {i}, routing {ids} {ws}"
        assert resp.completion_tokens == 10 and resp.prompt_tokens == len(prompt_ids)
        assert resp.finish_reason == pb2.FINISH_REASON_LENGTH
        # vLLM holds back a trailing incomplete UTF-8 sequence (random tiny-model bytes)
        assert resp.text == reference.tokenizer.decode(want).rstrip("\ufffd")
        assert resp.timings.total_ms > 0 and resp.timings.embed_ms > 0
        assert all(e.title for e in resp.routing.experts)
    assert len(tops) == 4  # prompts routed to different experts


def test_stream_yields_the_unary_tokens(client):
    kw = dict(max_tokens=12, logprobs=True)
    unary = client.generate(TOPIC_PROMPTS[1], **kw)
    chunks = list(client.stream(TOPIC_PROMPTS[1], **kw))
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert "".join(c.text for c in chunks) == unary.text
    assert chunks[0].routing.experts and not chunks[-1].HasField("routing") or len(chunks) == 1
    assert chunks[-1].finish_reason == pb2.FINISH_REASON_LENGTH
    np.testing.assert_allclose([x for c in chunks for x in c.logprobs], unary.logprobs,
                               atol=1e-5)


def test_score_matches_the_reference(client, reference):
    cont = " the planet and the star and the galaxy with the comet"
    resp = client.score(TOPIC_PROMPTS[1], cont)
    ids, ws = _ids_weights(resp.routing)
    p = reference.tokenizer(TOPIC_PROMPTS[1], add_special_tokens=False)["input_ids"]
    c = reference.tokenizer(cont, add_special_tokens=False)["input_ids"]
    assert list(resp.token_ids) == c
    want = reference.logprobs(p + c, len(p), ids, ws)
    np.testing.assert_allclose(resp.logprobs, want, atol=LOGPROB_TOL)
    assert resp.perplexity == pytest.approx(np.exp(-np.mean(want)), rel=1e-2)


def test_route_and_modes(client):
    r = client.route(TOPIC_PROMPTS[2]).routing
    assert r.experts and r.experts[0].title == "cooking" or \
        max(r.experts, key=lambda e: e.weight).title == "cooking"
    top1 = client.route(TOPIC_PROMPTS[2], routing_options("top1")).routing
    assert len(top1.experts) == 1 and top1.experts[0].weight == pytest.approx(1)
    uni = client.route(TOPIC_PROMPTS[2], routing_options("uniform", max_active=3)).routing
    assert [e.weight for e in uni.experts] == pytest.approx([1 / 3] * 3)
    base = client.generate(TOPIC_PROMPTS[2], routing=routing_options("base"),
                           sampling=sampling_options(max_tokens=4))
    assert not base.routing.experts and len(base.token_ids) == 4


def test_list_experts(client):
    resp = client.list_experts()
    assert sorted(e.title for e in resp.experts) == ["cooking", "football", "music", "space"]
    assert resp.query_tokens > 0


def _chat_request(messages, max_tokens: int = 8, **kw) -> pb2.GenerateRequest:
    return pb2.GenerateRequest(
        messages=[pb2.ChatMessage(role=r, content=c) for r, c in messages],
        sampling=sampling_options(max_tokens=max_tokens), **kw)


def test_messages_are_templated_and_route_on_the_last_user_turn(client, reference):
    chat = [("system", TOPIC_PROMPTS[0]), ("user", TOPIC_PROMPTS[3]),
            ("assistant", "the goal"), ("user", TOPIC_PROMPTS[1])]
    resp = client.stub.Generate(_chat_request(chat), timeout=60)
    ids, ws = _ids_weights(resp.routing)
    assert ids == _ids_weights(client.route(TOPIC_PROMPTS[1]).routing)[0]
    assert max(resp.routing.experts, key=lambda e: e.weight).title == "space"
    text = reference.tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in chat], tokenize=False,
        add_generation_prompt=True)
    prompt_ids = reference.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert resp.prompt_tokens == len(prompt_ids)
    assert list(resp.token_ids) == reference.greedy(prompt_ids, 8, ids, ws)
    chunks = list(client.stub.GenerateStream(_chat_request(chat), timeout=60))
    assert [t for c in chunks for t in c.token_ids] == list(resp.token_ids)


@pytest.mark.parametrize("messages, prompt, field", [
    ([("wizard", "the band")], "", "messages[0].role"),
    ([("system", "the band")], "", "messages"),
    ([("user", "  ")], "", "messages[0].content"),
    ([("user", "the band")], "the band", "messages"),
])
def test_invalid_messages_name_the_field(client, messages, prompt, field):
    with pytest.raises(grpc.RpcError) as e:
        client.stub.Generate(_chat_request(messages, prompt=prompt), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(f"{field}:")


@pytest.mark.parametrize("kwargs, field", [
    (dict(prompt="   "), "prompt"),
    (dict(prompt="x " * 400), "prompt"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-5), "max_tokens"),
    (dict(max_tokens=10_000), "max_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-7), "top_k"),
    (dict(beta=0.0), "beta"),
    (dict(tau=1.5), "tau"),
    (dict(max_active=0), "max_active"),
    (dict(experts=[99]), "experts"),
    (dict(experts=[0, 0]), "experts"),
    (dict(experts=list(range(100))), "experts"),
    (dict(experts=[0, 1], expert_weights=[1.0, float("nan")]), "expert_weights"),
    (dict(experts=[0, 1], expert_weights=[1.0, -1.0]), "expert_weights"),
    (dict(experts=[0, 1], expert_weights=[1.0]), "expert_weights"),
])
def test_invalid_arguments_name_the_field(client, kwargs, field):
    prompt = kwargs.pop("prompt", TOPIC_PROMPTS[0])
    with pytest.raises(grpc.RpcError) as e:
        client.generate(prompt, timeout=30, **kwargs)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details()
    assert len(client.generate(TOPIC_PROMPTS[0], max_tokens=2).token_ids) == 2  # still serving


def test_non_utf8_bytes_are_invalid_argument(target):
    with grpc.insecure_channel(target) as ch:
        call = ch.unary_unary(f"/{SERVICE_NAME}/Generate")
        bad = b"\x0a\x03\xff\xfe\xfd"  # field 1 (prompt), 3 bytes, not UTF-8
        with pytest.raises(grpc.RpcError) as e:
            call(bad, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "UTF-8" in e.value.details()


def test_cancelled_stream_frees_its_adapter(client, server):
    registry = server.service.engine.registry
    stream = client.stream(TOPIC_PROMPTS[3], max_tokens=200, beta=0.7, max_active=3)
    next(stream)
    assert registry.in_use >= 1
    stream.cancel()
    deadline = time.time() + 10
    while registry.in_use and time.time() < deadline:
        time.sleep(0.05)
    assert registry.in_use == 0


def test_deadline_exceeded_frees_its_adapter(client, server):
    registry = server.service.engine.registry
    with pytest.raises(grpc.RpcError) as e:
        client.generate(TOPIC_PROMPTS[0], max_tokens=240, beta=0.9, max_active=2, timeout=0.1)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.time() + 10
    while registry.in_use and time.time() < deadline:
        time.sleep(0.05)
    assert registry.in_use == 0


def test_prometheus_endpoint(client, server):
    client.generate(TOPIC_PROMPTS[0], max_tokens=2)
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics",
                                  timeout=10).read().decode()
    for stage in ("embed", "search", "merge", "register", "queue", "generate"):
        assert f'ttmm_stage_seconds_count{{stage="{stage}"}}' in body
    assert 'ttmm_adapters{state="registered"}' in body


# ---- re-routing during generation (issue 11): a prompt that drifts from music to space

DRIFT_PROMPT = " ".join([TOPIC_PROMPTS[0]] * 4 + [TOPIC_PROMPTS[1]] * 4)


def _schedule(first: pb2.Routing, switches, every: int, total: int):
    """(start, end, expert ids, weights) per segment: the routing in force at each start."""
    at = {s.token_index: s.routing for s in switches}
    segments, routing = [], first
    for start in range(0, total, every):
        routing = at.get(start, routing)
        segments.append((start, min(start + every, total), *_ids_weights(routing)))
    return segments


def test_rerouting_switches_experts_and_matches_the_reference(client, reference):
    every, total = 8, 16  # 8: the least reroute_every a request may ask (ServiceConfig)
    resp = client.generate(DRIFT_PROMPT, max_tokens=total, reroute_every=every, timeout=120)
    assert resp.completion_tokens == total and resp.finish_reason == pb2.FINISH_REASON_LENGTH
    assert resp.switches, "the prompt's tail is about space, its head about music"
    assert all(s.token_index % every == 0 and 0 < s.token_index < total for s in resp.switches)
    first_top = max(resp.routing.experts, key=lambda e: e.weight).title
    switched_top = max(resp.switches[0].routing.experts, key=lambda e: e.weight).title
    assert (first_top, switched_top) == ("music", "space")
    ids = reference.tokenizer(DRIFT_PROMPT, add_special_tokens=False)["input_ids"]
    want: list[int] = []
    for start, end, experts, weights in _schedule(resp.routing, resp.switches, every, total):
        want += reference.greedy(ids + want, end - start, experts, weights)
    assert list(resp.token_ids) == want
    chunks = list(client.stream(DRIFT_PROMPT, max_tokens=total, reroute_every=every))
    assert [t for c in chunks for t in c.token_ids] == want
    assert [s.token_index for c in chunks for s in c.switches] == \
        [s.token_index for s in resp.switches]


def test_rerouted_score_matches_the_reference_window_by_window(client, reference):
    cont = " ".join([TOPIC_PROMPTS[1]] * 3)
    every = 8
    resp = client.score(TOPIC_PROMPTS[0], cont, routing_options(reroute_every=every))
    once = client.score(TOPIC_PROMPTS[0], cont)
    assert resp.switches and not once.switches
    p = reference.tokenizer(TOPIC_PROMPTS[0], add_special_tokens=False)["input_ids"]
    c = list(resp.token_ids)
    want: list[float] = []
    for start, end, experts, weights in _schedule(resp.routing, resp.switches, every, len(c)):
        want += reference.logprobs(p + c[:end], len(p) + start, experts, weights)
    np.testing.assert_allclose(resp.logprobs, want, atol=LOGPROB_TOL)
    # the first window is scored under the prompt's routing, as without re-routing; the
    # window after the first switch is not
    np.testing.assert_allclose(resp.logprobs[:every], once.logprobs[:every], atol=LOGPROB_TOL)
    k = resp.switches[0].token_index
    assert not np.allclose(resp.logprobs[k:k + every], once.logprobs[k:k + every], atol=1e-3)


def test_rerouting_needs_routed_experts(client):
    for routing in (routing_options("base", reroute_every=4),
                    routing_options(experts=[0], reroute_every=4)):
        with pytest.raises(grpc.RpcError) as e:
            client.generate(TOPIC_PROMPTS[0], max_tokens=4, routing=routing)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "reroute_every" in e.value.details()
