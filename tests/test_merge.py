"""The merge maths: rank expansion is exact, shared-A merges are exact at rank r, compression is
optimal ("gram", up to float32) or near it ("randomized"), and reports its true error."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ttmm_vllm import merge as merge_mod
from ttmm_vllm.library import ExpertWeights
from ttmm_vllm.merge import (
    compress,
    compress_many,
    dense_delta,
    merge_experts,
    rank_expand,
    shares_a,
)


def _experts(n, ranks, din=24, dout=20, seed=0, modules=("m.q", "m.v"), shared=False,
             dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shared_as = {m: torch.randn(ranks[0], din, generator=g, dtype=dtype) for m in modules}
    out = []
    for k in range(n):
        r = ranks[0] if shared else ranks[k % len(ranks)]
        mods = {m: (shared_as[m] if shared else torch.randn(r, din, generator=g, dtype=dtype),
                    torch.randn(dout, r, generator=g, dtype=dtype)) for m in modules}
        out.append(ExpertWeights(k, mods, scaling=16.0 / r, rank=r))
    return out


def _pair(r, din, dout, seed, rank_a=None, rank_b=None, dtype=torch.float32):
    """A (r, din), B (dout, r); rank_a/rank_b make A/B low rank."""
    g = torch.Generator().manual_seed(seed)
    if rank_a is None:
        a = torch.randn(r, din, generator=g, dtype=torch.float64)
    else:
        a = torch.randn(r, rank_a, generator=g, dtype=torch.float64) @ torch.randn(
            rank_a, din, generator=g, dtype=torch.float64)
    if rank_b is None:
        b = torch.randn(dout, r, generator=g, dtype=torch.float64)
    else:
        b = torch.randn(dout, rank_b, generator=g, dtype=torch.float64) @ torch.randn(
            rank_b, r, generator=g, dtype=torch.float64)
    return a.to(dtype), b.to(dtype)


def _decaying_pair(r, din, dout, seed, decay):
    """Float32 factors of a B A with singular values decay**i (a trained library's shape)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(dout, r, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(din, r, generator=g, dtype=torch.float64))[0]
    s = decay ** torch.arange(r, dtype=torch.float64)
    mix = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))[0]
    mix = mix * (1 + torch.rand(r, generator=g, dtype=torch.float64))  # cond <= 2
    a = torch.linalg.solve(mix, s.sqrt()[:, None] * v.T)
    b = (u * s.sqrt()) @ mix
    return a.float(), b.float()


def _true_rel(a, b, c):
    full = b.double() @ a.double()
    return float(torch.linalg.norm(full - c.b.double() @ c.a.double()) / torch.linalg.norm(full))


# --------------------------------------------------------------------------- rank expansion


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


def test_rank_expand_requires_matching_lengths():
    with pytest.raises(ValueError):
        rank_expand([], [])


def test_rank_expand_keeps_bf16_and_does_not_touch_inputs():
    a = torch.randn(3, 5).bfloat16()
    b = torch.randn(4, 3).bfloat16()
    b0 = b.clone()
    sa, sb = rank_expand([(a, b), (a, b)], [0.5, 2.0])
    assert sa.dtype == sb.dtype == torch.bfloat16 and torch.equal(b, b0)
    torch.testing.assert_close(sb[:, 3:].float(), (b.float() * 2.0).bfloat16().float())


# --------------------------------------------------------------------------- shared A


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), seed=st.integers(0, 1000), r=st.integers(1, 8),
       missing=st.booleans())
def test_shared_a_merge_equals_dense_delta_at_rank_r(n, seed, r, missing):
    experts = _experts(n, [r], seed=seed, shared=True)
    if missing and n > 1:  # an expert without a module contributes nothing there
        del experts[-1].modules["m.v"]
    w = np.random.default_rng(seed).dirichlet(np.ones(n))
    assert shares_a(experts)
    merged = merge_experts(experts, w, shared_a=True)
    assert merged.rank == r and merged.rel_error == 0.0
    dense = dense_delta(experts, w)
    for name, (a, b) in merged.modules.items():
        assert a.shape == (r, 24) and b.shape == (20, r)
        torch.testing.assert_close(b @ a, dense[name], rtol=1e-10, atol=1e-10)
    # the same maths as the rank-expanded merge, at a tenth of the rank
    expanded = merge_experts(experts, w)
    for name, (a, b) in expanded.modules.items():
        torch.testing.assert_close(merged.modules[name][1] @ merged.modules[name][0], b @ a)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 5), seed=st.integers(0, 1000), which=st.integers(0, 4),
       module=st.sampled_from(["m.q", "m.v"]))
