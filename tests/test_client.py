"""The Python clients (ttmm_vllm/client.py): the request builders they share, and every call
of the sync and the asyncio client against the real session server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import inspect
import math
import socket

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ttmm_vllm import testing as tiny
from ttmm_vllm.client import (
    MODES,
    AsyncClient,
    TTMMClient,
    generate_request,
    routing_options,
    sampling_options,
)
from ttmm_vllm.stubs import pb2

PROMPT = {t: " ".join(words[:9]) for t, words in tiny.TOPICS.items()}
GREEDY = dict(max_tokens=10, temperature=0.0)


def _top_title(routing: pb2.Routing) -> str:
    return max(routing.experts, key=lambda e: e.weight).title


# ------------------------------------------------------------------ the option helpers

def test_routing_options_leaves_unset_fields_unset():
    r = routing_options()
    assert r.mode == pb2.ROUTING_MODE_UNSPECIFIED
    for name in ("beta", "tau", "max_active", "reroute_every"):
        assert not r.HasField(name), name
    assert list(r.experts) == [] and list(r.expert_weights) == []


def test_routing_options_sends_zeros_it_is_given():
    """tau=0 and reroute_every=0 mean something (no pruning, never re-route): they travel."""
    r = routing_options("uniform", beta=0.25, tau=0.0, max_active=2, experts=[3, 1],
                        expert_weights=[0.25, 0.75], reroute_every=0)
    assert r.mode == pb2.ROUTING_MODE_UNIFORM
    assert r.HasField("tau") and r.tau == 0.0 and r.HasField("reroute_every")
    assert (r.beta, r.max_active, r.reroute_every) == (0.25, 2, 0)
    assert list(r.experts) == [3, 1] and list(r.expert_weights) == [0.25, 0.75]


def test_every_mode_name_maps_to_its_enum_and_others_are_refused():
    assert {name: routing_options(name).mode for name in MODES} == {
        "ttmm": pb2.ROUTING_MODE_TTMM, "base": pb2.ROUTING_MODE_BASE,
        "top1": pb2.ROUTING_MODE_TOP1, "uniform": pb2.ROUTING_MODE_UNIFORM}
    with pytest.raises(KeyError):
        routing_options("mixture")


# floats that a proto float (32 bits) holds exactly
f32 = st.floats(width=32, allow_nan=False)
maybe = st.none


@given(max_tokens=st.one_of(maybe(), st.integers(-2**31, 2**31 - 1)),
       temperature=st.one_of(maybe(), f32), top_p=st.one_of(maybe(), f32),
       top_k=st.one_of(maybe(), st.integers(-2**31, 2**31 - 1)),
       seed=st.one_of(maybe(), st.integers(-2**63, 2**63 - 1)),
       stop=st.lists(st.text(max_size=5), max_size=3), logprobs=st.booleans())
def test_sampling_options_sets_exactly_what_is_given(max_tokens, temperature, top_p, top_k,
                                                     seed, stop, logprobs):
    s = sampling_options(max_tokens, temperature, top_p, top_k, seed, stop, logprobs)
    given_ = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                  seed=seed)
    for name, value in given_.items():
        assert s.HasField(name) == (value is not None), name
        if value is not None:
            assert getattr(s, name) == value, name
    assert list(s.stop) == stop
    assert s.HasField("logprobs") == logprobs and s.logprobs == int(logprobs)
    assert pb2.SamplingOptions.FromString(s.SerializeToString()) == s


@given(beta=st.one_of(maybe(), f32), tau=st.one_of(maybe(), f32),
       max_active=st.one_of(maybe(), st.integers(0, 2**32 - 1)),
       reroute_every=st.one_of(maybe(), st.integers(0, 2**32 - 1)),
       experts=st.lists(st.integers(0, 2**32 - 1), max_size=4),
       mode=st.sampled_from([None, *MODES]))
def test_routing_options_sets_exactly_what_is_given(beta, tau, max_active, reroute_every,
                                                    experts, mode):
    r = routing_options(mode, beta=beta, tau=tau, max_active=max_active, experts=experts,
                        reroute_every=reroute_every)
    for name, value in dict(beta=beta, tau=tau, max_active=max_active,
                            reroute_every=reroute_every).items():
        assert r.HasField(name) == (value is not None), name
        if value is not None:
            assert getattr(r, name) == value, name
    assert list(r.experts) == experts
    assert r.mode == (MODES[mode] if mode else pb2.ROUTING_MODE_UNSPECIFIED)


def test_generate_request_splits_keywords_between_sampling_and_routing():
    """The one builder both clients send generate/stream requests with."""
    req = generate_request("p", request_id="r", max_tokens=3, stop=["."], mode="top1",
                           max_active=2)
    assert req == pb2.GenerateRequest(prompt="p", request_id="r",
                                      sampling=sampling_options(max_tokens=3, stop=["."]),
                                      routing=routing_options("top1", max_active=2))
    with pytest.raises(TypeError, match=r"unexpected arguments \['beta'\]"):
        generate_request("p", routing=routing_options(), beta=0.5)


# ------------------------------------------------------------------ calls on the real server

def test_generate_with_keyword_options_equals_explicit_messages(client):
    by_kw = client.generate(PROMPT["music"], mode="top1", request_id="kw-1", **GREEDY)
    explicit = client.generate(PROMPT["music"], sampling=sampling_options(**GREEDY),
                               routing=routing_options("top1"))
    assert by_kw.request_id == "kw-1" and explicit.request_id not in ("", "kw-1")
    assert len(by_kw.token_ids) == 10 and by_kw.completion_tokens == 10
    assert by_kw.finish_reason == pb2.FINISH_REASON_LENGTH
    assert list(by_kw.token_ids) == list(explicit.token_ids) and by_kw.text == explicit.text
    assert [e.expert_id for e in by_kw.routing.experts] == \
        [e.expert_id for e in explicit.routing.experts]
    assert len(by_kw.routing.experts) == 1 and _top_title(by_kw.routing) == "music"


def test_generate_refuses_keywords_beside_an_explicit_routing(client):
    with pytest.raises(TypeError, match=r"unexpected arguments \['beta', 'max_active'\]"):
        client.generate(PROMPT["music"], routing=routing_options("top1"), beta=0.5,
                        max_active=2)


def test_stream_chunks_add_up_to_the_unary_answer(client):
    unary = client.generate(PROMPT["space"], **GREEDY)
    chunks = list(client.stream(PROMPT["space"], **GREEDY))
    assert len(chunks) > 1
    assert "".join(c.text for c in chunks) == unary.text and unary.text
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert chunks[0].HasField("routing") and _top_title(chunks[0].routing) == "space"
    assert not any(c.HasField("routing") for c in chunks[1:])
    assert chunks[-1].finish_reason == pb2.FINISH_REASON_LENGTH
    assert [c.completion_tokens for c in chunks] == \
        sorted(c.completion_tokens for c in chunks)
    assert chunks[-1].completion_tokens == 10


def test_route_answers_without_generating(client):
    resp = client.route(PROMPT["cooking"])
    assert _top_title(resp.routing) == "cooking"
    assert math.fsum(e.weight for e in resp.routing.experts) == pytest.approx(1, abs=1e-6)
    assert 1 <= len(resp.routing.experts) <= 3
    assert resp.timings.embed_ms > 0 and resp.timings.generate_ms == 0
    base = client.route(PROMPT["cooking"], routing_options("base"))
    assert base.routing.mode == pb2.ROUTING_MODE_BASE and not base.routing.experts
    two = client.route(PROMPT["cooking"], routing_options(experts=[1, 3],
                                                          expert_weights=[1, 3]))
    assert {e.expert_id: e.weight for e in two.routing.experts} == \
        pytest.approx({1: 0.25, 3: 0.75})


def test_score_by_text_equals_score_by_token_ids(client, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)  # the server's tokenizer
    prompt, continuation = PROMPT["football"], " the goal and the match"
    by_text = client.score(prompt, continuation)
    cont_ids = tok(continuation, add_special_tokens=False)["input_ids"]
    assert list(by_text.token_ids) == cont_ids and len(by_text.logprobs) == len(cont_ids)
    assert all(lp <= 0 for lp in by_text.logprobs)
    assert by_text.total_logprob == pytest.approx(math.fsum(by_text.logprobs), abs=1e-4)
    assert by_text.perplexity == pytest.approx(
        math.exp(-by_text.total_logprob / len(by_text.logprobs)), rel=1e-6)
    assert _top_title(by_text.routing) == "football"
    by_ids = client.score("", "", prompt_token_ids=tok(prompt, add_special_tokens=False)[
        "input_ids"], continuation_token_ids=cont_ids)
    assert list(by_ids.token_ids) == cont_ids
    assert list(by_ids.logprobs) == pytest.approx(list(by_text.logprobs), abs=1e-4)
    assert _top_title(by_ids.routing) == "football"


def test_list_experts_names_the_library(client):
    resp = client.list_experts()
    assert [(e.expert_id, e.title) for e in sorted(resp.experts, key=lambda e: e.expert_id)] \
        == list(enumerate(sorted(tiny.TOPICS)))
    assert {e.rank for e in resp.experts} == {4}
    assert resp.base_model == "tiny-llama" and resp.embedder == "tiny-embedder"
    assert (resp.default_beta, resp.query_tokens) == (pytest.approx(0.05), 32)


def test_wait_ready(target):
    with TTMMClient(target) as c:
        c.wait_ready(timeout=30)  # returns once connected
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here once the socket is closed
    with TTMMClient(f"127.0.0.1:{port}") as c, pytest.raises(grpc.FutureTimeoutError):
        c.wait_ready(timeout=0.5)


def test_the_context_manager_closes_the_channel(target):
    with TTMMClient(target) as c:
        assert c.list_experts(timeout=30).experts
    with pytest.raises(ValueError, match="closed channel"):
        c.list_experts(timeout=5)


def test_a_token_travels_as_bearer_metadata(target):
    with TTMMClient(target, token="s3cret") as c:
        assert c.metadata == (("authorization", "Bearer s3cret"),)
        assert c.list_experts(timeout=30).experts  # a server without tokens ignores it
    assert TTMMClient(target).metadata == ()


def test_max_message_bytes_limits_what_the_client_sends(target):
    with TTMMClient(target, max_message_bytes=1024) as c, pytest.raises(grpc.RpcError) as e:
        c.route("the " * 1000, timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# ------------------------------------------------------------------ deadlines

def _code(excinfo: pytest.ExceptionInfo) -> grpc.StatusCode:
    return excinfo.value.code()


def test_unary_calls_get_the_client_default_deadline_and_streams_none(target):
    for cls in (TTMMClient, AsyncClient):
        assert inspect.signature(cls).parameters["timeout"].default == 60.0
    with TTMMClient(target, timeout=1e-4) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.generate(PROMPT["music"], **GREEDY)  # the client's deadline, not given per call
        assert _code(e) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert c.generate(PROMPT["music"], timeout=30, **GREEDY).completion_tokens == 10
        assert c.list_experts(timeout=None).experts  # None: no deadline at all
        chunks = list(c.stream(PROMPT["music"], **GREEDY))  # streams: no default deadline
        assert chunks[-1].completion_tokens == 10
    with TTMMClient(target) as c, pytest.raises(grpc.RpcError) as e:
        c.generate(PROMPT["music"], timeout=1e-4, **GREEDY)
    assert _code(e) == grpc.StatusCode.DEADLINE_EXCEEDED


# ------------------------------------------------------------------ the asyncio client

def test_async_client_answers_as_the_sync_client(client, target):
    """generate, stream, route and score from asyncio (a loop of its own, as a user's program
    has): the same answers as the sync client's."""
    want = client.generate(PROMPT["music"], mode="top1", **GREEDY)
    want_score = client.score(PROMPT["football"], " the goal and the match")

    async def calls():
        async with AsyncClient(target) as c:
            await c.wait_ready(30)
            gen = await c.generate(PROMPT["music"], mode="top1", request_id="async-1",
                                   **GREEDY)
            chunks = [ch async for ch in c.stream(PROMPT["music"], mode="top1", **GREEDY)]
            route = await c.route(PROMPT["cooking"])
            score = await c.score(PROMPT["football"], " the goal and the match")
            together = await asyncio.gather(*(c.generate(PROMPT[t], **GREEDY)
                                              for t in sorted(PROMPT)))
            return gen, chunks, route, score, together

    gen, chunks, route, score, together = asyncio.run(calls())
    assert gen.request_id == "async-1" and gen.text == want.text and gen.text
    assert list(gen.token_ids) == list(want.token_ids)
    assert _top_title(gen.routing) == "music" and len(gen.routing.experts) == 1
    assert "".join(ch.text for ch in chunks) == gen.text
    assert [t for ch in chunks for t in ch.token_ids] == list(gen.token_ids)
    assert chunks[0].HasField("routing") and chunks[-1].finish_reason == \
        pb2.FINISH_REASON_LENGTH
    assert _top_title(route.routing) == "cooking"
    assert list(score.token_ids) == list(want_score.token_ids)
    assert list(score.logprobs) == pytest.approx(list(want_score.logprobs), abs=1e-4)
    assert [r.completion_tokens for r in together] == [10] * len(PROMPT)
    assert [_top_title(r.routing) for r in together] == sorted(PROMPT)


