"""Ray: `ttmm build --ray` (experts as Ray tasks) and `ttmm serve --ray` (Ray Serve replicas
behind Ray Serve's gRPC proxy), on one local Ray of 2 CPUs shared by the whole module.

Nothing is mocked: real Ray tasks train the tiny model's experts, a real worker process is
killed mid-build, and real vLLM engines answer through Ray Serve's gRPC proxy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is the optional extra ttmm-vllm[ray]")

import grpc  # noqa: E402
import psutil  # noqa: E402

from benchmarks.ray_build import max_expert_difference  # noqa: E402
from tests.conftest import SERVER_ENGINE  # noqa: E402
from ttmm_vllm.cli import main  # noqa: E402
from ttmm_vllm.client import TTMMClient  # noqa: E402
from ttmm_vllm.library import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Library  # noqa: E402
from ttmm_vllm.stubs import SERVICE_NAME, pb2  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
K = 4
TOPIC_PROMPTS = [
    "guitar piano melody chord the band song singer lyric",
    "rocket telescope orbit moon the planet star galaxy comet",
    "dough oven butter garlic the salt recipe chef spice",
    "striker goal keeper league the match referee penalty",
]


@pytest.fixture(scope="session")
def ray_address():
    """One local Ray for the session: 2 CPUs, no dashboard, a small object store."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=500 << 20,
             log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


# --------------------------------------------------------------------------- build


def _args(corpus: Path, model: Path, embedder: Path, out: Path, *extra: str) -> list[str]:
    # One torch thread in every training process: with the same threads the kernels take
    # the same paths, so a local and a Ray build give bitwise-equal tensors.
    return ["build", "--corpus", str(corpus), "--base-model", str(model), "--embedder",
            str(embedder), "--out", str(out), "-K", str(K), "--max-tokens", "128",
            "--query-tokens", "16", "--holdout-fraction", "0.1", "--lr", "1e-3",
            "--epochs", "2", "--threads", "1", "--no-tune", *extra]


@pytest.fixture(scope="module")
def local_build(tmp_path_factory, corpus_file, tiny_model_dir, tiny_embedder_dir) -> Path:
    out = tmp_path_factory.mktemp("local") / "lib"
    assert main(_args(corpus_file, tiny_model_dir, tiny_embedder_dir, out)) == 0
    return out


@pytest.fixture(scope="module")
def ray_build(tmp_path_factory, ray_address, corpus_file, tiny_model_dir, tiny_embedder_dir):
    out = tmp_path_factory.mktemp("ray") / "lib"
    handler = _Capture()
    logging.getLogger("training").addHandler(handler)
    logging.getLogger("training").setLevel(logging.INFO)
    try:
        assert main(_args(corpus_file, tiny_model_dir, tiny_embedder_dir, out,
                          "--ray", ray_address)) == 0
    finally:
        logging.getLogger("training").removeHandler(handler)
    return out, handler.text()


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def text(self) -> str:
        return "\n".join(self.lines)


def _assert_same_experts(lib: Path, ref: Path) -> None:
    a, b = Library.open(lib), Library.open(ref)
    assert [e.sha256 for e in a.manifest.experts] == [e.sha256 for e in b.manifest.experts]
    assert max_expert_difference(lib, ref) == 0.0  # every tensor, bitwise
    for k in range(K):
        assert (lib / f"experts/{k:04d}" / ADAPTER_CONFIG).read_bytes() == \
            (ref / f"experts/{k:04d}" / ADAPTER_CONFIG).read_bytes()


def test_ray_build_is_valid_and_equals_the_local_build(ray_build, local_build, tiny_model_dir):
    """Tolerance: none. Both builds run the same code on the same bytes with one torch
    thread, so every tensor (and hence every checksum) is bitwise equal."""
    out, log_text = ray_build
    lib = Library.open(out, base_model_dir=tiny_model_dir)  # validates checksums, base model
    assert lib.num_experts == K
    _assert_same_experts(out, local_build)
    # every expert came back from a Ray worker process, not this one
    pids = {int(line.split("(pid ")[1].split(")")[0]) for line in log_text.splitlines()
            if "(pid " in line}
    assert pids and os.getpid() not in pids, log_text
    assert log_text.count(": trained on ") == K


def test_second_ray_run_skips_everything(ray_build, corpus_file, tiny_model_dir,
                                         tiny_embedder_dir, caplog):
    out, _ = ray_build
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("experts/*/" + ADAPTER_WEIGHTS)}
    caplog.set_level(logging.INFO, logger="training")
    assert main(_args(corpus_file, tiny_model_dir, tiny_embedder_dir, out,
                      "--ray", "auto")) == 0
    assert len(mtimes) == K
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    for k in range(K):
        assert f"expert {k}: already trained" in caplog.text
    assert "expert tasks on" not in caplog.text  # nothing was sent to Ray


