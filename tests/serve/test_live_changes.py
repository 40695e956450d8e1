"""Beyond the paper: live library changes, experts per client, out-of-reach prompts.

A server of its own (the library is changed on disk), on a copy of the tiny library whose
experts are split into two groups and which holds a fifth expert not yet served."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import threading
import time

import grpc
import pytest
import torch

from tests.serve.mixed_load import mixed_request
from ttmm_vllm.client import TTMMClient
from ttmm_vllm.library import (
    PENDING_EXPERT,
    Library,
    RouterDefaults,
    expert_dirname,
    write_adapter,
)
from ttmm_vllm.routing.embed import SentenceEmbedder
from ttmm_vllm.routing.weights import normalize_rows
from ttmm_vllm.stubs import pb2

FOREIGN_PROMPT = "def __init__(self): return {} # 0x1F ++ ;; <<>> [] ()"
COMMON_PROMPT = "the of and a in is to with was for on by it that as from at"
TOPIC_PROMPTS = ["guitar piano melody chord the band song singer lyric",
                 "rocket telescope orbit moon the planet star galaxy comet",
                 "dough oven butter garlic the salt recipe chef spice",
                 "striker goal keeper league the match referee penalty"]
ADMIN = "adm1n"
TOKENS = {"tok-alice": "alice", "tok-admin-user": "root"}


@pytest.fixture(scope="module")
def live_library(tmp_path_factory, tiny_library, tiny_embedder_dir):
    root = tmp_path_factory.mktemp("live") / "lib"
    shutil.copytree(tiny_library, root)
    lib = Library.open(root)
    emb = SentenceEmbedder(tiny_embedder_dir)
    # groups: music/cooking vs football/space; an out-of-reach threshold from the documents
    groups = {0: "a", 1: "b", 2: "a", 3: "b"}  # cooking, football, music, space
    experts = tuple(dataclasses.replace(e, group=groups[e.id]) for e in lib.manifest.experts)
    # An out-of-reach threshold between the topic prompts and the foreign one. (A real build
    # takes a low percentile of its holdout prefixes; the tiny WordPiece vocabulary is not
    # stable enough across runs for a percentile to separate these prompts every time.)
    def top(texts):
        return (emb.embed(texts) @ lib.centroids.T).max(1)

    inside, foreign = float(top(TOPIC_PROMPTS).min()), float(top([FOREIGN_PROMPT])[0])
    assert foreign < inside, "the tiny embedder cannot tell the foreign prompt apart"
    router = dataclasses.replace(lib.manifest.router, ood_threshold=(inside + foreign) / 2)
    assert isinstance(router, RouterDefaults)
    lib.write_manifest(dataclasses.replace(lib.manifest, experts=experts, router=router))
    # a fifth expert, in the directory but not served: it covers "common words" prompts
    src = lib.read_expert(0)
    g = torch.Generator().manual_seed(99)
    modules = {m: (torch.randn(a.shape, generator=g) * 0.3, torch.randn(b.shape, generator=g)
                   * 0.3) for m, (a, b) in src.modules.items()}
    d = root / expert_dirname(4)
    write_adapter(d, modules, rank=src.rank, alpha=src.rank * src.scaling,
                  target_modules=lib.manifest.lora.target_modules)
    centroid = normalize_rows(emb.embed([COMMON_PROMPT] * 2).mean(0))
    (d / PENDING_EXPERT).write_text(json.dumps({"title": "common words", "size": 3,
                                                "group": "a", "centroid": centroid.tolist()}))
    return root


@pytest.fixture(scope="module")
def live(loop, live_library, tiny_model_dir):
    from tests.conftest import SERVER_ENGINE
    from ttmm_vllm.serve import ServeConfig, start
    from ttmm_vllm.serve.engine_api import EngineConfig
    from ttmm_vllm.serve.grpc_server import ServerConfig

    srv = loop.run(start(ServeConfig(
        library=str(live_library), base_model=str(tiny_model_dir),
        engine=EngineConfig(**SERVER_ENGINE),
        server=ServerConfig(port=0, tokens=TOKENS, admin_tokens=frozenset({ADMIN}),
                            client_groups={"alice": ("a",), "root": ("*",)}))))
    yield srv
    loop.run(srv.stop(grace=2))


def _client(live, token="tok-admin-user") -> TTMMClient:
    c = TTMMClient(f"127.0.0.1:{live.port}", token=token)
    c.wait_ready(30)
    return c


def _admin(live) -> TTMMClient:
    return _client(live, token=ADMIN)


def _streams(live, n, prompts, max_tokens=120):
    """n concurrent streams; returns (threads, results list of token counts or errors)."""
    results: list = [None] * n

    def one(i):
        try:
            with _client(live) as c:
                results[i] = sum(len(ch.token_ids) for ch in c.stream(
                    prompts[i % len(prompts)], max_tokens=max_tokens, temperature=1.0, seed=i,
                    timeout=120))
        except grpc.RpcError as e:
            results[i] = e
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results


def test_out_of_reach_flag(live):
    with _client(live) as c:
        for p in TOPIC_PROMPTS:
            r = c.route(p).routing
            assert not r.out_of_reach and r.top_similarity > 0 and r.entropy >= 0
        foreign = c.route(FOREIGN_PROMPT).routing
        assert foreign.out_of_reach


def test_client_limited_to_its_groups(live):
    rng = random.Random(0)
    words = " ".join(TOPIC_PROMPTS).split() + COMMON_PROMPT.split()
    with _client(live, token="tok-alice") as alice:
        listed = {e.expert_id for e in alice.list_experts().experts}
        assert listed == {0, 2}
        for _ in range(2000):
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
            mode = rng.choice(["ttmm", "uniform", "top1"])
            r = alice.route(prompt, pb2.RoutingOptions(mode={"ttmm": 1, "top1": 3,
                                                             "uniform": 4}[mode],
                                                       max_active=4)).routing
            assert {e.expert_id for e in r.experts} <= {0, 2}, (prompt, r)
        # a football prompt still gets alice's nearest permitted experts, not nothing
        assert alice.route(TOPIC_PROMPTS[3]).routing.experts
        with pytest.raises(grpc.RpcError) as e:
            alice.generate(TOPIC_PROMPTS[3], max_tokens=2, experts=[1])
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_add_expert_while_streaming_then_route_to_it(live, live_library):
    with _client(live) as c:
        before = c.route(COMMON_PROMPT).routing
        assert 4 not in {e.expert_id for e in before.experts}
    threads, results = _streams(live, 16, TOPIC_PROMPTS)
    time.sleep(0.3)
    with _admin(live) as admin:
        added = admin.stub.AddExpert(pb2.AddExpertRequest(expert_id=4),
                                     metadata=admin.metadata, timeout=60).expert
    assert added.expert_id == 4 and added.title == "common words"
    for t in threads:
        t.join(120)
    assert all(isinstance(r, int) and r == 120 for r in results), results
    with _client(live) as c:
        r = c.route(COMMON_PROMPT, pb2.RoutingOptions(mode=3)).routing
        assert r.experts[0].expert_id == 4
        out = c.generate(COMMON_PROMPT, max_tokens=8, mode="top1")
        assert out.routing.experts[0].expert_id == 4 and len(out.token_ids) == 8
        explicit = c.generate(COMMON_PROMPT, max_tokens=4, experts=[4])
        assert [e.expert_id for e in explicit.routing.experts] == [4]
    assert 4 in {e.id for e in Library.open(live_library).manifest.active_experts}


def test_remove_expert_under_load(live, live_library):
    threads, results = _streams(live, 16, TOPIC_PROMPTS)
    time.sleep(0.3)
    with _admin(live) as admin:
        admin.stub.RemoveExpert(pb2.RemoveExpertRequest(expert_id=1), metadata=admin.metadata,
                                timeout=60)
    for t in threads:
        t.join(120)
    assert all(isinstance(r, int) and r == 120 for r in results), results
    with _client(live) as c:
        for _ in range(3):
            for p in TOPIC_PROMPTS:
                assert 1 not in {e.expert_id for e in c.route(
                    p, pb2.RoutingOptions(max_active=4, beta=1.0)).routing.experts}
        with pytest.raises(grpc.RpcError) as e:
            c.generate(TOPIC_PROMPTS[3], max_tokens=2, experts=[1])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as e, _admin(live) as admin:
            admin.stub.RemoveExpert(pb2.RemoveExpertRequest(expert_id=1),
                                    metadata=admin.metadata, timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    reopened = Library.open(live_library)
    assert 1 not in {e.id for e in reopened.manifest.active_experts}
    assert reopened.manifest.expert(1).deleted


def test_admin_rpcs_need_the_admin_token(live):
    with _client(live) as c, pytest.raises(grpc.RpcError) as e:
        c.stub.AddExpert(pb2.AddExpertRequest(expert_id=4), metadata=c.metadata, timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with _admin(live) as admin, pytest.raises(grpc.RpcError) as e:
        admin.stub.AddExpert(pb2.AddExpertRequest(expert_id=77), metadata=admin.metadata,
                             timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_soak_with_admin_changes_leaves_nothing_behind(loop, live, live_library):
    """Mixed valid, invalid, cancelled and past-deadline requests while an admin adds and
    removes experts during every round: afterwards no request, admission slot, adapter or
    expert bank is left behind (adapters merging a removed expert are retired, not parked),
    and the resident memory of the server and its engine processes is within 5% of where it
    was after a warm-up round."""
    import gc
    import os
    from concurrent.futures import ThreadPoolExecutor

    import psutil

    engine = live.service.engine
    registry = engine.registry
    lib = Library.open(live_library)
    outcomes = {"completed": 0, "cancelled": 0, "deadline": 0, "invalid": 0}

    def pending(expert_id):
        d = live_library / expert_dirname(expert_id)
        shutil.copytree(live_library / expert_dirname(0), d)
        (d / PENDING_EXPERT).write_text(json.dumps({
            "title": f"copy of 0 ({expert_id})", "size": 1, "group": "a",
            "centroid": lib.centroids[0].tolist()}))

    def one(i):
        with _client(live) as c:
            return mixed_request(c, i, TOPIC_PROMPTS, invalid=True)

    def admin_cycle(expert_id):
        """Add an expert routed like expert 0, let requests use it, then remove it."""
        pending(expert_id)
        with _admin(live) as admin:
            admin.add_expert(expert_id, timeout=60)
            time.sleep(0.5)
            admin.remove_expert(expert_id, timeout=60)

    def round_(n, expert_id):
        with ThreadPoolExecutor(17) as pool:
            admin = pool.submit(admin_cycle, expert_id)
            for r in pool.map(one, range(n)):
                outcomes[r] += 1
            admin.result()

    def rss():
        proc = psutil.Process()
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])

    def drained():
        deadline = time.time() + 20
        while registry.in_use and time.time() < deadline:
            time.sleep(0.1)
        gc.collect()

    round_(32, 10)  # warm-up: first-time allocations are not growth
    drained()
    rss0 = rss()
    for r in range(int(os.environ.get("TTMM_SOAK_ROUNDS", "4"))):
        round_(48, 11 + r)
    drained()
    rss1 = rss()
    (info,) = loop.run(engine.llm.collective_rpc("ttmm_info"))
    stats = engine.adapter_stats()
    print(f"soak with admin changes: {outcomes}, adapters {stats}, "
          f"RSS {rss0 >> 20} -> {rss1 >> 20} MiB")
    assert registry.in_use == 0 and registry.registered <= registry.idle_capacity
    assert live.servicer.admission.count == 0
    assert stats["scratch_files"] <= registry.registered
    assert info["routes_on_retired_banks"] == []
    active = sorted(e.id for e in Library.open(live_library).manifest.active_experts)
    assert not set(range(10, 15)) & set(active)
    for bank in info["banks"].values():
        assert bank["experts"] == active
    assert all(v > 0 for v in outcomes.values()), outcomes
    assert rss1 <= rss0 * 1.05, f"resident memory grew {rss0 >> 20} -> {rss1 >> 20} MiB"
