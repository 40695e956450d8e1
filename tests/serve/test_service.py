"""The service without its transport: the session server's real TTMMService (real embedder,
index and vLLM engine), driven directly. Each refusal names the field it refuses."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ttmm_vllm import testing as tiny
from ttmm_vllm.routing.router import Mode
from ttmm_vllm.serve.engine_api import Sampling
from ttmm_vllm.serve.errors import InvalidArgument, PermissionDenied
from ttmm_vllm.serve.service import Client, GenerateInput, RoutingRequest

# tiny library: one expert per topic, ids in sorted topic order
EXPERT = {t: i for i, t in enumerate(sorted(tiny.TOPICS))}  # cooking, football, music, space
PROMPT = {t: " ".join(words[:9]) for t, words in tiny.TOPICS.items()}
ANYONE = Client()
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def service(server):
    return server.service


def _refused(fn, *args, field: str, match: str = ""):
    with pytest.raises(InvalidArgument) as e:
        fn(*args)
    assert e.value.field == field and str(e.value).startswith(f"{field}: ")
    assert match in str(e.value)
    return e.value


# ------------------------------------------------------------------ params_for

@pytest.mark.parametrize("request_, field, match", [
    (RoutingRequest(beta=0.0), "routing.beta", "got 0.0"),
    (RoutingRequest(beta=-1.0), "routing.beta", "> 0"),
    (RoutingRequest(beta=NAN), "routing.beta", "finite"),
    (RoutingRequest(beta=INF), "routing.beta", "finite"),
    (RoutingRequest(tau=1.0), "routing.tau", "[0, 1), got 1.0"),
    (RoutingRequest(tau=-0.1), "routing.tau", "got -0.1"),
    (RoutingRequest(tau=NAN), "routing.tau", "[0, 1)"),
    (RoutingRequest(max_active=0), "routing.max_active", "[1, 64], got 0"),
    (RoutingRequest(max_active=65), "routing.max_active", "got 65"),
    (RoutingRequest(experts=(99,)), "routing.experts", "unknown expert ids [99]"),
    (RoutingRequest(experts=(0, 7, 1, 8)), "routing.experts", "unknown expert ids [7, 8]"),
    (RoutingRequest(experts=(1, 1)), "routing.experts", "listed twice"),
    (RoutingRequest(experts=tuple(range(65))), "routing.experts", "at most 64 experts"),
    (RoutingRequest(experts=(0, 1), expert_weights=(1.0,)), "routing.expert_weights",
     "1 weights for 2 experts"),
    (RoutingRequest(experts=(0, 1), expert_weights=(1.0, -0.5)), "routing.expert_weights",
     "negative weight"),
    (RoutingRequest(experts=(0, 1), expert_weights=(1.0, NAN)), "routing.expert_weights",
     "NaN"),
    (RoutingRequest(experts=(0, 1), expert_weights=(INF, 1.0)), "routing.expert_weights",
     "infinite"),
    (RoutingRequest(experts=(0, 1), expert_weights=(0.0, 0.0)), "routing.expert_weights",
     "all weights are zero"),
    (RoutingRequest(expert_weights=(1.0,)), "routing.expert_weights", "1 weights for 0"),
    (RoutingRequest(reroute_every=-1), "routing.reroute_every", ">= 0"),
])
def test_params_for_names_the_bad_field(service, request_, field, match):
    _refused(service.params_for, request_, ANYONE, field=field, match=match)


def test_params_for_applies_overrides_over_the_library_defaults(service):
    router = service.library.manifest.router
    p = service.params_for(RoutingRequest(beta=0.5, max_active=2), ANYONE)
    assert (p.mode, p.beta, p.tau, p.max_active) == (Mode.TTMM, 0.5, router.tau, 2)
    assert service.params_for(RoutingRequest(), ANYONE) == service.defaults
    assert (service.defaults.beta, service.defaults.max_active) == (router.beta, 3)
    p = service.params_for(RoutingRequest(mode=Mode.TOP1, experts=(2, 0),
                                          expert_weights=(1.0, 3.0)), ANYONE)
    assert (p.mode, p.experts, p.expert_weights) == (Mode.TOP1, (2, 0), (1.0, 3.0))


def test_rerouting_is_refused_in_base_mode_and_with_named_experts(service):
    for r in (RoutingRequest(mode=Mode.BASE, reroute_every=8),
              RoutingRequest(experts=(0,), reroute_every=8)):
        params = service.params_for(r, ANYONE)  # valid on their own ...
        _refused(service.reroute_every, r, params, field="routing.reroute_every",
                 match="re-routing needs routed experts")  # ... not together
    never = RoutingRequest(mode=Mode.BASE, reroute_every=0)
    assert service.reroute_every(never, service.params_for(never, ANYONE)) == 0
    assert service.config.default_reroute_every == 0
    assert service.reroute_every(RoutingRequest(), service.defaults, 100) == 0


def test_rerouting_windows_are_neither_too_short_nor_too_many(service):
    c = service.config
    assert (c.min_reroute_every, c.max_reroute_windows) == (8, 64)
    params = service.defaults
    assert service.reroute_every(RoutingRequest(reroute_every=8), params, 64 * 8) == 8
    _refused(service.reroute_every, RoutingRequest(reroute_every=7), params, 100,
             field="routing.reroute_every", match="must be 0 (never) or >= 8 tokens, got 7")
    e = _refused(service.reroute_every, RoutingRequest(reroute_every=8), params, 64 * 8 + 1,
                 field="routing.reroute_every", match="65 re-routed windows; at most 64")
    assert "use reroute_every >= 9" in str(e)


@pytest.mark.parametrize("bob", [
    Client(identity="bob", allowed=frozenset({0, 1})),
    Client(identity="bob", allowed=frozenset({0, 1, 2}), groups=frozenset({"default"})),
])
def test_a_client_may_name_only_its_allowed_experts(service, bob):
    named = (0, 3, 42)  # 3 exists but is not bob's, 42 does not exist: one answer for both
    with pytest.raises(PermissionDenied) as e:
        service.params_for(RoutingRequest(experts=named), bob)
    assert str(e.value) == "routing.experts: experts [3, 42] are unknown or not permitted for bob"
    assert service.params_for(RoutingRequest(experts=(1, 0)), bob).experts == (1, 0)


def test_a_client_of_other_groups_may_name_no_expert(service):
    assert {e.group for e in service.library.manifest.experts} == {"default"}
    eve = Client(identity="eve", groups=frozenset({"finance"}))
    with pytest.raises(PermissionDenied, match=r"experts \[0\] are unknown or not permitted"):
        service.params_for(RoutingRequest(experts=(0,)), eve)
    assert service.permitted(eve) == frozenset()
    assert service.permitted(Client(groups=frozenset({"default"}))) == frozenset({0, 1, 2, 3})
    assert service.permitted(ANYONE) is None


# ------------------------------------------------------------------ validate_sampling

def test_max_tokens_must_fit_the_context(service):
    assert service.max_model_len == 256
    e = _refused(service.validate_sampling, Sampling(max_tokens=247), 10, True,
                 field="sampling.max_tokens")
    assert str(e) == ("sampling.max_tokens: 247 exceeds the context: the prompt has 10 "
                      "tokens and the model's context is 256")
    assert service.validate_sampling(Sampling(max_tokens=246), 10, True).max_tokens == 246
    _refused(service.validate_sampling, Sampling(max_tokens=0), 10, True,
             field="sampling.max_tokens", match="must be >= 1, got 0")


def test_an_unset_max_tokens_is_the_default_cut_to_the_room_left(service):
    assert service.config.default_max_tokens == 64
    assert service.validate_sampling(Sampling(max_tokens=0), 10, False).max_tokens == 64
    assert service.validate_sampling(Sampling(max_tokens=0), 250, False).max_tokens == 6
    assert service.validate_sampling(Sampling(max_tokens=0), 255, False).max_tokens == 1


@pytest.mark.parametrize("sampling, field, match", [
    (Sampling(temperature=2.5), "sampling.temperature", "[0, 2], got 2.5"),
    (Sampling(temperature=-0.1), "sampling.temperature", "got -0.1"),
    (Sampling(temperature=NAN), "sampling.temperature", "[0, 2]"),
    (Sampling(top_p=0.0), "sampling.top_p", "(0, 1], got 0.0"),
    (Sampling(top_p=1.01), "sampling.top_p", "got 1.01"),
    (Sampling(top_p=INF), "sampling.top_p", "(0, 1]"),
    (Sampling(top_k=-2), "sampling.top_k", "got -2"),
    (Sampling(stop=("x",) * 17), "sampling.stop", "at most 16 stop strings"),
    (Sampling(stop=("ok", "")), "sampling.stop", "1..256 characters"),
    (Sampling(stop=("y" * 257,)), "sampling.stop", "1..256 characters"),
])
def test_validate_sampling_names_the_bad_field(service, sampling, field, match):
    _refused(service.validate_sampling, sampling, 10, True, field=field, match=match)


def test_validate_sampling_accepts_the_edges(service):
    s = Sampling(max_tokens=5, temperature=2.0, top_p=1.0, top_k=-1, seed=3,
                 stop=("z" * 256,) * 16)
    assert service.validate_sampling(s, 10, True) == s


# ------------------------------------------------------------------ tokenize_prompt

@pytest.mark.parametrize("prompt, match", [
    ("", "prompt: is empty"),
    (" \n\t ", "prompt: is empty"),
    ("the guitar\x00the piano", "prompt: contains a NUL character"),
    ("x" * 1_000_001, "prompt: longer than 1000000 characters"),
    ("the " * 300, "tokens; the model's context is 256"),
])
def test_tokenize_prompt_refuses(service, prompt, match):
    _refused(service.tokenize_prompt, prompt, (), field="prompt", match=match)


def test_tokenize_prompt_refuses_token_ids_outside_the_vocabulary(service):
    vocab = len(service.tokenizer)
    for bad in ((vocab,), (-1,), (5, vocab + 7, 6)):
        e = _refused(service.tokenize_prompt, "", bad, field="prompt_token_ids",
                     match=f"outside the vocabulary ({vocab})")
        assert str([t for t in bad if not 0 <= t < vocab]) in str(e)
    assert service.tokenize_prompt("", (0, vocab - 1)) == [0, vocab - 1]
    _refused(service.tokenize_prompt, "", (vocab,) * 256, field="prompt_token_ids",
             match="has 256 tokens; the model's context is 256")  # counted before scanned


def test_tokenize_prompt_uses_the_base_models_tokenizer(service):
    ids = service.tokenize_prompt(PROMPT["music"], ())
    assert ids == service.tokenizer(PROMPT["music"], add_special_tokens=False)["input_ids"]
    assert service.tokenizer.decode(ids) == PROMPT["music"]
    _refused(service.tokenize_prompt, "", (), "continuation", field="continuation")


# ------------------------------------------------------------------ routing

def _top(routing) -> int:
    return routing.expert_ids[max(range(len(routing.weights)), key=routing.weights.__getitem__)]


def test_prepare_routes_validates_and_tokenizes(service, loop):
    gi = GenerateInput(prompt=PROMPT["music"], request_id="svc-1")
    p = loop.run(service.prepare(gi, ANYONE))
    assert p.request_id == "svc-1" and p.client is ANYONE and p.reroute_every == 0
    assert p.prompt_ids == service.tokenize_prompt(PROMPT["music"], ())
    assert p.sampling.max_tokens == 64  # max_tokens not set: the default
    assert 1 <= len(p.routing.expert_ids) <= 3  # the library's max_active
    assert math.fsum(p.routing.weights) == pytest.approx(1, abs=1e-9)
    assert _top(p.routing) == EXPERT["music"]
    assert p.timings.embed_ms > 0 and p.timings.total_ms >= p.timings.embed_ms
    other = loop.run(service.prepare(GenerateInput(prompt=PROMPT["space"]), ANYONE))
    assert len(other.request_id) == 32 and other.request_id != p.request_id
    assert _top(other.routing) == EXPERT["space"]


def test_prepare_refuses_before_routing(service, loop):
    bad = GenerateInput(prompt=PROMPT["music"], sampling=Sampling(max_tokens=9999),
                        max_tokens_set=True)
    with pytest.raises(InvalidArgument, match="sampling.max_tokens"):
        loop.run(service.prepare(bad, ANYONE))


@settings(max_examples=25, deadline=None)
@given(topic=st.sampled_from(sorted(tiny.TOPICS)),
       beta=st.floats(0.005, 5.0), tau=st.floats(0.0, 0.5), max_active=st.integers(1, 4),
       mode=st.sampled_from([None, Mode.TTMM, Mode.TOP1, Mode.UNIFORM]))
def test_routed_weights_sum_to_one_within_max_active(service, loop, topic, beta, tau,
                                                     max_active, mode):
    r = RoutingRequest(mode=mode, beta=beta, tau=tau, max_active=max_active)
    p = loop.run(service.prepare(GenerateInput(prompt=PROMPT[topic], routing=r), ANYONE))
    ids, ws = p.routing.expert_ids, p.routing.weights
    assert 1 <= len(ids) <= (1 if mode == Mode.TOP1 else max_active)
    assert len(set(ids)) == len(ids) and set(ids) <= set(EXPERT.values())
    assert all(w >= 0 for w in ws) and math.fsum(ws) == pytest.approx(1, abs=1e-9)
    assert list(ids) == sorted(ids)  # canonical: served in expert-id order
    if mode == Mode.UNIFORM:
        assert ws == pytest.approx([1 / len(ids)] * len(ids))
    assert _top(p.routing) == EXPERT[topic] or mode == Mode.UNIFORM


def test_no_served_expert_has_weight_zero(service, loop):
    # cooking's centroid is far nearer than the others: at a low beta the runner-up's weight
    # is ~1e-8, which rounds to 0.0 at 6 decimals
    r = RoutingRequest(beta=0.03125, tau=0.0, max_active=2)
    routing, _ = loop.run(service.route(PROMPT["cooking"], r, ANYONE))
    assert routing.expert_ids[0] == EXPERT["cooking"]
    assert all(w > 0 for w in routing.weights), routing


def test_named_experts_with_weights_are_served_as_given(service, loop):
    r = RoutingRequest(experts=(3, 0), expert_weights=(1.0, 3.0))
    routing, _ = loop.run(service.route(PROMPT["music"], r, ANYONE))
    assert dict(zip(routing.expert_ids, routing.weights, strict=True)) == \
        pytest.approx({0: 0.75, 3: 0.25})


def test_route_in_base_mode_returns_no_experts_and_embeds_nothing(service, loop):
    routing, timings = loop.run(service.route(PROMPT["music"], RoutingRequest(mode=Mode.BASE),
                                              ANYONE))
    assert routing.mode == Mode.BASE and routing.is_base
    assert routing.expert_ids == () and routing.weights == ()
    assert timings.embed_ms == 0 and timings.total_ms == 0


def test_route_keeps_to_the_clients_experts(service, loop):
    carol = Client(identity="carol", allowed=frozenset({EXPERT["cooking"], EXPERT["football"]}))
    routing, timings = loop.run(service.route(PROMPT["music"], RoutingRequest(), carol))
    assert routing.expert_ids and set(routing.expert_ids) <= carol.allowed
    assert timings.embed_ms > 0
    everyone, _ = loop.run(service.route(PROMPT["music"], RoutingRequest(), ANYONE))
    assert _top(everyone) == EXPERT["music"]


def test_experts_for_filters_by_client(service):
    assert [e.id for e in service.experts_for(ANYONE)] == [0, 1, 2, 3]
    assert [e.title for e in service.experts_for(ANYONE)] == sorted(tiny.TOPICS)
    assert [e.id for e in service.experts_for(Client(allowed=frozenset({3, 1, 9})))] == [1, 3]
    assert service.experts_for(Client(allowed=frozenset())) == []
    assert service.experts_for(Client(groups=frozenset({"finance"}))) == []
    both = Client(allowed=frozenset({2}), groups=frozenset({"default", "finance"}))
    assert [e.id for e in service.experts_for(both)] == [2]


def test_adapter_info(service, loop):
    base = loop.run(service.prepare(
        GenerateInput(prompt=PROMPT["space"], routing=RoutingRequest(mode=Mode.BASE)), ANYONE))
    assert base.routing.is_base and service.adapter_info(base) == {}
    # a routing no request has used yet: no adapter registered, the experts' ranks summed
    odd = loop.run(service.prepare(GenerateInput(
        prompt=PROMPT["space"], routing=RoutingRequest(experts=(1, 2),
                                                       expert_weights=(0.123, 0.877))),
        ANYONE))
    assert service.adapter_info(odd) == {"rank": 8}


def test_score_inputs_are_capped_before_they_are_tokenized(service):
    c = service.config
    _refused(service.check_sizes, "x" * (c.max_prompt_chars + 1), (), "prompt", field="prompt",
             match=f"at most {c.max_prompt_chars}")
    _refused(service.check_sizes, "", (1,) * 257, "continuation",
             field="continuation_token_ids", match="has 257 tokens; at most 256")
    service.check_sizes("x" * c.max_continuation_chars, (1,) * 256, "continuation")
    _refused(service.tokenize_continuation, "", (), field="continuation", match="is empty")
    _refused(service.tokenize_continuation, "", (len(service.tokenizer),),
             field="continuation_token_ids", match="outside the vocabulary")
    assert service.tokenize_continuation(" the moon", ()) == \
        service.tokenizer(" the moon", add_special_tokens=False)["input_ids"]
