"""Issue 17: who may call what, what one request may cost, admin changes as transactions,
faults reported as what they are. Black-box through gRPC where it can be.

Most tests run the real gRPC server and the real service over `FakeEngine` (an EngineLike
that streams a token every few milliseconds, no vLLM): they need the library to change
under them, an engine that hangs or fails on cue, and exact counts of engine requests. The
few that need vLLM itself use the session's engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ttmm_vllm.client import TTMMClient
from ttmm_vllm.library import PENDING_EXPERT, Library, LibraryError, expert_dirname
from ttmm_vllm.serve.engine_api import EngineConfig, Step
from ttmm_vllm.serve.errors import EngineError, status_of
from ttmm_vllm.serve.grpc_server import Server, ServerConfig
from ttmm_vllm.serve.service import ServiceConfig, TTMMService
from ttmm_vllm.stubs import pb2

PROMPT = "guitar piano melody chord the band song singer lyric"
ADMIN = "adm1n"
TOKENS = {"tok-alice": "alice", "tok-bob": "bob", "tok-carol": "carol"}
GROUPS = {0: "a", 1: "b", 2: "a", 3: "b"}


# ----------------------------------------------------------------------------- the fakes


class FakeEngine:
    """EngineLike without vLLM: one token per `step_s`; admin calls recorded; faults on cue."""

    def __init__(self, tokenizer, max_model_len: int = 256):
        self.config = EngineConfig(max_model_len=max_model_len)
        self.tokenizer = tokenizer
        self.is_running = True
        self.hang = False
        self.step_s = 0.005
        self.requests = 0  # engine requests (re-routed windows count one each)
        self.max_expert_rank: int | None = 64
        self.add_delay = 0.0
        self.fail_add: Exception | None = None
        self.fail_remove: Exception | None = None
        self.added: list[int] = []
        self.removed: list[int] = []

    async def generate(self, request_id, prompt_ids, sampling, routing, timings=None):
        self.requests += 1
        if not self.is_running:
            raise EngineError("vLLM engine is dead; retry on another server")
        for i in range(sampling.max_tokens):
            await asyncio.sleep(self.step_s)
            last = i == sampling.max_tokens - 1
            yield Step(text="x", token_ids=[5], finished=last,
                       finish_reason="length" if last else None,
                       prompt_tokens=len(prompt_ids), completion_tokens=i + 1)

    async def score(self, request_id, prompt_ids, continuation_ids, routing, timings=None):
        self.requests += 1
        return [-1.0] * len(continuation_ids)

    def adapter_info(self, routing, request_id=""):
        return {}

    def adapter_stats(self):
        return {}

    async def add_expert(self, expert_id):
        await asyncio.sleep(self.add_delay)
        if self.fail_add is not None:
            raise self.fail_add
        self.added.append(expert_id)

    async def remove_expert(self, expert_id):
        if self.fail_remove is not None:
            raise self.fail_remove
        self.removed.append(expert_id)

    async def check_health(self):
        while self.hang:
            await asyncio.sleep(0.05)
        if not self.is_running:
            raise EngineError("dead")

    async def shutdown(self):
        return None


class RemoteLikeEngine(FakeEngine):
    """What the Ray front door drives: an engine with no live library changes."""

    add_expert = None
    remove_expert = None


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def embedder(tiny_embedder_dir):
    from ttmm_vllm.routing.embed import SentenceEmbedder

    return SentenceEmbedder(tiny_embedder_dir)


def place_pending(root: Path, expert_id: int, *, group: str = "a", meta: dict | None = None,
                  edit=None) -> None:
    """Expert 0's adapter placed as a not-yet-served expert `expert_id` (its centroid: expert
    0's); `edit(name, tensor) -> tensor` changes its tensors."""
    from safetensors.torch import load_file, save_file

    lib = Library.open(root, verify_checksums=False)
    d = root / expert_dirname(expert_id)
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(root / "experts/0000", d)
    if edit is not None:
        f = d / "adapter_model.safetensors"
        save_file({k: edit(k, v.clone()) for k, v in load_file(str(f)).items()}, str(f))
    (d / PENDING_EXPERT).write_text(json.dumps(
        {"title": f"pending {expert_id}", "size": 2, "group": group,
         "centroid": lib.centroids[0].tolist(), **(meta or {})}))


