"""The build, stage by stage: corpus -> documents -> embeddings -> clusters -> experts (and the
multitask baseline; experts branched from it) -> titles -> routing embedding and centroids ->
tuned routing defaults -> quality on test documents -> library.

`build` below is that list. Each stage is a function of typed inputs in its own module and
returns a typed result; the results together are the `BuildState` (training/state.py) the
library is written from. Each cached stage keeps its output under the work dir with a record
of what it was computed from (a hash of its inputs and settings: `BuildContext.stage`), so a
rerun redoes only what changed, and a killed build resumes. Experts are written straight into
the library folder, each atomically with a checksum record (training/experts.py); with
`--shard i/n` a process trains only its share, and whichever run finds every expert present
writes the library (manifest last). `--ray` trains the experts as Ray tasks
(training/ray_build.py); nothing else changes.

The holdout is split once: tuning documents choose the routing embedding, the expert set and
beta/tau/max_active; test documents, never tuned on, give the report's table.
"""

from __future__ import annotations

import time

from training import publish
from training.clusters import cluster_corpus, split_documents
from training.config import BuildConfig
from training.context import BuildContext
from training.documents import prepare_documents
from training.embeddings import embed_corpus
from training.expert_sets import train_expert_sets
from training.quality import evaluate_test_documents
from training.routing import choose_routing
from training.state import BuildState
from training.titles import title_experts
from training.tune import choose_set, tune_sets
from ttmm_vllm.library import Library

__all__ = ["build"]


def build(cfg: BuildConfig) -> Library | None:
    """Build (or resume) a library and open it; None when this shard finished its experts
    but other shards' are still missing (the last one to finish writes the library)."""
    ctx = BuildContext(cfg)
    ctx.start()
    t_start = time.perf_counter()

    corpus = prepare_documents(ctx)  # 1
    embeddings = embed_corpus(ctx, corpus)  # 2: the clustering embedding
    clustering = cluster_corpus(ctx, embeddings)  # 3
    split = split_documents(cfg, clustering)  # 3: training, tuning and test documents
    experts = train_expert_sets(ctx, corpus, split.members)  # 4
    if experts is None:
        return None
    titles = title_experts(ctx, corpus, embeddings.vectors, split.members)  # 5
    routing = choose_routing(ctx, corpus, embeddings, clustering, split)  # 6
    ctx.release_embedders()
    tuning = tune_sets(ctx, corpus, experts, routing, split)  # 7
    choice = choose_set(cfg, experts, tuning)  # 7: which expert set serves
    evaluation = evaluate_test_documents(ctx, corpus, clustering, split, experts, routing,
                                         tuning, choice)  # 8
    state = BuildState(corpus=corpus, embeddings=embeddings.vectors, clustering=clustering,
                       split=split, experts=experts, titles=titles, routing=routing,
                       tuning=tuning, choice=choice, evaluation=evaluation)

    manifest = publish.make_manifest(ctx, state)  # 9
    ctx.timings["this run (wall)"] = {"seconds": round(time.perf_counter() - t_start, 2),
                                      "cached": False}
    publish.write(ctx, state, manifest)
    lib = Library.open(ctx.out)
    lib.check_base_model(lib.served_model_dir())
    return lib