def _ray_workers_running(prefix: str) -> list[psutil.Process]:
    """Ray worker processes whose title says they run a task named `prefix...`."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or ())
        if cmd.startswith(f"ray::{prefix}"):
            found.append(p)
    return found


def test_worker_killed_mid_build_is_retried(tmp_path, ray_address, corpus_file,
                                            tiny_model_dir, tiny_embedder_dir, local_build):
    """A second driver joins the session's cluster by address (as `--ray HOST:PORT` on
    another machine would); the test kills the worker process running one expert task."""
    out = tmp_path / "lib"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    log_path = tmp_path / "build.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ttmm_vllm.cli",
             *_args(corpus_file, tiny_model_dir, tiny_embedder_dir, out, "--ray",
                    ray_address)],
            cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        killed = None
        deadline = time.monotonic() + 180
        try:
            while killed is None:
                assert proc.poll() is None, log_path.read_text()[-4000:]
                assert time.monotonic() < deadline, "no expert task seen running"
                for worker in _ray_workers_running("ttmm expert"):
                    title = " ".join(worker.cmdline())
                    expert = int(title.split("ttmm expert ")[1].split()[0])
                    if (out / f"experts/{expert:04d}" / ADAPTER_WEIGHTS).exists():
                        continue
                    worker.send_signal(signal.SIGKILL)
                    killed = (expert, worker.pid)
                    break
                time.sleep(0.02)
            assert proc.wait(timeout=300) == 0, log_path.read_text()[-4000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    assert not psutil.pid_exists(killed[1]) or \
        psutil.Process(killed[1]).status() == psutil.STATUS_ZOMBIE
    log_text = log_path.read_text()
    assert f"expert {killed[0]}: trained on" in log_text  # by a retry, on another worker
    assert f"(pid {killed[1]})" not in log_text
    Library.open(out, base_model_dir=tiny_model_dir)
    _assert_same_experts(out, local_build)


def test_an_expert_that_keeps_failing_is_named_and_the_others_are_kept(
        tmp_path, ray_address, corpus, tiny_model_dir):
    from training.experts import ExpertJob, TrainSettings, finished
    from training.ray_build import RayOptions, train_on_ray
    from ttmm_vllm.library import LLAMA_TARGETS, model_fingerprint

    settings = TrainSettings(rank=4, alpha=8.0, target_modules=LLAMA_TARGETS, max_tokens=64,
                             threads=1)
    texts = [tuple(d["text"] for d in corpus[k::3][:8]) for k in range(3)]
    texts[1] = ()  # no documents: training raises, every time
    jobs = [ExpertJob(f"expert {k}", k, str(tiny_model_dir), model_fingerprint(tiny_model_dir),
                      texts[k], settings, k, str(tmp_path / f"experts/{k:04d}"))
            for k in range(3)]
    with pytest.raises(RuntimeError, match=r"training failed for expert 1 \(first error: "
                                           r"expert 1: no training documents"):
        train_on_ray(jobs, RayOptions(address=ray_address, retries=1))
    assert finished(jobs[0]) is not None and finished(jobs[2]) is not None
    assert not (tmp_path / "experts/0001").exists()
    assert not list((tmp_path / "experts").glob(".*tmp*"))


def test_bad_ray_settings_are_refused_by_name(capsys):
    assert main(["build", "--corpus", "c.jsonl", "--base-model", "m", "--embedder", "e",
                 "--out", "lib", "--ray", "--ray-cpus", "0"]) == 2
    assert "ray cpus per task must be > 0, got 0.0" in capsys.readouterr().err


# --------------------------------------------------------------------------- serve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_app(ray_address, tiny_library, tiny_model_dir):
    """The tiny library on Ray Serve: 2 engine replicas (same engine settings as the session
    `server`), expert affinity on, behind Ray Serve's gRPC proxy."""
    from ray import serve

    from ttmm_vllm.ray_runtime import forwarded_env
    from ttmm_vllm.serve import ray_serve
    from ttmm_vllm.serve.engine_api import EngineConfig
    from ttmm_vllm.serve.grpc_server import ServerConfig

    cfg = ray_serve.RayServeConfig(address=ray_address, replicas=2, replica_cpus=0.5,
                                   frontend_cpus=0.25, affinity=True,
                                   grpc_port=_free_port(), http_port=_free_port(),
                                   env_vars=forwarded_env())
    deployed = ray_serve.deploy(
        tiny_library, EngineConfig(merge_path="disk", **SERVER_ENGINE),
        ServerConfig(max_inflight=64, grace_s=5), cfg, model_dir=tiny_model_dir)
    assert deployed.grpc_port == cfg.grpc_port
    target = f"127.0.0.1:{deployed.grpc_port}"
    TTMMClient(target).wait_ready(60)
    yield target, deployed.frontend
    with contextlib.suppress(Exception):  # the serve-command test may have deleted it
        serve.delete(cfg.app_name)


