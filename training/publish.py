"""Stage 9: the library itself, written from the build's state: manifest, centroids, report.

The experts are already in the library folder (stage 4 writes them there, each atomically);
this stage writes everything that names them. The manifest is written last
(`ttmm_vllm.library.write_library`), so a library without one is a build in progress and
nobody serves experts whose checksums it has not recorded.

Besides the format's files the library gets the documents' provenance: `holdout.jsonl` (the
held-out documents with their clusters), `document_ids.txt` (corpus order, one a line),
`split.npy` (per document: trained on, held out, or beyond the per-expert cap) and the report
(`report.json`, `report.md`, plots; training/report.py).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from training import branching
from training.context import BuildContext
from training.documents import save_jsonl
from training.expert_sets import BRANCHED
from training.multitask import FOLDER as MULTITASK_FOLDER
from training.multitask import MATCHED_FOLDER, matched_epochs
from training.report import write_report
from training.state import BuildState
from training.tune import ood_threshold
from ttmm_vllm.library import (
    HOLDOUT,
    ExpertInfo,
    LoraSpec,
    Manifest,
    ModelRef,
    RouterDefaults,
    atomic_save_npy,
    atomic_write_bytes,
    write_library,
)

DOCUMENT_IDS = "document_ids.txt"
SPLIT = "split.npy"  # per document: 0 trained on, 1 holdout, 2 training split beyond the cap
REPORT = "report.json"


def make_manifest(ctx: BuildContext, state: BuildState) -> Manifest:
    """The manifest of the served expert set, with the tuned router defaults (the paper's
    when not tuned) and, in its extras, what the build decided and from what."""
    cfg = ctx.cfg
    s, tuned, routing, members = state.served, state.tuned, state.routing, state.split.members
    infos = tuple(ExpertInfo(id=e.expert_id, title=state.titles.titles[e.expert_id],
                             size=len(members[e.expert_id]),
                             file=s.folder(e.expert_id), sha256=e.sha256,
                             rank=cfg.rank, alpha=float(cfg.alpha)) for e in s.experts)
    router = RouterDefaults(
        beta=float(tuned["beta"]) if tuned else RouterDefaults.beta,
        tau=float(tuned["tau"]) if tuned else RouterDefaults.tau,
        query_tokens=cfg.query_tokens,
        max_active=int(tuned["max_active"]) if tuned else cfg.max_active,
        sparse_softmax=tuned["variant"] if tuned else "paper", top_m=0,
        ood_threshold=ood_threshold(routing.top_similarity(), cfg.ood_percentile))
    serving_base = None
    if s.name == BRANCHED:
        serving_base = ModelRef(name=f"{ctx.base.name}+multitask", fingerprint=s.fingerprint,
                                path=branching.BASE)
    branch = state.choice.info
    extras: dict[str, Any] = {
        "holdout": HOLDOUT, "document_ids": DOCUMENT_IDS, "split": SPLIT,
        "report": REPORT, "documents": len(state.corpus.docs),
        "cluster_sizes": state.clustering.sizes(),
        "central_titles": state.titles.examples,
        "tuned": tuned is not None,
        "expert_set": s.name,
        "experts_adapt": "serving_base" if serving_base else "base_model",
        "branch": {k: branch[k] for k in ("requested", "mode", "chosen", "rule")},
        "routing_embedding": {k: routing.report[k] for k in ("requested", "chosen")},
        "build": cfg.to_json(),
    }
    size = int(sum(len(m) for m in members))
    multitask = state.experts.multitask
    if multitask is not None:
        # an adapter of the base model, not of the serving base (which already holds it
        # when the experts are branched); trained with its own A even in a shared-A build
        extras["multitask"] = {"file": MULTITASK_FOLDER, "sha256": multitask.sha256,
                               "size": size, "rank": cfg.rank, "alpha": float(cfg.alpha),
                               "adapts": "base_model"}
    matched = state.experts.matched
    if matched is not None:
        # the same adapter trained for as many tokens as the branched library in all
        extras["multitask_matched"] = {"file": MATCHED_FOLDER, "sha256": matched.sha256,
                                       "size": size, "epochs": matched_epochs(cfg.epochs),
                                       "rank": cfg.rank, "alpha": float(cfg.alpha),
                                       "adapts": "base_model"}
    return Manifest(
        base_model=ModelRef(name=ctx.base.name, fingerprint=ctx.base_fingerprint,
                            path=str(ctx.base)),
        embedder=routing.ref,
        lora=LoraSpec(rank=cfg.rank, alpha=float(cfg.alpha),
                      target_modules=tuple(cfg.target_modules), shared_a=cfg.shared_a),
        router=router, experts=infos, serving_base=serving_base, extras=extras)


def report(ctx: BuildContext, state: BuildState, manifest: Manifest) -> dict[str, Any]:
    """report.json's content: the settings, timings, experts, routing, tuning, quality."""
    cfg = ctx.cfg
    docs, clustering, titles = state.corpus.docs, state.clustering, state.titles.titles
    members, tuning, routing = state.split.members, state.tuning, state.routing
    mt, matched = state.experts.multitask, state.experts.matched
    router = manifest.router
    tune_section: dict[str, Any] = {
        "tuned": bool(tuning), "ood_threshold": router.ood_threshold,
        "ood_percentile": cfg.ood_percentile,
        "variant": router.sparse_softmax, "beta": router.beta, "tau": router.tau,
        "max_active": router.max_active,
        # the tuning documents (benchmarks leave them out of their test sets)
        "eval_documents": state.corpus.ids(state.split.tune) if tuning else [],
        "routing_accuracy_top1": routing.report["by_kind"][routing.ref.kind]
        .get("pass_tune", {}).get("1"),
    }
    if tuning:
        tune_section.update({k: tuning[state.choice.name][k] for k in
                             ("perplexity", "best_by_variant", "variant_tie", "grid")})
        tune_section["by_set"] = tuning
    return {
        "config": cfg.to_json(),
        "timings": ctx.timings,
        "documents": len(docs),
        "cluster_sizes": clustering.sizes(),
        "titles": titles,
        "experts": [{"id": e.expert_id, "title": titles[e.expert_id],
                     "documents": len(members[e.expert_id]),
                     "holdout": int(len(clustering.holdout_ids(e.expert_id))),
                     "sha256": e.sha256, **e.metrics} for e in state.served.experts],
        "expert_sets": {n: {"model": str(x.model_dir), "fingerprint": x.fingerprint,
                            "train_seconds": round(sum(e.metrics.get("seconds", 0)
                                                       for e in x.experts), 1),
                            "loss_last": float(np.mean([e.metrics.get("loss_last", np.nan)
                                                        for e in x.experts]))}
                        for n, x in state.experts.sets.items()},
        "multitask": None if mt is None else {"sha256": mt.sha256, **mt.metrics},
        "multitask_matched": None if matched is None else {
            "sha256": matched.sha256, "epochs": matched_epochs(cfg.epochs), **matched.metrics},
        "branch": state.choice.info,
        "routing": routing.report,
        "router": json.loads(json.dumps(router.__dict__)),
        "tuning": tune_section,
        "evaluation": state.evaluation,
    }


def write(ctx: BuildContext, state: BuildState, manifest: Manifest) -> None:
    """Write the documents' provenance, the report, then the library (manifest last)."""
    out = ctx.out
    docs, clustering = state.corpus.docs, state.clustering
    holdout = [{"id": docs[i]["id"], "text": docs[i]["text"],
                "title": docs[i].get("title", ""), "cluster": int(clustering.labels[i])}
               for i in np.flatnonzero(clustering.holdout)]
    save_jsonl(out / HOLDOUT, holdout)
    atomic_write_bytes(out / DOCUMENT_IDS, "".join(f"{d['id']}\n" for d in docs).encode())
    atomic_save_npy(out / SPLIT, state.split.codes(clustering))
    write_report(out, report(ctx, state, manifest))
    write_library(out, manifest, state.routing.centroids, assignments=clustering.labels)
