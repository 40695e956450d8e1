"""The build, stage by stage: corpus -> documents -> embeddings -> clusters -> experts (and the
multitask baseline; experts branched from it) -> routing embedding -> centroids -> titles ->
tuned routing defaults -> quality on test documents -> library.

Each stage caches its output under the work dir with a record of what it was computed from
(a hash of its inputs and settings), so a rerun redoes only what changed, and a killed build
resumes. Experts are written straight into the library folder, each atomically with a
checksum record (training/experts.py); with `--shard i/n` a process trains only its share,
and whichever run finds every expert present writes the library (manifest last).

Expert sets. `plain` experts are trained from the base (the paper; `experts/NNNN`); `branched`
experts from the base with the multitask adapter folded in (training/branching.py;
`branched/base`, `branched/experts/NNNN`). `--branch-from-multitask` decides which are trained;
when both are, each is tuned on the tuning documents and the lower tuned perplexity is what the
manifest serves. The holdout is split once: tuning documents choose the routing embedding, the
expert set and beta/tau/max_active; test documents, never tuned on, give the report's table.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training import branching
from training.centroids import centroids as make_centroids
from training.clusters import Clustering
from training.config import BuildConfig
from training.documents import load_corpus, read_jsonl, save_jsonl
from training.experts import ExpertJob, ExpertResult, TrainSettings, finished, train_all
from ttmm_vllm.library import (
    HOLDOUT,
    MANIFEST,
    EmbedderRef,
    ExpertInfo,
    Library,
    LoraSpec,
    Manifest,
    ModelRef,
    RouterDefaults,
    atomic_save_npy,
    atomic_write_bytes,
    atomic_write_json,
    expert_dirname,
    model_fingerprint,
    read_adapter,
    write_library,
)

log = logging.getLogger(__name__)

DOCUMENT_IDS = "document_ids.txt"
SPLIT = "split.npy"  # per document: 0 trained on, 1 holdout, 2 training split beyond the cap
REPORT = "report.json"
PLAIN, BRANCHED = "plain", "branched"  # the two expert sets


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class ExpertSet:
    """K experts trained from one model: `plain` from the base, `branched` from the folded
    multitask model (`model_dir`, with its fingerprint)."""

    name: str
    model_dir: Path
    fingerprint: str
    experts: list[ExpertResult]

    def folder(self, expert_id: int) -> str:
        """The expert's library-relative folder."""
        if self.name == BRANCHED:
            return branching.expert_dirname(expert_id)
        return expert_dirname(expert_id)


@dataclass
class Trained:
    sets: dict[str, ExpertSet]  # by name; one or both of plain, branched
    multitask: ExpertResult | None


@dataclass
class Routing:
    """The routing embedding kept (centroids, holdout prefix embeddings) and what was measured."""

    ref: EmbedderRef
    centroids: np.ndarray  # (K, d)
    queries: np.ndarray  # (n_holdout, d): each holdout document's prefix, holdout order
    holdout: np.ndarray  # document indices of the holdout, in that order
    report: dict[str, Any]

    def sims(self, doc_ids: Sequence[int]) -> np.ndarray:
        """(n, K) cosine similarity of the documents' prefixes to the centroids."""
        pos = {int(d): j for j, d in enumerate(self.holdout)}
        rows = [pos[int(i)] for i in doc_ids]
        return self.queries[rows] @ self.centroids.T if rows else \
            np.zeros((0, len(self.centroids)))