@pytest.fixture
def fake_library(tmp_path, tiny_library):
    """A copy of the tiny library, experts in groups a (0, 2) and b (1, 3)."""
    root = tmp_path / "lib"
    shutil.copytree(tiny_library, root)
    lib = Library.open(root)
    lib.write_manifest(dataclasses.replace(lib.manifest, experts=tuple(
        dataclasses.replace(e, group=GROUPS[e.id]) for e in lib.manifest.experts)))
    return root


class Fake:
    """A service over FakeEngine and the doors started on it in one test."""

    def __init__(self, loop, root, tokenizer, embedder, engine_cls=FakeEngine, **service_kw):
        self.loop, self.root = loop, root
        self.engine = engine_cls(tokenizer)
        self.servers: list[Server] = []

        async def make():
            return TTMMService(Library.open(root), self.engine, embedder,
                               ServiceConfig(**service_kw))
        self.service = loop.run(make())

    def door(self, **config) -> str:
        config.setdefault("health_probe_s", 0)
        srv = self.loop.run(Server.start(self.service, ServerConfig(port=0, **config),
                                         own_service=False))
        self.servers.append(srv)
        return f"127.0.0.1:{srv.port}"

    def close(self) -> None:
        for s in self.servers:
            self.loop.run(s.stop(grace=0))
        self.loop.run(self.service.shutdown())


@pytest.fixture
def fake(loop, fake_library, tokenizer, embedder):
    f = Fake(loop, fake_library, tokenizer, embedder)
    yield f
    f.close()


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


def _error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value


def _add(c: TTMMClient, expert_id: int, timeout: float = 30):
    return c.stub.AddExpert(pb2.AddExpertRequest(expert_id=expert_id), metadata=c.metadata,
                            timeout=timeout)


def _remove(c: TTMMClient, expert_id: int, timeout: float = 30):
    return c.stub.RemoveExpert(pb2.RemoveExpertRequest(expert_id=expert_id),
                               metadata=c.metadata, timeout=timeout)


def _listed(c: TTMMClient) -> set[int]:
    return {e.expert_id for e in c.list_experts(timeout=30).experts}


def _on_disk(root) -> set[int]:
    return {e.id for e in Library.open(root).manifest.active_experts}


# ----------------------------------------------------------------------------- 1. admin, auth


def test_empty_admin_token_is_refused_and_never_admits_a_bare_request(fake):
    with pytest.raises(ValueError, match="admin_tokens: every token must be a non-empty"):
        ServerConfig(tokens={"t": "alice"}, admin_tokens=frozenset({""}))
    with pytest.raises(ValueError, match="tokens: every token must be a non-empty"):
        ServerConfig(tokens={"": "alice"})
    # Access itself refuses an empty bearer token as admin, whatever its token set holds
    from ttmm_vllm.serve.access import Access
    from ttmm_vllm.serve.errors import Unauthenticated

    access = Access(fake.service, tokens={"t": "alice"}, admin_tokens=frozenset({ADMIN}))
    access.admin_tokens = frozenset({"", ADMIN})
    for header in (None, "", "Bearer ", "Bearer    "):
        with pytest.raises(Unauthenticated):
            access.client(header, admin=True)
    target = fake.door(tokens=TOKENS, admin_tokens=frozenset({ADMIN}))
    for md in ((), (("authorization", "Bearer "),), (("authorization", "Bearer x"),)):
        with grpc.insecure_channel(target) as ch:
            stub = _stub(ch)
            assert _code(lambda s=stub, m=md: s.RemoveExpert(
                pb2.RemoveExpertRequest(expert_id=0), metadata=m, timeout=10)) \
                == grpc.StatusCode.UNAUTHENTICATED
    assert 0 in fake.service.index


def _stub(channel):
    from ttmm_vllm.stubs import pb2_grpc

    return pb2_grpc.TTMMServiceStub(channel)


def _serve_args(tmp_path, auth: object | None, *flags: str):
    from ttmm_vllm.cli import build_parser

    argv = ["serve", "--library", str(tmp_path)]
    if auth is not None:
        f = tmp_path / "auth.json"
        f.write_text(json.dumps(auth))
        argv += ["--auth", str(f)]
    return build_parser().parse_args(argv + list(flags))


