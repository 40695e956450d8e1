"""Issue 12 on the tiny model: experts branched from the multitask model (a folded base in the
library, served under the experts), the base model's hidden states as a routing embedding,
pass@k, the tuning grid over max_active, the report's quality table and heat map, and the
real engine serving a branched library exactly as the PEFT reference on the folded base."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ttmm_vllm.cli import main
from ttmm_vllm.library import ADAPTER_CONFIG, Library, LibraryError, model_fingerprint
from ttmm_vllm.testing import Reference

K = 4


def _args(corpus: Path, model: Path, out: Path, *extra: str) -> list[str]:
    # lr 0.02: the tiny model's scaled-up embeddings dwarf what a few steps at 1e-3 teach
    # (perplexity moves by 1e-10); at 0.02 adapters change greedy outputs, so serving the
    # wrong merge or the wrong base shows
    return ["build", "--corpus", str(corpus), "--base-model", str(model), "--out", str(out),
            "-K", str(K), "--max-tokens", "128", "--query-tokens", "16",
            "--holdout-fraction", "0.15", "--lr", "0.02", "--threads", "1", *extra]


# small grids: what is tested is the bookkeeping, not the optimum
TUNE = ["--tune-docs", "6", "--test-docs", "8", "--betas", "0.05", "10", "--taus", "0",
        "--active-counts", "1", "3", "--variants", "paper"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory, corpus_file, tiny_model_dir, tiny_embedder_dir) -> Path:
    """The default build with --multitask: both expert sets, both routing embeddings."""
    out = tmp_path_factory.mktemp("compared") / "lib"
    assert main(_args(corpus_file, tiny_model_dir, out, "--embedder", str(tiny_embedder_dir),
                      "--multitask", *TUNE)) == 0
    return out


@pytest.fixture(scope="module")
def branched(tmp_path_factory, compared, corpus_file, tiny_model_dir, tiny_embedder_dir
             ) -> Path:
    """The same build forced to serve the branched experts: a copy of `compared` rebuilt with
    --branch-from-multitask on reuses every adapter and only rewrites the library."""
    out = tmp_path_factory.mktemp("branched") / "lib"
    shutil.copytree(compared, out)
    assert main(_args(corpus_file, tiny_model_dir, out, "--embedder", str(tiny_embedder_dir),
                      "--multitask", "--branch-from-multitask", *TUNE)) == 0
    return out


def _report(lib_dir: Path) -> dict:
    return json.loads((lib_dir / "report.json").read_text())


# --------------------------------------------------------------------------- the build


def test_auto_trains_both_sets_and_serves_the_one_that_tunes_better(compared, tiny_model_dir):
    r = _report(compared)
    b = r["branch"]
    assert b["mode"] == "compare" and set(b["sets"]) == {"plain", "branched"}
    ppl = b["tuned_perplexity"]
    want = "branched" if ppl["branched"] < ppl["plain"] else "plain"
    assert b["chosen"] == want
    for name, t in r["tuning"]["by_set"].items():  # each set tuned on the same documents
        assert t["perplexity"] == min(p["perplexity"] for p in t["grid"]) == ppl[name]
    lib = Library.open(compared)
    lib.check_base_model(lib.served_model_dir())
    m = lib.manifest
    assert m.extras["expert_set"] == want
    folder = "branched/experts" if want == "branched" else "experts"
    assert all(e.file == f"{folder}/{e.id:04d}" for e in m.experts)
    assert (m.serving_base is not None) == (want == "branched")
    # both sets are on disk, trained on the same documents with the same seeds
    assert all((compared / f"experts/{k:04d}").is_dir() for k in range(K))
    assert all((compared / f"branched/experts/{k:04d}").is_dir() for k in range(K))


def test_branched_library_validates_against_its_folded_base(branched, tiny_model_dir):
    lib = Library.open(branched, base_model_dir=Library.open(branched).served_model_dir())
    m = lib.manifest
    folded = branched / "branched" / "base"
    assert lib.served_model_dir() == folded.resolve()
    assert m.serving_base is not None and m.serving_base.path == "branched/base"
    assert m.serving_base.fingerprint == model_fingerprint(folded)
    assert m.base_model.fingerprint == model_fingerprint(tiny_model_dir)
    assert m.extras["experts_adapt"] == "serving_base"
    assert m.extras["multitask"]["adapts"] == "base_model"
    with pytest.raises(LibraryError, match="is not the model this library was built on"):
        Library.open(branched, base_model_dir=tiny_model_dir)
    for e in m.experts:  # plain PEFT adapters of the folded checkpoint
        assert e.file == f"branched/experts/{e.id:04d}"
        cfg = json.loads((branched / e.file / ADAPTER_CONFIG).read_text())
        assert cfg["base_model_name_or_path"].endswith("branched/base")
        assert cfg["peft_type"] == "LORA" and cfg["r"] == m.lora.rank
    # the folded checkpoint is a whole model folder, tokenizer included
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in folded.iterdir()}


def test_folded_base_is_base_plus_the_multitask_delta(branched, tiny_model_dir):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from training.evaluate import load_model
    from ttmm_vllm.library import read_adapter

    base = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    folded = load_file(str(branched / "branched/base/model.safetensors"))
    mt = read_adapter(branched / "multitask")
    assert folded.keys() == base.keys()
    adapted = {f"{name}.weight" for name in mt.modules}
    assert adapted <= folded.keys() and len(adapted) == 2 * 7  # 2 layers x 7 projections
    for key, w in base.items():
        if key in adapted:
            a, b = mt.modules[key[: -len(".weight")]]
            delta = mt.scaling * (b.float() @ a.float())
            assert delta.abs().max() > 0, key
            torch.testing.assert_close(folded[key], w + delta, rtol=0, atol=1e-6)
        else:
            assert torch.equal(folded[key], w), key
    # served with no expert, the branched library is the multitask model
    x = torch.tensor([[5, 17, 42, 9, 100, 3]])
    fold_model, _ = load_model(branched / "branched/base")
    peft = PeftModel.from_pretrained(load_model(tiny_model_dir)[0], str(branched / "multitask"))
    with torch.no_grad():
        torch.testing.assert_close(fold_model(input_ids=x).logits, peft(input_ids=x).logits,
                                   rtol=1e-4, atol=1e-4)


def test_tuning_grid_covers_max_active_and_sets_it(compared):
    r = _report(compared)
    router = Library.open(compared).manifest.router
    for t in r["tuning"]["by_set"].values():
        grid = t["grid"]
        assert {p["max_active"] for p in grid} == {1, 3, 10}  # --active-counts + --max-active
        assert len(grid) == 3 * 2 * 1  # max_active x betas x taus (one variant)
        assert all(p["mean_active"] <= p["max_active"] for p in grid)
        best = min(grid, key=lambda p: p["perplexity"])
        assert (t["max_active"], t["beta"], t["tau"]) == (best["max_active"], best["beta"],
                                                          best["tau"])
    served = r["tuning"]["by_set"][r["branch"]["chosen"]]
    assert (router.max_active, router.beta, router.tau) == (served["max_active"],
                                                            served["beta"], served["tau"])
    assert (compared / "tuning.png").stat().st_size > 0


def test_report_has_the_quality_table_and_the_heat_map(compared):
    r = _report(compared)
    ev = r["evaluation"]
    tuned = set(r["tuning"]["eval_documents"])
    assert ev["documents"] == len(ev["test_documents"]) == 8
    assert not tuned & set(ev["test_documents"]), "test documents were tuned on"
    rows = ev["rows"]
    for name in ("base", "multitask"):
        assert name in rows
    for s in ("plain", "branched"):
        for row in ("TTMM 1", "TTMM 3", "TTMM 10", "uniform top-3", "own expert"):
            v = rows[f"{s} {row}"]
            assert v["lo"] <= v["perplexity"] <= v["hi"]
    pairs = {(p["a"], p["b"]) for p in ev["pairs"]}
    assert ("branched TTMM 10", "multitask") in pairs
    assert ("branched TTMM 10", "plain TTMM 10") in pairs
    labels = np.array(ev["labels"])
    for s in ("plain", "branched"):
        heat = np.array(ev["sets"][s]["heatmap"])
        assert heat.shape == (K, K)
        # the heat map's diagonal is the "own expert" row, cluster by cluster
        for c in ev["per_cluster"]:
            k = c["cluster"]
            if (labels == k).any():
                assert heat[k, k] == pytest.approx(c[f"{s} own expert"], rel=1e-9)
    md = (compared / "report.md").read_text()
    assert "## Summary" in md and "Expert set served" in md and "pass@1" in md
    for png in ("heatmap.png", "routing.png", "tuning.png"):
        assert (compared / png).stat().st_size > 0


# --------------------------------------------------------------------------- compute-matched


MATCHED_ROW = "multitask, compute-matched (2 epochs)"


def _record(adapter_dir: Path) -> dict:
    return json.loads((adapter_dir / "ttmm-train.json").read_text())


def test_compute_matched_adapter_trains_the_branched_librarys_tokens(compared, branched):
    """multitask-matched/ is the multitask job for twice the epochs: the same documents, twice
    the steps and tokens (the multitask pass plus the branched experts' pass), named in the
    manifest like the multitask adapter, and reused (not retrained) by a rebuild."""
    from ttmm_vllm.library import sha256_file

    mt, matched = _record(compared / "multitask"), _record(compared / "multitask-matched")
    m1, m2 = mt["metrics"], matched["metrics"]
    assert m2["documents"] == m1["documents"] > 0
    assert (m2["steps"], m2["tokens"]) == (2 * m1["steps"], 2 * m1["tokens"])
    experts = [_record(compared / f"branched/experts/{k:04d}")["metrics"] for k in range(K)]
    assert m2["tokens"] == m1["tokens"] + sum(e["tokens"] for e in experts)
    assert matched["sha256"] != mt["sha256"]
    for lib_dir in (compared, branched):
        extras = Library.open(lib_dir).manifest.extras
        x = extras["multitask_matched"]
        assert (x["file"], x["epochs"], x["adapts"]) == ("multitask-matched", 2, "base_model")
        assert x["size"] == extras["multitask"]["size"]
        assert sha256_file(lib_dir / x["file"] / "adapter_model.safetensors") == x["sha256"]
        assert x["sha256"] == matched["sha256"]  # the rebuild reused it
        r = _report(lib_dir)
        assert r["multitask_matched"]["tokens"] == m2["tokens"]
        assert "train: multitask, compute-matched" in r["timings"]


def test_report_answers_the_three_questions_with_compute_matched_fine_tuning(compared,
                                                                             branched):
    from training.report import QUESTIONS, answer

    for lib_dir in (compared, branched):
        ev = _report(lib_dir)["evaluation"]
        rows, chosen = ev["rows"], ev["chosen"]
        v = rows[MATCHED_ROW]
        assert v["lo"] <= v["perplexity"] <= v["hi"]
        assert v["perplexity"] != rows["multitask"]["perplexity"]
        pairs = {(p["a"], p["b"]): p for p in ev["pairs"]}
        served = ev["served_row"]
        for pair in ((served, MATCHED_ROW), ("branched TTMM 10", MATCHED_ROW),
                     (f"{chosen} TTMM 10", f"{chosen} TTMM 1"),
                     (f"{chosen} TTMM 10", f"{chosen} own expert")):
            assert pair in pairs, pair
            p = pairs[pair]
            assert p["lo"] <= p["hi"] and 0 <= p["p_a_better"] <= 1
        claims = ev["claims"]
        # a branched set is matched by the 2-epoch adapter, a plain one by the 1-epoch one
        assert claims["finetuning"]["b"] == (MATCHED_ROW if chosen == "branched"
                                             else "multitask")
        assert (claims["single"]["b"], claims["own"]["b"]) == (f"{chosen} TTMM 1",
                                                               f"{chosen} own expert")
        md = (lib_dir / "report.md").read_text()
        assert f"| {MATCHED_ROW} |" in md  # the quality table's row
        for key, q in QUESTIONS.items():
            c = claims[key]
            p = pairs[(c["a"], c["b"])]
            line = next(x for x in md.splitlines() if x.startswith(f"- {q} "))
            assert line.startswith(f"- {q} **{answer(p)}**: {c['a']} minus {c['b']} = ")
            assert f"interval {p['lo']:.2f} to {p['hi']:.2f}" in line
    assert ev["chosen"] == "branched"  # the last one: --branch-from-multitask on


@pytest.mark.parametrize(("pair", "want"), [
    ({"lo": -2.0, "hi": -0.1}, "yes"), ({"lo": 0.1, "hi": 3.0}, "no"),
    ({"lo": -1.0, "hi": 1.0}, "not distinguishable (interval includes 0)")])
def test_answer_follows_the_paired_interval(pair, want):
    from training.report import answer

    assert answer({"difference": (pair["lo"] + pair["hi"]) / 2, **pair}) == want


@pytest.mark.parametrize(("kw", "matched"), [
    ({"multitask": True}, True),  # compare: the branched set is trained
    ({"branch_from_multitask": "on"}, True),
    ({"multitask": True, "branch_from_multitask": "off"}, False),  # plain: already matched
    ({}, False),
    ({"multitask": True, "compute_matched": False}, False),
])
def test_compute_matched_adapter_only_with_the_branched_set(kw, matched):
    from training.config import BuildConfig
    from training.expert_sets import trains_matched
    from ttmm_vllm.cli import build_parser

    cfg = BuildConfig(corpus="c.jsonl", out=Path("lib"), base_model=Path("m"),
                      embedder=Path("e"), **kw)
    assert trains_matched(cfg) is matched
    args = build_parser().parse_args(["build", "--corpus", "c", "--base-model", "m", "--out",
                                      "o", "--no-compute-matched"])
    assert args.compute_matched is False


@pytest.mark.parametrize(("kw", "mode", "multitask"), [
    ({"multitask": True}, "compare", True),  # the default: both sets, the holdout decides
    ({"multitask": True, "tune": False}, "on", True),  # nothing to compare on: branch
    ({}, "off", False),  # no multitask adapter to branch from: the paper's build
    ({"branch_from_multitask": "on"}, "on", True),  # implies the multitask adapter
    ({"multitask": True, "branch_from_multitask": "off"}, "off", True),
])
def test_branch_mode_resolves_against_multitask_and_tuning(kw, mode, multitask):
    from training.config import BuildConfig

    cfg = BuildConfig(corpus="c.jsonl", out=Path("lib"), base_model=Path("m"),
                      embedder=Path("e"), **kw)
    assert (cfg.branch_mode, cfg.trains_multitask) == (mode, multitask)


def test_bad_branch_and_embedding_settings_are_refused(tmp_path, capsys, corpus_file,
                                                       tiny_model_dir):
    assert main(_args(corpus_file, tiny_model_dir, tmp_path / "lib", "--embedder-kind",
                      "base-hidden", "--branch-from-multitask", "sometimes")) == 2
    assert "branch_from_multitask 'sometimes' is not one of" in capsys.readouterr().err
    assert main(_args(corpus_file, tiny_model_dir, tmp_path / "lib")) == 2  # auto: needs one
    assert "embedder is required with embedder_kind 'auto'" in capsys.readouterr().err


# --------------------------------------------------------------------------- routing


def test_pass_at_k_on_a_constructed_example():
    from training.routing import choose_embedding, own_rank, pass_at_k, pass_curve

    sims = np.array([[0.9, 0.1, 0.5],   # own 0: first
                     [0.2, 0.3, 0.1],   # own 0: second (behind 1)
                     [0.1, 0.2, 0.3],   # own 1: second (behind 2)
                     [0.4, 0.4, 0.0]])  # own 1: tie with 0, the lower id ranks first
    labels = np.array([0, 0, 1, 1])
    assert own_rank(sims, labels).tolist() == [0, 1, 1, 1]
    assert pass_at_k(sims, labels, (1, 2, 3)) == {1: 0.25, 2: 1.0, 3: 1.0}
    assert pass_curve(sims, labels) == [0.25, 1.0, 1.0]
    assert choose_embedding({"sentence-transformers": 0.7, "base-hidden": 0.8},
                            ["sentence-transformers", "base-hidden"]) == "base-hidden"
    assert choose_embedding({"sentence-transformers": 0.8, "base-hidden": 0.8},
                            ["sentence-transformers", "base-hidden"]) == "sentence-transformers"


def test_auto_embedding_keeps_the_better_pass_at_1(compared):
    r = _report(compared)["routing"]
    p1 = {k: m["pass_tune"]["1"] for k, m in r["by_kind"].items()}
    assert set(p1) == {"sentence-transformers", "base-hidden"}
    want = "base-hidden" if p1["base-hidden"] > p1["sentence-transformers"] else \
        "sentence-transformers"
    assert r["chosen"] == want == Library.open(compared).manifest.embedder.kind


def test_base_hidden_embedding_builds_and_routes(tmp_path, corpus_file, tiny_model_dir):
    """No embedder folder: the base model clusters, embeds the centroids and routes; serving
    (load_embedder from the manifest) reproduces the build's routing."""
    from ttmm_vllm.routing.embed import load_embedder, query_text
    from ttmm_vllm.routing.router import CentroidIndex, Router, RoutingParams

    out = tmp_path / "lib"
    assert main(_args(corpus_file, tiny_model_dir, out, "--embedder-kind", "base-hidden",
                      "--no-tune")) == 0
    lib = Library.open(out, base_model_dir=tiny_model_dir)
    m = lib.manifest
    assert (m.embedder.kind, m.embedder.dim) == ("base-hidden", 64)  # tiny hidden size
    assert Path(m.embedder.path) == Path(tiny_model_dir).resolve()
    assert lib.centroids.shape == (K, 64)
    r = _report(out)["routing"]
    assert list(r["by_kind"]) == ["base-hidden"]
    emb = load_embedder(m.embedder.kind, m.embedder.path, m.embedder.name)
    holdout = {json.loads(x)["id"]: json.loads(x) for x in (out / "holdout.jsonl").open()}
    docs = [holdout[i] for i in r["documents"]["tune"]]
    router = Router(CentroidIndex(lib.centroids), RoutingParams(beta=0.05, tau=0.0))
    tok = emb.tokenizer
    queries = emb.embed([query_text(tok, d["text"], m.router.query_tokens) for d in docs])
    top = [router.route(q).expert_ids[0] for q in queries]
    hits = np.mean([t == d["cluster"] for t, d in zip(top, docs, strict=True)])
    assert hits == pytest.approx(r["by_kind"]["base-hidden"]["pass_tune"]["1"])
    assert hits >= 0.5  # four topics with distinct words: the hidden states separate them


# --------------------------------------------------------------------------- serving


ENGINE = dict(merge_path="disk", max_model_len=256, max_num_seqs=8, max_loras=4,
              kv_cache_bytes=64 << 20)


def test_engine_serves_a_branched_library_like_peft_on_the_folded_base(loop, branched):
    """The real engine on the folded base, merging branched experts, generates what
    transformers + PEFT generate on the folded base: a routed request (library defaults),
    a three-expert merge and a base request (the multitask model), batched together."""
    from ttmm_vllm.routing.embed import load_embedder, query_text
    from ttmm_vllm.routing.router import CentroidIndex, Mode, Router, RoutingParams, Variant
    from ttmm_vllm.serve.engine import Engine
    from ttmm_vllm.serve.engine_api import EngineConfig, Sampling
    from ttmm_vllm.serve.metrics import Timings

    lib = Library.open(branched, base_model_dir=Library.open(branched).served_model_dir())
    m = lib.manifest
    emb = load_embedder(m.embedder.kind, m.embedder.path, m.embedder.name)
    r = m.router
    defaults = RoutingParams(beta=r.beta, tau=r.tau, max_active=r.max_active,
                             variant=Variant(r.sparse_softmax))
    router = Router(CentroidIndex(lib.centroids), defaults)
    ref = Reference(lib.served_model_dir(), lib)
    prompts = ["rocket telescope orbit moon the planet star galaxy comet",
               "the orchestra and the comet and the chef with the penalty",
               "dough oven butter garlic the salt recipe"]
    ids = [ref.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    q = emb.embed([query_text(ref.tokenizer, p, r.query_tokens) for p in prompts])
    routings = [router.route(q[0]).canonical(),
                router.route(q[1], defaults.with_overrides(beta=10.0, tau=0.0,
                                                           max_active=3)).canonical(),
                router.route(q[2], defaults.with_overrides(mode=Mode.BASE)).canonical()]
    assert len(routings[1].expert_ids) == 3 and routings[2].is_base
    sampling = Sampling(max_tokens=12, temperature=0.0)

    async def serve():
        engine = await Engine.start(lib, EngineConfig(**ENGINE), lib.served_model_dir())
        try:
            async def one(i):
                toks = []
                async for step in engine.generate(f"b{i}", ids[i], sampling, routings[i],
                                                  Timings()):
                    toks += step.token_ids
                return toks

            return await asyncio.gather(*[one(i) for i in range(len(prompts))])
        finally:
            await engine.shutdown()

    got = loop.run(serve())
    for i, toks in enumerate(got):
        want = ref.greedy(ids[i], 12, routings[i].expert_ids, routings[i].weights)
        assert toks == want, f"prompt {i} routed to {routings[i].expert_ids}"
    # not a vacuous match: the merged experts move the folded base's predictions
    rt = routings[1]
    merged = ref.logprobs(ids[1] + got[1], len(ids[1]), rt.expert_ids, rt.weights)
    alone = ref.logprobs(ids[1] + got[1], len(ids[1]))
    assert np.abs(np.array(merged) - np.array(alone)).max() > 0.05
