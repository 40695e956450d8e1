"""The house rules, checked: the import contracts in pyproject.toml ([tool.importlinter]) and
no use of another module's private names (ARCHITECTURE.md says why)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ttmm_vllm", "training", "benchmarks")
# Other projects' private names that the vLLM plugin patches or reads, on purpose: they are
# vLLM's and torch's (pinned by the `cpu` extra), not another module of ours.
FOREIGN = {"WorkerLoRAManager._load_adapter", "worker_manager._lora_model_cls", "x._base"}


def _sources():
    for pkg in PACKAGES:
        for f in sorted((REPO / pkg).rglob("*.py")):
            if "_generated" not in f.parts:
                yield f


def test_import_contracts_hold():
    exe = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(exe), "--no-cache"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def private_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """`from m import _x`, and `obj._x` where obj is not self/cls (another object's private
    state). Dunders are public protocol, not private names."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    found.append((node.lineno, f"from {node.module} import {a.name}"))
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                and not node.attr.startswith("__"):
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_no_module_uses_another_modules_private_names():
    offences = []
    for f in _sources():
        for line, what in private_uses(ast.parse(f.read_text(), str(f))):
            if what not in FOREIGN:
                offences.append(f"{f.relative_to(REPO)}:{line}: {what}")
    assert not offences, "private names used across objects:\n" + "\n".join(offences)


def test_the_checker_finds_what_it_should():
    tree = ast.parse("from a import _b\nx = self._ok\ny = other._state\nz = x.__class__\n")
    assert [w for _, w in private_uses(tree)] == ["from a import _b", "other._state"]