@pytest.mark.parametrize("auth,message", [
    ({"tokens": {"t": "alice"}, "admin_tokens": "s3cret"}, "admin_tokens must be a list"),
    ({"admin_tokens": ["ok", ""]}, "admin_tokens: every token must be a non-empty"),
    ({"tokens": ["t"]}, "tokens must map token -> identity"),
    ({"tokens": {"": "alice"}}, "tokens: every token must be a non-empty"),
    ({"tokens": {"t": ""}}, "tokens: every identity must be a non-empty"),
    ({"tokens": {"t": "alice"}, "client_groups": {"alice": "ab"}},
     r"client_groups\['alice'\] must be a list of groups"),
    ({"tokens": {"t": "alice"}, "client_groups": ["alice"]}, "client_groups must map"),
    ({"tokens": {"t": "alice"}, "admin_tokens": ["t"]}, "both a client token and an admin"),
    ({"tokens": {"t": "alice"}, "admins": ["x"]}, r"unknown keys \['admins'\]"),
    (["t"], "must be a JSON object"),
])
def test_malformed_auth_file_is_refused_at_start_up(tmp_path, capsys, auth, message):
    from ttmm_vllm.cli import serve as cli_serve

    args = _serve_args(tmp_path, auth)
    with pytest.raises(ValueError, match=message):
        cli_serve.configs(args)
    assert args.func(args) == 2  # before anything starts: the library is not even opened
    err = capsys.readouterr().err.strip()
    assert err.startswith("ttmm serve: ") and "\n" not in err and re.search(message, err)


def test_admin_tokens_from_a_valid_file_are_exactly_the_listed_ones(tmp_path):
    from ttmm_vllm.cli import serve as cli_serve

    args = _serve_args(tmp_path, {"tokens": {"t": "alice"}, "admin_tokens": ["s3cret"],
                                  "client_groups": {"alice": ["a", "b"]}})
    _, server = cli_serve.configs(args)
    assert server.admin_tokens == frozenset({"s3cret"})
    assert server.client_groups == {"alice": ("a", "b")}


def test_unlisted_identity_gets_no_expert(fake):
    target = fake.door(tokens=TOKENS, client_groups={"alice": ("a",), "bob": ("b",)})
    with TTMMClient(target, token="tok-carol") as carol:
        assert _listed(carol) == set()
        for mode in ("ttmm", "top1", "uniform"):
            r = carol.route(PROMPT, pb2.RoutingOptions(
                mode={"ttmm": 1, "top1": 3, "uniform": 4}[mode], max_active=4),
                timeout=30).routing
            assert not r.experts, (mode, r)
        assert not carol.generate(PROMPT, max_tokens=2, timeout=30).routing.experts
        assert _code(lambda: carol.generate(PROMPT, max_tokens=2, experts=[0], timeout=30)) \
            == grpc.StatusCode.PERMISSION_DENIED
    with TTMMClient(target, token="tok-alice") as alice:
        assert _listed(alice) == {0, 2}
    # without client_groups, every identity may use every expert; with them, "*" does
    with TTMMClient(fake.door(tokens=TOKENS), token="tok-carol") as carol:
        assert _listed(carol) == {0, 1, 2, 3}
    target = fake.door(tokens=TOKENS, client_groups={"alice": ("a",), "carol": ("*",)})
    with TTMMClient(target, token="tok-carol") as carol:
        assert _listed(carol) == {0, 1, 2, 3}


def test_groups_follow_the_live_manifest(fake):
    target = fake.door(tokens=TOKENS, admin_tokens=frozenset({ADMIN}),
                       client_groups={"alice": ("a",), "bob": ("b",)})
    place_pending(fake.root, 4, group="a")
    with TTMMClient(target, token="tok-alice") as alice, \
            TTMMClient(target, token="tok-bob") as bob, \
            TTMMClient(target, token=ADMIN) as admin:
        assert _add(admin, 4).expert.group == "a"
        assert _listed(alice) == {0, 2, 4} and _listed(bob) == {1, 3}
        assert [e.expert_id for e in alice.generate(
            PROMPT, max_tokens=2, experts=[4], timeout=30).routing.experts] == [4]
        assert _code(lambda: bob.generate(PROMPT, max_tokens=2, experts=[4], timeout=30)) \
            == grpc.StatusCode.PERMISSION_DENIED
        # removed, then re-added under group b: closed to alice, open to bob
        _remove(admin, 4)
        place_pending(fake.root, 4, group="b")
        assert _add(admin, 4).expert.group == "b"
        assert _listed(alice) == {0, 2} and _listed(bob) == {1, 3, 4}
        assert _code(lambda: alice.generate(PROMPT, max_tokens=2, experts=[4], timeout=30)) \
            == grpc.StatusCode.PERMISSION_DENIED
        assert bob.generate(PROMPT, max_tokens=2, experts=[4], timeout=30).routing.experts
        for _ in range(20):
            routed = alice.route(PROMPT, pb2.RoutingOptions(mode=4, max_active=8),
                                 timeout=30).routing
            assert {e.expert_id for e in routed.experts} <= {0, 2}


