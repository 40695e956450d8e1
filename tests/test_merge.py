"""The merge maths: rank expansion is exact, compression is optimal."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ttmm_vllm.library import ExpertWeights
from ttmm_vllm.merge import compress, dense_delta, merge_experts, rank_expand


def _experts(n, ranks, din=24, dout=20, seed=0, modules=("m.q", "m.v")):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        r = ranks[k % len(ranks)]
        mods = {m: (torch.randn(r, din, generator=g, dtype=torch.float64),
                    torch.randn(dout, r, generator=g, dtype=torch.float64)) for m in modules}
        out.append(ExpertWeights(k, mods, scaling=16.0 / r, rank=r))
    return out


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), seed=st.integers(0, 1000), ranks=st.lists(st.integers(1, 8),
       min_size=1, max_size=3))
def test_rank_expansion_equals_weighted_sum(n, seed, ranks):
    experts = _experts(n, ranks, seed=seed)
    w = np.random.default_rng(seed).dirichlet(np.ones(n))
    merged = merge_experts(experts, w)
    assert merged.rank == sum(e.rank for e in experts)
    dense = dense_delta(experts, w)
    for name, (a, b) in merged.modules.items():
        torch.testing.assert_close(b @ a, dense[name], rtol=1e-10, atol=1e-10)


def test_one_expert_at_weight_one_is_itself():
    e = _experts(1, [4])[0]
    merged = merge_experts([e], [1.0])
    for name, (a, b) in merged.modules.items():
        torch.testing.assert_close(b @ a, e.scaling * e.modules[name][1] @ e.modules[name][0])


def test_expert_order_does_not_matter():
    ex = _experts(3, [2, 4, 3])
    w = [0.2, 0.5, 0.3]
    m1 = merge_experts(ex, w)
    m2 = merge_experts(ex[::-1], w[::-1])
    for name in m1.modules:
        a1, b1 = m1.modules[name]
        a2, b2 = m2.modules[name]
        torch.testing.assert_close(b1 @ a1, b2 @ a2)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 1000), budget=st.integers(1, 12))
def test_compression_error_is_the_discarded_singular_values(seed, budget):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(12, 30, generator=g, dtype=torch.float64)
    b = torch.randn(25, 12, generator=g, dtype=torch.float64)
    c = compress(a, b, budget)
    full = b @ a
    s = torch.linalg.svdvals(full)
    torch.testing.assert_close(c.singular_values, s[:12], rtol=1e-8, atol=1e-8)
    err = torch.linalg.norm(full - c.b @ c.a) / torch.linalg.norm(full)
    want = (s[budget:] ** 2).sum().sqrt() / (s**2).sum().sqrt()
    assert float(err) == pytest.approx(float(want), abs=1e-9)
    assert c.rel_error == pytest.approx(float(want), abs=1e-9)


def test_compression_to_full_rank_is_exact():
    ex = _experts(3, [4])
    merged = merge_experts(ex, [0.5, 0.3, 0.2], rank_budget=12)
    assert merged.rank == 12 and merged.rel_error == 0.0
    squeezed = merge_experts(ex, [0.5, 0.3, 0.2], rank_budget=5)
    assert squeezed.rank == 5 and 0 < squeezed.rel_error < 1
    for a, b in squeezed.modules.values():
        assert a.shape[0] == 5 and b.shape[1] == 5


def test_rank_expand_requires_matching_lengths():
    with pytest.raises(ValueError):
        rank_expand([], [])
