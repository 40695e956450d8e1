"""Train time (`ttmm build`, training/) on the tiny model: a valid library, resumable after a
kill, shardable, deterministic, tuned from its grid; bad settings refused by name."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from benchmarks.ray_build import max_expert_difference
from training.config import BuildConfig
from ttmm_vllm import testing as tiny
from ttmm_vllm.cli import main
from ttmm_vllm.home import OFFLINE_ENV
from ttmm_vllm.library import ADAPTER_WEIGHTS, Library, read_adapter

REPO = Path(__file__).resolve().parents[2]
K = 4


def _write_corpus(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def _args(corpus, model, embedder, out, *extra) -> list[str]:
    return ["build", "--corpus", str(corpus), "--base-model", str(model), "--embedder",
            str(embedder), "--out", str(out), "-K", str(K), "--max-tokens", "128",
            "--query-tokens", "16", "--holdout-fraction", "0.1", "--lr", "1e-3",
            # one thread: two would spin against each other when the cores are busy
            "--threads", "1", *extra]


# --------------------------------------------------------------------------- one full build


@pytest.fixture(scope="module")
def built(tmp_path_factory, corpus, tiny_model_dir, tiny_embedder_dir):
    root = tmp_path_factory.mktemp("build")
    src = _write_corpus(root / "corpus.jsonl", corpus)
    out = root / "lib"
    # plain experts only (tests/training/test_branching.py covers the branched ones)
    rc = main(_args(src, tiny_model_dir, tiny_embedder_dir, out, "--multitask",
                    "--branch-from-multitask", "off", "--tune-docs", "12", "--betas", "0.05",
                    "0.5", "--taus", "0", "0.1"))
    assert rc == 0
    return out


def test_build_writes_a_valid_library(built, corpus, tiny_model_dir):
    lib = Library.open(built, base_model_dir=tiny_model_dir)
    m = lib.manifest
    assert lib.num_experts == K and [e.id for e in m.experts] == list(range(K))
    assert m.format_version == 1 and m.embedder.dim == lib.centroids.shape[1]
    assert m.lora.rank == 16 and m.lora.alpha == 16.0 and len(m.lora.target_modules) == 7
    assert np.allclose(np.linalg.norm(lib.centroids, axis=1), 1.0, atol=1e-5)
    # every document has a cluster, and every cluster holds out at least one document
    assignments = np.load(built / "assignments.npy")
    ids = (built / "document_ids.txt").read_text().split()
    assert len(assignments) == len(ids) == len(corpus)
    holdout = [json.loads(line) for line in (built / "holdout.jsonl").open()]
    assert Counter(h["cluster"] for h in holdout).keys() == set(range(K))
    by_id = dict(zip(ids, assignments.tolist(), strict=True))
    assert all(by_id[h["id"]] == h["cluster"] for h in holdout)
    # sizes: the training split, holdout excluded
    sizes = np.bincount(assignments, minlength=K)
    held = Counter(h["cluster"] for h in holdout)
    assert [e.size for e in m.experts] == [int(sizes[k]) - held[k] for k in range(K)]


def test_titles_name_each_clusters_topic(built, corpus):
    lib = Library.open(built)
    ids = (built / "document_ids.txt").read_text().split()
    topic_of = {d["id"]: d["topic"] for d in corpus}
    labels = np.load(built / "assignments.npy")
    for e in lib.manifest.experts:
        topic = Counter(topic_of[i] for i, c in zip(ids, labels, strict=True)
                        if c == e.id).most_common(1)[0][0]
        central, terms = e.title.rsplit(": ", 1)  # 'Central Title, ...: term, term, term'
        assert len(terms.split(", ")) == 3 and set(terms.split(", ")) <= set(
            tiny.TOPICS[topic]), e.title
        assert central.startswith(f"{topic.title()} "), e.title


def test_each_expert_loads_alone_with_peft_and_matches_the_mixer(built, tiny_model_dir):
    import torch
    from peft import PeftModel

    from training.evaluate import AdapterMixer, load_model

    model, tok = load_model(tiny_model_dir)
    x = tok(["the guitar and the planet of the oven"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = model(input_ids=x).logits
    adapters = [read_adapter(built / f"experts/{k:04d}", k) for k in range(K)]
    mixer = AdapterMixer(model, adapters)
    for k in range(K):
        w = np.zeros((1, K))
        w[0, k] = 1.0
        mixer.set_weights(w)
        with torch.no_grad():
            mixed = model(input_ids=x).logits
        mixer.set_weights(None)
        fresh, _ = load_model(tiny_model_dir)
        peft = PeftModel.from_pretrained(fresh, str(built / f"experts/{k:04d}"))
        with torch.no_grad():
            ref = peft(input_ids=x).logits
        scale = ref.abs().max()
        assert (ref - base).abs().max() > 1e-3 * scale, f"expert {k} changed nothing"
        torch.testing.assert_close(mixed, ref, rtol=1e-4, atol=1e-4 * float(scale))
    mixer.remove()


def test_mixer_equals_the_dense_merge(built, tiny_model_dir):
    import torch

    from training.evaluate import AdapterMixer, load_model, merged_state

    model, tok = load_model(tiny_model_dir)
    x = tok(["a melody in orbit", "flour and a penalty goal"], return_tensors="pt",
            padding=True)
    adapters = [read_adapter(built / f"experts/{k:04d}", k) for k in range(K)]
    weights = np.array([[0.5, 0.3, 0.2, 0.0], [0.0, 0.0, 0.25, 0.75]])
    mixer = AdapterMixer(model, adapters)
    mixer.set_weights(weights)
    with torch.no_grad():
        mixed = model(**x).logits
    mixer.set_weights(None)
    for row in range(2):
        state = merged_state(model, adapters, weights[row].tolist())
        with torch.no_grad():
            dense = torch.func.functional_call(model, state, kwargs={
                "input_ids": x["input_ids"][row:row + 1],
                "attention_mask": x["attention_mask"][row:row + 1]}).logits
        scale = float(dense.abs().max())
        torch.testing.assert_close(mixed[row:row + 1], dense, rtol=1e-4, atol=1e-4 * scale)


def test_tuning_picks_from_the_grid_and_sets_the_defaults(built):
    lib = Library.open(built)
    r = lib.manifest.router
    report = json.loads((built / "report.json").read_text())
    grid = report["tuning"]["grid"]
    assert len(grid) == 2 * 3 * 2 * 2  # variants x max_active (1, 3, 10) x betas x taus
    best = min(grid, key=lambda p: p["perplexity"])
    assert (r.beta, r.tau, r.sparse_softmax, r.max_active) == (
        best["beta"], best["tau"], best["variant"], best["max_active"])
    assert r.beta in (0.05, 0.5) and r.tau in (0.0, 0.1) and r.query_tokens == 16
    assert r.ood_threshold is not None and -1 <= r.ood_threshold <= 1
    assert set(report["tuning"]["best_by_variant"]) == {"paper", "threshold"}
    assert report["branch"]["chosen"] == "plain" and list(report["tuning"]["by_set"]) == [
        "plain"]
    assert (built / "report.md").read_text().startswith("# Library build report")
    assert (built / "tuning.png").stat().st_size > 0
    # routing accuracy of both embeddings on the tuning documents, the better one kept
    by_kind = report["routing"]["by_kind"]
    assert set(by_kind) == {"sentence-transformers", "base-hidden"}
    assert all(0 <= m["pass_tune"]["1"] <= m["pass_tune"]["3"] <= 1 for m in by_kind.values())


def test_multitask_adapter_is_in_the_library(built, tiny_model_dir):
    from ttmm_vllm.library import sha256_file

    lib = Library.open(built)
    mt = lib.manifest.extras["multitask"]
    assert sha256_file(built / mt["file"] / ADAPTER_WEIGHTS) == mt["sha256"]
    assert mt["size"] == sum(e.size for e in lib.manifest.experts)
    assert read_adapter(built / mt["file"]).rank == 16


def test_plain_library_has_no_compute_matched_adapter(built):
    """Plain experts make one pass over the multitask adapter's documents: that adapter is
    the compute-matched baseline already, no second one is trained, and the report says so."""
    assert (built / "multitask").is_dir() and not (built / "multitask-matched").exists()
    assert "multitask_matched" not in Library.open(built).manifest.extras
    report = json.loads((built / "report.json").read_text())
    assert report["multitask_matched"] is None
    assert not any("compute-matched" in stage for stage in report["timings"])
    md = (built / "report.md").read_text()
    assert "No compute-matched adapter: the plain experts make one pass over the multitask " \
           "adapter's documents, so the equal-data multitask adapter is already " \
           "compute-matched." in md
    assert "multitask, compute-matched" not in md


def test_plain_claims_compare_against_the_equal_data_adapter():
    """The report's three lines for a plain library, from constructed per-document scores:
    TTMM against the (equal-data, compute-matched) multitask adapter, merging against the
    single best and the own expert; a missing row is 'not measured', not a verdict."""
    from training.quality import served_claims, summarise
    from training.report import QUESTIONS, _claims

    rng = np.random.default_rng(0)
    tokens = np.full(40, 50)
    base = rng.uniform(100, 200, 40)
    rows = {"multitask": (base * 1.0, tokens), "plain TTMM 3": (base * 0.8, tokens),
            "plain TTMM 10": (base * 0.8, tokens), "plain TTMM 1": (base * 0.9, tokens),
            "plain own expert": (base * 0.8 + rng.normal(0, 1, 40), tokens)}
    claims = served_claims("plain", "plain TTMM 3", 10, "multitask", rows)
    assert [(c["a"], c["b"]) for c in claims.values()] == [
        ("plain TTMM 3", "multitask"), ("plain TTMM 10", "plain TTMM 1"),
        ("plain TTMM 10", "plain own expert")]
    ev = summarise(rows, np.zeros(40, dtype=int), 1,
                   [(c["a"], c["b"]) for c in claims.values()]) | {"claims": claims}
    lines = _claims(ev)
    assert len(lines) == 3
    assert lines[0].startswith(f"- {QUESTIONS['finetuning']} **yes**: plain TTMM 3 minus "
                               "multitask = ")
    assert "equal-data multitask adapter" in lines[0] and "compute-matched" in lines[0]
    assert lines[1].startswith(f"- {QUESTIONS['single']} **yes**: ")
    assert lines[2].startswith(f"- {QUESTIONS['own']} **not distinguishable (interval "
                               "includes 0)**: ")
    # no multitask adapter: the question is not answered
    del rows["multitask"]
    claims = served_claims("plain", "plain TTMM 3", 10, "multitask", rows)
    ev = summarise(rows, np.zeros(40, dtype=int), 1, []) | {"claims": claims}
    assert _claims(ev)[0] == (f"- {QUESTIONS['finetuning']} **not measured**: no multitask "
                              "adapter (build with --multitask).")


# --------------------------------------------------------------------------- resume, shards


@pytest.fixture(scope="module")
def slow_corpus(tmp_path_factory):
    """Longer documents, so one expert takes long enough to kill the build between two."""
    docs = tiny.synthetic_corpus(docs_per_topic=40, seed=1, words=200)
    return _write_corpus(tmp_path_factory.mktemp("slow") / "corpus.jsonl", docs)


@pytest.fixture(scope="module")
def clean(tmp_path_factory, slow_corpus, tiny_model_dir, tiny_embedder_dir):
    out = tmp_path_factory.mktemp("clean") / "lib"
    assert main(_args(slow_corpus, tiny_model_dir, tiny_embedder_dir, out, "--epochs", "5",
                      "--no-tune")) == 0
    return out


def _env() -> dict:
    env = dict(os.environ)
    env.update(OFFLINE_ENV, PYTHONPATH=str(REPO))
    return env


def test_killed_build_resumes_and_equals_a_clean_build(tmp_path, slow_corpus, tiny_model_dir,
                                                       tiny_embedder_dir, clean, caplog):
    out = tmp_path / "lib"
    args = _args(slow_corpus, tiny_model_dir, tiny_embedder_dir, out, "--epochs", "5",
                 "--no-tune")
    log = (tmp_path / "first.log").open("w")
    # the CLI's main in a process of its own (ttmm_vllm.cli has no __main__ to run with -m)
    cli = "import sys; from ttmm_vllm.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", cli, *args], cwd=REPO,
                            env=_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    try:
        while not list(out.glob("experts/*/ttmm-train.json")):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no expert finished in time"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    done = {p.parent.name: p.parent.joinpath(ADAPTER_WEIGHTS).stat().st_mtime_ns
            for p in out.glob("experts/*/ttmm-train.json")}
    assert 1 <= len(done) < K, f"the kill did not land mid-way: {sorted(done)}"
    assert not (out / "manifest.json").exists()

    caplog.set_level(logging.INFO, logger="training")
    assert main(args) == 0
    for name, mtime in done.items():
        assert (out / "experts" / name / ADAPTER_WEIGHTS).stat().st_mtime_ns == mtime
        assert f"expert {int(name)}: already trained" in caplog.text
    assert not list(out.glob("experts/.*.tmp-*")), "temporary folders left behind"
    lib = Library.open(out, base_model_dir=tiny_model_dir)
    ref = Library.open(clean)
    assert [e.sha256 for e in lib.manifest.experts] == [e.sha256 for e in ref.manifest.experts]
    assert max_expert_difference(out, clean) == 0.0  # every tensor, bitwise


def test_two_shards_make_the_whole_library(tmp_path, slow_corpus, tiny_model_dir,
                                           tiny_embedder_dir, clean):
    out = tmp_path / "lib"
    args = _args(slow_corpus, tiny_model_dir, tiny_embedder_dir, out, "--epochs", "5",
                 "--no-tune")
    assert main([*args, "--shard", "0/2"]) == 0
    assert sorted(p.name for p in (out / "experts").iterdir()) == ["0000", "0002"]
    assert not (out / "manifest.json").exists()
    assert main([*args, "--shard", "1/2"]) == 0
    lib = Library.open(out, base_model_dir=tiny_model_dir)
    assert lib.num_experts == K
    ref = Library.open(clean)
    assert [e.sha256 for e in lib.manifest.experts] == [e.sha256 for e in ref.manifest.experts]


def test_a_changed_setting_retrains_instead_of_reusing(tmp_path, slow_corpus, tiny_model_dir,
                                                       tiny_embedder_dir, clean):
    import shutil

    out = tmp_path / "lib"
    shutil.copytree(clean, out)
    args = _args(slow_corpus, tiny_model_dir, tiny_embedder_dir, out, "--epochs", "5",
                 "--no-tune", "--lr", "5e-4")
    assert main(args) == 0
    lib = Library.open(out, base_model_dir=tiny_model_dir)
    ref = Library.open(clean)
    assert all(a.sha256 != b.sha256 for a, b in zip(lib.manifest.experts,
                                                      ref.manifest.experts, strict=True))


# --------------------------------------------------------------------------- units and errors


def test_holdout_split_keeps_one_per_cluster_and_spares_singletons():
    from training.clusters import holdout_split

    labels = np.array([0] * 40 + [1] * 3 + [2] * 2 + [3])
    h = holdout_split(labels, 0.1, seed=0)
    assert h[labels == 0].sum() == 4
    assert h[labels == 1].sum() == 1 and h[labels == 2].sum() == 1
    assert h[labels == 3].sum() == 0  # its only document trains the expert
    assert np.array_equal(h, holdout_split(labels, 0.1, seed=0))


def test_clusters_are_numbered_by_size():
    from training.clusters import bisecting_kmeans

    rng = np.random.default_rng(0)
    centres = np.eye(8)[:3] * 5
    x = np.concatenate([c + rng.normal(size=(n, 8)) for c, n in zip(centres, (10, 30, 20),
                                                                     strict=True)])
    labels = bisecting_kmeans(x, 3, seed=0)
    assert np.bincount(labels).tolist() == [30, 20, 10]
    with pytest.raises(ValueError, match="K=100 clusters need at least 100 documents"):
        bisecting_kmeans(x, 100)


@pytest.mark.parametrize(("kw", "message"), [
    ({"k": 0}, "K must be >= 1, got 0"),
    ({"k": 16, "taus": (0.1,)}, r"taus must be in \[0, 1/K\)"),
    ({"lr": -1.0}, r"lr must be in \(0, 1\), got -1.0"),
    ({"shard": "2/2"}, "shard '2/2'"),
    ({"shard": "half"}, "shard must look like i/n"),
    ({"holdout_fraction": 1.0}, r"holdout_fraction must be in \[0, 1\), got 1.0"),
    ({"query_tokens": 2048}, r"query_tokens \(2048\) must be < max_tokens \(1024\)"),
    ({"variants": ("paper", "best")}, "variants must be among"),
    ({"max_docs_per_expert": 0}, "max_docs_per_expert must be >= 1, got 0"),
    ({"branch_from_multitask": "yes"}, "branch_from_multitask 'yes' is not one of"),
    ({"embedder_kind": "bert"}, "embedder_kind 'bert' is not one of"),
    ({"embedder": Path()}, "embedder is required with embedder_kind 'auto'"),
    ({"active_counts": (0, 3)}, r"active_counts must be numbers >= 1, got \(0, 3\)"),
    ({"test_docs": -1}, "test_docs must be >= 0, got -1"),
])
def test_bad_settings_are_refused_by_name(kw, message):
    base = {"corpus": "c.jsonl", "out": Path("lib"), "base_model": Path("m"),
            "embedder": Path("e")}
    with pytest.raises(ValueError, match=message):
        BuildConfig(**{**base, **kw})


def test_cli_reports_bad_values_and_missing_inputs(tmp_path, capsys, tiny_model_dir,
                                                   tiny_embedder_dir):
    assert main(["build", "--corpus", "x.jsonl", "--base-model", "m", "--embedder", "e",
                 "--out", str(tmp_path / "lib"), "-K", "0"]) == 2
    assert "K must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match=r"base model .* \(no config.json\)"):
        main(_args(tmp_path / "c.jsonl", tmp_path, tiny_embedder_dir, tmp_path / "lib"))
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        main(_args(tmp_path / "nowhere.jsonl", tiny_model_dir, tiny_embedder_dir,
                   tmp_path / "lib"))


def test_parallel_workers_train_the_same_experts(tmp_path, slow_corpus, tiny_model_dir,
                                                 tiny_embedder_dir, clean):
    """Two spawned worker processes give the same tensors as one in-process run."""
    out = tmp_path / "lib"
    assert main(_args(slow_corpus, tiny_model_dir, tiny_embedder_dir, out, "--epochs", "5",
                      "--no-tune", "--workers", "2")) == 0
    Library.open(out, base_model_dir=tiny_model_dir)
    assert max_expert_difference(out, clean) == 0.0  # every tensor, bitwise


def test_raise_failures_names_every_failed_expert_and_chains_the_first():
    from training.experts import raise_failures

    raise_failures({})  # nothing failed: nothing raised
    first, second = ValueError("out of memory"), OSError("disk full")
    with pytest.raises(RuntimeError, match=r"training failed for expert 2, expert 7 \(first "
                       r"error: out of memory\); finished experts are kept") as info:
        raise_failures({"expert 7": first, "expert 2": second})
    assert info.value.__cause__ is first
