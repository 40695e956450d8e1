"""The OpenAI-compatible HTTP door, driven with the official `openai` package against the real
server: the session's engine and service (tests/conftest.py), spoken to over HTTP."""

from __future__ import annotations

import json
import re
import ssl
import threading
import time
import types
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

from tests.certs import PKI
from ttmm_vllm.client import routing_options, sampling_options
from ttmm_vllm.serve.access import Access
from ttmm_vllm.serve.grpc_server import ServerConfig
from ttmm_vllm.serve.http_server import (
    MAX_CHAT_TOP_LOGPROBS,
    MAX_COMPLETION_LOGPROBS,
    HttpConfig,
    HttpServer,
    token_form,
)
from ttmm_vllm.serve.launch import ServeConfig, http_config
from ttmm_vllm.serve.metrics import Metrics
from ttmm_vllm.stubs import pb2

TOPIC_PROMPTS = [
    "guitar piano melody chord the band song singer lyric",
    "rocket telescope orbit moon the planet star galaxy comet",
    "dough oven butter garlic the salt recipe chef spice",
    "striker goal keeper league the match referee penalty",
]
TOPICS = ["music", "space", "cooking", "football"]
LOGPROB_TOL = 1e-4  # the same merged weights; only the batch around a request differs


@pytest.fixture(scope="module")
def base_url(server) -> str:
    return f"http://127.0.0.1:{server.http.port}"


@pytest.fixture(scope="module")
def oa(base_url):
    c = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    yield c
    c.close()


def _ttmm(obj) -> dict:
    """The `ttmm` extension field of an openai response object (or chunk, or choice)."""
    return obj.model_extra["ttmm"]


def _experts(routing: dict) -> tuple[list[int], list[float]]:
    return [e["id"] for e in routing["experts"]], [e["weight"] for e in routing["experts"]]


def _pb_experts(routing: pb2.Routing) -> tuple[list[int], list[float]]:
    return [e.expert_id for e in routing.experts], [e.weight for e in routing.experts]


def _top_title(routing: dict) -> str:
    return max(routing["experts"], key=lambda e: e["weight"])["title"]


def _extra_door(loop, server, access: Access, config: HttpConfig | None = None):
    """A second HTTP door on the session's service (no second engine)."""
    return loop.run(HttpServer.start(server.service, config or HttpConfig(port=0), access))


# ----------------------------------------------------------------------------- models


def test_models_list_names_every_routing(oa):
    ids = [m.id for m in oa.models.list().data]
    assert ids == ["ttmm", "ttmm:top1", "ttmm:uniform", "base",
                   "expert-0", "expert-1", "expert-2", "expert-3"]
    card = oa.models.retrieve("expert-2")
    assert card.model_extra["ttmm"]["title"] == "music"  # ids follow the sorted topics


# ----------------------------------------------------------------------------- completions


@pytest.mark.parametrize("model, routing", [
    ("ttmm", routing_options()),
    ("ttmm:top1", routing_options("top1")),
    ("ttmm:uniform", routing_options("uniform")),
    ("base", routing_options("base")),
    ("expert-2", routing_options(experts=[2])),
])
def test_greedy_completion_equals_grpc(oa, client, model, routing):
    prompt = TOPIC_PROMPTS[1]
    resp = oa.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0)
    want = client.generate(prompt, sampling=sampling_options(max_tokens=10),
                                routing=routing)
    choice = resp.choices[0]
    assert choice.text == want.text and choice.text
    assert choice.finish_reason == "length"
    assert resp.usage.completion_tokens == 10 and resp.usage.prompt_tokens == want.prompt_tokens
    ids, ws = _experts(_ttmm(resp)["routing"])
    want_ids, want_ws = _pb_experts(want.routing)
    assert ids == want_ids
    np.testing.assert_allclose(ws, want_ws, rtol=1e-6)
    assert _ttmm(resp)["timings"]["total_ms"] > 0
    if model == "base":
        assert ids == []
    elif model == "expert-2":
        assert ids == [2] and ws == [1.0]


