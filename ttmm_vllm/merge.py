"""Merge maths: many LoRA experts -> one adapter (the paper's Algorithm 2, step 2).

For active experts k with weight w_k and scaling s_k = alpha_k / r_k, the merged update is

    delta W = sum_k w_k s_k B_k A_k

The rank-expanded adapter stacks the factors,

    A* = [A_1; ...; A_n]              (R = sum r_k, in)
    B* = [w_1 s_1 B_1, ..., w_n s_n B_n]   (out, R)

so B* A* = delta W exactly, and it is stored with alpha = rank (scaling 1). Two ways below a
rank budget b:

- Shared A (`LoraSpec.shared_a`: one frozen A per module, only B trained): then
  sum_k w_k s_k B_k A = (sum_k w_k s_k B_k) A, exact at rank r (`merge_experts(shared_a=True)`).
- Compression to the best rank-b approximation (Eckart-Young) without forming delta W.
  `compress` is the float64 reference (QR of both factors, SVD of the R x R core: exact, but
  2.5-6 s over SmolLM2's 210 modules at R = 160). `compress_many` is the serving path: it
  works from the two R x R Gram matrices G_a = A A^T and G_b = B^T B (the only O(R^2 (in+out))
  work, ~60% of the time; ||BA||_F^2 = <G_a, G_b>, so the error reported is the true one) and
  batches the R x R maths of all modules in float32: "gram" (exact eigendecomposition,
  ~0.7 s a merge on one core) or "randomized" (subspace iteration with b + 8 probes, ~0.32 s
  on one core, ~0.24 s on two; benchmarks/merge_micro.py). Admission should cost about one
  token time (~100 ms): the Grams alone are ~0.18 s on one core, see compress_many.

Pure torch (CPU or any device); nothing here knows vLLM, gRPC or files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ttmm_vllm.library import ExpertWeights

METHODS = ("auto", "gram", "randomized", "reference")


def _noise(t: torch.Tensor, n: int) -> float:
    """Relative rounding level of n x n Gram maths in t's dtype: 2 sqrt(n) eps. Measured in
    float32 on exactly low-rank modules (n = 16-160): 1-4 eps lambda_1 on the eigenvalues that
    should be 0, 4-14 eps lambda_1 on ||BA||^2 - captured. Below it is rounding, not signal."""
    return 2.0 * n**0.5 * torch.finfo(t.dtype).eps


def rank_expand(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]], coeffs: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (A_k (r_k, in), B_k (out, r_k)) with coefficients c_k: B* A* = sum c_k B_k A_k."""
    if len(factors) != len(coeffs) or not factors:
        raise ValueError(f"need one coefficient per factor pair, got {len(factors)} pairs and "
                         f"{len(coeffs)} coefficients")
    a = torch.cat([f[0] for f in factors], dim=0)
    b = torch.cat([f[1] for f in factors], dim=1)  # then scaled in place: one allocation
    sdtype = torch.promote_types(b.dtype, torch.float32)  # bf16 B: scaled in float32, rounded once
    scale = torch.cat([torch.full((f[1].shape[1],), float(c), dtype=sdtype)
                       for f, c in zip(factors, coeffs, strict=True)]).to(b.device)
    return a, b.mul_(scale)


@dataclass
class Compressed:
    a: torch.Tensor  # (k, in), k = min(budget, R)
    b: torch.Tensor  # (out, k)
    # Singular values of B*A*, descending: all of them from `compress` and method "gram", the
    # budget + oversample leading estimates (Ritz values) from "randomized", None when nothing
    # was decomposed (budget >= R: the factors are returned as they are).
    singular_values: torch.Tensor | None
    rel_error: float  # ||B*A* - B'A'||_F / ||B*A*||_F


