"""Session-wide tiny artefacts: built once per test session, shared by every test."""

from __future__ import annotations

import json
from pathlib import Path

from ttmm_vllm.home import offline_env

offline_env()

import pytest  # noqa: E402

from ttmm_vllm import testing as tiny  # noqa: E402


@pytest.fixture(scope="session")
def corpus() -> list[dict]:
    return tiny.synthetic_corpus()


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory, corpus) -> Path:
    """The synthetic corpus as the JSONL file `ttmm build --corpus` reads."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in corpus))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, corpus):
    return tiny.build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"),
                                 [d["text"] for d in corpus])


@pytest.fixture(scope="session")
def tiny_embedder_dir(tmp_path_factory, corpus):
    return tiny.build_tiny_embedder(tmp_path_factory.mktemp("tiny-embedder"),
                                    [d["text"] for d in corpus])


@pytest.fixture(scope="session")
def tiny_library(tmp_path_factory, tiny_model_dir, tiny_embedder_dir, corpus):
    """Four random rank-4 experts, one per topic of the synthetic corpus."""
    return tiny.build_random_library(tmp_path_factory.mktemp("tiny-library"), tiny_model_dir,
                                     tiny_embedder_dir, docs=corpus)


@pytest.fixture(scope="session")
def loop():
    """One asyncio loop thread for every async service of the session."""
    from ttmm_vllm.loop import LoopThread

    lt = LoopThread()
    yield lt
    lt.close()


# One engine and one gRPC server for the whole session (an engine start costs ~15 s here).
SERVER_ENGINE = dict(max_model_len=256, max_num_seqs=32, max_loras=8, idle_adapters=4,
                     kv_cache_bytes=64 << 20)


@pytest.fixture(scope="session")
def server(loop, tiny_library, tiny_model_dir):
    """The real ttmm gRPC server on 127.0.0.1 (any free port), tiny model, tiny library, with
    the OpenAI-compatible HTTP door beside it (`server.http.port`)."""
    from ttmm_vllm.serve import ServeConfig, start
    from ttmm_vllm.serve.engine_api import EngineConfig
    from ttmm_vllm.serve.grpc_server import ServerConfig
    from ttmm_vllm.serve.http_server import HttpConfig

    srv = loop.run(start(ServeConfig(
        library=str(tiny_library), base_model=str(tiny_model_dir),
        engine=EngineConfig(**SERVER_ENGINE),  # the default: merged in the worker
        server=ServerConfig(port=0, metrics_port=0, max_inflight=64, grace_s=5),
        http=HttpConfig(port=0))))
    yield srv
    loop.run(srv.stop(grace=2))


@pytest.fixture(scope="session")
def target(server) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture(scope="session")
def client(target):
    """A TTMMClient on the session server, ready."""
    from ttmm_vllm.client import TTMMClient

    c = TTMMClient(target)
    c.wait_ready(60)
    yield c
    c.close()
