"""Bad input, overload, faults, and who may call: the server keeps serving and loses nothing."""

from __future__ import annotations

import gc
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.certs import PKI
from tests.serve.mixed_load import mixed_request
from ttmm_vllm.client import TTMMClient
from ttmm_vllm.serve.grpc_server import Server, ServerConfig
from ttmm_vllm.stubs import SERVICE_NAME, pb2

PROMPT = "guitar piano melody chord the band song singer lyric"
CLEAN_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.PERMISSION_DENIED}
FUZZ_EXAMPLES = int(os.environ.get("TTMM_FUZZ_EXAMPLES", "600"))


@pytest.fixture(scope="module")
def baseline(client):
    """A normal request's answer, to check the server still answers correctly after abuse."""
    return list(client.generate(PROMPT, max_tokens=6).token_ids)


def _extra_server(loop, server, **config):
    """A second front door on the session's service (no second engine)."""
    cfg = ServerConfig(port=0, **config)
    return loop.run(Server.start(server.service, cfg, own_service=False))


# ----------------------------------------------------------------------------- bad input

# Each field is usually valid and sometimes wild, so the fuzz exercises both the happy path
# (real generations with odd but legal settings) and every validation branch.
wild_floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


def sometimes(valid, wild):
    return st.one_of(valid, valid, valid, wild)


texts = sometimes(st.sampled_from([PROMPT, "rocket orbit moon", "é ü ß 漢字 emoji 🎉 the band",
                                   "dough oven the", "x"]),
                  st.one_of(st.text(max_size=60), st.sampled_from(["", "   ", "\n\t",
                                                                   "x " * 300, "\x00abc"])))


@st.composite
def requests(draw):
    s = pb2.SamplingOptions()
    s.max_tokens = draw(sometimes(st.integers(1, 4), st.integers(-2**31, 2**31 - 1)))
    s.temperature = draw(sometimes(st.floats(0, 2), wild_floats))
    if draw(st.booleans()):
        s.top_p = draw(sometimes(st.floats(0.05, 1), wild_floats))
    if draw(st.booleans()):
        s.top_k = draw(sometimes(st.integers(-1, 50), st.integers(-2**31, 2**31 - 1)))
    if draw(st.booleans()):
        s.seed = draw(st.integers(-2**63, 2**63 - 1))
    s.stop.extend(draw(st.lists(st.text(min_size=1, max_size=5), max_size=2)))
    r = pb2.RoutingOptions(mode=draw(sometimes(st.integers(0, 4), st.integers(5, 99))))
    if draw(st.booleans()):
        r.beta = draw(sometimes(st.floats(0.01, 2), wild_floats))
    if draw(st.booleans()):
        r.tau = draw(sometimes(st.floats(0, 0.2), wild_floats))
    if draw(st.booleans()):
        r.max_active = draw(sometimes(st.integers(1, 4), st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        experts = draw(sometimes(st.lists(st.integers(0, 3), max_size=3, unique=True),
                                 st.lists(st.integers(0, 2**32 - 1), max_size=70)))
        r.experts.extend(experts)
        if draw(st.booleans()):
            r.expert_weights.extend(draw(sometimes(
                st.lists(st.floats(0.01, 1), min_size=len(experts),
                         max_size=len(experts)),
                st.lists(wild_floats, max_size=5))))
    ids = draw(st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 500), max_size=8)) \
        if draw(st.integers(0, 5)) == 0 else []
    return pb2.GenerateRequest(prompt=draw(texts), sampling=s, routing=r, prompt_token_ids=ids)


