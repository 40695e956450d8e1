"""Sparse-softmax (routing/weights.py): properties on random logits."""

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ttmm_vllm.routing.weights import Variant, normalize_rows, softmax, sparse_softmax

logits = arrays(np.float64, st.integers(1, 40), elements=st.floats(-30, 30))



@given(z=logits, frac=st.floats(0, 0.999), variant=st.sampled_from(list(Variant)))
def test_sparse_softmax_is_a_distribution_with_support(z, frac, variant):
    tau = frac / z.size  # the paper's range: tau in [0, 1/K)
    w = sparse_softmax(z, tau, variant)
    assert np.all(w >= 0)
    assert w.sum() == pytest.approx(1.0)
    assert (w > 0).sum() >= 1
    assert w[np.argmax(z)] > 0  # the best expert always survives


@given(z=logits)
def test_tau_zero_is_softmax(z):
    for variant in Variant:
        np.testing.assert_allclose(sparse_softmax(z, 0.0, variant), softmax(z))


@given(z=logits, frac=st.floats(0, 0.999), variant=st.sampled_from(list(Variant)))
def test_monotone_in_similarity(z, frac, variant):
    """A more similar expert never gets a smaller weight."""
    w = sparse_softmax(z, frac / z.size, variant)
    order = np.argsort(z)
    assert np.all(np.diff(w[order]) >= -1e-12)


def test_variants_differ_as_documented():
    z = np.log(np.array([0.5, 0.3, 0.2]))
    paper = sparse_softmax(z, 0.25, Variant.PAPER)
    code = sparse_softmax(z, 0.25, Variant.THRESHOLD)
    np.testing.assert_allclose(paper, [0.25 / 0.30, 0.05 / 0.30, 0.0])
    np.testing.assert_allclose(code, [0.5 / 0.8, 0.3 / 0.8, 0.0])


@given(x=arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 8)),
                elements=st.floats(-1e3, 1e3)))
@example(x=np.array([[2.220446e-16]]))  # once gave a row of norm 2e-4
def test_normalize_rows_gives_unit_rows_or_zeros(x):
    n = np.linalg.norm(normalize_rows(x), axis=-1)
    assert np.all((np.abs(n - 1) < 1e-4) | (n < 1e-6))