def test_shared_a_merge_refuses_mismatched_a(n, seed, which, module):
    experts = _experts(n, [4], seed=seed, shared=True)
    k = 1 + which % (n - 1)
    a, b = experts[k].modules[module]
    a = a.clone()
    a[0, 0] += 1e-9
    experts[k].modules[module] = (a, b)
    assert not shares_a(experts)
    with pytest.raises(ValueError, match=module) as err:
        merge_experts(experts, [1.0 / n] * n, shared_a=True)
    assert f"expert {k}" in str(err.value) and "expert 0" in str(err.value)


def test_shared_a_refuses_different_ranks_and_unshared_libraries():
    assert not shares_a(_experts(3, [4]))  # independent A's
    with pytest.raises(ValueError, match="different A"):
        merge_experts(_experts(3, [4]), [0.2, 0.3, 0.5], shared_a=True)
    assert not shares_a([])
    assert shares_a(_experts(1, [4]))


def test_shared_a_merge_returns_fresh_tensors_in_the_inputs_dtype():
    experts = _experts(3, [4], shared=True, dtype=torch.float32)
    merged = merge_experts(experts, [0.2, 0.3, 0.5], shared_a=True)
    a, b = merged.modules["m.q"]
    assert a.dtype == b.dtype == torch.float32 and a.is_contiguous()
    assert a.data_ptr() != experts[0].modules["m.q"][0].data_ptr()


def test_shared_a_merge_above_the_budget_is_compressed():
    experts = _experts(3, [6], shared=True)
    merged = merge_experts(experts, [0.2, 0.3, 0.5], rank_budget=4, shared_a=True)
    assert merged.rank == 4 and 0 < merged.rel_error < 1
    assert all(a.shape[0] == 4 and b.shape[1] == 4 for a, b in merged.modules.values())


# --------------------------------------------------------------------------- compress (reference)


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


# --------------------------------------------------------------------------- compress_many


@pytest.mark.parametrize("case", ["random", "flat-wide", "decay-0.8", "decay-0.95", "a-rank-6",
                                  "b-rank-10", "out<R", "in<R"])
def test_compress_many_matches_the_float64_reference(case):
    r, din, dout, budget = 48, 64, 56, 8
    if case == "random":
        a, b = _pair(r, din, dout, 1)
    elif case == "flat-wide":
        a, b = _pair(r, 160, 192, 2)
    elif case.startswith("decay"):
        a, b = _decaying_pair(r, din, dout, 3, float(case.split("-")[1]))
    elif case == "a-rank-6":
        a, b = _pair(r, din, dout, 4, rank_a=6)
    elif case == "b-rank-10":
        a, b = _pair(r, din, dout, 5, rank_b=10)
    elif case == "out<R":
        a, b = _pair(r, din, 30, 6)
    else:
        a, b = _pair(r, 20, dout, 7)
    ref = compress(a.double(), b.double(), budget)
    n = min(budget, ref.singular_values.numel())
    s_ref = ref.singular_values.float()
    gram = compress_many([(a, b)], budget, method="gram")[0]
    rnd = compress_many([(a, b)], budget, method="randomized")[0]
    for c in (gram, rnd):
        assert c.a.shape == (budget, a.shape[1]) and c.b.shape == (b.shape[0], budget)
        assert c.a.dtype == c.b.dtype == torch.float32
        assert torch.isfinite(c.a).all() and torch.isfinite(c.b).all()
        # the reported error is the true one (from the Grams, not from B A)
        assert c.rel_error == pytest.approx(_true_rel(a, b, c), abs=3e-4)
    # gram: exact up to float32
    torch.testing.assert_close(gram.singular_values[:n], s_ref[:n], rtol=1e-4,
                               atol=1e-5 * float(s_ref[0]))
    assert abs(gram.rel_error - ref.rel_error) < 1e-4
    # randomized: Ritz values never exceed the truth, the error is near the optimum
    assert (rnd.singular_values[:n] <= s_ref[:n] * (1 + 1e-4) + 1e-5 * s_ref[0]).all()
    assert ref.rel_error - 1e-4 <= rnd.rel_error <= ref.rel_error + 0.03