def test_fuzzed_requests_get_a_response_or_a_clean_error(target, client, baseline):
    channel = grpc.insecure_channel(target)
    generate = channel.unary_unary(f"/{SERVICE_NAME}/Generate",
                                   request_serializer=pb2.GenerateRequest.SerializeToString,
                                   response_deserializer=pb2.GenerateResponse.FromString)
    raw = channel.unary_unary(f"/{SERVICE_NAME}/Generate")
    seen = {"ok": 0, "errors": 0}

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(req=requests(), junk=st.binary(max_size=64))
    def check(req, junk):
        try:
            resp = generate(req, timeout=60)
            seen["ok"] += 1
            assert resp.completion_tokens == len(resp.token_ids) >= 1
        except grpc.RpcError as e:
            seen["errors"] += 1
            assert e.code() in CLEAN_ERRORS, (e.code(), e.details(), req)
            assert e.details()
        try:
            raw(junk, timeout=60)
        except grpc.RpcError as e:
            assert e.code() in CLEAN_ERRORS, (e.code(), e.details(), junk)

    check()
    channel.close()
    print(f"fuzz: {FUZZ_EXAMPLES} structured + {FUZZ_EXAMPLES} raw requests, "
          f"{seen['ok']} served, {seen['errors']} clean errors")
    assert seen["ok"] > FUZZ_EXAMPLES // 10 and seen["errors"] > FUZZ_EXAMPLES // 10
    assert list(client.generate(PROMPT, max_tokens=6).token_ids) == baseline