def test_async_admin_calls_reach_the_server(target):
    """list_experts answers; add/remove_expert reach the admin check (the session server has
    no admin token, so they are refused there and the shared library stays as it is)."""
    async def calls():
        async with AsyncClient(target, token="not-an-admin") as c:
            listed = await c.list_experts()
            codes = []
            for call in (c.add_expert(99), c.remove_expert(0)):
                try:
                    await call
                except grpc.aio.AioRpcError as e:
                    codes.append(e.code())
            return listed, codes

    listed, codes = asyncio.run(calls())
    assert sorted(e.title for e in listed.experts) == sorted(tiny.TOPICS)
    assert codes == [grpc.StatusCode.PERMISSION_DENIED] * 2


def test_async_client_deadlines(target):
    async def calls():
        codes = []
        async with AsyncClient(target, timeout=1e-4) as c:
            try:
                await c.generate(PROMPT["space"], **GREEDY)  # the client's default deadline
            except grpc.aio.AioRpcError as e:
                codes.append(e.code())
            ok = await c.generate(PROMPT["space"], timeout=30, **GREEDY)
            chunks = [ch async for ch in c.stream(PROMPT["space"], **GREEDY)]  # none
        async with AsyncClient(target) as c:
            try:
                await c.score(PROMPT["space"], " the orbit", timeout=1e-4)
            except grpc.aio.AioRpcError as e:
                codes.append(e.code())
        return codes, ok, chunks

    codes, ok, chunks = asyncio.run(calls())
    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 2
    assert ok.completion_tokens == 10 and chunks[-1].completion_tokens == 10


def test_async_client_closes_its_channel(target):
    async def calls():
        async with AsyncClient(target) as c:
            assert (await c.list_experts()).experts
        with pytest.raises(grpc.aio.UsageError):
            await c.list_experts()

    asyncio.run(calls())