def test_ttmm_extension_overrides_routing(oa, client):
    prompt = TOPIC_PROMPTS[0]
    ext = {"beta": 0.5, "max_active": 2}
    resp = oa.completions.create(model="ttmm", prompt=prompt, max_tokens=6, temperature=0,
                                 extra_body={"ttmm": ext})
    want = client.generate(prompt, max_tokens=6, beta=0.5, max_active=2)
    ids, ws = _experts(_ttmm(resp)["routing"])
    assert ids == _pb_experts(want.routing)[0] and len(ids) == 2
    assert resp.choices[0].text == want.text
    fixed = oa.completions.create(model="ttmm", prompt=prompt, max_tokens=6, temperature=0,
                                  extra_body={"ttmm": {"experts": [1, 3],
                                                       "expert_weights": [0.25, 0.75]}})
    ids, ws = _experts(_ttmm(fixed)["routing"])
    assert ids == [1, 3]
    np.testing.assert_allclose(ws, [0.25, 0.75], atol=1e-6)


def test_a_batch_of_prompts_gets_one_merge_each(oa):
    resp = oa.completions.create(model="ttmm", prompt=TOPIC_PROMPTS, max_tokens=6,
                                 temperature=0)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    tops = [_top_title(_ttmm(c)["routing"]) for c in resp.choices]
    assert tops == TOPICS
    for p, c in zip(TOPIC_PROMPTS, resp.choices, strict=True):
        one = oa.completions.create(model="ttmm", prompt=p, max_tokens=6, temperature=0)
        assert c.text == one.choices[0].text
    assert resp.usage.completion_tokens == 4 * 6


