"""Merge maths: many LoRA experts -> one adapter (the paper's Algorithm 2, step 2).

For active experts k with weight w_k and scaling s_k = alpha_k / r_k, the merged update is

    delta W = sum_k w_k s_k B_k A_k

The rank-expanded adapter stacks the factors,

    A* = [A_1; ...; A_n]              (sum r_k, in)
    B* = [w_1 s_1 B_1, ..., w_n s_n B_n]   (out, sum r_k)

so B* A* = delta W exactly, and it is stored with alpha = rank (scaling 1). When sum r_k exceeds a
rank budget, `compress` gives the optimal rank-b approximation (Eckart-Young) without forming
delta W: QR of both stacked factors, then an SVD of the small (R x R) core.

Pure torch on CPU tensors; nothing here knows vLLM, gRPC or files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ttmm_vllm.library import ExpertWeights


def rank_expand(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]], coeffs: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (A_k (r_k, in), B_k (out, r_k)) with coefficients c_k: B* A* = sum c_k B_k A_k."""
    if len(factors) != len(coeffs) or not factors:
        raise ValueError(f"need one coefficient per factor pair, got {len(factors)} pairs and "
                         f"{len(coeffs)} coefficients")
    a = torch.cat([f[0] for f in factors], dim=0)
    b = torch.cat([f[1] * float(c) for f, c in zip(factors, coeffs, strict=True)], dim=1)
    return a, b


@dataclass
class Compressed:
    a: torch.Tensor  # (b, in)
    b: torch.Tensor  # (out, b)
    singular_values: torch.Tensor  # all singular values of B* A*, descending
    rel_error: float  # ||B*A* - B'A'||_F / ||B*A*||_F


def compress(a: torch.Tensor, b: torch.Tensor, budget: int) -> Compressed:
    """Best rank-`budget` approximation of B A, from the factors only.

    A^T = Q_a R_a and B = Q_b R_b (reduced QR), so B A = Q_b (R_b R_a^T) Q_a^T; the SVD of the
    small core U S V^T gives B A = (Q_b U) S (Q_a V)^T, and truncating S is optimal in
    Frobenius norm. The error is exactly the norm of the discarded singular values.
    """
    if budget < 1:
        raise ValueError(f"rank budget must be >= 1, got {budget}")
    dtype = a.dtype
    a64, b64 = a.double(), b.double()
    qa, ra = torch.linalg.qr(a64.T, mode="reduced")  # (in, p), (p, R)
    qb, rb = torch.linalg.qr(b64, mode="reduced")  # (out, q), (q, R)
    core = rb @ ra.T  # (q, p)
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    k = min(budget, s.numel())
    root = s[:k].sqrt()
    new_b = (qb @ u[:, :k]) * root  # (out, k)
    new_a = root[:, None] * (vh[:k] @ qa.T)  # (k, in)
    total = float((s**2).sum())
    err = float((s[k:] ** 2).sum())
    rel = (err / total) ** 0.5 if total > 0 else 0.0
    return Compressed(new_a.to(dtype), new_b.to(dtype), s.to(dtype), rel)


@dataclass
class MergedAdapter:
    """One merged adapter: module -> (A, B) with scaling 1 (alpha = rank)."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    rel_error: float = 0.0  # worst module's relative Frobenius error (0: exact)

    @property
    def alpha(self) -> float:
        return float(self.rank)

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                   for a, b in self.modules.values())


def merge_experts(
    experts: Sequence[ExpertWeights],
    weights: Sequence[float],
    rank_budget: int | None = None,
) -> MergedAdapter:
    """Rank-expanded merge of experts with routing weights; compressed when over the budget.

    A module missing from an expert contributes nothing for that expert (its B is zero).
    """
    if len(experts) != len(weights) or not experts:
        raise ValueError("need one weight per expert and at least one expert")
    names = sorted({m for e in experts for m in e.modules})
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    worst = 0.0
    full_rank = sum(e.rank for e in experts)
    for name in names:
        factors, coeffs = [], []
        for e, w in zip(experts, weights, strict=True):
            if name in e.modules:
                a, b = e.modules[name]
            else:  # pad so every module has the same rank
                ref_a, ref_b = next(x.modules[name] for x in experts if name in x.modules)
                a = torch.zeros(e.rank, ref_a.shape[1], dtype=ref_a.dtype)
                b = torch.zeros(ref_b.shape[0], e.rank, dtype=ref_b.dtype)
            factors.append((a, b))
            coeffs.append(float(w) * e.scaling)
        a_star, b_star = rank_expand(factors, coeffs)
        if rank_budget is not None and full_rank > rank_budget:
            c = compress(a_star, b_star, rank_budget)
            a_star, b_star = c.a, c.b
            if a_star.shape[0] < rank_budget:  # a rank-deficient module: pad to the budget
                pad = rank_budget - a_star.shape[0]
                a_star = torch.cat([a_star, a_star.new_zeros(pad, a_star.shape[1])])
                b_star = torch.cat([b_star, b_star.new_zeros(b_star.shape[0], pad)], dim=1)
            worst = max(worst, c.rel_error)
        out[name] = (a_star.contiguous(), b_star.contiguous())
    rank = full_rank if rank_budget is None or full_rank <= rank_budget else rank_budget
    return MergedAdapter(out, rank, worst)


def dense_delta(
    experts: Sequence[ExpertWeights], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """delta W = sum_k w_k s_k B_k A_k per module, densely (the paper's einsum, Figure 7).

    The reference the rank-expanded adapter and the served outputs are checked against.
    """
    out: dict[str, torch.Tensor] = {}
    for e, w in zip(experts, weights, strict=True):
        for name, (a, b) in e.modules.items():
            d = (float(w) * e.scaling) * (b.double() @ a.double())
            out[name] = out[name] + d if name in out else d
    return out


def apply_delta(state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    """Base weights + delta (module names without `.weight`): a merged dense state dict."""
    new = dict(state)
    for name, d in delta.items():
        key = f"{name}.weight"
        if key not in new:
            raise KeyError(f"delta for {name} has no base weight {key}")
        new[key] = (new[key].double() + d).to(new[key].dtype)
    return new
