"""The engine against the offline reference: each request's merged expert, batched together,
generates what transformers + PEFT generate with the same merged weights."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from ttmm_vllm.routing.embed import SentenceEmbedder
from ttmm_vllm.routing.router import CentroidIndex, Mode, Router, RoutingParams
from ttmm_vllm.serve.engine_api import Sampling
from ttmm_vllm.serve.metrics import Timings

PROMPTS = [
    "guitar piano melody chord the band song singer lyric",
    "rocket telescope orbit moon the planet star galaxy comet",
    "dough oven butter garlic the salt recipe chef spice",
    "striker goal keeper league the match referee penalty",
    "the orchestra and the comet and the chef",
    "the stadium",
]

# Log-probabilities: vLLM's CPU kernels (attention, RMSNorm, fused SiLU) and torch's eager ops
# sum in different orders; in fp32 over a 2-layer model the differences are ~1e-5. 2e-3 leaves
# room for the larger logits of the merged adapters without hiding a wrong merge (a missing or
# mis-weighted expert moves log-probabilities by 0.1 or more here).
LOGPROB_TOL = 2e-3


@pytest.fixture(scope="session")
def router(library, tiny_embedder_dir):
    emb = SentenceEmbedder(tiny_embedder_dir)
    r = library.manifest.router
    params = RoutingParams(beta=0.02, tau=0.0, max_active=3)
    return emb, Router(CentroidIndex(library.centroids), params), params, r


@pytest.fixture(scope="session")
def session_engine(server):
    """The session server's engine: one engine start for the whole session."""
    return server.service.engine


def _route(router, text, **over):
    emb, r, params, _ = router
    return r.route(emb.embed([text])[0], params.with_overrides(**over)).canonical()


async def _collect(engine, rid, ids, sampling, routing):
    toks, lps, timings = [], [], Timings()
    async for step in engine.generate(rid, ids, sampling, routing, timings):
        toks += step.token_ids
        lps += step.logprobs
    return toks, lps, timings


def test_routes_differ_by_topic(router):
    tops = set()
    for p in PROMPTS[:4]:
        r = _route(router, p)
        tops.add(max(zip(r.weights, r.expert_ids, strict=True))[1])
    assert len(tops) == 4


def test_concurrent_merged_experts_match_peft(loop, session_engine, router, reference):
    tok = session_engine.tokenizer
    routings = [_route(router, p) for p in PROMPTS]
    routings[-1] = _route(router, PROMPTS[-1], mode=Mode.BASE)  # a base request in the batch
    assert any(len(r.expert_ids) > 1 for r in routings)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    sampling = Sampling(max_tokens=12, temperature=0.0, logprobs=True)

    async def run_all():
        return await asyncio.gather(*[
            _collect(session_engine, f"gen-{i}", ids[i], sampling, routings[i])
            for i in range(len(PROMPTS))])

    results = loop.run(run_all())
    for i, (toks, lps, timings) in enumerate(results):
        r = routings[i]
        want = reference.greedy(ids[i], 12, r.expert_ids, r.weights)
        assert toks == want, f"prompt {i} routed to {r.expert_ids} {r.weights}"
        ref_lp = reference.logprobs(ids[i] + toks, len(ids[i]), r.expert_ids, r.weights)
        np.testing.assert_allclose(lps, ref_lp, atol=LOGPROB_TOL)
        assert timings.generate_ms > 0
        if not r.is_base:
            assert timings.merge_ms > 0 or timings.register_ms > 0


def test_score_matches_reference(loop, session_engine, router, reference):
    tok = session_engine.tokenizer
    prompt = tok(PROMPTS[1], add_special_tokens=False)["input_ids"]
    cont = tok(" the planet and the star and the galaxy with the comet", add_special_tokens=False)["input_ids"]
    r = _route(router, PROMPTS[1])
    got = loop.run(session_engine.score("score-1", prompt, cont, r))
    want = reference.logprobs(prompt + cont, len(prompt), r.expert_ids, r.weights)
    assert len(got) == len(cont)
    np.testing.assert_allclose(got, want, atol=LOGPROB_TOL)
    base = loop.run(session_engine.score("score-2", prompt, cont,
                                      _route(router, PROMPTS[1], mode=Mode.BASE)))
    assert np.abs(np.array(base) - np.array(got)).max() > 0.05  # the adapter matters


def test_adapters_are_shared_and_bounded(loop, session_engine, router):
    tok = session_engine.tokenizer
    reg = session_engine.registry
    s = Sampling(max_tokens=2)

    async def burst():
        ps = [PROMPTS[i % 4] for i in range(12)]
        rs = [_route(router, p, max_active=1 + (i % 3)) for i, p in enumerate(ps)]
        await asyncio.gather(*[_collect(session_engine, f"b-{i}", tok(p)["input_ids"], s, r)
                               for i, (p, r) in enumerate(zip(ps, rs, strict=True))])
        return rs

    before = reg.created
    rs = loop.run(burst())
    distinct = len({r.key() for r in rs})
    assert reg.created - before <= distinct  # equal routings shared one adapter
    assert reg.in_use == 0
    assert reg.registered <= reg.idle_capacity
    files = sorted(p.name for p in session_engine.scratch_dir.iterdir())
    if session_engine.config.merge_path == "disk":
        assert len(files) == reg.registered  # one merged PEFT folder per registered adapter
    else:
        assert files == []  # merged in the worker: nothing is written


def test_cancelled_request_frees_its_adapter(loop, session_engine, router):
    tok = session_engine.tokenizer
    r = _route(router, PROMPTS[2], max_active=2, beta=0.5)

    async def cancel_midway():
        agen = session_engine.generate("cancel-1", tok(PROMPTS[2])["input_ids"],
                                    Sampling(max_tokens=200), r)
        async for _ in agen:
            break
        await agen.aclose()
        await asyncio.sleep(0.2)

    loop.run(cancel_midway())
    assert session_engine.registry.in_use == 0