def compress(a: torch.Tensor, b: torch.Tensor, budget: int) -> Compressed:
    """Best rank-`budget` approximation of B A, from the factors only (the float64 reference).

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


# --------------------------------------------------------------------------- compress_many
#
# Notation for one module: A (R, in), B (out, R), G_a = A A^T, G_b = B^T B (both R x R).
# Everything is done in "B coordinates": an (R, m) matrix U stands for the out x m basis
# Q = B U, orthonormal when U^T G_b U = I, and T = G_b U gives Q^T B = T^T. Then
#   Q^T (BA) (BA)^T Q = T^T G_a T      (m x m)
# whose eigenpairs (lambda_i = s_i^2, W) give the best rank-k approximation of BA within
# span(Q): B'A' = Q W_k W_k^T Q^T BA, with the balanced factors
#   B' = B (U W_k S_k^{1/2})   and   A' = (S_k^{-1/2} W_k^T T^T) A.
# "gram" takes the whole range of B (U = L^{-T} with G_b = L L^T, so T = L): exact.
# "randomized" takes m = k + p probes pushed q times through (BA)(BA)^T = B G_a G_b B^T.
# B'A' is an orthogonal projection of BA, so ||BA - B'A'||^2 = ||BA||^2 - sum_{i<=k} lambda_i,
# and ||BA||_F^2 = tr(G_b G_a) = <G_a, G_b> (accumulated in float64).


def compress_many(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    budget: int,
    *,
    method: str = "auto",
    oversample: int = 8,
    power_iters: int = 2,
    seed: int = 0,
) -> list[Compressed]:
    """Rank-`budget` approximations of B A for many (A (R, in), B (out, R)) pairs at once.

    Why: `compress` costs 12-40 ms a module in float64 (2.5-6 s a merge); a merge touches
    every adapted module (210 in SmolLM2-135M) and should be admitted in about one token
    time. Here each module costs two Gram products (R^2 (in + out) multiply-adds: the floor
    for an exact error, 2 R^2 sum(in + out) = 15.6 GFLOP a SmolLM2 merge at R = 160, ~0.15 s
    on one core of this machine, more than a base decode step at 32 requests; computing only
    their upper block triangle measured no faster) and two thin products for
    the result; the R x R maths of all modules with the same R (whatever their in/out) runs
    as one batch, in float32 (float64 inputs stay float64).

    method:
    - "gram": exact-optimal up to float32 conditioning (an R x R eigendecomposition per
      module; B of rank < R handled by a pseudo-inverse). Singular values agree with
      `compress` to ~1e-5 relative; rel_error to 1e-4 except near 0, where float32 Grams
      resolve it only to ~sqrt(4 sqrt(R) eps) s_1/||BA|| (2.5e-3 at R = 160).
    - "randomized": m = budget + `oversample` probes and `power_iters` power iterations
      (m x m eigenproblems). The error it reports is the true one; it is a little above the
      optimum on flat spectra (+0.01 on random rank-160 merges at b = 16, under +0.002 on
      small random modules, ~0 on decaying spectra). With m >= R it is "gram".
    - "auto": "randomized" when m < R / 2, else "gram".
    - "reference": `compress` (float64, one module at a time).
    A module with budget >= R is returned as is (exact, rel_error 0). The probes come from
    `seed`: the result is deterministic.

    Returns one `Compressed` per pair, in order: A' (k, in), B' (out, k) with k = min(budget,
    R) (zero rows/columns where B A has rank < k; "reference" returns fewer), in the input's
    dtype, and rel_error = ||BA - B'A'||_F / ||BA||_F from the Grams (never forming B A).
    """
    if not isinstance(pairs, _Pairs):
        for i, (a, b) in enumerate(pairs):
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise ValueError(f"pair {i}: need A (R, in) and B (out, R), got A "
                                 f"{tuple(a.shape)} and B {tuple(b.shape)}")
        pairs = _Pairs(pairs)
    return _compress_all(pairs, budget, method, oversample, power_iters, seed)


class _Pairs(Sequence):
    """Where `_compress_all` reads the modules' factors: here, given tensors. A sequence of
    the (A, B) pairs; subclasses build them on demand (`_Expanded`)."""

    def __init__(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self.owned(j) for j in range(len(self))[i]]
        return self.owned(i)

    def meta(self, i: int) -> tuple[int, torch.dtype, torch.device]:
        """(R, dtype of the maths, device) without building anything."""
        a, b = self.pairs[i]
        work = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
        return a.shape[0], work, a.device

    def get(self, i: int, work: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in `work`; may be scratch, valid until the next call."""
        a, b = self.pairs[i]
        return a.to(work), b.to(work)

    def owned(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as the caller may keep them, in their own dtypes."""
        return self.pairs[i]

    def dtypes(self, i: int) -> tuple[torch.dtype, torch.dtype]:
        a, b = self.pairs[i]
        return a.dtype, b.dtype


def _compress_all(src: _Pairs, budget: int, method: str, oversample: int, power_iters: int,
                  seed: int) -> list[Compressed]:
    if budget < 1:
        raise ValueError(f"rank budget must be >= 1, got {budget}")
    if method not in METHODS:
        raise ValueError(f"unknown compression method {method!r}; expected one of {METHODS}")
    if oversample < 0 or power_iters < 0:
        raise ValueError("oversample and power_iters must be >= 0")
    out: list[Compressed | None] = [None] * len(src)
    groups: dict[tuple, list[int]] = {}
    for i in range(len(src)):
        r, work, device = src.meta(i)
        if budget >= r:
            out[i] = Compressed(*src.owned(i), None, 0.0)
        elif method == "reference":
            out[i] = compress(*src.owned(i), budget)
        else:
            groups.setdefault((r, work, device), []).append(i)
    for (r, work, device), idx in groups.items():
        chosen = method
        if chosen == "auto":
            chosen = "randomized" if 2 * (budget + oversample) < r else "gram"
        gen = torch.Generator(device=device).manual_seed(seed)
        results = _compress_group(src, idx, r, work, device, budget, chosen, oversample,
                                  power_iters, gen)
        for i, res in zip(idx, results, strict=True):
            out[i] = res
    return out  # type: ignore[return-value]


def _compress_group(src, idx, r, work, device, k, method, oversample, power_iters, gen
                    ) -> list[Compressed]:
    """Modules `idx` of `src`, all of rank R: Grams per module, R x R maths batched, then the
    thin products. The factors are read twice (for the Grams, for the result), never kept."""
    n = len(idx)
    ga = torch.empty(n, r, r, dtype=work, device=device)
    gb = torch.empty(n, r, r, dtype=work, device=device)
    for j, i in enumerate(idx):  # the O(R^2 (in + out)) part: most of the time
        a, b = src.get(i, work)
        torch.matmul(a, a.T, out=ga[j])
        torch.matmul(b.T, b, out=gb[j])
    # ||BA||_F^2 = tr(G_b G_a) = <G_a, G_b> (both symmetric): rows in float32, then float64
    total = (ga * gb).sum(-1).double().sum(-1)
    if method == "gram" or k + oversample >= r:  # probes spanning R-space: the exact path
        xb, xa, lam = _gram_core(ga, gb, k)
    else:
        xb, xa, lam = _randomized_core(ga, gb, k, oversample, power_iters, gen)
    captured = lam[:, :k].sum(-1, dtype=torch.float64)
    # Float32 Gram maths resolve energy down to a few sqrt(R) eps lambda_1: a residual below
    # that is rounding (a rank <= k module would otherwise report ~1e-3 instead of 0). So the
    # error's resolution is ~sqrt(4 sqrt(R) eps) s_1 / ||BA|| (2.5e-3 at R = 160).
    floor = 2 * _noise(ga, r) * lam[:, 0].double().clamp_min(0)
    resid = (total - captured).clamp_min(0)
    resid = torch.where(resid > floor, resid, torch.zeros_like(resid))
    rel = torch.where(total > 0, (resid / total.clamp_min(1e-300)).clamp(max=1.0).sqrt(), 0.0)
    svals = lam.clamp_min(0).sqrt()
    out = []
    for j, i in enumerate(idx):
        a, b = src.get(i, work)
        a_dtype, b_dtype = src.dtypes(i)
        new_a = (xa[j] @ a).to(a_dtype)  # (k, R) (R, in)
        new_b = (b @ xb[j]).to(b_dtype)  # (out, R) (R, k)
        out.append(Compressed(new_a, new_b, svals[j].to(a_dtype), float(rel[j])))
    return out


def _top_eig(core: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Descending eigenpairs of symmetric (L, m, m) cores; values under the rounding floor
    (`_noise` lambda_1) are set to 0 (rank-deficient modules get exact zero factors)."""
    lam, w = torch.linalg.eigh(core)
    lam, w = lam.flip(-1), w.flip(-1)
    floor = _noise(core, core.shape[-1]) * lam[:, :1].clamp_min(0)
    lam = torch.where(lam > floor, lam, torch.zeros_like(lam))
    return lam, w


def _balanced(lam: torch.Tensor, w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W_k S^{1/2} (L, m, k) and S^{-1/2} W_k^T (L, k, m), zero where s_i = 0."""
    root = lam[:, :k].sqrt().sqrt()  # s^{1/2}
    inv = torch.where(root > 0, 1 / root.clamp_min(torch.finfo(root.dtype).tiny), 0.0)
    wk = w[..., :k]
    return wk * root[:, None, :], (wk * inv[:, None, :]).mT


def _gram_core(ga: torch.Tensor, gb: torch.Tensor, k: int):
    """Exact: U = L^{-T}, T = L with G_b = L L^T (Cholesky), core L^T G_a L (R x R).

    A module whose Cholesky fails or has a pivot under the rounding floor (B of rank < R:
    out < R, zero columns from a missing module, collinear experts) takes G_b = V D V^T
    instead: U = V D^{-1/2}, T = V D^{1/2} on the eigenvalues above the floor, 0 elsewhere.
    Returns X_b (L, R, k), X_a (L, k, R) and the core's eigenvalues (L, R), descending.
    """
    r = gb.shape[-1]
    chol, info = torch.linalg.cholesky_ex(gb)
    piv = chol.diagonal(dim1=-2, dim2=-1) ** 2
    scale = gb.diagonal(dim1=-2, dim2=-1).amax(-1)
    bad = (info != 0) | (piv.amin(-1) <= _noise(gb, r) * scale) | ~torch.isfinite(piv).all(-1)
    t = chol
    u_bad = None
    any_bad = bool(bad.any())
    if any_bad:
        t = chol.clone()
        d, v = torch.linalg.eigh(gb[bad])
        keep = d > _noise(gb, r) * d[:, -1:].clamp_min(0)
        dk = torch.where(keep, d, torch.ones_like(d))
        t[bad] = v * torch.where(keep, dk.sqrt(), 0.0)[:, None, :]
        u_bad = v * torch.where(keep, dk.rsqrt(), 0.0)[:, None, :]
    lam, w = _top_eig(t.mT @ ga @ t, k)
    y, xa = _balanced(lam, w, k)
    xa = xa @ t.mT  # S^{-1/2} W_k^T T^T
    if not any_bad:  # X_b = L^{-T} W_k S^{1/2}
        return torch.linalg.solve_triangular(chol.mT, y, upper=True), xa, lam
    good = ~bad
    xb = torch.empty_like(y)
    if bool(good.any()):
        xb[good] = torch.linalg.solve_triangular(chol[good].mT, y[good], upper=True)
    xb[bad] = u_bad @ y[bad]
    return xb, xa, lam


def _orthonormalize(z: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Z (L, R, m) -> (Z X, G Z X) with (Z X)^T G (Z X) = I: for G = G_b the basis B Z X is
    orthonormal, for G = G_a the basis A^T Z X is. Cholesky QR of the m x m Gram (cheap);
    a module whose Cholesky fails or has a pivot under the rounding floor (collinear or zero
    columns) takes the eigendecomposition instead, with 0 columns for the lost directions."""
    h = (z.mT @ g).mT  # = G Z (G symmetric); the row-vector form is the faster batched GEMM
    s = z.mT @ h  # (L, m, m)
    m = s.shape[-1]
    chol, info = torch.linalg.cholesky_ex(s)
    piv = chol.diagonal(dim1=-2, dim2=-1) ** 2
    scale = s.diagonal(dim1=-2, dim2=-1).amax(-1)
    bad = (info != 0) | (piv.amin(-1) <= _noise(s, m) * scale) | ~torch.isfinite(piv).all(-1)
    if not bool(bad.any()):  # X = L^{-T}
        lt = chol.mT
        return (torch.linalg.solve_triangular(lt, z, upper=True, left=False),
                torch.linalg.solve_triangular(lt, h, upper=True, left=False))
    zx = torch.empty_like(z)
    hx = torch.empty_like(h)
    good = ~bad
    if bool(good.any()):
        lt = chol[good].mT  # X = L^{-T}
        zx[good] = torch.linalg.solve_triangular(lt, z[good], upper=True, left=False)
        hx[good] = torch.linalg.solve_triangular(lt, h[good], upper=True, left=False)
    if bool(bad.any()):
        d, v = torch.linalg.eigh(s[bad])
        keep = d > _noise(s, m) * d[:, -1:].clamp_min(0)
        x = v * torch.where(keep, torch.where(keep, d, 1.0).rsqrt(), 0.0)[:, None, :]
        zx[bad] = z[bad] @ x
        hx[bad] = h[bad] @ x
    return zx, hx


def _randomized_core(ga, gb, k, oversample, power_iters, gen):
    """Randomized range finder with power iterations, never forming B A (Halko et al. 2011,
    alg. 4.4), in the Gram coordinates: m = k + p Gaussian probes Z give the row-space basis
    P = A^T Z; each half step maps one side's orthonormal basis to the other's,
        Q = orth(B A P)   : U = G_a Z in B coordinates, orthonormalised with G_b
        P = orth(A^T B^T Q): Z = G_b U = T in A coordinates, orthonormalised with G_a,
    so a basis's conditioning is squared once per half step (not twice per power step, which
    would round directions past the k-th away in float32). Rayleigh-Ritz on span(Q) last.
    Every product is (R, R) x (R, m), m = k + p < R. Returns X_b (L, R, k), X_a (L, k, R) and
    the Ritz values (L, m), descending."""
    n, r, _ = ga.shape
    m = k + oversample  # < r (else the caller takes the exact path)
    z = torch.randn(n, r, m, generator=gen, dtype=ga.dtype, device=ga.device)
    z = torch.linalg.qr(z).Q  # orthonormal probes: no near-collinear pair to round away
    _, h = _orthonormalize(z, ga)  # h = G_a Z
    u, t = _orthonormalize(h, gb)
    for _ in range(power_iters):
        _, h = _orthonormalize(t, ga)
        u, t = _orthonormalize(h, gb)
    lam, w = _top_eig(t.mT @ ga @ t, k)
    y, xa = _balanced(lam, w, k)
    return u @ y, xa @ t.mT, lam


# --------------------------------------------------------------------------- merges


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


def shares_a(experts: Sequence[ExpertWeights]) -> bool:
    """True when every module's A is identical (torch.equal) across the experts that have it.

    For callers that do not know whether a library was trained with a shared A
    (`LoraSpec.shared_a`): then `merge_experts(..., shared_a=True)` is exact at rank r.
    """
    if not experts:
        return False
    first: dict[str, torch.Tensor] = {}
    for e in experts:
        for name, (a, _) in e.modules.items():
            ref = first.setdefault(name, a)
            if ref is not a and not torch.equal(ref, a):
                return False
    return True


def _shared_a_pair(name: str, experts: Sequence[ExpertWeights], weights: Sequence[float]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), sum_k w_k s_k B_k (out, r)) for one module; raises if the A's differ.

    B is accumulated in at least float32 and returned in B's dtype. An expert without the
    module contributes nothing (its B is zero)."""
    ref_e, ref_a, acc, b_dtype = None, None, None, None
    for e, w in zip(experts, weights, strict=True):
        if name not in e.modules:
            continue
        a, b = e.modules[name]
        if ref_a is None:
            ref_e, ref_a, b_dtype = e, a, b.dtype
            acc = torch.zeros(b.shape, dtype=torch.promote_types(b.dtype, torch.float32),
                              device=b.device)
        elif ref_a is not a and not torch.equal(ref_a, a):
            raise ValueError(f"shared-A merge: module {name!r}: expert {e.expert_id} has a "
                             f"different A than expert {ref_e.expert_id} (shape "
                             f"{tuple(a.shape)} vs {tuple(ref_a.shape)}); the library does "
                             "not share A (merge with shared_a=False)")
        acc.add_(b, alpha=float(w) * e.scaling)
    return ref_a.clone(memory_format=torch.contiguous_format), acc.to(b_dtype)


class _Expanded(_Pairs):
    """The rank-expanded pairs (A* (R, in), B* (out, R)) of a merge, built on demand.

    Why: materialising every module's A* and B* (195 MB for 10 rank-16 experts over
    SmolLM2's 210 modules) costs more than the compression maths, mostly in page faults on
    fresh memory; `get` writes them into a scratch pair reused across modules of one shape,
    still cache-warm when the Gram products read it.
    """

    def __init__(self, experts: Sequence[ExpertWeights], weights: Sequence[float],
                 names: Sequence[str]):
        self.names = list(names)
        self.coeffs = [float(w) * e.scaling for e, w in zip(experts, weights, strict=True)]
        self.experts = list(experts)
        self.rank = sum(e.rank for e in experts)
        self._scratch: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self._meta = []
        for name in self.names:
            present = [e.modules[name] for e in experts if name in e.modules]
            a_dtype, b_dtype = present[0][0].dtype, present[0][1].dtype
            for a, b in present[1:]:
                a_dtype = torch.promote_types(a_dtype, a.dtype)
                b_dtype = torch.promote_types(b_dtype, b.dtype)
            self._meta.append((present[0][0].shape[1], present[0][1].shape[0], a_dtype,
                               b_dtype, present[0][0].device))

    def __len__(self) -> int:
        return len(self.names)

    def meta(self, i: int) -> tuple[int, torch.dtype, torch.device]:
        _, _, a_dtype, b_dtype, device = self._meta[i]
        work = torch.promote_types(torch.promote_types(a_dtype, b_dtype), torch.float32)
        return self.rank, work, device

    def dtypes(self, i: int) -> tuple[torch.dtype, torch.dtype]:
        return self._meta[i][2], self._meta[i][3]

    def get(self, i: int, work: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        din, dout, _, _, device = self._meta[i]
        key = (din, dout, work, device)
        if key not in self._scratch:
            scale = torch.cat([torch.full((e.rank,), c, dtype=work, device=device)
                               for e, c in zip(self.experts, self.coeffs, strict=True)])
            self._scratch[key] = (torch.empty(self.rank, din, dtype=work, device=device),
                                  torch.empty(dout, self.rank, dtype=work, device=device),
                                  scale)
        sa, sb, scale = self._scratch[key]
        parts = _module_factors(self.names[i], self.experts)
        torch.cat([a for a, _ in parts], out=sa)
        torch.cat([b for _, b in parts], dim=1, out=sb)
        return sa, sb.mul_(scale)

    def owned(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _expand_module(self.names[i], self.experts, self.coeffs)


def _module_factors(name: str, experts: Sequence[ExpertWeights]
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each expert's (A_k, B_k) of one module; zeros (so every module has the same rank) where
    an expert lacks it: it contributes nothing."""
    factors = []
    for e in experts:
        if name in e.modules:
            a, b = e.modules[name]
        else:
            ref_a, ref_b = next(x.modules[name] for x in experts if name in x.modules)
            a = torch.zeros(e.rank, ref_a.shape[1], dtype=ref_a.dtype, device=ref_a.device)
            b = torch.zeros(ref_b.shape[0], e.rank, dtype=ref_b.dtype, device=ref_b.device)
        factors.append((a, b))
    return factors


def _expand_module(name: str, experts: Sequence[ExpertWeights], coeffs: Sequence[float]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A* (R, in), B* (out, R)) of one module (`rank_expand`)."""
    return rank_expand(_module_factors(name, experts), coeffs)


def merge_experts(
    experts: Sequence[ExpertWeights],
    weights: Sequence[float],
    rank_budget: int | None = None,
    *,
    shared_a: bool = False,
    method: str = "auto",
) -> MergedAdapter:
    """Merge experts with routing weights into one adapter of scaling 1.

    shared_a=False: the exact rank-expanded merge (rank R = sum r_k). shared_a=True: the
    experts share one A per module (checked, ValueError naming the module and experts
    otherwise) and the merge (A, sum_k w_k s_k B_k) is exact at rank r. Above `rank_budget`
    every module is compressed in one `compress_many` call (`method`), which reads the
    rank-expanded factors straight from the experts (`_Expanded`: never all materialised);
    the result then has rank == rank_budget (rank-deficient modules zero-padded) and
    rel_error is the worst module's relative Frobenius error.

    A module missing from an expert contributes nothing for that expert (its B is zero).
    """
    if len(experts) != len(weights) or not experts:
        raise ValueError("need one weight per expert and at least one expert")
    if method not in METHODS:
        raise ValueError(f"unknown compression method {method!r}; expected one of {METHODS}")
    names = sorted({m for e in experts for m in e.modules})
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if shared_a:
        for name in names:
            pairs[name] = _shared_a_pair(name, experts, weights)
        rank = max(a.shape[0] for a, _ in pairs.values())
    else:
        rank = sum(e.rank for e in experts)
        if rank_budget is not None and rank > rank_budget:  # straight from the experts
            done = compress_many(_Expanded(experts, weights, names), rank_budget, method=method)
            return _padded({n: (c.a, c.b) for n, c in zip(names, done, strict=True)},
                           rank_budget, max(c.rel_error for c in done))
        coeffs = [float(w) * e.scaling for e, w in zip(experts, weights, strict=True)]
        for name in names:
            pairs[name] = _expand_module(name, experts, coeffs)
    worst = 0.0
    if rank_budget is not None and rank > rank_budget:  # shared A above the budget
        done = compress_many(list(pairs.values()), rank_budget, method=method)
        pairs = {name: (c.a, c.b) for name, c in zip(pairs, done, strict=True)}
        worst = max(c.rel_error for c in done)
        rank = rank_budget
    return _padded(pairs, rank, worst)


def _padded(pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], rank: int, rel_error: float
            ) -> MergedAdapter:
    """The adapter, every module at `rank` (a rank-deficient module zero-padded)."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, (a, b) in pairs.items():
        if a.shape[0] < rank:
            pad = rank - a.shape[0]
            a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
        out[name] = (a.contiguous(), b.contiguous())
    return MergedAdapter(out, rank, rel_error)


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
