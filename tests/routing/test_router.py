"""Routing decisions (routing/router.py) and the centroid index (routing/index.py): modes,
overrides, and the index against brute force."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ttmm_vllm.routing.index import CentroidIndex
from ttmm_vllm.routing.router import Mode, Router, RoutingParams, brute_force, decide
from ttmm_vllm.routing.weights import normalize_rows


def _random_centroids(k, d, seed):
    return normalize_rows(np.random.default_rng(seed).normal(size=(k, d)))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 60), beta=st.floats(0.01, 1.0),
       frac=st.floats(0, 0.99), max_active=st.integers(1, 12))
def test_index_with_m_equal_k_matches_brute_force(seed, k, beta, frac, max_active):
    cent = _random_centroids(k, 16, seed)
    q = normalize_rows(np.random.default_rng(seed + 1).normal(size=16))
    p = RoutingParams(beta=beta, tau=frac / k, max_active=max_active, top_m=0)
    got = Router(CentroidIndex(cent), p).route(q)
    want = brute_force(q, cent, p)
    assert got.expert_ids == want.expert_ids
    np.testing.assert_allclose(got.weights, want.weights, rtol=1e-5, atol=1e-7)


def test_modes():
    ids, sims = np.arange(5), np.array([0.1, 0.9, 0.5, 0.3, 0.8])
    base = RoutingParams(beta=0.1, tau=0.0, max_active=3)
    top1 = decide(ids, sims, base.with_overrides(mode=Mode.TOP1))
    assert top1.expert_ids == (1,) and top1.weights == (1.0,)
    uni = decide(ids, sims, base.with_overrides(mode=Mode.UNIFORM))
    assert uni.expert_ids == (1, 4, 2) and uni.weights == pytest.approx((1 / 3,) * 3)
    assert decide(ids, sims, base.with_overrides(mode=Mode.BASE)).is_base
    ttmm = decide(ids, sims, base)
    assert ttmm.expert_ids == (1, 4, 2) and sum(ttmm.weights) == pytest.approx(1)
    assert ttmm.weights[0] > ttmm.weights[1] > ttmm.weights[2]


def test_explicit_experts_and_weights():
    cent = _random_centroids(6, 8, 0)
    router = Router(CentroidIndex(cent), RoutingParams())
    r = router.route(cent[0], RoutingParams(experts=(3, 5), expert_weights=(1.0, 3.0)))
    assert r.expert_ids == (3, 5) and r.weights == pytest.approx((0.25, 0.75))
    r = router.route(cent[0], RoutingParams(experts=(2, 4)))
    assert set(r.expert_ids) == {2, 4} and sum(r.weights) == pytest.approx(1)
    with pytest.raises(KeyError, match="unknown expert ids"):
        router.route(cent[0], RoutingParams(experts=(9,)))


@pytest.mark.parametrize("bad", [dict(beta=0), dict(beta=float("nan")), dict(tau=-0.1),
                                 dict(max_active=0), dict(experts=(1,), expert_weights=(-1,)),
                                 dict(experts=(1, 2), expert_weights=(1,)),
                                 dict(experts=(1, 1))])
def test_invalid_params_are_refused(bad):
    with pytest.raises(ValueError):
        RoutingParams(**bad)


def test_canonical_routing_is_shared_after_rounding():
    a = decide(np.arange(3), np.array([0.9, 0.5, 0.1]), RoutingParams(beta=0.3, tau=0))
    b = decide(np.arange(3), np.array([0.9, 0.5, 0.1]) + 1e-9, RoutingParams(beta=0.3, tau=0))
    assert a.key() == b.key()
    assert a.canonical().weights == b.canonical().weights


def test_canonical_drops_experts_whose_weight_rounds_to_zero():
    r = decide(np.arange(3), np.array([0.9, 0.8, 0.1]), RoutingParams(beta=0.03, tau=0))
    assert min(r.weights) < 5e-7  # the third expert's softmax weight is ~1e-12
    c = r.canonical()
    assert c.expert_ids == (0, 1) and all(w > 0 for w in c.weights)
    assert sum(c.weights) == pytest.approx(1.0)


def test_index_add_remove_and_filter():
    cent = _random_centroids(8, 8, 3)
    index = CentroidIndex(cent[:6], ids=range(6))
    ids, _ = index.search(cent[2], 0)
    assert ids[0, 0] == 2
    index.remove(2)
    ids, _ = index.search(cent[2], 0)
    assert 2 not in ids[0] and ids.shape[1] == 5
    index.add(7, cent[7])
    ids, _ = index.search(cent[7], 1)
    assert ids[0, 0] == 7
    ids, _ = index.search(cent[7], 0, allowed=lambda i: i in (0, 1))
    assert set(ids[0]) == {0, 1}