def test_compress_many_low_rank_is_exact_within_the_budget():
    for a, b in (_pair(40, 50, 60, 8, rank_a=5), _pair(40, 50, 60, 9, rank_b=7)):
        for method in ("gram", "randomized", "auto"):
            c = compress_many([(a, b)], 8, method=method)[0]
            assert c.rel_error == 0.0
            full = b.double() @ a.double()
            torch.testing.assert_close(c.b.double() @ c.a.double(), full, rtol=0,
                                       atol=1e-5 * float(full.abs().max()))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), r=st.integers(1, 40), din=st.integers(1, 48),
       dout=st.integers(1, 48), budget=st.integers(1, 48),
       method=st.sampled_from(["gram", "randomized", "auto"]))
def test_compress_many_property(seed, r, din, dout, budget, method):
    a, b = _pair(r, din, dout, seed)
    c = compress_many([(a, b)], budget, method=method)[0]
    if budget >= r:  # exact: the factors as they are
        assert c.rel_error == 0.0 and c.a is a and c.b is b
        return
    ref = compress(a.double(), b.double(), budget)
    assert c.a.shape == (budget, din) and c.b.shape == (dout, budget)
    assert c.rel_error == pytest.approx(_true_rel(a, b, c), abs=1e-3)
    slack = 1e-3 if method == "gram" or budget + 8 >= r else 0.05
    assert ref.rel_error - 1e-3 <= c.rel_error <= ref.rel_error + slack


def test_compress_many_keeps_order_mixed_shapes_and_is_deterministic():
    pairs = [_pair(32, 40, 24, 1), _pair(16, 40, 24, 2), _pair(32, 24, 40, 3),
             _pair(8, 12, 12, 4), _pair(32, 40, 24, 5)]
    out = compress_many(pairs, 10, method="randomized", oversample=4)
    again = compress_many(pairs, 10, method="randomized", oversample=4)
    for (a, b), c, d in zip(pairs, out, again, strict=True):
        assert c.a.shape == (min(10, a.shape[0]), a.shape[1]) and c.b.shape[0] == b.shape[0]
        assert torch.equal(c.a, d.a) and c.rel_error == d.rel_error
        # each module matches its own single-module compression
        ref = compress(a.double(), b.double(), 10)
        assert c.rel_error <= ref.rel_error + 0.03


def test_compress_many_zero_module_and_dtypes():
    a, b = _pair(20, 16, 16, 0)
    zero = (a, torch.zeros_like(b))
    out = compress_many([zero, (a.bfloat16(), b.bfloat16()), (a.double(), b.double())], 4)
    assert out[0].rel_error == 0.0
    assert torch.isfinite(out[0].a).all() and (out[0].b @ out[0].a).abs().max() == 0
    assert out[1].a.dtype == torch.bfloat16 and out[2].a.dtype == torch.float64
    ref = compress(a.double(), b.double(), 4)
    assert out[2].rel_error == pytest.approx(ref.rel_error, abs=1e-10)  # float64 in, float64 maths


def test_compress_many_reference_method_is_compress():
    a, b = _pair(12, 30, 25, 3, dtype=torch.float64)
    c = compress_many([(a, b)], 5, method="reference")[0]
    ref = compress(a, b, 5)
    assert torch.equal(c.a, ref.a) and c.rel_error == ref.rel_error


def test_compress_many_validates():
    a, b = _pair(8, 10, 10, 0)
    with pytest.raises(ValueError, match="budget"):
        compress_many([(a, b)], 0)
    with pytest.raises(ValueError, match="method"):
        compress_many([(a, b)], 4, method="svd")
    with pytest.raises(ValueError, match="pair 0"):
        compress_many([(a, b.T)], 4)
    assert compress_many([], 4) == []


# --------------------------------------------------------------------------- merges above a budget