def test_stream_yields_the_unary_text(oa, base_url):
    prompt = TOPIC_PROMPTS[2]
    unary = oa.completions.create(model="ttmm", prompt=prompt, max_tokens=12, temperature=0)
    chunks = list(oa.completions.create(model="ttmm", prompt=prompt, max_tokens=12,
                                        temperature=0, stream=True,
                                        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == unary.choices[0].text
    assert _ttmm(chunks[0])["routing"] == _ttmm(unary)["routing"]
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert "timings" in _ttmm(finals[0])
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices
    # the wire format: server-sent events ending with [DONE]
    with httpx.stream("POST", f"{base_url}/v1/completions", timeout=60,
                      json={"model": "ttmm", "prompt": prompt, "max_tokens": 3,
                            "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith(
            "text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    three = oa.completions.create(model="ttmm", prompt=prompt, max_tokens=3, temperature=0)
    assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]) == \
        three.choices[0].text


def test_echo_logprobs_equal_score(oa, client, server):
    """What lm-eval-harness's loglikelihood tasks send: echo, logprobs, max_tokens 0 or 1."""
    prompt = TOPIC_PROMPTS[1] + " the star and the moon"
    ids = server.service.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    resp = oa.completions.create(model="ttmm", prompt=prompt, max_tokens=0, echo=True,
                                 logprobs=1, temperature=0)
    lp = resp.choices[0].logprobs
    assert resp.choices[0].text == prompt
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    assert "".join(lp.tokens) == prompt
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    # routed on the whole prompt, as a generation from it would be
    routing = _ttmm(resp)["routing"]
    experts, weights = _experts(routing)
    assert experts == _pb_experts(client.route(prompt).routing)[0]
    assert _top_title(routing) == "space"
    want = client.score("", "", routing_options(experts=experts, expert_weights=weights),
                             prompt_token_ids=ids[:1], continuation_token_ids=ids[1:])
    np.testing.assert_allclose(lp.token_logprobs[1:], want.logprobs, atol=LOGPROB_TOL)
    assert all(v < 0 for v in lp.token_logprobs[1:])
    # lm-eval's form: token ids (a batch of one), one generated token after the echo
    lm = oa.completions.create(model="ttmm", prompt=[ids], max_tokens=1, echo=True,
                               logprobs=1, temperature=0, seed=1234)
    lp1 = lm.choices[0].logprobs
    assert len(lp1.token_logprobs) == len(ids) + 1
    np.testing.assert_allclose(lp1.token_logprobs[1:-1], want.logprobs, atol=LOGPROB_TOL)
    # logprobs=1: per token the most likely one and the token itself (one entry or two)
    for top, t, v in zip(lp1.top_logprobs[1:], lp1.tokens[1:], lp1.token_logprobs[1:],
                         strict=True):
        _check_alternatives(top, t, v, 1, greedy=False)


def test_generated_logprobs_equal_grpc(oa, client):
    prompt = TOPIC_PROMPTS[3]
    resp = oa.completions.create(model="ttmm", prompt=prompt, max_tokens=8, temperature=0,
                                 logprobs=0)
    want = client.generate(prompt, max_tokens=8, logprobs=True)
    lp = resp.choices[0].logprobs
    np.testing.assert_allclose(lp.token_logprobs, want.logprobs, atol=1e-5)
    text = b"".join(map(_token_bytes, lp.tokens)).decode("utf-8", "replace")
    assert text.rstrip("\ufffd").startswith(resp.choices[0].text.rstrip("\ufffd"))
    # k = 0: the chosen token alone
    assert all(top == {t: v} for top, t, v in
               zip(lp.top_logprobs, lp.tokens, lp.token_logprobs, strict=True))


def _token_bytes(name: str) -> bytes:
    """A logprobs token name's bytes ("bytes:\\xNN...": a part of a character)."""
    if name.startswith("bytes:"):
        return bytes(int(h, 16) for h in name[len("bytes:"):].split("\\x")[1:])
    return name.encode()


def test_tokens_that_are_parts_of_characters_have_names_of_their_own(server):
    """A byte of a multi-byte character decodes alone to U+FFFD, like every other such byte:
    logprobs name it by its bytes, as OpenAI does, so top_logprobs keys stay distinct."""
    tok = server.service.tokenizer
    forms = [token_form(tok, i) for i in range(len(tok))]
    names = [f.name for f in forms]
    assert len(set(names)) == len(names)
    parts = [f for f in forms if f.name.startswith("bytes:")]
    assert parts and all(f.text == "\ufffd" and _token_bytes(f.name) == f.raw for f in parts)
    euro = tok("price \u20ac", add_special_tokens=False)["input_ids"]  # 3 UTF-8 bytes
    got = b"".join(_token_bytes(token_form(tok, i).name) for i in euro)
    assert got.decode() == "price \u20ac"


def _check_alternatives(top: dict, token: str, value: float, k: int, greedy: bool) -> None:
    """One position's completion top_logprobs: the k most likely (and the chosen), sorted."""
    values = list(top.values())
    assert k <= len(top) <= k + 1, top
    assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
    assert value <= values[0] + 1e-6
    if greedy:  # the chosen token is the most likely one
        assert next(iter(top)) == token and abs(top[token] - value) < 1e-6
    else:
        assert token in top and abs(top[token] - value) < 1e-6


def test_completion_top_logprobs_are_the_k_most_likely(oa, client, server):
    k = 3
    prompt = TOPIC_PROMPTS[2]
    # one expert: the same routing for the echo below (routed on a longer prompt otherwise)
    resp = oa.completions.create(model="expert-1", prompt=prompt, max_tokens=6, temperature=0,
                                 logprobs=k)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.top_logprobs) == 6
    for top, t, v in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs, strict=True):
        _check_alternatives(top, t, v, k, greedy=True)
        assert sum(np.exp(list(top.values()))) <= 1 + 1e-4
    sampled = oa.completions.create(model="expert-1", prompt=prompt, max_tokens=12,
                                    temperature=1.0, seed=7, logprobs=k).choices[0].logprobs
    for top, t, v in zip(sampled.top_logprobs, sampled.tokens, sampled.token_logprobs,
                         strict=True):
        _check_alternatives(top, t, v, k, greedy=False)
    # echo: the prompt's tokens get theirs from the scoring pass (vLLM's prompt_logprobs=k);
    # the generated tokens, echoed as prompt, have the same alternatives as when generated
    ids = server.service.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    gen = list(client.generate(prompt, max_tokens=6, experts=[1]).token_ids)
    echo = oa.completions.create(model="expert-1", prompt=[ids + gen], max_tokens=0, echo=True,
                                 logprobs=k, temperature=0)
    elp = echo.choices[0].logprobs
    assert len(elp.tokens) == len(ids) + len(gen)
    assert elp.top_logprobs[0] is None and elp.token_logprobs[0] is None
    for top, t, v in zip(elp.top_logprobs[1:], elp.tokens[1:], elp.token_logprobs[1:],
                         strict=True):
        _check_alternatives(top, t, v, k, greedy=False)
    assert elp.tokens[len(ids):] == lp.tokens
    for want, got in zip(lp.top_logprobs, elp.top_logprobs[len(ids):], strict=True):
        assert list(got)[:k] == list(want)[:k]
        np.testing.assert_allclose([got[t] for t in want], list(want.values()), atol=1e-3)
    # a stream carries the same alternatives
    chunks = list(oa.completions.create(model="expert-1", prompt=prompt, max_tokens=6,
                                        temperature=0, logprobs=k, stream=True))
    streamed = [top for c in chunks if c.choices and c.choices[0].logprobs
                for top in c.choices[0].logprobs.top_logprobs]
    assert [list(t) for t in streamed] == [list(t) for t in lp.top_logprobs]


