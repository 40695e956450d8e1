"""Train time (the paper's Algorithm 1): corpus -> embeddings -> clusters -> one LoRA expert per
cluster -> centroids -> tuned routing defaults -> an expert library (ttmm_vllm.library).

`training.pipeline.build(BuildConfig)` runs every stage in order; `ttmm build` is its CLI. Each
stage is a function in its own module (documents, embeddings, clusters, expert_sets, titles,
routing, tune, quality, publish) over the shared `BuildContext` (training/context.py: settings,
folders, the stage cache); their results make up the `BuildState` (training/state.py).
"""
