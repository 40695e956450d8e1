"""`ttmm serve`'s flags (cli/serve.py): vLLM's names, defaults read from the config
dataclasses (so help and code cannot drift), help on every flag, the pass-through."""

import dataclasses

import pytest

from ttmm_vllm.cli import build_parser
from ttmm_vllm.cli.serve import configs, engine_args
from ttmm_vllm.serve.engine_api import EngineConfig
from ttmm_vllm.serve.grpc_server import ServerConfig


def _serve_parser():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")  # noqa: SLF001 - argparse
    return sub.choices["serve"]


def test_defaults_are_the_configs_defaults():
    engine, server = configs(build_parser().parse_args(["serve", "--library", "L"]))
    want = EngineConfig()
    for f in dataclasses.fields(EngineConfig):
        assert getattr(engine, f.name) == getattr(want, f.name), f.name
    for name in ("host", "port", "max_inflight", "max_message_bytes", "grace_s"):
        assert getattr(server, name) == getattr(ServerConfig(), name), name


def test_every_flag_has_help():
    missing = [a.option_strings for a in _serve_parser()._actions  # noqa: SLF001
               if a.option_strings and not a.help]
    assert not missing


def test_vllm_named_flags_reach_the_engine_config():
    args = build_parser().parse_args([
        "serve", "--library", "L", "--no-enforce-eager", "--no-enable-prefix-caching",
        "--max-lora-rank", "32", "--seed", "7", "--tensor-parallel-size", "2",
        "--gpu-memory-utilization", "0.8", "--dtype", "bfloat16",
        "--engine-arg", "swap_space=4", "--engine-arg", "quantization=fp8"])
    e, _ = configs(args)
    assert (e.enforce_eager, e.enable_prefix_caching, e.rank_budget, e.seed) == \
        (False, False, 32, 7)
    assert (e.tensor_parallel_size, e.gpu_memory_utilization, e.dtype) == (2, 0.8, "bfloat16")
    assert e.engine_args == {"swap_space": 4, "quantization": "fp8"}


def test_engine_arg_needs_key_and_value():
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        engine_args(["swap_space"])
