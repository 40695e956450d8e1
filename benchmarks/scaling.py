"""Scaling in K at a fixed corpus and a fixed training budget, against fine-tuning (issue 19).

The paper's central claims (Table 1, Figure 4): TTMM improves as the library grows, and merging
the active experts beats the single best one. Here one corpus sample is split once into
training, tuning and test documents; the training documents are clustered into K in `--ks`
clusters (bisecting k-means on MiniLM embeddings), one expert per cluster is trained for one
epoch on its cluster, so every K trains on exactly the same tokens, with the same compute. The
rows, all on the same test documents (never tuned on):

- base model; multitask fine-tuning on all training documents for 1 epoch (equal data, and
  equal compute to a plain library) and for 2 epochs (equal compute to a branched library:
  multitask pass + expert pass). The 1-epoch adapter is the first epoch of the 2-epoch run
  (constant learning rate), so both cost one training run;
- per K, plain experts: TTMM with 1 and 10 active (beta tuned per count on the tuning
  documents), the document's own-cluster expert (nearest centroid to the whole document: routing
  that cannot miss), and TTMM 10 served as one rank-b merge (`merge.compress_many`, what
  `--worker-merge auto` serves for ordinary libraries above K * r = 256) with its error;
- at `--branched-k`: experts trained from the folded 1-epoch multitask model (the product's
  `--branch-from-multitask`), against the compute-matched 2-epoch adapter;
- at `--shared-a-k`: experts sharing one frozen A per module (`ttmm build --shared-a`: exact
  merges at rank r, the cheapest serving path), against plain experts at the same K.

95% bootstrap intervals over test documents and paired intervals for the differences that answer
the questions: does TTMM improve with K, does merging beat one expert, does it beat fine-tuning
at equal compute, what do the serving defaults cost. Stages are cached under the work folder
(adapters, embeddings, scores), so a killed sweep resumes and K values can be added later.

    python -m benchmarks.scaling --corpus wiki --ks 4 16 64      # about 45 min on 2 cores
    python -m benchmarks.scaling --smoke                          # tiny model, about a minute
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks.common import log

Scores = tuple[np.ndarray, np.ndarray]  # per test document: summed suffix NLL, scored tokens
COUNTS = (1, 10)  # TTMM 1 and TTMM 10: the paper's comparison (each count costs a test pass)


@dataclass(frozen=True)
class Sweep:
    corpus: str
    ks: tuple[int, ...]
    base_model: str
    embedder: str
    train_docs: int
    tune_docs: int
    test_docs: int
    max_tokens: int
    min_tokens: int
    prefix_tokens: int
    rank: int = 16
    lr: float = 1e-3
    batch_size: int = 4
    seed: int = 0
    betas: tuple[float, ...] = (0.03, 0.1, 1.0)
    budget: int = 16
    branched_k: int | None = None
    shared_a_k: int | None = None
    threads: int = 0

    def key(self) -> str:
        """What the documents, split and adapters depend on (the work folder's name)."""
        import hashlib

        d = asdict(self)
        for k in ("ks", "betas", "budget", "branched_k", "shared_a_k", "threads"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


# --------------------------------------------------------------------------- documents


def sample_documents(sw: Sweep, tokenizer, home: Path | None) -> list[dict]:
    """A seeded sample of the corpus, each cut to `max_tokens`, at least `min_tokens` long."""
    from training.documents import truncate
    from training.sources import load_documents

    docs = load_documents(sw.corpus, home=home)
    need = sw.train_docs + sw.tune_docs + sw.test_docs
    order = np.random.default_rng(sw.seed).permutation(len(docs))
    out: list[dict] = []
    for start in range(0, len(order), 4 * need):  # tokenize only as much as the sample needs
        chunk = [docs[i] for i in order[start:start + 4 * need]]
        out += [dict(d) for d in truncate(chunk, tokenizer, sw.max_tokens, sw.min_tokens)]
        if len(out) >= need:
            return out[:need]
    raise ValueError(f"corpus {sw.corpus!r} has {len(out)} documents of at least "
                     f"{sw.min_tokens} tokens; the sweep needs {need}")


@dataclass
class Data:
    """The fixed split and its embeddings (unit rows): training documents whole (clusters and
    centroids), tuning and test prefixes (routing queries), test documents whole (own expert)."""

    train: list[str]
    tune: list[str]
    test: list[str]
    train_emb: np.ndarray
    tune_query: np.ndarray
    test_query: np.ndarray
    test_whole: np.ndarray


def prepare(sw: Sweep, work: Path, home: Path | None) -> Data:
    from transformers import AutoTokenizer

    from training.embeddings import embed_texts, prefix_texts
    from ttmm_vllm.routing.embed import load_embedder

    path = work / "data.npz"
    docs_path = work / "documents.json"
    if path.exists() and docs_path.exists():
        texts = json.loads(docs_path.read_text())
        z = np.load(path)
        return Data(texts["train"], texts["tune"], texts["test"], z["train_emb"],
                    z["tune_query"], z["test_query"], z["test_whole"])
    tok = AutoTokenizer.from_pretrained(sw.base_model)
    docs = [d["text"] for d in sample_documents(sw, tok, home)]
    test, tune = docs[:sw.test_docs], docs[sw.test_docs:sw.test_docs + sw.tune_docs]
    train = docs[sw.test_docs + sw.tune_docs:]
    emb = load_embedder("sentence-transformers", sw.embedder)
    data = Data(train, tune, test, embed_texts(emb, train, desc="embed training documents"),
                embed_texts(emb, prefix_texts(tok, tune, sw.prefix_tokens)),
                embed_texts(emb, prefix_texts(tok, test, sw.prefix_tokens)),
                embed_texts(emb, test))
    np.savez(path, train_emb=data.train_emb, tune_query=data.tune_query,
             test_query=data.test_query, test_whole=data.test_whole)
    common.write_json(docs_path, {"train": train, "tune": tune, "test": test})
    return data


# --------------------------------------------------------------------------- adapters


@dataclass(frozen=True)
class ExpertSet:
    """K experts, one per cluster of the training documents, trained from `base_dir`."""

    name: str  # plain-k16, branched-k16, shared-a-k16
    k: int
    base_dir: str
    folders: tuple[str, ...]
    labels: np.ndarray  # cluster of each training document
    centroids: np.ndarray  # (K, d)


def settings(sw: Sweep, **kw: Any):
    from training.experts import TrainSettings
    from ttmm_vllm.library import LLAMA_TARGETS

    return TrainSettings(rank=sw.rank, alpha=float(sw.rank), lr=sw.lr, batch_size=sw.batch_size,
                         max_tokens=sw.max_tokens, target_modules=LLAMA_TARGETS,
                         threads=sw.threads, **kw)


def train_multitask(sw: Sweep, work: Path, data: Data) -> tuple[str, str]:
    """(1-epoch folder, 2-epoch folder): one 2-epoch run, its first epoch saved as well."""
    from training.experts import ExpertJob, TrainedAdapter, finished, save_adapter, train_adapter
    from ttmm_vllm.library import model_fingerprint

    order = np.random.default_rng(sw.seed).permutation(len(data.train))
    texts = tuple(data.train[i] for i in order)
    fp = model_fingerprint(sw.base_model)
    jobs = [ExpertJob(name=f"multitask, {e} epoch(s)", expert_id=-1, base_model=sw.base_model,
                      base_fingerprint=fp, texts=texts, settings=settings(sw, epochs=e),
                      seed=sw.seed, out_dir=str(work / f"multitask-{e}ep")) for e in (1, 2)]
    if not all(finished(j) for j in jobs):
        log("training the multitask adapter (2 epochs; the first is the equal-data baseline)")
        first: dict[str, Any] = {}
        trained = train_adapter(jobs[1], on_epoch=lambda e, m: first.setdefault("m", m)
                                if e == 0 else None)
        half = {k: (v // 2 if k in ("tokens", "steps") else v)
                for k, v in trained.metrics.items()}
        save_adapter(jobs[0], TrainedAdapter(first["m"], half))
        save_adapter(jobs[1], trained)
    return jobs[0].out_dir, jobs[1].out_dir


def train_set(sw: Sweep, work: Path, data: Data, name: str, k: int, base_dir: str,
              shared_a: bool = False) -> ExpertSet:
    from training.centroids import centroids
    from training.clusters import bisecting_kmeans
    from training.experts import ExpertJob, train_all
    from ttmm_vllm.library import model_fingerprint

    labels_path = work / f"labels-k{k}.npy"
    if labels_path.exists():
        labels = np.load(labels_path)
    else:
        labels = bisecting_kmeans(data.train_emb, k, seed=sw.seed)
        np.save(labels_path, labels)
    members = [np.flatnonzero(labels == c) for c in range(k)]
    fp = model_fingerprint(base_dir)
    jobs = [ExpertJob(name=f"{name} expert {c}", expert_id=c, base_model=base_dir,
                      base_fingerprint=fp, texts=tuple(data.train[i] for i in ids),
                      settings=settings(sw, shared_a=shared_a), seed=sw.seed + c,
                      out_dir=str(work / name / f"{c:04d}")) for c, ids in enumerate(members)]
    train_all(jobs, desc=name)
    return ExpertSet(name, k, base_dir, tuple(j.out_dir for j in jobs), labels,
                     centroids(data.train_emb, members))


def fold(sw: Sweep, work: Path, adapter_dir: str) -> str:
    from training.branching import fold_adapter

    out = work / "branched-base"
    if not (out / "config.json").exists():
        fold_adapter(sw.base_model, adapter_dir, out)
    return str(out)


# --------------------------------------------------------------------------- scoring


class Scorer:
    """Suffix NLLs of the tuning and test documents, cached in scores.json by row name, so a
    resumed sweep scores only new rows. One model in memory at a time."""

    def __init__(self, sw: Sweep, work: Path, data: Data):
        self.sw, self.data = sw, data
        self.path = work / "scores.json"
        self.rows: dict[str, Any] = json.loads(self.path.read_text()) \
            if self.path.exists() else {}
        self._model: tuple[str, Any, Any] | None = None

    def has(self, key: str) -> bool:
        return key in self.rows

    def get(self, key: str) -> Scores:
        r = self.rows[key]
        return np.asarray(r["nll"]), np.asarray(r["tokens"])

    def put(self, key: str, scores: Scores, **extra: Any) -> None:
        self.rows[key] = {"nll": scores[0].tolist(), "tokens": scores[1].tolist(), **extra}
        common.write_json(self.path, self.rows)

    def model(self, base_dir: str):
        from training.evaluate import load_model

        if self._model is None or self._model[0] != base_dir:
            self._model = None
            self._model = (base_dir, *load_model(base_dir))
        return self._model[1], self._model[2]

    def cache(self, base_dir: str, texts: Sequence[str], adapters):
        from training.evaluate import AdapterMixer, ScoreCache

        model, tok = self.model(base_dir)
        mixer = AdapterMixer(model, adapters) if adapters else None
        return ScoreCache(model, tok, texts, self.sw.prefix_tokens, mixer=mixer,
                          max_tokens=self.sw.max_tokens, batch_size=8), mixer


def score_baselines(sc: Scorer, mt_dirs: Sequence[str]) -> None:
    from ttmm_vllm.library import read_adapter

    keys = ["base", "multitask-1ep", "multitask-2ep"]
    if all(sc.has(k) for k in keys):
        return
    log("scoring base and multitask on the test documents")
    adapters = [read_adapter(d) for d in mt_dirs]
    cache, mixer = sc.cache(sc.sw.base_model, sc.data.test, adapters)
    n = len(sc.data.test)
    sc.put("base", cache.score(None))
    for j, key in enumerate(keys[1:]):
        w = np.zeros((n, len(adapters)))
        w[:, j] = 1
        sc.put(key, cache.score(w))
    mixer.remove()


def score_set(sc: Scorer, s: ExpertSet, compressed: bool) -> None:
    """TTMM 1 and 10 (beta tuned per count on the tuning documents), own expert and, for
    ordinary experts, TTMM 10 as one rank-b merge."""
    from training.tune import best_point, routing_weights, tune
    from ttmm_vllm.library import read_adapter
    from ttmm_vllm.routing.router import RoutingParams, Variant

    wanted = [f"{s.name}/ttmm{c}" for c in COUNTS] + [f"{s.name}/own"]
    if compressed:
        wanted.append(f"{s.name}/ttmm10-rank{sc.sw.budget}")
    if all(sc.has(k) for k in wanted):
        return
    log(f"scoring {s.name}")
    adapters = [read_adapter(d, expert_id=i) for i, d in enumerate(s.folders)]
    tune_cache, mixer = sc.cache(s.base_dir, sc.data.tune, adapters)
    grid = tune(tune_cache, sc.data.tune_query @ s.centroids.T, betas=sc.sw.betas,
                taus=(0.0,), variants=("paper",), max_active=COUNTS).grid
    mixer.remove()
    test_cache, mixer = sc.cache(s.base_dir, sc.data.test, adapters)
    sims = sc.data.test_query @ s.centroids.T
    chosen = {}
    for c in COUNTS:
        beta = best_point(grid, max_active=c).beta
        chosen[c] = RoutingParams(beta=beta, tau=0.0, variant=Variant.PAPER, max_active=c)
        sc.put(f"{s.name}/ttmm{c}", test_cache.score(routing_weights(sims, chosen[c])),
               beta=beta, active=float((routing_weights(sims, chosen[c]) > 0).sum(1).mean()))
    own = np.eye(s.k)[np.argmax(sc.data.test_whole @ s.centroids.T, axis=1)]
    sc.put(f"{s.name}/own", test_cache.score(own))
    mixer.remove()
    if compressed:
        w10 = routing_weights(sims, chosen[10])
        scores, errors = score_compressed(sc, s, adapters, w10)
        sc.put(f"{s.name}/ttmm10-rank{sc.sw.budget}", scores,
               rel_error_mean=float(np.mean(errors)), rel_error_max=float(np.max(errors)))


def score_compressed(sc: Scorer, s: ExpertSet, adapters, weights: np.ndarray,
                     chunk: int = 16) -> tuple[Scores, list[float]]:
    """Each test document under its TTMM merge compressed to rank b (as served), in chunks of
    documents (each merge is its own adapter in the mixer, one-hot per document)."""
    from training.evaluate import AdapterMixer, suffix_nll
    from ttmm_vllm.library import ExpertWeights
    from ttmm_vllm.merge import merge_experts

    model, tok = sc.model(s.base_dir)
    nll, cnt, errors = [], [], []
    texts = sc.data.test
    for start in range(0, len(texts), chunk):
        merged = []
        for row in weights[start:start + chunk]:
            ids = np.flatnonzero(row)
            m = merge_experts([adapters[i] for i in ids], row[ids].tolist(),
                              rank_budget=sc.sw.budget)
            errors.append(m.rel_error)
            merged.append(ExpertWeights(-1, m.modules, 1.0, m.rank))
        mixer = AdapterMixer(model, merged)
        part = suffix_nll(model, tok, texts[start:start + chunk], sc.sw.prefix_tokens,
                          max_tokens=sc.sw.max_tokens, mixer=mixer,
                          weights=np.eye(len(merged)))
        mixer.remove()
        nll.append(part[0])
        cnt.append(part[1])
    return (np.concatenate(nll), np.concatenate(cnt)), errors


# --------------------------------------------------------------------------- summary


def summarise(sw: Sweep, sc: Scorer) -> dict[str, Any]:
    """Every row's perplexity and interval, and the paired differences that answer the
    questions (negative: the first row is better)."""
    from training.evaluate import perplexity
    from training.quality import bootstrap_indices, interval, paired

    idx = bootstrap_indices(len(sc.data.test), seed=sw.seed)
    rows = {}
    for key, r in sc.rows.items():
        s = sc.get(key)
        lo, hi = interval(s, idx)
        rows[key] = {"perplexity": perplexity(*s), "lo": lo, "hi": hi,
                     **{k: v for k, v in r.items() if k not in ("nll", "tokens")}}
    pairs = []

    def pair(a: str, b: str, question: str) -> None:
        if a in sc.rows and b in sc.rows:
            pairs.append({"a": a, "b": b, "question": question,
                          **paired(sc.get(a), sc.get(b), idx)})

    k0 = min(sw.ks)
    for k in sw.ks:
        p = f"plain-k{k}"
        pair(f"{p}/ttmm10", f"{p}/ttmm1", "merging vs the top expert")
        pair(f"{p}/ttmm10", f"{p}/own", "merging vs the own-cluster expert")
        pair(f"{p}/ttmm10", "multitask-1ep", "TTMM vs fine-tuning, equal data and compute")
        pair(f"{p}/ttmm10-rank{sw.budget}", f"{p}/ttmm10", "served rank-b merge vs exact")
        if k != k0:
            pair(f"{p}/ttmm10", f"plain-k{k0}/ttmm10", f"TTMM 10: K={k} vs K={k0}")
            pair(f"{p}/own", f"plain-k{k0}/own", f"own expert: K={k} vs K={k0}")
    if sw.branched_k:
        b = f"branched-k{sw.branched_k}"
        pair(f"{b}/ttmm10", "multitask-2ep", "branched TTMM vs fine-tuning, equal compute")
        pair(f"{b}/ttmm10", "multitask-1ep", "branched TTMM vs fine-tuning, equal data")
        pair(f"{b}/ttmm10", f"{b}/ttmm1", "branched: merging vs the top expert")
        pair("multitask-2ep", "multitask-1ep", "fine-tuning: 2 epochs vs 1")
    if sw.shared_a_k:
        a, p = f"shared-a-k{sw.shared_a_k}", f"plain-k{sw.shared_a_k}"
        pair(f"{a}/ttmm10", f"{p}/ttmm10", "shared-A experts vs ordinary (TTMM 10)")
        pair(f"{a}/own", f"{p}/own", "shared-A experts vs ordinary (own expert)")
    return {"config": asdict(sw), "test_documents": len(sc.data.test),
            "tuning_documents": len(sc.data.tune), "training_documents": len(sc.data.train),
            "rows": rows, "pairs": pairs}


def plain_answers(summary: dict[str, Any]) -> list[str]:
    """One sentence per question, from the paired intervals."""
    def verdict(p: dict) -> str:
        if p["hi"] < 0:
            return f"yes, by {-p['difference']:.3f} (95% {p['lo']:+.3f} to {p['hi']:+.3f})"
        if p["lo"] > 0:
            return f"no, worse by {p['difference']:.3f} (95% {p['lo']:+.3f} to {p['hi']:+.3f})"
        return (f"not distinguishable ({p['difference']:+.3f}, 95% {p['lo']:+.3f} to "
                f"{p['hi']:+.3f})")

    return [f"- {p['question']} ({p['a']} - {p['b']}): {verdict(p)}"
            for p in summary["pairs"]]


def write_report(out: Path, sw: Sweep, summary: dict[str, Any], command: str) -> None:
    rows = summary["rows"]
    fixed = [("base", "base model"), ("multitask-1ep", "multitask, 1 epoch (equal data)"),
             ("multitask-2ep", "multitask, 2 epochs (compute of a branched library)")]
    methods = [("ttmm1", "TTMM 1"), ("ttmm10", "TTMM 10"),
               ("own", "own-cluster expert"), (f"ttmm10-rank{sw.budget}",
                                               f"TTMM 10 as one rank-{sw.budget} merge")]

    def cell(key: str) -> str:
        r = rows.get(key)
        return "" if r is None else f"{r['perplexity']:.3f} ({r['lo']:.2f}-{r['hi']:.2f})"

    lines = [f"# Scaling in K: {sw.corpus}", "", f"`{command}`", "",
             f"{summary['training_documents']} training documents (the same for every K: "
             f"equal data and compute), {summary['tuning_documents']} tuning, "
             f"{summary['test_documents']} test documents (never tuned on); first "
             f"{sw.max_tokens} tokens, the first {sw.prefix_tokens} route, the rest are "
             f"scored. Perplexity (95% bootstrap over test documents).", ""]
    header = ["method"] + [f"K={k}" for k in sw.ks]
    table = [[name] + [cell(key)] * len(sw.ks) for key, name in fixed]
    table += [[name] + [cell(f"plain-k{k}/{key}") for k in sw.ks] for key, name in methods]
    for prefix, label, k in (("branched", "branched", sw.branched_k),
                             ("shared-a", "shared-A", sw.shared_a_k)):
        if k:
            for key, name in methods[:3]:
                table.append([f"{label} {name}"] + [cell(f"{prefix}-k{k}/{key}")
                                                     if kk == k else "" for kk in sw.ks])
    lines += [common.markdown_table(header, table), ""]
    errs = [(k, rows.get(f"plain-k{k}/ttmm10-rank{sw.budget}", {})) for k in sw.ks]
    lines += [f"Relative error of the rank-{sw.budget} merges (mean / worst module, over documents): "
               + ", ".join(f"K={k}: {r.get('rel_error_mean', float('nan')):.3f}"
                                             f" / {r.get('rel_error_max', float('nan')):.3f}"
                                             for k, r in errs), ""]
    lines += ["## Paired differences (a - b, negative: a is better)", "",
              common.markdown_table(
                  ["question", "a", "b", "difference", "95% paired interval"],
                  [[p["question"], p["a"], p["b"], f"{p['difference']:+.3f}",
                    f"{p['lo']:+.3f} to {p['hi']:+.3f}"] for p in summary["pairs"]]),
              "", "## Plainly", "", *plain_answers(summary), ""]
    (out / "scaling.md").write_text("\n".join(lines))


def plot(out: Path, sw: Sweep, summary: dict[str, Any]) -> None:
    plt = common.pyplot()
    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ks = list(sw.ks)
    for key, label in (("ttmm1", "TTMM 1"), ("ttmm10", "TTMM 10"), ("own", "own expert"),
                       (f"ttmm10-rank{sw.budget}", f"TTMM 10, rank-{sw.budget} merge")):
        pts = [(k, rows[f"plain-k{k}/{key}"]) for k in ks if f"plain-k{k}/{key}" in rows]
        if pts:
            x = [k for k, _ in pts]
            y = [r["perplexity"] for _, r in pts]
            err = [[r["perplexity"] - r["lo"] for _, r in pts],
                   [r["hi"] - r["perplexity"] for _, r in pts]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label, alpha=0.85)
    for key, label, style in (("base", "base", ":"), ("multitask-1ep", "multitask 1 epoch", "--"),
                              ("multitask-2ep", "multitask 2 epochs", "-.")):
        if key in rows:
            ax.axhline(rows[key]["perplexity"], linestyle=style, color="gray", label=label)
    for prefix, k, marker in (("branched", sw.branched_k, "s"), ("shared-a", sw.shared_a_k, "^")):
        key = f"{prefix}-k{k}/ttmm10"
        if k and key in rows:
            ax.plot([k], [rows[key]["perplexity"]], marker=marker, linestyle="",
                    label=f"{prefix} TTMM 10")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("experts in the library (K), same training documents")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"TTMM against K: {sw.corpus} ({summary['test_documents']} test documents)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def run(sw: Sweep, work: Path, out: Path, home: Path | None, command: str) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = prepare(sw, work, home)
    log(f"{len(data.train)} training, {len(data.tune)} tuning, {len(data.test)} test documents")
    mt1, mt2 = train_multitask(sw, work, data)
    sc = Scorer(sw, work, data)
    score_baselines(sc, [mt1, mt2])
    for k in sw.ks:  # smallest first: the sweep's answer grows as it runs
        score_set(sc, train_set(sw, work, data, f"plain-k{k}", k, sw.base_model),
                  compressed=True)
    if sw.shared_a_k:
        k = sw.shared_a_k
        score_set(sc, train_set(sw, work, data, f"shared-a-k{k}", k, sw.base_model,
                                shared_a=True), compressed=False)
    if sw.branched_k:
        k = sw.branched_k
        score_set(sc, train_set(sw, work, data, f"branched-k{k}", k, fold(sw, work, mt1)),
                  compressed=False)
    summary = summarise(sw, sc)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["environment"] = common.environment()
    common.write_json(out / "scaling.json", summary)
    write_report(out, sw, summary, command)
    plot(out, sw, summary)
    log(f"wrote {out}/scaling.md ({summary['seconds']} s)")
    print("\n".join(plain_answers(summary)))
    return summary


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="wiki", help="'wiki', 'python' or a JSONL path")
    p.add_argument("--ks", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--train-docs", type=int, default=720)
    p.add_argument("--tune-docs", type=int, default=64)
    p.add_argument("--test-docs", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--min-tokens", type=int, default=96)
    p.add_argument("--prefix-tokens", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--budget", type=int, default=16, help="rank b of the served merges")
    p.add_argument("--betas", type=float, nargs="+", default=[0.03, 0.1, 1.0])
    p.add_argument("--branched-k", type=int, default=16, help="0: no branched experts")
    p.add_argument("--shared-a-k", type=int, default=16, help="0: no shared-A experts")
    p.add_argument("--base-model", default=None, help="default: the fetched SmolLM2")
    p.add_argument("--embedder", default=None, help="default: the fetched MiniLM")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: torch's default). 1 keeps a sweep steady beside "
                        "other work on a small machine")
    p.add_argument("--work", default=None, help="stage cache (default $TTMM_HOME/scaling/...)")
    common.add_run_args(p, "scaling")
    return p


def main(argv: list[str] | None = None) -> Path:
    import sys

    from ttmm_vllm.home import offline_env, ttmm_home

    offline_env()
    args = parser().parse_args(argv)
    home = ttmm_home()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.smoke:
        assets = common.smoke_assets(args.assets)
        args.corpus = str(assets.model_dir.parent / "corpus.jsonl")
        args.base_model, args.embedder = str(assets.model_dir), str(assets.embedder_dir)
        args.ks, args.train_docs, args.tune_docs, args.test_docs = [2, 4], 48, 8, 16
        args.max_tokens, args.min_tokens, args.prefix_tokens = 48, 16, 12
        args.rank, args.budget, args.branched_k, args.shared_a_k = 4, 4, 2, 2
    base = args.base_model or str(home / "models" / "SmolLM2-135M-Instruct")
    emb = args.embedder or str(home / "models" / "all-MiniLM-L6-v2")
    sw = Sweep(corpus=args.corpus, ks=tuple(args.ks), base_model=base, embedder=emb,
               train_docs=args.train_docs, tune_docs=args.tune_docs, test_docs=args.test_docs,
               max_tokens=args.max_tokens, min_tokens=args.min_tokens,
               prefix_tokens=args.prefix_tokens, rank=args.rank, lr=args.lr,
               betas=tuple(args.betas), budget=args.budget,
               branched_k=args.branched_k or None, shared_a_k=args.shared_a_k or None,
               threads=args.threads)
    for k in (sw.branched_k, sw.shared_a_k):
        if k and k not in sw.ks:
            raise SystemExit(f"--branched-k/--shared-a-k {k} must be one of --ks {sw.ks}")
    name = Path(args.corpus).stem if args.smoke else args.corpus
    out = Path(args.out) if args.out else common.results_dir("scaling", None, args.smoke) / name
    work = Path(args.work) if args.work else (
        out / "work" if args.smoke else home / "scaling" / f"{name}-{sw.key()}")
    run(sw, work, out, home, "python -m benchmarks.scaling " + " ".join(
        sys.argv[1:] if argv is None else argv))
    return out


if __name__ == "__main__":
    main()