def test_restricted_client_cannot_tell_unknown_ids_from_forbidden_ones(fake):
    target = fake.door(tokens=TOKENS, client_groups={"alice": ("a",)})
    with TTMMClient(target, token="tok-alice") as alice:
        forbidden = _error(lambda: alice.generate(PROMPT, max_tokens=2, experts=[1],
                                                  timeout=30))
        unknown = _error(lambda: alice.generate(PROMPT, max_tokens=2, experts=[777],
                                                timeout=30))
        assert forbidden.code() == unknown.code() == grpc.StatusCode.PERMISSION_DENIED
        assert forbidden.details().replace("[1]", "[N]") == \
            unknown.details().replace("[777]", "[N]")


# ----------------------------------------------------------------------------- 2. cost bounds


def test_reroute_every_has_a_floor_and_windows_a_ceiling(loop, fake_library, tokenizer,
                                                          embedder):
    f = Fake(loop, fake_library, tokenizer, embedder, max_reroute_windows=4)
    try:
        with TTMMClient(f.door()) as c:
            for every in (1, 7):
                e = _error(lambda ev=every: c.generate(PROMPT, max_tokens=200,
                                                       reroute_every=ev, timeout=30))
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "routing.reroute_every: must be 0 (never) or >= 8" in e.details()
            e = _error(lambda: c.generate(PROMPT, max_tokens=64, reroute_every=8, timeout=30))
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 4" in e.details()
            long = " ".join(["melody chord song"] * 60)
            e = _error(lambda: c.score(PROMPT, long, pb2.RoutingOptions(reroute_every=1),
                                       timeout=30))
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
            e = _error(lambda: c.score(PROMPT, long, pb2.RoutingOptions(reroute_every=8),
                                       timeout=30))
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 4" in e.details()
            assert f.engine.requests == 0  # refused before the engine saw anything
            out = c.generate(PROMPT, max_tokens=32, reroute_every=8, timeout=30)
            assert out.completion_tokens == 32 and f.engine.requests == 4
    finally:
        f.close()
    # the server's default window widens to fit the ceiling instead of failing the request
    f = Fake(loop, fake_library, tokenizer, embedder, max_reroute_windows=4,
             default_reroute_every=8)
    try:
        with TTMMClient(f.door()) as c:
            assert c.generate(PROMPT, max_tokens=100, timeout=30).completion_tokens == 100
            assert f.engine.requests <= 4
    finally:
        f.close()
    with pytest.raises(ValueError, match="default_reroute_every must be 0"):
        ServiceConfig(default_reroute_every=1)


def test_score_continuation_is_capped_in_characters_and_tokens(loop, fake_library, tokenizer,
                                                               embedder):
    f = Fake(loop, fake_library, tokenizer, embedder, max_continuation_chars=1000,
             max_continuation_tokens=16)
    try:
        with TTMMClient(f.door()) as c:
            e = _error(lambda: c.score(PROMPT, "song " * 300, timeout=30))
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert e.details() == "continuation: has 1500 characters; at most 1000"
            e = _error(lambda: c.score(PROMPT, "song melody " * 20, timeout=30))
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "at most 16" in e.details()
            e = _error(lambda: c.score(PROMPT, "", continuation_token_ids=[5] * 17,
                                       timeout=30))
            assert e.details() == "continuation_token_ids: has 17 tokens; at most 16"
            assert len(c.score(PROMPT, "song melody", timeout=30).logprobs) >= 2
    finally:
        f.close()


def _largest_gap(chunks_at: list[float]) -> float:
    return max(b - a for a, b in zip(chunks_at, chunks_at[1:], strict=False))