# ----------------------------------------------------------------------------- chat

CHAT = [{"role": "system", "content": TOPIC_PROMPTS[0]},
        {"role": "user", "content": TOPIC_PROMPTS[1]}]


def test_chat_equals_grpc_messages_and_routes_on_the_last_user_turn(oa, client):
    resp = oa.chat.completions.create(model="ttmm", messages=CHAT, max_tokens=8,
                                      temperature=0)
    req = pb2.GenerateRequest(
        messages=[pb2.ChatMessage(role=m["role"], content=m["content"]) for m in CHAT],
        sampling=sampling_options(max_tokens=8))
    want = client.stub.Generate(req, timeout=60)
    msg = resp.choices[0].message
    assert msg.role == "assistant" and msg.content == want.text and msg.content
    assert resp.usage.prompt_tokens == want.prompt_tokens
    routing = _ttmm(resp)["routing"]
    assert _experts(routing)[0] == _pb_experts(client.route(CHAT[1]["content"]).routing)[0]
    assert _top_title(routing) == "space"  # the user's turn, not the system's (music)
    chunks = list(oa.chat.completions.create(model="ttmm", messages=CHAT, max_tokens=8,
                                             temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_logprobs(oa, client):
    resp = oa.chat.completions.create(model="ttmm", messages=CHAT, max_tokens=5,
                                      temperature=0, logprobs=True)
    req = pb2.GenerateRequest(
        messages=[pb2.ChatMessage(role=m["role"], content=m["content"]) for m in CHAT],
        sampling=sampling_options(max_tokens=5, logprobs=True))
    want = client.stub.Generate(req, timeout=60)
    got = [c.logprob for c in resp.choices[0].logprobs.content]
    np.testing.assert_allclose(got, want.logprobs, atol=1e-5)
    assert all(c.top_logprobs == [] for c in resp.choices[0].logprobs.content)  # as OpenAI


def test_chat_top_logprobs_are_the_k_most_likely(oa):
    k = 4
    resp = oa.chat.completions.create(model="ttmm", messages=CHAT, max_tokens=5,
                                      temperature=0, logprobs=True, top_logprobs=k)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens == 5
    for c in content:
        tops = c.top_logprobs
        assert len(tops) == k and len({t.token for t in tops}) == k
        values = [t.logprob for t in tops]
        assert values == sorted(values, reverse=True) and values[0] <= 0
        assert tops[0].token == c.token and abs(tops[0].logprob - c.logprob) < 1e-6  # greedy
        assert all(t.bytes == list(_token_bytes(t.token)) for t in tops)
    sampled = oa.chat.completions.create(model="ttmm", messages=CHAT, max_tokens=10,
                                         temperature=1.0, seed=11, logprobs=True,
                                         top_logprobs=k)
    for c in sampled.choices[0].logprobs.content:
        assert len(c.top_logprobs) == k
        assert c.logprob <= c.top_logprobs[0].logprob + 1e-6
        assert c.token in {t.token for t in c.top_logprobs} or \
            c.logprob <= c.top_logprobs[-1].logprob + 1e-6
    # a stream carries the same alternatives
    chunks = list(oa.chat.completions.create(model="ttmm", messages=CHAT, max_tokens=5,
                                             temperature=0, logprobs=True, top_logprobs=k,
                                             stream=True))
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs
                for c in ch.choices[0].logprobs.content]
    assert [[t.token for t in c.top_logprobs] for c in streamed] == \
        [[t.token for t in c.top_logprobs] for c in content]
    np.testing.assert_allclose([[t.logprob for t in c.top_logprobs] for c in streamed],
                               [[t.logprob for t in c.top_logprobs] for c in content],
                               atol=1e-4)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=100_000), "max_tokens"),
    (dict(n=2), "n"),
    (dict(logprobs=50), "logprobs"),
    (dict(logprobs=MAX_COMPLETION_LOGPROBS + 1), "logprobs"),
    (dict(logprobs=-1), "logprobs"),
    (dict(prompt="   "), "prompt"),
    (dict(prompt=[]), "prompt"),
    (dict(prompt=[[10**7]]), "prompt"),
    (dict(temperature="hot"), "temperature"),
    (dict(extra_body={"ttmm": {"beta": 0}}), "ttmm.beta"),
    (dict(extra_body={"ttmm": {"tau": 1.5}}), "ttmm.tau"),
    (dict(extra_body={"ttmm": {"experts": [99]}}), "ttmm.experts"),
    (dict(extra_body={"ttmm": {"experts": [0, 1], "expert_weights": [1.0]}}),
     "ttmm.expert_weights"),
    (dict(extra_body={"ttmm": {"betta": 1.0}}), "ttmm.betta"),
    (dict(model="base", extra_body={"ttmm": {"reroute_every": 4}}), "ttmm.reroute_every"),
])
def test_bad_completion_input_is_400_naming_the_field(oa, kwargs, field):
    kw = dict(model="ttmm", prompt=TOPIC_PROMPTS[0], max_tokens=4) | kwargs
    with pytest.raises(openai.BadRequestError) as e:
        oa.completions.create(**kw)
    assert e.value.status_code == 400
    assert e.value.param == field
    assert e.value.body["message"].startswith(f"{field}:")  # OpenAI's error JSON
    assert e.value.type == "invalid_request_error"
    assert oa.completions.create(model="ttmm", prompt=TOPIC_PROMPTS[0], max_tokens=2,
                                 temperature=0).usage.completion_tokens == 2  # still serving