class Pipeline:
    """One build. `run()` returns the opened library, or None when this shard is done but
    other shards' experts are still missing."""

    def __init__(self, cfg: BuildConfig):
        self.cfg = cfg
        self.out = Path(cfg.out).expanduser().resolve()
        self.work = cfg.work.expanduser().resolve()
        self.base = Path(cfg.base_model).expanduser().resolve()
        self.timings: dict[str, dict[str, Any]] = {}
        self._tokenizer = None
        self._embedders: dict[str, Any] = {}
        self._models: dict[Path, tuple[Any, Any]] = {}

    # ------------------------------------------------------------------ plumbing

    def _stage(self, name: str, key: dict, outputs: list[Path], compute: Callable[[], None]
               ) -> str:
        """Run `compute` unless the work dir holds this stage's outputs for the same key."""
        digest = _hash(key)
        rec_path = self.work / f"{name}.stage.json"
        try:
            rec = json.loads(rec_path.read_text())
        except (OSError, ValueError):
            rec = None
        if rec and rec.get("key") == digest and all(p.exists() for p in outputs):
            log.info("stage %s: cached (%s)", name, rec_path)
            self.timings[name] = {"seconds": rec.get("seconds"), "cached": True}
            return digest
        log.info("stage %s: running", name)
        t0 = time.perf_counter()
        compute()
        seconds = round(time.perf_counter() - t0, 2)
        atomic_write_json(rec_path, {"key": digest, "seconds": seconds, "inputs": key})
        self.timings[name] = {"seconds": seconds, "cached": False}
        log.info("stage %s: done in %.1fs", name, seconds)
        return digest

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.base))
        return self._tokenizer

    def _embedder_path(self, kind: str) -> Path:
        if kind == "base-hidden":
            return self.base
        return Path(self.cfg.embedder).expanduser().resolve()

    def _embedder(self, kind: str):
        if kind not in self._embedders:
            from ttmm_vllm.routing.embed import load_embedder

            self._embedders[kind] = load_embedder(kind, self._embedder_path(kind))
        return self._embedders[kind]

    def _embed(self, kind: str, texts: list[str], desc: str) -> np.ndarray:
        from training.embeddings import embed_texts

        return embed_texts(self._embedder(kind), texts, self.cfg.embed_batch_size, desc=desc)

    def _model(self, model_dir: Path):
        """(model, tokenizer) for evaluation, loaded once per build."""
        if model_dir not in self._models:
            from training.evaluate import load_model

            self._models[model_dir] = load_model(model_dir)
        return self._models[model_dir]

    def _check_inputs(self) -> None:
        cfg = self.cfg
        if not (self.base / "config.json").exists():
            raise FileNotFoundError(f"base model {cfg.base_model} is not a model folder "
                                    "(no config.json)")
        emb = Path(cfg.embedder).expanduser()
        if cfg.has_sentence_embedder and not emb.is_dir():
            raise FileNotFoundError(f"embedder {cfg.embedder} is not a folder")

    # ------------------------------------------------------------------ the stages

    def run(self) -> Library | None:
        cfg = self.cfg
        self._check_inputs()
        self.work.mkdir(parents=True, exist_ok=True)
        t_start = time.perf_counter()
        base_fp = model_fingerprint(self.base)

        docs_path = self.work / "documents.jsonl"
        docs_key = self._stage(
            "documents",
            {"corpus": cfg.corpus, "limit": cfg.limit, "max_tokens": cfg.max_tokens,
             "min_tokens": cfg.min_tokens, "tokenizer": base_fp},
            [docs_path],
            lambda: save_jsonl(docs_path, load_corpus(
                cfg.corpus, self.tokenizer, max_tokens=cfg.max_tokens,
                min_tokens=cfg.min_tokens, home=cfg.home, limit=cfg.limit)))
        docs = read_jsonl(docs_path)
        texts = [d["text"] for d in docs]
        log.info("%d documents", len(docs))

        # the clustering embedding (the sentence embedder when given; the routing embedding
        # is chosen later, on the holdout)
        kind = cfg.cluster_embedder_kind
        emb_path = self.work / "embeddings.npy"
        emb_key = self._stage(
            "embeddings",
            {"documents": docs_key, "embedder": str(self._embedder_path(kind)
                                                    if kind == "base-hidden" else cfg.embedder),
             "kind": kind},
            [emb_path],
            lambda: atomic_save_npy(emb_path, self._embed(kind, texts, "embed documents")))
        embeddings = np.load(emb_path)

        clusters_path = self.work / "clusters.npz"
        self._stage(
            "clusters",
            {"embeddings": emb_key, **cfg.subset("k", "bisecting_strategy", "holdout_fraction",
                                                 "seed")},
            [clusters_path],
            lambda: self._cluster(embeddings, clusters_path))
        with np.load(clusters_path) as z:
            clustering = Clustering(z["labels"], z["holdout"])
        members = self._training_members(clustering)

        trained = self._train(texts, members, base_fp)
        if trained is None:
            return None

        titles, examples = self._titles(docs, embeddings, members)
        tune_ids, test_ids = self._split_holdout(clustering)
        routing = self._routing(docs, docs_key, embeddings, clustering, members, tune_ids,
                                test_ids, base_fp)
        self._embedders.clear()  # the base-hidden embedder holds a whole model
        tuning = self._tune(docs, trained, routing, tune_ids)
        chosen, branch = self._choose(trained, tuning)
        evaluation = None
        if tuning and len(test_ids):
            evaluation = self._evaluate(docs, clustering, trained, routing, tuning, test_ids,
                                        chosen)
        manifest = self._manifest(docs, clustering, members, trained.sets[chosen],
                                  trained.multitask, titles, examples, tuning.get(chosen),
                                  routing, branch, base_fp)
        self.timings["this run (wall)"] = {"seconds": round(time.perf_counter() - t_start, 2),
                                           "cached": False}
        self._write(docs, clustering, members, routing, manifest, trained, chosen, titles,
                    tuning, tune_ids, evaluation, branch)
        lib = Library.open(self.out)
        lib.check_base_model(lib.served_model_dir())
        return lib

    def _cluster(self, embeddings: np.ndarray, path: Path) -> None:
        from training.clusters import cluster

        cfg = self.cfg
        c = cluster(embeddings, cfg.k, cfg.holdout_fraction, seed=cfg.seed,
                    strategy=cfg.bisecting_strategy)
        buf = io.BytesIO()
        np.savez(buf, labels=c.labels, holdout=c.holdout)
        atomic_write_bytes(path, buf.getvalue())
        log.info("cluster sizes: %s", c.sizes())

    def _training_members(self, clustering) -> list[np.ndarray]:
        """Each expert's training documents in training order: a seeded shuffle of its
        cluster's training split, cut to --max-docs-per-expert."""
        cap = self.cfg.max_docs_per_expert
        out = []
        for k in range(self.cfg.k):
            ids = clustering.train_ids(k)
            if len(ids) == 0:  # a cluster of one document, kept out of the holdout
                raise ValueError(f"cluster {k} has no training documents")
            ids = np.random.default_rng([self.cfg.seed, k]).permutation(ids)
            out.append(ids[:cap] if cap else ids)
        return out

    # ------------------------------------------------------------------ training

    def _settings(self) -> TrainSettings:
        cfg = self.cfg
        return TrainSettings(
            rank=cfg.rank, alpha=cfg.alpha, target_modules=tuple(cfg.target_modules),
            lr=cfg.lr, batch_size=cfg.batch_size, weight_decay=cfg.weight_decay,
            adam_betas=tuple(cfg.adam_betas), adam_eps=cfg.adam_eps, epochs=cfg.epochs,
            max_tokens=cfg.max_tokens, threads=cfg.torch_threads)

    def _expert_jobs(self, texts: list[str], members: list[np.ndarray], s: ExpertSet
                     ) -> list[ExpertJob]:
        """One job per expert of set `s`, trained from `s.model_dir` on its cluster."""
        label = "expert" if s.name == PLAIN else "branched expert"
        return [ExpertJob(name=f"{label} {k}", expert_id=k, base_model=str(s.model_dir),
                          base_fingerprint=s.fingerprint, texts=tuple(texts[i] for i in ids),
                          settings=self._settings(), seed=self.cfg.seed + k,
                          out_dir=str(self.out / s.folder(k)))
                for k, ids in enumerate(members)]

    def _run_share(self, jobs: list[ExpertJob]) -> dict[str, ExpertResult]:
        """Train this shard's share of `jobs` (every n-th), locally or on Ray."""
        cfg = self.cfg
        i, n = cfg.shard_index
        mine = [j for idx, j in enumerate(jobs) if idx % n == i]
        if not mine:
            return {}
        manifest = self.out / MANIFEST
        if manifest.exists() and any(finished(j) is None for j in mine):
            # experts are about to change under an existing library: unpublish it first, so
            # nobody opens a manifest whose checksums no longer hold (rewritten at the end)
            log.warning("retraining experts of the existing library %s: removing its "
                        "manifest until the build finishes", self.out)
            manifest.unlink()
        if cfg.ray is not None:  # one Ray task per expert (training/ray_build.py)
            from training.ray_build import RayOptions, train_on_ray

            results = train_on_ray(mine, RayOptions.from_config(cfg))
        else:
            results = train_all(mine, workers=cfg.workers)
        return {r.name: r for r in results}

    def _train(self, texts, members, base_fp) -> Trained | None:
        """The plain experts and the multitask adapter, then (once the multitask adapter
        exists) the folded base and the branched experts. None while another shard's
        adapters are missing."""
        from training import multitask as mt

        cfg = self.cfg
        mode = cfg.branch_mode
        plain = ExpertSet(PLAIN, self.base, base_fp, [])
        first = [] if mode == "on" else self._expert_jobs(texts, members, plain)
        mt_job = None
        if cfg.trains_multitask:
            mt_job = mt.multitask_job(
                texts, mt.multitask_order(members, cfg.seed), base_model=str(self.base),
                base_fingerprint=base_fp, settings=self._settings(), seed=cfg.seed,
                out_dir=str(self.out / mt.FOLDER))
        t0 = time.perf_counter()
        done = self._run_share(first + ([mt_job] if mt_job else []))
        branched, second = None, []
        if mt_job is not None and mode != "off" and finished(mt_job) is not None:
            folded_dir, folded_fp = self._fold(finished(mt_job)["sha256"], base_fp)
            branched = ExpertSet(BRANCHED, folded_dir, folded_fp, [])
            second = self._expert_jobs(texts, members, branched)
            done.update(self._run_share(second))
        trained = [r for r in done.values() if not r.skipped]
        # wall time of this run's training, then each adapter's own training time (from the
        # records, so a resumed build still reports what its experts cost)
        self.timings["train"] = {"seconds": round(time.perf_counter() - t0, 2),
                                 "cached": not trained, "trained": len(trained),
                                 "skipped": len(done) - len(trained)}
        missing = []
        for job in first + ([mt_job] if mt_job else []) + second:
            if job.name in done:
                continue
            rec = finished(job)
            if rec is None:
                missing.append(job.name)
            else:
                done[job.name] = ExpertResult(job.name, job.expert_id, job.out_dir,
                                              rec["sha256"], rec.get("metrics", {}), True)
        if missing:
            log.info("shard %s done; still missing: %s. The last shard to finish, or a rerun "
                     "without --shard, writes the library (branched experts start once the "
                     "multitask adapter exists).", cfg.shard, ", ".join(missing))
            return None
        sets = {}
        for s, jobs, label in ((plain, first, "train: experts"),
                               (branched, second, "train: branched experts")):
            if s is None or not jobs:
                continue
            s.experts = [done[j.name] for j in jobs]
            sets[s.name] = s
            self.timings[label] = {
                "seconds": round(sum(e.metrics.get("seconds", 0) for e in s.experts), 2),
                "cached": all(e.skipped for e in s.experts)}
        multitask = done.get("multitask")
        if multitask is not None:
            self.timings["train: multitask"] = {"seconds": multitask.metrics.get("seconds"),
                                                "cached": multitask.skipped}
        return Trained(sets, multitask)

    def _fold(self, multitask_sha: str, base_fp: str) -> tuple[Path, str]:
        """The base with the multitask adapter folded in (`branched/base`), and its
        fingerprint (which the branched experts' jobs carry: a new fold retrains them)."""
        from training.multitask import FOLDER

        out_dir = self.out / branching.BASE
        self._stage("fold", {"base": base_fp, "multitask": multitask_sha},
                    [out_dir / "config.json"],
                    lambda: branching.fold_adapter(self.base, self.out / FOLDER, out_dir))
        return out_dir, model_fingerprint(out_dir)

    def _titles(self, docs, embeddings, members) -> tuple[list[str], list[list[str]]]:
        """Titles from the clustering embedding (whatever embedding routes)."""
        from training.titles import central_titles, cluster_titles

        t0 = time.perf_counter()
        cents = make_centroids(embeddings, members)
        titles = [d.get("title", "") for d in docs]
        examples = [central_titles(embeddings[ids], [titles[i] for i in ids], cents[k])
                    for k, ids in enumerate(members)]
        texts = [" ".join(docs[i]["text"] for i in ids) for ids in members]
        out = cluster_titles(texts, examples)
        self.timings["titles"] = {"seconds": round(time.perf_counter() - t0, 2),
                                  "cached": False}
        for k, t in enumerate(out):
            log.info("expert %d: %s", k, t)
        return out, examples

    # ------------------------------------------------------------------ routing embedding

    def _split_holdout(self, clustering) -> tuple[np.ndarray, np.ndarray]:
        """(tuning documents, test documents): disjoint, each taken round-robin over the
        clusters from a seeded order of each cluster's holdout, so every cluster is
        represented as evenly as the holdout allows. Tuning takes the first --tune-docs,
        the test set the next --test-docs."""
        cfg = self.cfg
        rng = np.random.default_rng(cfg.seed)
        pools = [list(rng.permutation(clustering.holdout_ids(k))) for k in range(cfg.k)]

        def take(n: int) -> np.ndarray:
            picked: list[int] = []
            while len(picked) < n and any(pools):
                for pool in pools:
                    if pool and len(picked) < n:
                        picked.append(int(pool.pop(0)))
            return np.asarray(sorted(picked), dtype=np.int64)

        tune_ids = take(cfg.tune_docs)
        return tune_ids, take(cfg.test_docs)

    def _embedder_ref(self, kind: str, dim: int) -> EmbedderRef:
        path = self._embedder_path(kind)
        name = f"base-hidden:{path.name}" if kind == "base-hidden" else path.name
        return EmbedderRef(name=name, dim=int(dim), kind=kind, path=str(path))

    def _member_embeddings(self, kind, docs_key, texts, members, base_fp) -> np.ndarray:
        """(n_docs, d) `kind` embeddings of the experts' training documents (zero rows for
        the others): what that kind's centroids are the means of."""
        ids = np.unique(np.concatenate(members))
        path = self.work / f"routing-{kind}.npz"

        def compute() -> None:
            vecs = self._embed(kind, [texts[i] for i in ids], f"embed documents ({kind})")
            buf = io.BytesIO()
            np.savez(buf, ids=ids, vectors=vecs)
            atomic_write_bytes(path, buf.getvalue())

        self._stage(f"routing-{kind}", {"documents": docs_key, "members": _hash(ids.tolist()),
                                        "model": base_fp, "kind": kind}, [path], compute)
        with np.load(path) as z:
            full = np.zeros((len(texts), z["vectors"].shape[1]), np.float32)
            full[z["ids"]] = z["vectors"]
        return full

    def _holdout_queries(self, kind: str, docs, holdout: np.ndarray) -> np.ndarray:
        """(n_holdout, d): each holdout document's first --query-tokens tokens, embedded as a
        prompt is at serve time."""
        from training.embeddings import prefix_texts

        cfg = self.cfg
        name = "holdout_queries" if kind == "sentence-transformers" else \
            f"holdout_queries-{kind}"
        path = self.work / f"{name}.npy"
        embedder = cfg.embedder if kind == "sentence-transformers" else self.base
        key = {"holdout": _hash(holdout.tolist()), "query_tokens": cfg.query_tokens,
               "embedder": str(embedder), "kind": kind,
               "docs": _hash([docs[i]["id"] for i in holdout])}
        self._stage(name, key, [path], lambda: atomic_save_npy(path, self._embed(
            kind, prefix_texts(self.tokenizer, [docs[i]["text"] for i in holdout],
                               cfg.query_tokens), f"embed holdout prefixes ({kind})")))
        return np.load(path)

    def _routing(self, docs, docs_key, embeddings, clustering, members, tune_ids, test_ids,
                 base_fp) -> Routing:
        """Centroids and holdout queries for each candidate embedding; pass@k on the tuning
        and test documents; the candidate with the best pass@1 on the tuning documents is
        kept (training/routing.py)."""
        from training.routing import PASS_AT, choose_embedding, pass_at_k, pass_curve

        cfg = self.cfg
        holdout = np.flatnonzero(clustering.holdout)
        texts = [d["text"] for d in docs]
        candidates: dict[str, Routing] = {}
        measured: dict[str, Any] = {}
        for kind in cfg.routing_candidates:
            if kind == cfg.cluster_embedder_kind:
                doc_emb = embeddings
            else:
                doc_emb = self._member_embeddings(kind, docs_key, texts, members, base_fp)
            cents = make_centroids(doc_emb, members)
            r = Routing(self._embedder_ref(kind, cents.shape[1]), cents,
                        self._holdout_queries(kind, docs, holdout), holdout, {})
            candidates[kind] = r
            m: dict[str, Any] = {"name": r.ref.name, "dim": r.ref.dim}
            for split, ids in (("tune", tune_ids), ("test", test_ids)):
                if len(ids):
                    labels = clustering.labels[ids]
                    acc = pass_at_k(r.sims(ids), labels, PASS_AT)
                    m[f"pass_{split}"] = {str(k): v for k, v in acc.items()}
                    m[f"curve_{split}"] = pass_curve(r.sims(ids), labels)
            measured[kind] = m
            log.info("routing by %s: pass@1/3/10 on the tuning documents %s", kind,
                     m.get("pass_tune"))
        kinds = list(cfg.routing_candidates)
        if len(tune_ids):
            chosen = choose_embedding({k: measured[k]["pass_tune"]["1"] for k in kinds}, kinds)
        else:
            chosen = kinds[0]
        routing = candidates[chosen]
        routing.report = {"requested": cfg.embedder_kind, "chosen": chosen,
                          "rule": "highest pass@1 on the tuning documents (a tie keeps the "
                                  "first of " + ", ".join(kinds) + ")",
                          "by_kind": measured,
                          "documents": {"tune": [docs[i]["id"] for i in tune_ids],
                                        "test": [docs[i]["id"] for i in test_ids]}}
        return routing

    # ------------------------------------------------------------------ tuning

    def _tune(self, docs, trained: Trained, routing: Routing, tune_ids) -> dict[str, dict]:
        """Per expert set, the grid over variant x max_active x beta x tau on the tuning
        documents (training/tune.py); {} when --no-tune."""
        cfg = self.cfg
        if not cfg.tune:
            return {}
        if len(tune_ids) == 0:
            raise ValueError("tuning needs holdout documents: raise --holdout-fraction or "
                             "pass --no-tune")
        sims = routing.sims(tune_ids)
        texts = [docs[i]["text"] for i in tune_ids]
        out = {}
        for name, s in trained.sets.items():
            key = {"experts": [e.sha256 for e in s.experts], "model": s.fingerprint,
                   "eval": _hash(tune_ids.tolist()), "queries": _hash(sims.round(6).tolist()),
                   "active_counts": list(cfg.tuned_active_counts),
                   **cfg.subset("betas", "taus", "variants", "query_tokens", "max_tokens")}
            path = self.work / f"tune-{name}.json"
            self._stage(f"tune-{name}", key, [path],
                        lambda s=s, path=path: atomic_write_json(path, self._grid(s, texts, sims)))
            out[name] = json.loads(path.read_text())
        return out

    def _grid(self, s: ExpertSet, texts: list[str], sims: np.ndarray) -> dict[str, Any]:
        from training.evaluate import AdapterMixer, ScoreCache
        from training.tune import tune

        cfg = self.cfg
        model, tokenizer = self._model(s.model_dir)
        mixer = AdapterMixer(model, [read_adapter(e.out_dir, e.expert_id) for e in s.experts])
        try:
            cache = ScoreCache(model, tokenizer, texts, cfg.query_tokens, mixer=mixer,
                               max_tokens=cfg.max_tokens, batch_size=cfg.eval_batch_size)
            t = tune(cache, sims, betas=cfg.betas, taus=cfg.taus, variants=cfg.variants,
                     max_active=cfg.tuned_active_counts)
        finally:
            mixer.remove()
        bests = {round(b["perplexity"], 6) for b in t.best_by_variant.values()}
        return {"variant": t.variant, "beta": t.beta, "tau": t.tau, "max_active": t.max_active,
                "perplexity": t.perplexity, "best_by_variant": t.best_by_variant,
                "variant_tie": len(t.best_by_variant) > 1 and len(bests) == 1,
                "grid": [vars(p) for p in t.grid]}

    def _choose(self, trained: Trained, tuning: dict[str, dict]) -> tuple[str, dict[str, Any]]:
        """Which expert set the library serves, and why."""
        cfg = self.cfg
        names = list(trained.sets)
        info: dict[str, Any] = {"requested": cfg.branch_from_multitask,
                                "mode": cfg.branch_mode, "sets": names}
        if len(names) == 1:
            info.update(chosen=names[0], rule=f"--branch-from-multitask "
                        f"{cfg.branch_from_multitask} resolved to {cfg.branch_mode!r}: one "
                        "expert set trained")
            return names[0], info
        ppl = {n: tuning[n]["perplexity"] for n in names}
        # a tie keeps plain: nothing beyond the base to ship and serve
        chosen = BRANCHED if ppl[BRANCHED] < ppl[PLAIN] else PLAIN
        info.update(chosen=chosen, tuned_perplexity=ppl,
                    rule="lower tuned TTMM perplexity on the tuning documents (a tie keeps "
                         "plain)")
        log.info("expert sets on the tuning documents: %s; serving %s", ppl, chosen)
        return chosen, info

    # ------------------------------------------------------------------ test documents

    def _evaluate(self, docs, clustering, trained: Trained, routing: Routing,
                  tuning: dict[str, dict], test_ids: np.ndarray, chosen: str) -> dict:
        cfg = self.cfg
        sims = routing.sims(test_ids)
        key = {"sets": {n: [e.sha256 for e in s.experts] + [s.fingerprint]
                        for n, s in trained.sets.items()},
               "multitask": trained.multitask.sha256 if trained.multitask else None,
               "tuning": {n: t["grid"] for n, t in tuning.items()}, "chosen": chosen,
               "test": _hash(test_ids.tolist()), "queries": _hash(sims.round(6).tolist()),
               "active_counts": list(cfg.tuned_active_counts),
               **cfg.subset("heatmap", "query_tokens", "max_tokens")}
        path = self.work / "evaluate.json"
        self._stage("evaluate", key, [path], lambda: atomic_write_json(
            path, self._test_rows(docs, clustering, trained, tuning, test_ids, sims, chosen)))
        return json.loads(path.read_text())

    def _test_rows(self, docs, clustering, trained, tuning, test_ids, sims, chosen) -> dict:
        from training.evaluate import AdapterMixer, ScoreCache
        from training.quality import set_rows, summarise

        cfg = self.cfg
        texts = [docs[i]["text"] for i in test_ids]
        labels = clustering.labels[test_ids]
        kw = dict(max_tokens=cfg.max_tokens, batch_size=cfg.eval_batch_size)
        model, tokenizer = self._model(self.base)
        rows = {}
        mixer = None
        if trained.multitask is not None:
            mixer = AdapterMixer(model, [read_adapter(trained.multitask.out_dir)])
        try:
            cache = ScoreCache(model, tokenizer, texts, cfg.query_tokens, mixer=mixer, **kw)
            rows["base"] = cache.score(None)
            if mixer is not None:
                rows["multitask"] = cache.score(np.ones((len(texts), 1)))
        finally:
            if mixer is not None:
                mixer.remove()
        details = {}
        for name, s in trained.sets.items():
            model, tokenizer = self._model(s.model_dir)
            mixer = AdapterMixer(model, [read_adapter(e.out_dir, e.expert_id)
                                         for e in s.experts])
            try:
                cache = ScoreCache(model, tokenizer, texts, cfg.query_tokens, mixer=mixer, **kw)
                r, details[name] = set_rows(name, cache, tuning[name]["grid"], sims, labels,
                                            cfg.tuned_active_counts, heatmap=cfg.heatmap)
            finally:
                mixer.remove()
            rows.update(r)
        top = max(cfg.tuned_active_counts)
        tuned = tuning[chosen]["max_active"]
        pairs = []
        for name in trained.sets:
            pairs += [(f"{name} TTMM {top}", "multitask"), (f"{name} TTMM {top}", "base")]
        if len(trained.sets) == 2:
            pairs += [(f"{BRANCHED} TTMM {top}", f"{PLAIN} TTMM {top}"),
                      (f"{BRANCHED} own expert", f"{PLAIN} own expert")]
        if tuned != top:
            pairs.append((f"{chosen} TTMM {tuned}", "multitask"))
        out = summarise(rows, labels, cfg.k, pairs, seed=cfg.seed)
        out["test_documents"] = [docs[i]["id"] for i in test_ids]
        out["labels"] = labels.tolist()
        out["sets"] = details
        out["chosen"] = chosen
        out["served_row"] = f"{chosen} TTMM {tuned}"
        return out

    # ------------------------------------------------------------------ the library

    def _manifest(self, docs, clustering, members, s: ExpertSet, multitask, titles, examples,
                  tuned: dict | None, routing: Routing, branch: dict, base_fp) -> Manifest:
        from training.tune import ood_threshold

        cfg = self.cfg
        infos = tuple(ExpertInfo(id=e.expert_id, title=titles[e.expert_id],
                                 size=len(members[e.expert_id]),
                                 file=s.folder(e.expert_id), sha256=e.sha256,
                                 rank=cfg.rank, alpha=float(cfg.alpha)) for e in s.experts)
        top = (routing.queries @ routing.centroids.T).max(1) if len(routing.queries) else \
            np.zeros(0)
        router = RouterDefaults(
            beta=float(tuned["beta"]) if tuned else RouterDefaults.beta,
            tau=float(tuned["tau"]) if tuned else RouterDefaults.tau,
            query_tokens=cfg.query_tokens,
            max_active=int(tuned["max_active"]) if tuned else cfg.max_active,
            sparse_softmax=tuned["variant"] if tuned else "paper", top_m=0,
            ood_threshold=ood_threshold(top, cfg.ood_percentile))
        serving_base = None
        if s.name == BRANCHED:
            serving_base = ModelRef(name=f"{self.base.name}+multitask", fingerprint=s.fingerprint,
                                    path=branching.BASE)
        extras: dict[str, Any] = {
            "holdout": HOLDOUT, "document_ids": DOCUMENT_IDS, "split": SPLIT,
            "report": REPORT, "documents": len(docs),
            "cluster_sizes": clustering.sizes(),
            "central_titles": examples,
            "tuned": tuned is not None,
            "expert_set": s.name,
            "experts_adapt": "serving_base" if serving_base else "base_model",
            "branch": {k: branch[k] for k in ("requested", "mode", "chosen", "rule")},
            "routing_embedding": {k: routing.report[k] for k in ("requested", "chosen")},
            "build": cfg.to_json(),
        }
        if multitask is not None:
            from training.multitask import FOLDER

            # an adapter of the base model, not of the serving base (which already holds it
            # when the experts are branched)
            extras["multitask"] = {"file": FOLDER, "sha256": multitask.sha256,
                                   "size": int(sum(len(m) for m in members)),
                                   "rank": cfg.rank, "alpha": float(cfg.alpha),
                                   "adapts": "base_model"}
        return Manifest(
            base_model=ModelRef(name=self.base.name, fingerprint=base_fp, path=str(self.base)),
            embedder=routing.ref,
            lora=LoraSpec(rank=cfg.rank, alpha=float(cfg.alpha),
                          target_modules=tuple(cfg.target_modules)),
            router=router, experts=infos, serving_base=serving_base, extras=extras)

    def _write(self, docs, clustering, members, routing, manifest, trained, chosen, titles,
               tuning, tune_ids, evaluation, branch) -> None:
        from training.report import write_report

        out = self.out
        holdout = [{"id": docs[i]["id"], "text": docs[i]["text"],
                    "title": docs[i].get("title", ""), "cluster": int(clustering.labels[i])}
                   for i in np.flatnonzero(clustering.holdout)]
        save_jsonl(out / HOLDOUT, holdout)
        atomic_write_bytes(out / DOCUMENT_IDS, "".join(f"{d['id']}\n" for d in docs).encode())
        split = np.where(clustering.holdout, 1, 2).astype(np.int8)
        for ids in members:
            split[ids] = 0
        atomic_save_npy(out / SPLIT, split)
        s = trained.sets[chosen]
        mt = trained.multitask
        router = manifest.router
        tune_section: dict[str, Any] = {
            "tuned": bool(tuning), "ood_threshold": router.ood_threshold,
            "ood_percentile": self.cfg.ood_percentile,
            "variant": router.sparse_softmax, "beta": router.beta, "tau": router.tau,
            "max_active": router.max_active,
            # the tuning documents (benchmarks leave them out of their test sets)
            "eval_documents": [docs[i]["id"] for i in tune_ids] if tuning else [],
            "routing_accuracy_top1": routing.report["by_kind"][routing.ref.kind]
            .get("pass_tune", {}).get("1"),
        }
        if tuning:
            tune_section.update({k: tuning[chosen][k] for k in
                                 ("perplexity", "best_by_variant", "variant_tie", "grid")})
            tune_section["by_set"] = tuning
        write_report(out, {
            "config": self.cfg.to_json(),
            "timings": self.timings,
            "documents": len(docs),
            "cluster_sizes": clustering.sizes(),
            "titles": titles,
            "experts": [{"id": e.expert_id, "title": titles[e.expert_id],
                         "documents": len(members[e.expert_id]),
                         "holdout": int(len(clustering.holdout_ids(e.expert_id))),
                         "sha256": e.sha256, **e.metrics} for e in s.experts],
            "expert_sets": {n: {"model": str(x.model_dir), "fingerprint": x.fingerprint,
                                "train_seconds": round(sum(e.metrics.get("seconds", 0)
                                                           for e in x.experts), 1),
                                "loss_last": float(np.mean([e.metrics.get("loss_last", np.nan)
                                                            for e in x.experts]))}
                            for n, x in trained.sets.items()},
            "multitask": None if mt is None else {"sha256": mt.sha256, **mt.metrics},
            "branch": branch,
            "routing": routing.report,
            "router": json.loads(json.dumps(router.__dict__)),
            "tuning": tune_section,
            "evaluation": evaluation,
        })
        write_library(out, manifest, routing.centroids, assignments=clustering.labels)


def build(cfg: BuildConfig) -> Library | None:
    """Build (or resume) a library; None when this shard finished but others have not."""
    return Pipeline(cfg).run()
