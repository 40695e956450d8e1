"""Starting a server: the one sequence the CLI, the demo, the benchmarks and the tests share.

    open + validate the library -> embedder -> vLLM engine -> service -> gRPC server
        [-> the OpenAI-compatible HTTP door on the same service, auth and admission]

`start(config)` returns the running `Server`; `await server.stop()` drains it and shuts the
engine down. Everything a start needs is one typed `ServeConfig`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace

from ttmm_vllm.library import Library
from ttmm_vllm.routing.embed import load_library_embedder
from ttmm_vllm.serve.engine import Engine
from ttmm_vllm.serve.engine_api import EngineConfig
from ttmm_vllm.serve.grpc_server import Server, ServerConfig
from ttmm_vllm.serve.http_server import HttpConfig, HttpServer
from ttmm_vllm.serve.service import ServiceConfig, TTMMService


@dataclass(frozen=True)
class ServeConfig:
    """Everything `ttmm serve` needs: the library, and one config per concern."""

    library: str
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    # The served model folder (default: the library's); its fingerprint must match.
    base_model: str | None = None
    # The sentence-transformers folder (default: the library's).
    embedder: str | None = None
    # The OpenAI-compatible HTTP door (None: gRPC only). It shares the gRPC server's tokens,
    # client groups, admission bound and metrics, and its TLS certificate, key and client CA
    # unless it names a certificate of its own; `server.http.port` is its port.
    http: HttpConfig | None = None


def http_config(config: ServeConfig) -> HttpConfig | None:
    """The HTTP door's config: with the gRPC server's TLS files when it names none itself,
    so a TLS server has no plaintext door."""
    http, grpc = config.http, config.server
    if http is None or http.tls_cert or not grpc.tls_cert:
        return http
    return replace(http, tls_cert=grpc.tls_cert, tls_key=grpc.tls_key,
                   tls_client_ca=grpc.tls_client_ca)


async def start(config: ServeConfig) -> Server:
    """Open the library, start the engine and the gRPC server; the engine is shut down again
    if the server cannot start (a port in use, unreadable TLS files)."""
    lib = await asyncio.to_thread(Library.open, config.library)
    embedder = await asyncio.to_thread(load_library_embedder, lib.manifest.embedder,
                                       config.embedder)
    engine = await Engine.start(lib, config.engine, config.base_model)
    service = TTMMService(lib, engine, embedder, config.service)
    try:
        server = await Server.start(service, config.server)
    except BaseException:
        await service.shutdown()
        raise
    http = http_config(config)
    if http is not None:
        try:
            server.http = await HttpServer.start(service, http, access=server.servicer.access)
        except BaseException:
            await server.stop(grace=0)
            raise
    return server
