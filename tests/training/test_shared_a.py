"""`ttmm build --shared-a` on the tiny model: every expert has the same frozen A per module and
only B trains (training/experts.py), the manifest says so, and the library opens."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from training.experts import ExpertJob, TrainSettings
from ttmm_vllm.cli import main
from ttmm_vllm.library import ADAPTER_WEIGHTS, Library

K = 3


@pytest.fixture(scope="module")
def shared(tmp_path_factory, corpus, tiny_model_dir, tiny_embedder_dir) -> Path:
    """A small shared-A library with the multitask baseline (which trains its own A)."""
    root = tmp_path_factory.mktemp("shared-a")
    src = root / "corpus.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in corpus))
    out = root / "lib"
    assert main(["build", "--corpus", str(src), "--base-model", str(tiny_model_dir),
                 "--embedder", str(tiny_embedder_dir), "--embedder-kind",
                 "sentence-transformers", "--out", str(out), "-K", str(K), "--max-tokens",
                 "128", "--query-tokens", "16", "--holdout-fraction", "0.1", "--lr", "1e-3",
                 "--max-docs-per-expert", "8", "--threads", "1", "--no-tune", "--multitask",
                 "--branch-from-multitask", "off", "--shared-a"]) == 0
    return out


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / ADAPTER_WEIGHTS))


def test_shared_a_library_validates_and_says_so(shared, tiny_model_dir):
    lib = Library.open(shared, base_model_dir=tiny_model_dir)
    m = lib.manifest
    assert m.lora.shared_a is True and lib.num_experts == K
    assert json.loads((shared / "manifest.json").read_text())["lora"]["shared_a"] is True
    report = json.loads((shared / "report.json").read_text())
    assert report["config"]["shared_a"] is True
    assert "Shared A (--shared-a)" in (shared / "report.md").read_text()


def test_every_expert_has_the_same_a_and_its_own_b(shared):
    experts = [_tensors(shared / f"experts/{k:04d}") for k in range(K)]
    a_keys = sorted(key for key in experts[0] if ".lora_A." in key)
    b_keys = sorted(key for key in experts[0] if ".lora_B." in key)
    assert len(a_keys) == len(b_keys) == 2 * 7  # two layers, seven projections
    for e in experts[1:]:
        assert sorted(e) == sorted(experts[0])
        for key in a_keys:  # bit for bit
            assert np.array_equal(e[key].numpy(), experts[0][key].numpy()), key
    for key in b_keys:  # B trained per expert: no two alike, none left at zero
        bs = [e[key].numpy() for e in experts]
        assert all(np.abs(b).max() > 0 for b in bs), key
        assert all(not np.array_equal(bs[i], bs[j]) for i in range(K) for j in range(i)), key
    # the multitask baseline trained its own A: not the shared one
    mt = _tensors(shared / "multitask")
    assert all(not np.array_equal(mt[key].numpy(), experts[0][key].numpy()) for key in a_keys)


def test_shared_a_is_part_of_the_experts_cache_key():
    """Plain and shared-A experts never mix: a finished folder of one is stale for the other,
    and a plain job's fingerprint is the one it had before the option existed."""
    job = ExpertJob(name="expert 0", expert_id=0, base_model="m", base_fingerprint="f",
                    texts=("a b c",), settings=TrainSettings(rank=4), seed=0, out_dir="x")
    shared = replace(job, settings=replace(job.settings, shared_a=True))
    assert job.fingerprint() != shared.fingerprint()
    assert job.fingerprint() == "e91c5056fa9898e2"  # stable: existing plain builds resume


def test_build_help_shows_the_flag(capsys):
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    out = capsys.readouterr().out
    assert "--shared-a" in out and "--no-shared-a" in out
