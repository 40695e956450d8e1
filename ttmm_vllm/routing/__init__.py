"""Routing: from a prompt to weights over experts.

    embed.py    query embeddings (sentence-transformers or the base model's hidden states),
                micro-batched across concurrent requests
    index.py    the hnswlib centroid index
    weights.py  sparse-softmax and friends (pure maths)
    router.py   routing decisions: modes, per-request overrides, the Router

Imports the library format, numpy, hnswlib and sentence-transformers; nothing of serving.
"""