def test_multi_megabyte_score_continuation_does_not_stall_streams(fake):
    fake.engine.step_s = 0.01
    target = fake.door()
    arrivals: list[float] = []

    def stream():
        with TTMMClient(target) as c:
            for _ in c.stream(PROMPT, max_tokens=240, timeout=60):
                arrivals.append(time.perf_counter())

    t = threading.Thread(target=stream)
    t.start()
    while len(arrivals) < 20:
        time.sleep(0.01)
    big = "melody chord song " * (3_000_000 // 18)  # ~3 MB, under the 4 MB message limit
    with TTMMClient(target) as c:
        t0 = time.perf_counter()
        e = _error(lambda: c.score(PROMPT, big, timeout=60))
        refused_in = time.perf_counter() - t0
    t.join(60)
    gap = _largest_gap(arrivals)
    print(f"multi-MB Score refused in {refused_in * 1e3:.0f} ms; largest gap between stream "
          f"chunks {gap * 1e3:.0f} ms")
    assert gap < 0.5, gap  # tokenized on the event loop: ~1.9 s here
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "characters" in e.details()
    assert len(arrivals) == 240


def test_one_client_cannot_hold_every_slot(fake):
    fake.engine.step_s = 0.05  # 240 tokens: 12 s, longer than the test
    target = fake.door(tokens=TOKENS, max_inflight=4)  # per client: half, 2
    held, refused = [], 0
    with TTMMClient(target, token="tok-alice") as alice:
        for _ in range(8):  # 2 x max_inflight streams nobody reads
            s = alice.stream(PROMPT, max_tokens=240, timeout=60)
            try:
                next(s)
                held.append(s)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                refused += 1
        assert len(held) == 2 and refused == 6
        with TTMMClient(target, token="tok-bob") as bob:
            assert bob.generate(PROMPT, max_tokens=3, timeout=30).completion_tokens == 3
        for s in held:
            s.cancel()
    deadline = time.time() + 10
    while fake.servers[0].servicer.admission.count and time.time() < deadline:
        time.sleep(0.05)
    assert fake.servers[0].servicer.admission.count == 0
    assert fake.servers[0].servicer.admission.by_client == {}
    with pytest.raises(ValueError, match="max_inflight_per_client must be >= 1"):
        ServerConfig(max_inflight_per_client=0)


def test_an_unread_stream_gives_its_slot_back_after_the_connection_age(fake):
    fake.engine.step_s = 0.05
    target = fake.door(max_connection_age_s=1.0, max_connection_age_grace_s=1.0)
    admission = fake.servers[0].servicer.admission
    c = TTMMClient(target)
    s = c.stream(PROMPT, max_tokens=240, timeout=60)
    next(s)  # admitted; never read again
    assert admission.count == 1
    deadline = time.time() + 8
    while admission.count and time.time() < deadline:
        time.sleep(0.1)
    assert admission.count == 0, "the unread stream still holds its slot"
    c.close()


# ----------------------------------------------------------------------------- 3. validation


def _inf_in_b(name, t):
    if ".lora_B." in name:
        t.view(-1)[0] = float("inf")
    return t


def test_add_expert_validates_tensors_metadata_rank_and_id(fake):
    target = fake.door(tokens=TOKENS, admin_tokens=frozenset({ADMIN}))
    rows = fake.service.library.centroids.shape[0]
    with TTMMClient(target, token=ADMIN) as admin, TTMMClient(target, token="tok-alice") as c:
        place_pending(fake.root, 4, edit=_inf_in_b)
        e = _error(lambda: _add(admin, 4))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "NaN or infinite" in e.details()
        place_pending(fake.root, 5, meta={"size": -3})
        e = _error(lambda: _add(admin, 5))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "size" in e.details()
        place_pending(fake.root, 6, meta={"group": "no spaces/slashes"})
        assert _code(lambda: _add(admin, 6)) == grpc.StatusCode.INVALID_ARGUMENT
        fake.engine.max_expert_rank = 2  # the engine's max_lora_rank
        place_pending(fake.root, 7)
        e = _error(lambda: _add(admin, 7))
        assert "rank 4 exceeds the engine's max_lora_rank 2" in e.details()
        for huge in (4_000_000_000, 1_000_000):
            e = _error(lambda h=huge: _add(admin, h))
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "expert_id: must be in [0, 1000000)" in e.details()
        assert fake.engine.added == [] and _on_disk(fake.root) == {0, 1, 2, 3}
        assert fake.service.library.centroids.shape[0] == rows
        assert _listed(c) == {0, 1, 2, 3}  # ListExperts still fine
        fake.engine.max_expert_rank = 64
        assert _add(admin, 7).expert.rank == 4


def test_library_with_negative_metadata_is_refused_at_open(fake_library):
    m = json.loads((fake_library / "manifest.json").read_text())
    m["experts"][2]["size"] = -1
    (fake_library / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(LibraryError, match="expert 2: size must be an integer >= 0"):
        Library.open(fake_library)


# ----------------------------------------------------------------------------- 4. faults


def test_dead_engine_is_unavailable_and_not_serving(fake):
    target = fake.door(engine_watch_s=0.1)
    server = fake.servers[0]
    fake.engine.is_running = False
    with TTMMClient(target) as c:
        assert _code(lambda: c.generate(PROMPT, max_tokens=2, timeout=30)) \
            == grpc.StatusCode.UNAVAILABLE
    assert fake.loop.run(asyncio.wait_for(server.engine_dead.wait(), 5)) is True
    with grpc.insecure_channel(target) as ch:
        h = health_pb2_grpc.HealthStub(ch)
        assert h.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING


def test_vllm_engine_death_maps_to_engine_error():
    """serve/engine.py: vLLM's EngineDeadError (and any error once the engine has errored)
    is EngineError, UNAVAILABLE; the health check's round trip reaches the engine core."""
    from vllm.v1.engine.exceptions import EngineDeadError

    from ttmm_vllm.serve.engine import Engine

    class DyingLLM:
        errored = False

        def generate(self, *a, **kw):
            async def gen():
                raise EngineDeadError()
                yield  # pragma: no cover
            return gen()

        async def check_health(self):
            return None

        async def is_sleeping(self):
            await asyncio.sleep(3600)  # a hung engine core

    engine = Engine.__new__(Engine)
    engine.llm = DyingLLM()

    async def run():
        return [o async for o in engine._run([1, 2], None, "r", None)]

    with pytest.raises(EngineError) as e:
        asyncio.run(run())
    assert status_of(e.value).code == "UNAVAILABLE"
    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(asyncio.wait_for(engine.check_health(), 0.2))
    engine.llm.errored = True
    with pytest.raises(EngineError):
        asyncio.run(run())
    with pytest.raises(EngineError):
        asyncio.run(engine.check_health())


def test_hung_engine_turns_health_not_serving_until_it_answers(fake):
    target = fake.door(engine_watch_s=0.05, health_probe_s=0.1, health_timeout_s=0.3)

    def status():
        with grpc.insecure_channel(target) as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                        timeout=10).status

    def becomes(want, within=5.0):
        deadline = time.time() + within
        while time.time() < deadline:
            if status() == want:
                return True
            time.sleep(0.05)
        return False

    assert status() == health_pb2.HealthCheckResponse.SERVING
    fake.engine.hang = True
    assert becomes(health_pb2.HealthCheckResponse.NOT_SERVING)
    assert not fake.servers[0].engine_dead.is_set()  # hung is not dead: no restart yet
    fake.engine.hang = False
    assert becomes(health_pb2.HealthCheckResponse.SERVING)


@pytest.mark.parametrize("flags,message", [
    (dict(tls_client_ca="ca.pem"), "--tls-client-ca .* needs --tls-cert and --tls-key"),
    (dict(tls_cert="c.pem"), "needs both a certificate and its key"),
    (dict(tls_key="k.pem"), "needs both a certificate and its key"),
])
def test_tls_misconfiguration_is_refused_at_start_up(tmp_path, capsys, flags, message):
    with pytest.raises(ValueError, match=message):
        ServerConfig(**flags)
    argv = []
    for k, v in flags.items():
        argv += [f"--{k.replace('_', '-')}", v]
    args = _serve_args(tmp_path, None, *argv)
    assert args.func(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.search(message, err)


def test_error_details_carry_no_absolute_path(fake, tmp_path):
    target = fake.door(tokens=TOKENS, admin_tokens=frozenset({ADMIN}))
    d = fake.root / expert_dirname(9)
    d.mkdir(parents=True)
    (d / PENDING_EXPERT).write_text(json.dumps({"centroid": fake.service.library.centroids[0]
                                                .tolist()}))
    with TTMMClient(target, token=ADMIN) as admin:
        e = _error(lambda: _add(admin, 9))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "experts/0009" in e.details()
    assert str(fake.root) not in e.details() and str(tmp_path) not in e.details()
    # and whatever raises a library error with a path in it, the status never carries it
    st = status_of(LibraryError(f"expert 3: bad file {fake.root}/experts/0003/x.safetensors"))
    assert str(fake.root) not in st.message and st.code == "FAILED_PRECONDITION"


# ----------------------------------------------------------------------------- 5. admin


def test_add_expert_survives_its_caller_cancelling(fake):
    """A 5 ms deadline on AddExpert while it commits: the change still completes in full
    (manifest, index, engine); retries see it; RemoveExpert then works."""
    lib = fake.service.library
    commit = lib.commit_added

    def slow_commit(*a):
        time.sleep(0.3)
        commit(*a)
    lib.commit_added = slow_commit
    fake.engine.add_delay = 0.2
    target = fake.door(tokens=TOKENS, admin_tokens=frozenset({ADMIN}))
    place_pending(fake.root, 4)
    with TTMMClient(target, token=ADMIN) as admin:
        assert _code(lambda: _add(admin, 4, timeout=0.005)) == \
            grpc.StatusCode.DEADLINE_EXCEEDED
        retries = []
        for _ in range(3):
            try:
                retries.append(_add(admin, 4).expert.expert_id)
            except grpc.RpcError as e:
                retries.append(e.code())
        assert set(retries) == {grpc.StatusCode.ALREADY_EXISTS}, retries
        assert 4 in fake.service.index and fake.engine.added == [4] and 4 in _on_disk(fake.root)
        _remove(admin, 4)
        assert 4 not in fake.service.index and 4 not in _on_disk(fake.root)
        assert fake.engine.removed == [4]


def test_admin_lock_is_held_until_the_change_finishes(fake):
    fake.engine.add_delay = 0.5
    place_pending(fake.root, 4)
    place_pending(fake.root, 5)

    async def scenario():
        first = asyncio.ensure_future(fake.service.add_expert(4))
        await asyncio.sleep(0.05)
        first.cancel()  # the caller goes away; the change goes on, holding the lock
        t0 = time.perf_counter()
        await fake.service.add_expert(5)
        return time.perf_counter() - t0

    waited = fake.loop.run(scenario())
    assert waited >= 0.4, "the second change ran while the first still held the engine"
    assert fake.engine.added == [4, 5] and {4, 5} <= set(fake.service.index.ids)


def test_remove_expert_rolls_back_when_the_engine_fails(fake):
    target = fake.door(tokens=TOKENS, admin_tokens=frozenset({ADMIN}))
    fake.engine.fail_remove = RuntimeError("worker refused")
    before = Library.open(fake.root).manifest
    with TTMMClient(target, token=ADMIN) as admin, TTMMClient(target, token="tok-alice") as c:
        assert _code(lambda: _remove(admin, 1)) == grpc.StatusCode.INTERNAL
        assert 1 in fake.service.index and _listed(c) == {0, 1, 2, 3}
        assert Library.open(fake.root).manifest == before
        assert fake.engine.added == [1]  # the engine re-synced with the restored manifest
        fake.engine.fail_remove = None
        _remove(admin, 1)
        assert _listed(c) == {0, 2, 3} and 1 not in _on_disk(fake.root)


def test_add_expert_rolls_back_when_the_engine_fails(fake):
    target = fake.door(tokens=TOKENS, admin_tokens=frozenset({ADMIN}))
    fake.engine.fail_add = EngineError("vLLM engine is dead; retry on another server")
    before = Library.open(fake.root).manifest
    rows = Library.open(fake.root).centroids.shape[0]
    place_pending(fake.root, 6)
    with TTMMClient(target, token=ADMIN) as admin:
        assert _code(lambda: _add(admin, 6)) == grpc.StatusCode.UNAVAILABLE
    reopened = Library.open(fake.root)
    assert reopened.manifest == before and reopened.centroids.shape[0] == rows
    assert 6 not in fake.service.index and fake.engine.removed == [6]


def test_admin_rpcs_are_refused_up_front_without_live_changes(loop, fake_library, tokenizer,
                                                             embedder):
    """The Ray front door's engine (RemoteEngine) cannot change its replicas' libraries:
    AddExpert/RemoveExpert are UNIMPLEMENTED before anything changes, no split brain."""
    f = Fake(loop, fake_library, tokenizer, embedder, engine_cls=RemoteLikeEngine)
    try:
        target = f.door(tokens=TOKENS, admin_tokens=frozenset({ADMIN}))
        place_pending(fake_library, 4)
        before = Library.open(fake_library).manifest
        with TTMMClient(target, token=ADMIN) as admin:
            for call in (lambda: _add(admin, 4), lambda: _remove(admin, 0)):
                e = _error(call)
                assert e.code() == grpc.StatusCode.UNIMPLEMENTED and "Ray" in e.details()
        assert Library.open(fake_library).manifest == before
        assert f.service.index.ids == [0, 1, 2, 3]
    finally:
        f.close()


def test_ray_remote_engine_has_no_live_changes():
    pytest.importorskip("ray")
    from ttmm_vllm.serve.ray_serve import RemoteEngine

    assert not callable(getattr(RemoteEngine, "add_expert", None))


# ----------------------------------------------------------------------------- the real engine


def test_real_engine_answers_its_health_probe_and_refuses_tiny_reroute_windows(loop, server,
                                                                              target):
    assert loop.run(server.service.engine_healthy(10)) is True
    assert server.service.engine.max_expert_rank >= 4
    with TTMMClient(target) as c:
        e = _error(lambda: c.generate(PROMPT, max_tokens=16, reroute_every=1, timeout=30))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_killed_engine_core_is_unavailable_not_serving_and_dead(loop, tiny_library,
                                                               tiny_model_dir):
    """A real vLLM engine of its own, its EngineCore process killed: requests end
    UNAVAILABLE (never INTERNAL), health turns NOT_SERVING, `engine_dead` is set (what makes
    `ttmm serve` exit with status 1)."""
    import psutil

    from tests.conftest import SERVER_ENGINE
    from ttmm_vllm.serve import ServeConfig, start

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    srv = loop.run(start(ServeConfig(
        library=str(tiny_library), base_model=str(tiny_model_dir),
        engine=EngineConfig(**SERVER_ENGINE),
        server=ServerConfig(port=0, engine_watch_s=0.2, health_probe_s=0))))
    try:
        target = f"127.0.0.1:{srv.port}"
        with TTMMClient(target) as c:
            assert c.generate(PROMPT, max_tokens=2, timeout=60).completion_tokens == 2
            new = [p for p in me.children(recursive=True) if p.pid not in before]
            cores = [p for p in new if "EngineCore" in " ".join([p.name()] + p.cmdline())]
            assert cores, [p.name() for p in new]
            for p in cores:
                p.kill()
            assert loop.run(asyncio.wait_for(srv.engine_dead.wait(), 60)) is True
            for _ in range(3):
                e = _error(lambda: c.generate(PROMPT, max_tokens=2, timeout=30))
                assert e.code() == grpc.StatusCode.UNAVAILABLE, (e.code(), e.details())
                assert "engine is dead" in e.details()
            e = _error(lambda: c.score(PROMPT, "song", timeout=30))
            assert e.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(target) as ch:
            assert health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=10).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        loop.run(srv.stop(grace=0))


# ----------------------------------------------------------------------------- 6. the doc


def test_security_doc_states_every_limit_and_its_default():
    from ttmm_vllm.library.format import LibraryLimits

    doc = (Path(__file__).parents[2] / "docs/security.md").read_text()
    for cls, names in (
        (ServiceConfig, ("min_reroute_every", "max_reroute_windows", "max_continuation_chars",
                         "max_continuation_tokens", "max_prompt_chars", "max_explicit_experts",
                         "max_stop_strings")),
        (ServerConfig, ("max_inflight", "max_inflight_per_client", "max_message_bytes",
                        "keepalive_time_s", "keepalive_timeout_s", "max_connection_age_s",
                        "max_connection_age_grace_s", "health_probe_s", "health_timeout_s")),
        (LibraryLimits, ("max_expert_id", "max_rank", "max_title_chars", "max_group_chars")),
    ):
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for name in names:
            row = next((line for line in doc.splitlines() if line.startswith(f"| `{name}` |")),
                       None)
            assert row is not None, f"docs/security.md does not state {cls.__name__}.{name}"
            want = defaults[name]
            shown = {f"{want:_}" if isinstance(want, int) else str(want), str(want)}
            if isinstance(want, float) and want.is_integer():
                shown.add(str(int(want)))
            assert any(s in row for s in shown) or want is None, (name, want, row)
    assert np.all([s in doc for s in ("Ray", "admin", "client_groups", "TLS")])