@pytest.mark.parametrize("messages, field", [
    ([{"role": "wizard", "content": "the band"}], "messages[0].role"),
    ([], "messages"),
    ([{"role": "system", "content": "the band"}], "messages"),
    ([{"role": "user", "content": "   "}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[0].content[0].type"),
])
def test_bad_chat_input_is_400_naming_the_field(oa, messages, field):
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model="ttmm", messages=messages, max_tokens=2)
    assert e.value.param == field


@pytest.mark.parametrize("kwargs", [
    dict(logprobs=True, top_logprobs=MAX_CHAT_TOP_LOGPROBS + 1),
    dict(logprobs=True, top_logprobs=-1),
    dict(top_logprobs=2),  # without logprobs
])
def test_bad_chat_top_logprobs_is_400_naming_the_field(oa, kwargs):
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model="ttmm", messages=CHAT, max_tokens=2, **kwargs)
    assert e.value.status_code == 400 and e.value.param == "top_logprobs"
    assert e.value.body["message"].startswith("top_logprobs:")
    top = oa.chat.completions.create(model="ttmm", messages=CHAT, max_tokens=1, logprobs=True,
                                     top_logprobs=MAX_CHAT_TOP_LOGPROBS)  # the limit is served
    assert len(top.choices[0].logprobs.content[0].top_logprobs) == MAX_CHAT_TOP_LOGPROBS


