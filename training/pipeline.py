"""The build, stage by stage: corpus -> documents -> embeddings -> clusters -> experts (and the
multitask baseline) -> centroids -> titles -> tuned routing defaults -> library.

Each stage caches its output under the work dir with a record of what it was computed from
(a hash of its inputs and settings), so a rerun redoes only what changed, and a killed build
resumes. Experts are written straight into the library folder, each atomically with a
checksum record (training/experts.py); with `--shard i/n` a process trains only its share,
and whichever run finds every expert present writes the library (manifest last).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

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


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
        self._embedder = None

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

    @property
    def embedder(self):
        if self._embedder is None:
            from ttmm_vllm.embed import load_embedder

            path = self.base if self.cfg.embedder_kind == "base-hidden" else self.cfg.embedder
            self._embedder = load_embedder(self.cfg.embedder_kind, Path(path).expanduser())
        return self._embedder

    def _check_inputs(self) -> None:
        cfg = self.cfg
        if not (self.base / "config.json").exists():
            raise FileNotFoundError(f"base model {cfg.base_model} is not a model folder "
                                    "(no config.json)")
        emb = Path(cfg.embedder).expanduser()
        if cfg.embedder_kind == "sentence-transformers" and not emb.is_dir():
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

        emb_path = self.work / "embeddings.npy"
        emb_key = self._stage(
            "embeddings",
            {"documents": docs_key, "embedder": str(cfg.embedder), "kind": cfg.embedder_kind},
            [emb_path],
            lambda: atomic_save_npy(emb_path, self._embed(texts, "embed documents")))
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

        results = self._train(docs, texts, members, base_fp)
        if results is None:
            return None
        experts, multitask = results

        t0 = time.perf_counter()
        cents = make_centroids(embeddings, members)
        self.timings["centroids"] = {"seconds": round(time.perf_counter() - t0, 2),
                                     "cached": False}
        titles, examples = self._titles(docs, embeddings, members, cents)

        tuning = self._tune(docs, clustering, cents, experts, multitask)
        manifest = self._manifest(docs, clustering, members, cents, experts, multitask, titles,
                                  examples, tuning, base_fp)
        self.timings["this run (wall)"] = {"seconds": round(time.perf_counter() - t_start, 2),
                                 "cached": False}
        self._write(docs, clustering, members, cents, manifest, experts, multitask, titles,
                    examples, tuning)
        return Library.open(self.out, base_model_dir=self.base)

    def _embed(self, texts: list[str], desc: str) -> np.ndarray:
        from training.embeddings import embed_texts

        return embed_texts(self.embedder, texts, self.cfg.embed_batch_size, desc=desc)

    def _cluster(self, embeddings: np.ndarray, path: Path) -> None:
        import io

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

    def _settings(self) -> TrainSettings:
        cfg = self.cfg
        return TrainSettings(
            rank=cfg.rank, alpha=cfg.alpha, target_modules=tuple(cfg.target_modules),
            lr=cfg.lr, batch_size=cfg.batch_size, weight_decay=cfg.weight_decay,
            adam_betas=tuple(cfg.adam_betas), adam_eps=cfg.adam_eps, epochs=cfg.epochs,
            max_tokens=cfg.max_tokens, threads=cfg.torch_threads)

    def _jobs(self, texts: list[str], members: list[np.ndarray], base_fp: str
              ) -> list[ExpertJob]:
        """One job per expert, then the multitask job (the list a shard takes every n-th of)."""
        from training import multitask as mt

        cfg = self.cfg
        settings = self._settings()
        jobs = [ExpertJob(name=f"expert {k}", expert_id=k, base_model=str(self.base),
                          base_fingerprint=base_fp, texts=tuple(texts[i] for i in ids),
                          settings=settings, seed=cfg.seed + k,
                          out_dir=str(self.out / expert_dirname(k)))
                for k, ids in enumerate(members)]
        if cfg.multitask:
            jobs.append(mt.multitask_job(
                texts, mt.multitask_order(members, cfg.seed), base_model=str(self.base),
                base_fingerprint=base_fp, settings=settings, seed=cfg.seed,
                out_dir=str(self.out / mt.FOLDER)))
        return jobs

    def _train(self, docs, texts, members, base_fp
               ) -> tuple[list[ExpertResult], ExpertResult | None] | None:
        cfg = self.cfg
        jobs = self._jobs(texts, members, base_fp)
        i, n = cfg.shard_index
        mine = [j for idx, j in enumerate(jobs) if idx % n == i]
        manifest = self.out / MANIFEST
        if manifest.exists() and any(finished(j) is None for j in mine):
            # experts are about to change under an existing library: unpublish it first, so
            # nobody opens a manifest whose checksums no longer hold (rewritten at the end)
            log.warning("retraining experts of the existing library %s: removing its "
                        "manifest until the build finishes", self.out)
            manifest.unlink()
        t0 = time.perf_counter()
        if cfg.ray is not None:  # one Ray task per expert (training/ray_build.py)
            from training.ray_build import RayOptions, train_on_ray

            finished_now = train_on_ray(mine, RayOptions.from_config(cfg))
        else:
            finished_now = train_all(mine, workers=cfg.workers)
        done = {r.name: r for r in finished_now}
        trained = [r for r in done.values() if not r.skipped]
        # wall time of this run's training, then each adapter's own training time (from the
        # records, so a resumed build still reports what its experts cost)
        self.timings["train"] = {"seconds": round(time.perf_counter() - t0, 2),
                                 "cached": not trained, "trained": len(trained),
                                 "skipped": len(done) - len(trained)}
        missing = []
        for job in jobs:
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
                     "without --shard, writes the library.", cfg.shard, ", ".join(missing))
            return None
        experts = [done[j.name] for j in jobs if j.expert_id >= 0]
        multitask = done.get("multitask")
        self.timings["train: experts"] = {
            "seconds": round(sum(e.metrics.get("seconds", 0) for e in experts), 2),
            "cached": all(e.skipped for e in experts)}
        if multitask is not None:
            self.timings["train: multitask"] = {"seconds": multitask.metrics.get("seconds"),
                                                "cached": multitask.skipped}
        return experts, multitask

    def _titles(self, docs, embeddings, members, cents) -> tuple[list[str], list[list[str]]]:
        from training.titles import central_titles, cluster_titles

        t0 = time.perf_counter()
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

    # ------------------------------------------------------------------ tuning

    def _eval_docs(self, clustering) -> np.ndarray:
        """Up to --tune-docs holdout documents, taken round-robin over clusters (seeded), so
        every cluster is represented as evenly as the holdout allows."""
        rng = np.random.default_rng(self.cfg.seed)
        pools = [list(rng.permutation(clustering.holdout_ids(k))) for k in range(self.cfg.k)]
        picked: list[int] = []
        while len(picked) < self.cfg.tune_docs and any(pools):
            for pool in pools:
                if pool and len(picked) < self.cfg.tune_docs:
                    picked.append(int(pool.pop(0)))
        return np.asarray(sorted(picked), dtype=np.int64)

    def _tune(self, docs, clustering, cents, experts, multitask) -> dict[str, Any]:
        """Routing defaults (tuned or the paper's), the OOD threshold and the evaluation."""
        cfg = self.cfg
        holdout = np.flatnonzero(clustering.holdout)
        q_path = self.work / "holdout_queries.npy"
        q_key = {"holdout": _hash(holdout.tolist()), "query_tokens": cfg.query_tokens,
                 "embedder": str(cfg.embedder), "kind": cfg.embedder_kind,
                 "docs": _hash([docs[i]["id"] for i in holdout])}
        from training.embeddings import prefix_texts

        self._stage("holdout_queries", q_key, [q_path], lambda: atomic_save_npy(
            q_path, self._embed(prefix_texts(self.tokenizer, [docs[i]["text"] for i in holdout],
                                             cfg.query_tokens), "embed holdout prefixes")))
        queries = np.load(q_path)
        from training.tune import ood_threshold

        top = (queries @ cents.T).max(1) if len(queries) else np.zeros(0)
        result: dict[str, Any] = {
            "ood_threshold": ood_threshold(top, cfg.ood_percentile),
            "ood_percentile": cfg.ood_percentile,
            "variant": "paper", "beta": RouterDefaults.beta, "tau": RouterDefaults.tau,
            "tuned": False,
        }
        if not cfg.tune:
            return result
        if len(holdout) == 0:
            raise ValueError("tuning needs holdout documents: raise --holdout-fraction or "
                             "pass --no-tune")
        eval_ids = self._eval_docs(clustering)
        pos = {int(d): j for j, d in enumerate(holdout)}
        sims = queries[[pos[int(i)] for i in eval_ids]] @ cents.T
        key = {"experts": [e.sha256 for e in experts],
               "multitask": multitask.sha256 if multitask else None,
               "eval": _hash(eval_ids.tolist()), "queries": _hash(sims.round(6).tolist()),
               **cfg.subset("betas", "taus", "variants", "max_active", "query_tokens",
                            "max_tokens")}
        path = self.work / "tune.json"
        self._stage("tune", key, [path], lambda: atomic_write_json(
            path, self._grid_and_eval(docs, clustering, eval_ids, sims, experts, multitask)))
        result.update(json.loads(path.read_text()))
        result["tuned"] = True
        return result

    def _grid_and_eval(self, docs, clustering, eval_ids, sims, experts, multitask) -> dict:
        from training.evaluate import AdapterMixer, load_model, perplexity, suffix_nll
        from training.tune import tune

        cfg = self.cfg
        model, tokenizer = load_model(self.base)
        adapters = [read_adapter(e.out_dir, e.expert_id) for e in experts]
        if multitask is not None:
            adapters.append(read_adapter(multitask.out_dir))
        mixer = AdapterMixer(model, adapters)
        texts = [docs[i]["text"] for i in eval_ids]
        labels = clustering.labels[eval_ids]
        kw = dict(max_tokens=cfg.max_tokens, batch_size=cfg.eval_batch_size)
        t = tune(model, tokenizer, mixer, texts, sims, betas=cfg.betas, taus=cfg.taus,
                 variants=cfg.variants, max_active=cfg.max_active,
                 query_tokens=cfg.query_tokens, **kw)
        rows = {"ttmm": (t.nll, t.count)}
        rows["base"] = suffix_nll(model, tokenizer, texts, cfg.query_tokens, **kw)
        own = np.zeros((len(texts), mixer.n))
        own[np.arange(len(texts)), labels] = 1.0
        rows["own expert"] = suffix_nll(model, tokenizer, texts, cfg.query_tokens, mixer=mixer,
                                        weights=own, **kw)
        top1 = np.zeros((len(texts), mixer.n))
        top1[np.arange(len(texts)), sims.argmax(1)] = 1.0
        rows["routed top-1"] = suffix_nll(model, tokenizer, texts, cfg.query_tokens,
                                          mixer=mixer, weights=top1, **kw)
        if multitask is not None:
            mt = np.zeros((len(texts), mixer.n))
            mt[:, -1] = 1.0
            rows["multitask"] = suffix_nll(model, tokenizer, texts, cfg.query_tokens,
                                           mixer=mixer, weights=mt, **kw)
        mixer.remove()
        per_cluster = []
        for k in range(cfg.k):
            sel = labels == k
            per_cluster.append({"cluster": k, "documents": int(sel.sum()),
                                **{name: perplexity(nll[sel], cnt[sel])
                                   for name, (nll, cnt) in rows.items()}})
        bests = {round(b["perplexity"], 6) for b in t.best_by_variant.values()}
        return {
            "variant": t.variant, "beta": t.beta, "tau": t.tau,
            "best_by_variant": t.best_by_variant,
            "variant_tie": len(t.best_by_variant) > 1 and len(bests) == 1,
            "grid": [vars(p) for p in t.grid],
            "eval_documents": [docs[i]["id"] for i in eval_ids],
            "perplexity": {name: perplexity(nll, cnt) for name, (nll, cnt) in rows.items()},
            "per_cluster": per_cluster,
            "per_document": {name: {"nll": nll.tolist(), "tokens": cnt.tolist()}
                             for name, (nll, cnt) in rows.items()},
            "routing_accuracy_top1": float((sims.argmax(1) == labels).mean()),
        }

    # ------------------------------------------------------------------ the library

    def _manifest(self, docs, clustering, members, cents, experts, multitask, titles, examples,
                  tuning, base_fp) -> Manifest:
        cfg = self.cfg
        emb = self.embedder
        infos = tuple(ExpertInfo(id=e.expert_id, title=titles[e.expert_id],
                                 size=len(members[e.expert_id]),
                                 file=expert_dirname(e.expert_id), sha256=e.sha256,
                                 rank=cfg.rank, alpha=float(cfg.alpha)) for e in experts)
        router = RouterDefaults(beta=float(tuning["beta"]), tau=float(tuning["tau"]),
                                query_tokens=cfg.query_tokens, max_active=cfg.max_active,
                                sparse_softmax=tuning["variant"], top_m=0,
                                ood_threshold=tuning["ood_threshold"])
        extras: dict[str, Any] = {
            "holdout": HOLDOUT, "document_ids": DOCUMENT_IDS, "split": SPLIT,
            "report": REPORT, "documents": len(docs),
            "cluster_sizes": clustering.sizes(),
            "central_titles": examples,
            "tuned": bool(tuning["tuned"]),
            "build": cfg.to_json(),
        }
        if multitask is not None:
            from training.multitask import FOLDER

            extras["multitask"] = {"file": FOLDER, "sha256": multitask.sha256,
                                   "size": int(sum(len(m) for m in members)),
                                   "rank": cfg.rank, "alpha": float(cfg.alpha)}
        return Manifest(
            base_model=ModelRef(name=self.base.name, fingerprint=base_fp, path=str(self.base)),
            embedder=EmbedderRef(name=emb.name, dim=int(emb.dim), kind=cfg.embedder_kind,
                                 path=str(Path(cfg.embedder).expanduser().resolve())),
            lora=LoraSpec(rank=cfg.rank, alpha=float(cfg.alpha),
                          target_modules=tuple(cfg.target_modules)),
            router=router, experts=infos, extras=extras)

    def _write(self, docs, clustering, members, cents, manifest, experts, multitask, titles,
               examples, tuning) -> None:
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
        write_report(out, {
            "config": self.cfg.to_json(),
            "timings": self.timings,
            "documents": len(docs),
            "cluster_sizes": clustering.sizes(),
            "experts": [{"id": e.expert_id, "title": titles[e.expert_id],
                         "documents": len(members[e.expert_id]),
                         "holdout": int(len(clustering.holdout_ids(e.expert_id))),
                         "sha256": e.sha256, **e.metrics} for e in experts],
            "multitask": None if multitask is None else {"sha256": multitask.sha256,
                                                         **multitask.metrics},
            "router": json.loads(json.dumps(manifest.router.__dict__)),
            "tuning": tuning,
        })
        write_library(out, manifest, cents, assignments=clustering.labels)


def build(cfg: BuildConfig) -> Library | None:
    """Build (or resume) a library; None when this shard finished but others have not."""
    return Pipeline(cfg).run()
