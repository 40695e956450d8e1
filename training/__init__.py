"""Train time (the paper's Algorithm 1): corpus -> embeddings -> clusters -> one LoRA expert per
cluster -> centroids -> tuned routing defaults -> an expert library (ttmm_vllm.library).

`training.pipeline.build(BuildConfig)` runs every stage; `ttmm build` is its CLI.
"""