def test_unknown_model_is_404(oa):
    for model in ("gpt-4", "expert-99", "ttmm:nonsense"):
        with pytest.raises(openai.NotFoundError) as e:
            oa.completions.create(model=model, prompt=TOPIC_PROMPTS[0], max_tokens=2)
        assert e.value.status_code == 404 and e.value.param == "model"
        assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("gpt-4")


def test_auth_tokens_and_client_groups(loop, server):
    access = Access(server.service, tokens={"s3cret": "alice", "b0b": "bob"},
                    client_groups={"alice": ("default",), "bob": ("nothing",)})
    door = _extra_door(loop, server, access)
    url = f"http://127.0.0.1:{door.port}"
    try:
        r = httpx.get(f"{url}/v1/models", timeout=30)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200  # no token needed
        with openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0) as c, \
                pytest.raises(openai.AuthenticationError):
            c.completions.create(model="ttmm", prompt=TOPIC_PROMPTS[0], max_tokens=2)
        with openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0) as alice:
            assert "expert-3" in [m.id for m in alice.models.list().data]
            out = alice.completions.create(model="expert-3", prompt=TOPIC_PROMPTS[0],
                                           max_tokens=3, temperature=0)
            assert _experts(_ttmm(out)["routing"])[0] == [3]
        with openai.OpenAI(base_url=f"{url}/v1", api_key="b0b", max_retries=0) as bob:
            assert [m.id for m in bob.models.list().data] == \
                ["ttmm", "ttmm:top1", "ttmm:uniform", "base"]
            with pytest.raises(openai.PermissionDeniedError) as e:
                bob.completions.create(model="expert-1", prompt=TOPIC_PROMPTS[0], max_tokens=2)
            assert e.value.status_code == 403
            with pytest.raises(openai.PermissionDeniedError):
                bob.chat.completions.create(model="ttmm", messages=CHAT, max_tokens=2,
                                            extra_body={"ttmm": {"experts": [1]}})
            # bob's unknown expert looks like a forbidden one (no probing which ids exist)
            with pytest.raises(openai.PermissionDeniedError):
                bob.completions.create(model="expert-99", prompt=TOPIC_PROMPTS[0], max_tokens=2)
    finally:
        loop.run(door.stop())


# ----------------------------------------------------------------------------- TLS


def _tls_context(pki: PKI, tmp_path, cn: str | None = None) -> ssl.SSLContext:
    """A client's TLS context trusting the test CA; with `cn`, presenting its certificate."""
    ctx = ssl.create_default_context(cafile=pki.ca_file)
    if cn is not None:
        key, cert = pki.client(cn)
        (tmp_path / f"{cn}.key").write_bytes(key)
        (tmp_path / f"{cn}.pem").write_bytes(cert)
        ctx.load_cert_chain(tmp_path / f"{cn}.pem", tmp_path / f"{cn}.key")
    return ctx


def _openai(url: str, verify) -> openai.OpenAI:
    """An OpenAI client whose httpx client verifies with `verify` (a CA file or context)."""
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60,
                         http_client=httpx.Client(verify=verify, timeout=60))


def test_https_door_serves_the_grpc_certificate(loop, server, tmp_path):
    pki = PKI(tmp_path / "pki")
    door = _extra_door(loop, server, Access(server.service),
                       HttpConfig(port=0, tls_cert=pki.server_cert, tls_key=pki.server_key))
    try:
        for host in ("127.0.0.1", "localhost"):  # both in the certificate
            with _openai(f"https://{host}:{door.port}", pki.ca_file) as c:
                out = c.completions.create(model="ttmm", prompt=TOPIC_PROMPTS[0],
                                           max_tokens=3, temperature=0)
                assert out.usage.completion_tokens == 3
                assert [m.id for m in c.models.list().data][:4] == \
                    ["ttmm", "ttmm:top1", "ttmm:uniform", "base"]
        # plain HTTP to the TLS port: no answer
        with _openai(f"http://127.0.0.1:{door.port}", True) as c, \
                pytest.raises(openai.APIConnectionError):
            c.models.list()
        # a client that does not trust the certificate's CA refuses the server
        with _openai(f"https://127.0.0.1:{door.port}", True) as c, \
                pytest.raises(openai.APIConnectionError):
            c.models.list()
        assert httpx.get(f"https://127.0.0.1:{door.port}/health", verify=_tls_context(
            pki, tmp_path), timeout=30).json() == {"status": "ok"}
    finally:
        loop.run(door.stop())