def _engine_handle():
    from ray import serve

    return serve.get_deployment_handle("EngineReplica", app_name="ttmm")


def test_two_replicas_answer_concurrent_clients_like_the_single_server(ray_app, target):
    ray_target, frontend = ray_app
    prompts = [TOPIC_PROMPTS[i % 4] + (" the" * (i // 4)) for i in range(16)]

    def one(args):
        where, i = args
        with TTMMClient(where) as c:
            return c.generate(prompts[i], max_tokens=10, max_active=1 + i % 3, timeout=120)

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, [(ray_target, i) for i in range(16)]))
        want = list(pool.map(one, [(target, i) for i in range(16)]))
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert list(g.token_ids) == list(w.token_ids) and g.text == w.text, i
        assert [(e.expert_id, e.title) for e in g.routing.experts] == \
            [(e.expert_id, e.title) for e in w.routing.experts]
        np.testing.assert_allclose([e.weight for e in g.routing.experts],
                                   [e.weight for e in w.routing.experts], atol=1e-6)
        assert g.routing.merged_rank == w.routing.merged_rank > 0
        assert g.finish_reason == pb2.FINISH_REASON_LENGTH and g.completion_tokens == 10
        assert g.timings.generate_ms > 0 and g.timings.embed_ms > 0
    # affinity: every top expert was served by exactly one replica
    stats = frontend.stats.remote().result()
    by_key: dict[str, set[str]] = {}
    for replica, s in stats["replicas"].items():
        for key in s["keys"]:
            by_key.setdefault(key, set()).add(replica)
    assert len(by_key) == 4 and all(len(r) == 1 for r in by_key.values()), stats


def test_requests_without_a_top_expert_spread_over_both_replicas(ray_app):
    ray_target, frontend = ray_app
    before = frontend.stats.remote().result()["replicas"]

    def one(i):
        with TTMMClient(ray_target) as c:
            return c.generate(TOPIC_PROMPTS[i % 4], max_tokens=24, mode="base", timeout=120)

    with ThreadPoolExecutor(16) as pool:
        assert all(len(r.token_ids) == 24 for r in pool.map(one, range(16)))
    after = frontend.stats.remote().result()["replicas"]
    served = [r for r, s in after.items()
              if s["keys"].get("base", 0) > before.get(r, {"keys": {}})["keys"].get("base", 0)]
    assert len(served) == 2, after


def test_stream_through_the_proxy_yields_the_single_servers_tokens(ray_app, target):
    ray_target, _ = ray_app
    kw = dict(max_tokens=12, logprobs=True)
    with TTMMClient(target) as single, TTMMClient(ray_target) as c:
        want = single.generate(TOPIC_PROMPTS[1], **kw)
        chunks = list(c.stream(TOPIC_PROMPTS[1], **kw))
    assert len(chunks) > 1
    assert [t for ch in chunks for t in ch.token_ids] == list(want.token_ids)
    assert "".join(ch.text for ch in chunks) == want.text
    assert chunks[0].routing.experts and not chunks[-1].HasField("routing")
    assert chunks[-1].finish_reason == pb2.FINISH_REASON_LENGTH
    np.testing.assert_allclose([x for ch in chunks for x in ch.logprobs], want.logprobs,
                               atol=1e-5)


def test_ttmm_generate_command_works_unchanged(ray_app, capsys):
    ray_target, _ = ray_app
    assert main(["generate", "--target", ray_target, TOPIC_PROMPTS[2], "--max-tokens", "4",
                 "--stream"]) == 0
    err = capsys.readouterr().err
    assert "cooking" in err and "expert" in err


def test_status_codes_and_details_cross_the_proxy(ray_app):
    ray_target, _ = ray_app
    with TTMMClient(ray_target) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.generate(TOPIC_PROMPTS[0], max_tokens=0, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "sampling.max_tokens: must be >= 1, got 0" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            list(c.stream(TOPIC_PROMPTS[0], experts=[99], timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown expert ids [99]" in e.value.details()
        assert len(c.list_experts(timeout=30).experts) == K


def test_health_and_reflection_through_the_proxy(ray_app):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    ray_target, _ = ray_app
    with grpc.insecure_channel(ray_target) as ch:
        h = health_pb2_grpc.HealthStub(ch)
        for name in ("", SERVICE_NAME):
            resp = h.Check(health_pb2.HealthCheckRequest(service=name), timeout=30)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:
            h.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        r = reflection_pb2_grpc.ServerReflectionStub(ch)
        reqs = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        names = {s.name for resp in r.ServerReflectionInfo(reqs, timeout=30)
                 for s in resp.list_services_response.service}
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def test_cancelled_stream_frees_its_adapter_on_the_replica(ray_app):
    """Cancellation crosses the proxy, the Frontend and the replica down to vLLM."""
    ray_target, _ = ray_app
    engine = _engine_handle()
    key = "expert:3"  # the affinity router sends these stats calls to the stream's replica
    with TTMMClient(ray_target) as c:
        stream = c.stream(TOPIC_PROMPTS[3], max_tokens=200, experts=[3, 1],
                          expert_weights=[0.7, 0.3], timeout=120)
        next(stream)
        assert engine.stats.remote(affinity_key=key).result()["in_use"] >= 1
        stream.cancel()
    _wait_until_idle(engine, key)
    with TTMMClient(ray_target) as c, pytest.raises(grpc.RpcError) as e:  # a deadline too
        c.generate(TOPIC_PROMPTS[3], max_tokens=240, experts=[3, 0], expert_weights=[0.6, 0.4],
                   timeout=0.5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_until_idle(engine, key)


def _wait_until_idle(engine, key: str) -> None:
    deadline = time.time() + 20
    while engine.stats.remote(affinity_key=key).result()["in_use"] and time.time() < deadline:
        time.sleep(0.1)
    assert engine.stats.remote(affinity_key=key).result()["in_use"] == 0


def test_what_the_proxy_cannot_carry_undecodable_requests(ray_app, target):
    """The single server answers a request whose bytes do not decode with INVALID_ARGUMENT
    naming UTF-8; Ray Serve's proxy decodes requests itself, before any ttmm code runs, so
    the client gets the proxy's own error instead. The service keeps answering."""
    ray_target, _ = ray_app
    bad = b"\x0a\x03\xff\xfe\xfd"  # field 1 (prompt), 3 bytes, not UTF-8
    codes = {}
    for name, where in (("single", target), ("ray", ray_target)):
        with grpc.insecure_channel(where) as ch:
            with pytest.raises(grpc.RpcError) as e:
                ch.unary_unary(f"/{SERVICE_NAME}/Generate")(bad, timeout=30)
            codes[name] = (e.value.code(), e.value.details())
    assert codes["single"][0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in codes["single"][1]
    print("undecodable request:", codes)
    assert codes["ray"][0] != grpc.StatusCode.INVALID_ARGUMENT, codes
    with TTMMClient(ray_target) as c:
        assert len(c.generate(TOPIC_PROMPTS[0], max_tokens=2, timeout=60).token_ids) == 2


def test_ttmm_serve_ray_command_joins_the_cluster_and_stops_on_sigterm(
        ray_app, ray_address, tiny_library, tiny_model_dir):
    """`ttmm serve --ray ADDRESS` from another process: it finds Serve already running (the
    fixture's proxy and port), replaces the application, answers, and takes it down on
    SIGTERM. Runs last among the serving tests: it replaces the fixture's application."""
    from ray import serve

    port = int(ray_app[0].rsplit(":", 1)[1])
    cmd = [sys.executable, "-m", "ttmm_vllm.cli", "serve", "--library", str(tiny_library),
           "--base-model", str(tiny_model_dir), "--ray", ray_address, "--port", str(port),
           "--replicas", "1", "--replica-cpus", "0.25", "--frontend-cpus", "0.25",
           "--merge-path", "disk", "--max-model-len", "256", "--max-num-seqs", "32",
           "--max-loras", "8", "--idle-adapters", "4", "--kv-cache-gib", "0.0625"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 240
        while not any(line.startswith("serving ") for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-4000:]
            lines.append(proc.stdout.readline())
        assert f"gRPC port {port}, 1 engine replica(s)" in lines[-1]
        with TTMMClient(f"127.0.0.1:{port}") as c:
            assert len(c.generate(TOPIC_PROMPTS[0], max_tokens=3, timeout=120).token_ids) == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "ttmm" not in serve.status().applications


def test_affinity_ranking_is_stable_and_moves_few_keys():
    from ttmm_vllm.serve.ray_serve import rendezvous_order

    replicas = [f"r{i}" for i in range(4)]
    keys = [f"expert:{k}" for k in range(400)]
    first = {k: replicas[rendezvous_order(k, replicas)[0]] for k in keys}
    assert first == {k: replicas[rendezvous_order(k, replicas)[0]] for k in keys}
    counts = {r: sum(v == r for v in first.values()) for r in replicas}
    assert min(counts.values()) > 60  # spread, not piled on one replica
    fewer = replicas[:3]  # replica r3 goes away: only its keys move
    moved = [k for k in keys if first[k] != fewer[rendezvous_order(k, fewer)[0]]]
    assert moved and all(first[k] == "r3" for k in moved)