def test_compression_to_full_rank_is_exact():
    ex = _experts(3, [4])
    merged = merge_experts(ex, [0.5, 0.3, 0.2], rank_budget=12)
    assert merged.rank == 12 and merged.rel_error == 0.0
    squeezed = merge_experts(ex, [0.5, 0.3, 0.2], rank_budget=5)
    assert squeezed.rank == 5 and 0 < squeezed.rel_error < 1
    for a, b in squeezed.modules.values():
        assert a.shape[0] == 5 and b.shape[1] == 5


@pytest.mark.parametrize("method", ["gram", "randomized", "reference", "auto"])
def test_merge_compresses_all_modules_in_one_call(method, monkeypatch):
    ex = _experts(4, [4], dtype=torch.float32, modules=("m.q", "m.v", "m.o"))
    w = [0.1, 0.2, 0.3, 0.4]
    calls = []
    real = merge_mod.compress_many
    monkeypatch.setattr(merge_mod, "compress_many",
                        lambda pairs, *a, **k: calls.append(len(pairs)) or real(pairs, *a, **k))
    merged = merge_experts(ex, w, rank_budget=6, method=method)
    assert calls == [3]
    assert merged.rank == 6
    dense = dense_delta(ex, w)
    worst = 0.0
    for name, (a, b) in merged.modules.items():
        assert a.shape == (6, 24) and b.shape == (20, 6) and a.is_contiguous()
        err = float(torch.linalg.norm(dense[name] - (b @ a).double()) / torch.linalg.norm(
            dense[name]))
        worst = max(worst, err)
        exp_a, exp_b = rank_expand([e.modules[name] for e in ex],
                                   [wi * e.scaling for e, wi in zip(ex, w, strict=True)])
        assert err <= compress(exp_a.double(), exp_b.double(), 6).rel_error + 0.03
    assert merged.rel_error == pytest.approx(worst, abs=1e-4)


def test_merge_pads_rank_deficient_modules_to_the_budget():
    # out = 3 < budget: B A has rank 3, the module is padded with zero rows/columns
    ex = _experts(3, [4], din=10, dout=3, modules=("m.q",))
    for method in ("gram", "reference"):
        merged = merge_experts(ex, [0.3, 0.3, 0.4], rank_budget=5, method=method)
        a, b = merged.modules["m.q"]
        assert merged.rank == 5 and a.shape == (5, 10) and b.shape == (3, 5)
        assert merged.rel_error == pytest.approx(0.0, abs=1e-6)
        torch.testing.assert_close(b @ a, dense_delta(ex, [0.3, 0.3, 0.4])["m.q"],
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_compression_reads_the_experts_like_rank_expand(dtype):
    # merge_experts streams the rank-expanded factors from the experts (no materialised A*, B*);
    # it must see exactly what rank_expand builds, missing modules included
    ex = _experts(4, [3, 5], dtype=torch.float32, modules=("m.q", "m.v", "m.o"), seed=4)
    for e in ex:
        e.modules = {m: (a.to(dtype), b.to(dtype)) for m, (a, b) in e.modules.items()}
    del ex[2].modules["m.v"]
    w = [0.4, 0.1, 0.3, 0.2]
    for method in ("gram", "randomized"):
        merged = merge_experts(ex, w, rank_budget=5, method=method)
        pairs = {}
        for name in merged.modules:
            factors = []
            for e in ex:
                a, b = e.modules.get(name, (torch.zeros(e.rank, 24, dtype=dtype),
                                            torch.zeros(20, e.rank, dtype=dtype)))
                factors.append((a, b))
            pairs[name] = rank_expand(factors, [wi * e.scaling for e, wi in zip(ex, w,
                                                                                strict=True)])
        want = compress_many(list(pairs.values()), 5, method=method)
        # bf16: rank_expand rounds w_k s_k B_k to bf16, the streamed merge keeps it in float32
        tol = 0 if dtype == torch.float32 else 2e-3
        assert merged.rel_error == pytest.approx(max(c.rel_error for c in want), abs=tol)
        for name, c in zip(pairs, want, strict=True):
            a, b = merged.modules[name]
            assert a.dtype == b.dtype == dtype
            torch.testing.assert_close(b.float() @ a.float(), c.b.float() @ c.a.float(),
                                       **({} if tol == 0 else {"rtol": 0.05, "atol": 0.1}))


def test_merge_validates_the_method():
    with pytest.raises(ValueError, match="method"):
        merge_experts(_experts(2, [4]), [0.5, 0.5], method="svd")