def test_mutual_tls_door_requires_a_client_certificate(loop, server, tmp_path):
    pki = PKI(tmp_path / "pki")
    access = Access(server.service, client_groups={"alice": ("default",), "bob": ("nothing",)})
    door = _extra_door(loop, server, access, HttpConfig(
        port=0, tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca_file))
    url = f"https://localhost:{door.port}"
    try:
        with _openai(url, _tls_context(pki, tmp_path)) as c, \
                pytest.raises(openai.APIConnectionError):
            c.models.list()  # no client certificate: the handshake is refused
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/health", verify=_tls_context(pki, tmp_path), timeout=30)
        other = PKI(tmp_path / "other")  # a certificate another CA signed
        ctx = _tls_context(pki, tmp_path)
        key, cert = other.client("alice")
        (tmp_path / "mallory.key").write_bytes(key)
        (tmp_path / "mallory.pem").write_bytes(cert)
        ctx.load_cert_chain(tmp_path / "mallory.pem", tmp_path / "mallory.key")
        with _openai(url, ctx) as c, pytest.raises(openai.APIConnectionError):
            c.models.list()
        with _openai(url, _tls_context(pki, tmp_path, "alice")) as alice:
            assert "expert-3" in [m.id for m in alice.models.list().data]
            out = alice.completions.create(model="expert-3", prompt=TOPIC_PROMPTS[0],
                                           max_tokens=3, temperature=0)
            assert _experts(_ttmm(out)["routing"])[0] == [3]
        # the certificate's common name is the identity, as at the gRPC door: bob's groups
        with _openai(url, _tls_context(pki, tmp_path, "bob")) as bob:
            assert [m.id for m in bob.models.list().data] == \
                ["ttmm", "ttmm:top1", "ttmm:uniform", "base"]
            with pytest.raises(openai.PermissionDeniedError):
                bob.completions.create(model="expert-1", prompt=TOPIC_PROMPTS[0], max_tokens=2)
    finally:
        loop.run(door.stop())


def test_http_door_takes_the_grpc_tls_settings(tmp_path):
    pki = PKI(tmp_path / "pki")
    tls = dict(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca_file)
    got = http_config(ServeConfig(library="lib", server=ServerConfig(port=0, **tls),
                                  http=HttpConfig(port=0)))
    assert (got.tls_cert, got.tls_key, got.tls_client_ca) == tuple(tls.values())
    assert got.scheme == "https"
    plain = http_config(ServeConfig(library="lib", http=HttpConfig(port=0)))
    assert plain.tls_cert is None and plain.scheme == "http"
    assert http_config(ServeConfig(library="lib", server=ServerConfig(port=0, **tls))) is None
    with pytest.raises(ValueError, match="--tls-key"):
        HttpConfig(tls_cert=pki.server_cert)
    with pytest.raises(ValueError, match="--tls-client-ca"):
        HttpConfig(tls_client_ca=pki.ca_file)


def test_unreadable_tls_files_fail_the_start(loop, server, tmp_path):
    with pytest.raises(OSError, match="cannot serve HTTPS"):
        _extra_door(loop, server, Access(server.service),
                    HttpConfig(port=0, tls_cert=str(tmp_path / "missing.pem"),
                               tls_key=str(tmp_path / "missing.key")))