def test_oversized_message_is_invalid_argument(target):
    big = "word " * ((4 << 20) // 5 + 10)
    with TTMMClient(target, max_message_bytes=16 << 20) as c, \
            pytest.raises(grpc.RpcError) as e:
        c.generate(big, max_tokens=1, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "exceeds the limit" in e.value.details()


def test_only_safetensors_are_read(tiny_library, tmp_path):
    from ttmm_vllm.library import LibraryError, read_adapter

    d = tmp_path / "pickled"
    shutil.copytree(tiny_library / "experts/0000", d)
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    with pytest.raises(LibraryError, match="only safetensors"):
        read_adapter(d)


# ----------------------------------------------------------------------------- overload


def test_full_admission_queue_answers_resource_exhausted_quickly(loop, server, baseline):
    extra = _extra_server(loop, server, max_inflight=1)
    try:
        with TTMMClient(f"127.0.0.1:{extra.port}") as c:
            stream = c.stream(PROMPT, max_tokens=240, temperature=1.0, seed=1)
            next(stream)  # admitted and generating
            t0 = time.perf_counter()
            with pytest.raises(grpc.RpcError) as e:
                c.generate(PROMPT, max_tokens=2, timeout=30)
            elapsed = time.perf_counter() - t0
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert elapsed < 2.0, elapsed
            list(stream)
            assert list(c.generate(PROMPT, max_tokens=6).token_ids) == baseline
    finally:
        loop.run(extra.stop(grace=1))


def test_soak_leaves_nothing_behind(target, server, baseline):
    """A fixed count of requests, many at once: completed, cancelled, deadline-exceeded."""
    engine = server.service.engine
    registry = engine.registry
    proc = psutil.Process()
    prompts = ["guitar piano melody chord", "rocket telescope orbit moon",
               "dough oven butter garlic", "striker goal keeper league"]
    outcomes = {"completed": 0, "cancelled": 0, "deadline": 0}

    def one(i):
        with TTMMClient(target) as c:
            return mixed_request(c, i, prompts, max_tokens=24)

    def round_(n):
        with ThreadPoolExecutor(24) as pool:
            for r in pool.map(one, range(n)):
                outcomes[r] += 1

    round_(48)  # warm-up: first-time allocations are not growth
    gc.collect()
    rss0 = proc.memory_info().rss
    round_(int(os.environ.get("TTMM_SOAK_REQUESTS", "240")))
    deadline = time.time() + 15
    while registry.in_use and time.time() < deadline:
        time.sleep(0.1)
    gc.collect()
    rss1 = proc.memory_info().rss
    stats = engine.adapter_stats()
    print(f"soak: {outcomes}, adapters {stats}, RSS {rss0 >> 20} -> {rss1 >> 20} MiB")
    assert registry.in_use == 0
    assert registry.registered <= registry.idle_capacity
    assert stats["scratch_files"] <= registry.registered
    assert server.servicer.admission.count == 0
    assert rss1 - rss0 < 150 << 20, f"RSS grew {(rss1 - rss0) >> 20} MiB"
    assert outcomes["cancelled"] > 0 and outcomes["completed"] > 0
    with TTMMClient(target) as c:
        assert list(c.generate(PROMPT, max_tokens=6).token_ids) == baseline


# ----------------------------------------------------------------------------- faults


def test_expert_corrupted_after_start_is_refused_never_served(loop, server, tiny_library,
                                                              tmp_path):
    """The disk path reads experts on demand, checksum-verified: a file changed after start
    is refused with an error that names the expert."""
    from ttmm_vllm.library import Library, LibraryError
    from ttmm_vllm.library.expert_cache import ExpertCache

    lib_dir = tmp_path / "lib"
    shutil.copytree(tiny_library, lib_dir)
    lib = Library.open(lib_dir)
    cache = ExpertCache(lib)
    f = lib_dir / "experts/0001/adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x55
    f.write_bytes(bytes(data))
    with pytest.raises(LibraryError, match="expert 1 .*checksum mismatch"):
        cache.get(1)
    assert cache.get(0).expert_id == 0  # the others still serve


# ----------------------------------------------------------------------------- security


def test_bearer_token_authentication(loop, server, baseline):
    extra = _extra_server(loop, server, tokens={"s3cret": "alice"},
                          admin_tokens=frozenset({"adm1n"}))
    target = f"127.0.0.1:{extra.port}"
    try:
        for token in (None, "wrong"):
            with TTMMClient(target, token=token) as c, pytest.raises(grpc.RpcError) as e:
                c.generate(PROMPT, max_tokens=2, timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with TTMMClient(target, token="s3cret") as c:
            assert list(c.generate(PROMPT, max_tokens=6).token_ids) == baseline
            with pytest.raises(grpc.RpcError) as e:
                c.stub.RemoveExpert(pb2.RemoveExpertRequest(expert_id=0),
                                    metadata=c.metadata, timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        loop.run(extra.stop(grace=1))


def test_tls_and_mutual_tls(loop, server, baseline, tmp_path):
    pki = PKI(tmp_path / "pki")
    tls = _extra_server(loop, server, tls_cert=pki.server_cert, tls_key=pki.server_key)
    mtls = _extra_server(loop, server, tls_cert=pki.server_cert, tls_key=pki.server_key,
                         tls_client_ca=pki.ca_file,
                         client_groups={"alice": ("default",), "bob": ("nothing",)})
    try:
        with TTMMClient(f"localhost:{tls.port}", root_certificates=pki.ca_pem) as c:
            assert list(c.generate(PROMPT, max_tokens=6).token_ids) == baseline
        with TTMMClient(f"127.0.0.1:{tls.port}") as plain, pytest.raises(grpc.RpcError) as e:
            plain.generate(PROMPT, max_tokens=2, timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # mutual TLS: no client certificate, no connection
        with TTMMClient(f"localhost:{mtls.port}", root_certificates=pki.ca_pem) as c, \
                pytest.raises(grpc.RpcError) as e:
            c.generate(PROMPT, max_tokens=2, timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        key, cert = pki.client("alice")
        with TTMMClient(f"localhost:{mtls.port}", root_certificates=pki.ca_pem,
                        private_key=key, certificate_chain=cert) as c:
            assert list(c.generate(PROMPT, max_tokens=6).token_ids) == baseline
        # the mTLS subject is the identity: bob may use no expert group
        key, cert = pki.client("bob")
        with TTMMClient(f"localhost:{mtls.port}", root_certificates=pki.ca_pem,
                        private_key=key, certificate_chain=cert) as c:
            assert len(c.list_experts().experts) == 0
            with pytest.raises(grpc.RpcError) as e:
                c.generate(PROMPT, max_tokens=2, experts=[0], timeout=10)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        loop.run(tls.stop(grace=1))
        loop.run(mtls.stop(grace=1))


def test_no_request_field_names_a_path():
    """Experts are named by library ids only: no message the server reads carries a path."""
    for msg in (pb2.GenerateRequest, pb2.ScoreRequest, pb2.RouteRequest, pb2.AddExpertRequest,
                pb2.RemoveExpertRequest):
        names = {f.name for f in msg.DESCRIPTOR.fields}
        nested = {f.name for f in pb2.RoutingOptions.DESCRIPTOR.fields}
        assert not any(w in n for n in names | nested for w in ("path", "file", "dir", "url"))
