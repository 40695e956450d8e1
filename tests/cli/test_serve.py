"""`ttmm serve`'s flags (cli/serve.py): vLLM's names, defaults read from the config
dataclasses (so help and code cannot drift), help on every flag, the pass-through; `ttmm
--version`; and a user's mistake (a missing library, a busy port) as one line, exit 2."""

import dataclasses
import importlib.metadata
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from ttmm_vllm.cli import USER_ERROR_EXIT, build_parser, user_error_message
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


# ------------------------------------------------------------------ the command line, run

REPO = Path(__file__).resolve().parents[2]


def _ttmm(*argv: str) -> subprocess.CompletedProcess:
    """`python -m ttmm_vllm.cli ARGV` in a process of its own, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "ttmm_vllm.cli", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == USER_ERROR_EXIT, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ttmm serve: ")
    return lines[0]


def test_version_is_the_distributions():
    proc = _ttmm("--version")
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.strip() == f"ttmm {importlib.metadata.version('ttmm-vllm')}"


def test_a_missing_library_is_one_line(tmp_path):
    line = _one_line_error(_ttmm("serve", "--library", str(tmp_path / "nowhere"),
                                 "--base-model", str(tmp_path / "no-model")))
    assert f"--library {tmp_path / 'nowhere'}: no such directory" in line
    assert "ttmm build" in line  # what to do
    line = _one_line_error(_ttmm("serve", "--library", str(tmp_path)))
    assert "not an expert library (no manifest.json)" in line


@pytest.mark.parametrize("flag", ["--port", "--http-port"])
def test_a_port_in_use_is_one_line_before_anything_starts(tmp_path, flag):
    (tmp_path / "manifest.json").write_text("{}")  # the ports are checked before it is read
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        others = {"--port": "0", "--http-port": "0"}
        others[flag] = str(port)
        line = _one_line_error(_ttmm("serve", "--library", str(tmp_path), "--host",
                                     "127.0.0.1", *[a for kv in others.items() for a in kv]))
    assert line == (f"ttmm serve: {flag} {port}: 127.0.0.1:{port} is already in use; stop "
                    f"whatever listens there or choose another {flag}")


def test_a_port_taken_after_the_check_is_still_a_users_error():
    """A port taken between the check and the bind (the engine starts in between): grpc's
    RuntimeError and the HTTP door's OSError are user errors too, one line each."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = grpc.server(None, options=[("grpc.so_reuseport", 0)])
        with pytest.raises(RuntimeError) as grpc_error:
            server.add_insecure_port(f"127.0.0.1:{port}")
        with socket.socket() as s, pytest.raises(OSError) as os_error:
            s.bind(("127.0.0.1", port))
    message = user_error_message(grpc_error.value)
    assert message == (f"cannot listen on 127.0.0.1:{port} (in use?); stop whatever listens "
                       "there or choose another --port or --host")
    assert user_error_message(os_error.value).endswith("choose another port")
    assert user_error_message(RuntimeError("a bug")) is None  # a bug keeps its traceback