def test_admission_full_is_429_and_draining_is_503(loop, server):
    full = _extra_door(loop, server, Access(server.service, max_inflight=0))
    try:
        with openai.OpenAI(base_url=f"http://127.0.0.1:{full.port}/v1", api_key="x",
                           max_retries=0) as c:
            with pytest.raises(openai.RateLimitError) as e:
                c.completions.create(model="ttmm", prompt=TOPIC_PROMPTS[0], max_tokens=2)
            assert e.value.status_code == 429
            with pytest.raises(openai.RateLimitError):
                c.chat.completions.create(model="ttmm", messages=CHAT, max_tokens=2,
                                          stream=True)
            full.access.admission.closed = True
            with pytest.raises(openai.APIStatusError) as e:
                c.completions.create(model="ttmm", prompt=TOPIC_PROMPTS[0], max_tokens=2)
            assert e.value.status_code == 503
        assert httpx.get(f"http://127.0.0.1:{full.port}/health", timeout=30).status_code == 503
    finally:
        loop.run(full.stop())


def test_health_is_503_when_the_engine_is_not_running(loop, server, base_url):
    assert httpx.get(f"{base_url}/health", timeout=30).json() == {"status": "ok"}
    dead = types.SimpleNamespace(metrics=Metrics(), library=server.service.library,
                                 engine_running=False)
    door = loop.run(HttpServer.start(dead, HttpConfig(port=0), Access(dead)))
    try:
        r = httpx.get(f"http://127.0.0.1:{door.port}/health", timeout=30)
        assert r.status_code == 503 and "engine" in r.json()["error"]["message"]
    finally:
        loop.run(door.stop())


def test_oversized_body_is_400(loop, server):
    door = _extra_door(loop, server, Access(server.service), HttpConfig(port=0,
                                                                        max_body_bytes=1000))
    try:
        r = httpx.post(f"http://127.0.0.1:{door.port}/v1/completions", timeout=30,
                       json={"model": "ttmm", "prompt": "the " * 1000})
        assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    finally:
        loop.run(door.stop())


# ----------------------------------------------------------------------------- metrics


def _scrape(server) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics",
                                  timeout=10).read().decode()


def _inflight(body: str) -> float:
    return float(re.search(r"^ttmm_inflight_requests (\S+)$", body, re.M).group(1))


def test_metrics_count_both_doors_and_the_inflight_gauge_follows(oa, client, server,
                                                                 base_url):
    seen: list[float] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(_inflight(_scrape(server)))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            jobs = [pool.submit(oa.completions.create, model="ttmm", prompt=p, max_tokens=200,
                                temperature=0) for p in TOPIC_PROMPTS]
            jobs += [pool.submit(client.generate, p, max_tokens=200)
                     for p in TOPIC_PROMPTS]
            for j in jobs:
                j.result(timeout=300)
    finally:
        stop.set()
        watcher.join()
    assert max(seen) >= 2, "requests of both doors were admitted at once"
    body = _scrape(server)
    assert _inflight(body) == 0
    assert re.search(r'ttmm_requests_total\{code="OK",rpc="/v1/completions"\} [1-9]', body)
    assert re.search(r'ttmm_requests_total\{code="INVALID_ARGUMENT",rpc="/v1/completions"\}',
                     body)
    # vLLM's own engine metrics beside ttmm's, on both endpoints
    for name in ("vllm:time_to_first_token_seconds_count", "vllm:kv_cache_usage_perc",
                 "vllm:generation_tokens_total"):
        assert name in body
    http_body = httpx.get(f"{base_url}/metrics", timeout=30).text
    assert "vllm:time_to_first_token_seconds_count" in http_body
    assert "ttmm_inflight_requests 0.0" in http_body


def test_a_closed_stream_releases_its_slot_and_adapter(server, base_url):
    registry = server.service.engine.registry
    with httpx.stream("POST", f"{base_url}/v1/completions", timeout=60,
                      json={"model": "ttmm", "prompt": TOPIC_PROMPTS[3], "max_tokens": 240,
                            "temperature": 0, "stream": True,
                            "ttmm": {"beta": 0.7, "max_active": 3}}) as r:
        first = next(r.iter_lines())
        assert first.startswith("data: ")
    deadline = time.time() + 10
    while (registry.in_use or _inflight(_scrape(server))) and time.time() < deadline:
        time.sleep(0.05)
    assert registry.in_use == 0
    assert _inflight(_scrape(server)) == 0
