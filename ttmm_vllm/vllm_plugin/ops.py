"""The plugin's multi-LoRA ops for the CPU: pure torch, no vLLM import.

Why not vLLM's stock CPU ops (`vllm/lora/ops/torch_ops/lora_ops.py`): they gather a whole
`(out, max_lora_rank)` matrix for every token and run an einsum over it, so the cost grows with
`max_lora_rank` and is paid even by tokens without an adapter (NOTES.md: 80-100x a base
projection at 32 tokens). Three ops replace them here:

- `grouped_lora_linear`: ordinary adapters in vLLM's slot buffers. Tokens are grouped by
  slot; each active slot costs one matrix-product pair per output slice, at the adapter's real
  rank; tokens without an adapter cost nothing.
- `batched_lora_linear`: the same for slots with one token each (decode, where every request
  has its own merged adapter): all of them in one batched product pair per slice, so a step
  with 32 distinct adapters costs two `bmm` calls per slice instead of 64 small GEMMs.
  `shared_a_lora_linear` is its variant for merges of shared-A experts, whose slots all hold
  the library's one A: one shrink GEMM for every slot, then the batched expand.
- `mix_lora_linear`: TTMM routing adapters. Every expert of a library is resident per layer as
  stacked factors, scaling folded into B. A batch costs two GEMMs per layer (one shrink over
  the union of the experts in use, one expand per output slice) whatever the number of
  requests, with each token's routing weights applied between them. Nothing is built per
  request, and re-routing a request is changing its weights.

Each op has a plain-torch twin (`*_ref`), written token by token from the semantics, that the
tests hold the op to.

Shapes follow vLLM's punica wrapper: x (T, in) token activations; y (T, sum(output_slices)) the
base layer's output, updated in place; a packed layer (qkv_proj: 3 slices, gate_up_proj: 2)
writes slice i at columns [offset_i, offset_i + output_slices[i]).
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

Rows = slice | torch.Tensor  # a contiguous run of tokens (views, no copy) or token indices


# --------------------------------------------------------------------------- token groups


def group_rows_by_slot(token_slots: torch.Tensor, skip: Container[int] = ()) -> dict[int, Rows]:
    """Tokens of each slot: {slot: rows}, for slots >= 0 that are not in `skip`.

    token_slots: (T,) int64, the slot of each token (-1: no adapter). Rows are a `slice` when
    the slot's tokens are contiguous (every prefill segment, and decode batches with one
    request per adapter), else an int64 index tensor in increasing order.
    """
    if token_slots.numel() == 0:
        return {}
    order = torch.argsort(token_slots, stable=True)
    slots, counts = torch.unique_consecutive(token_slots[order], return_counts=True)
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    firsts = order[starts].tolist()
    lasts = order[ends - 1].tolist()
    out: dict[int, Rows] = {}
    for s, c, b, f, la in zip(slots.tolist(), counts.tolist(), starts.tolist(), firsts, lasts,
                              strict=True):
        if s < 0 or s in skip:
            continue
        out[s] = slice(f, la + 1) if la - f + 1 == c else order[b:b + c]
    return out


@dataclass(frozen=True)
class SlotGroup:
    """The tokens of one active slot and the real rank of the adapter in it."""

    slot: int
    rank: int
    rows: Rows


def _take_rows(x: torch.Tensor, rows: Rows | None) -> torch.Tensor:
    if rows is None:
        return x
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def _add_rows(y: torch.Tensor, rows: Rows | None, h: torch.Tensor, b: torch.Tensor) -> None:
    """y[rows] += h @ b.T, accumulating in place (no temporary when rows are contiguous)."""
    if rows is None:
        y.addmm_(h, b.T)
    elif isinstance(rows, slice):
        y[rows].addmm_(h, b.T)
    else:
        y.index_add_(0, rows, h @ b.T)


# --------------------------------------------------------------------------- grouped op


def grouped_lora_linear(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a_stacked: Sequence[torch.Tensor],
    lora_b_stacked: Sequence[torch.Tensor],
    groups: Sequence[SlotGroup],
    output_slices: Sequence[int],
    scale: float = 1.0,
    offset_start: int = 0,
) -> None:
    """Multi-LoRA on vLLM's slot buffers, one matrix-product pair per active slot and slice.

    Args:
        y: (T, >= offset_start + sum(output_slices)), updated in place.
        x: (T, in).
        lora_a_stacked[i]: (S, 1, max_rank, in), slice i's A of every slot.
        lora_b_stacked[i]: (S, 1, out_i, max_rank), slice i's B of every slot.
        groups: the active slots, their tokens and real ranks. vLLM zeroes a slot before
            copying an adapter in, so columns past the real rank are zero and skipping them
            is exact.
        output_slices: (out_0, out_1, ...).

    Semantics:
        for g in groups:
            offset = offset_start
            for i in range(len(output_slices)):
                A = lora_a_stacked[i][g.slot, 0, :g.rank, :]  # (r, in)
                B = lora_b_stacked[i][g.slot, 0, :, :g.rank]  # (out_i, r)
                y[g.rows, offset:offset + out_i] += scale * (x[g.rows] @ A.T) @ B.T
                offset += out_i
    """
    for g in groups:
        xs = _take_rows(x, g.rows)
        offset = offset_start
        for a_all, b_all, n in zip(lora_a_stacked, lora_b_stacked, output_slices, strict=True):
            a = a_all[g.slot, 0, : g.rank]
            b = b_all[g.slot, 0, :, : g.rank]
            if a.dtype != x.dtype:
                a, b = a.to(x.dtype), b.to(x.dtype)
            h = xs @ a.T  # (T_g, r)
            if scale != 1.0:
                h.mul_(scale)
            _add_rows(y[:, offset:offset + n], g.rows, h, b)
            offset += n


def grouped_lora_linear_ref(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a_stacked: Sequence[torch.Tensor],
    lora_b_stacked: Sequence[torch.Tensor],
    token_slots: torch.Tensor,
    output_slices: Sequence[int],
    scale: float = 1.0,
    offset_start: int = 0,
) -> None:
    """Plain twin of `grouped_lora_linear`: token by token, full `max_rank` buffers, -1 skipped."""
    for t, s in enumerate(token_slots.tolist()):
        if s < 0:
            continue
        offset = offset_start
        for a_all, b_all, n in zip(lora_a_stacked, lora_b_stacked, output_slices, strict=True):
            a = a_all[s, 0].to(x.dtype)
            b = b_all[s, 0].to(x.dtype)
            y[t, offset:offset + n] += scale * (b @ (a @ x[t]))
            offset += n


@dataclass(frozen=True)
class SlotBatch:
    """Slots with exactly one token each, computed together, and the largest real rank among
    them (columns past a slot's own rank are zero in vLLM's buffers: exact to include)."""

    slots: torch.Tensor  # (S,) int64 slot index
    rows: torch.Tensor  # (S,) int64 token row of each slot
    rank: int
    # Every slot holds a merge of this shared-A library (its A is the library's, not read
    # from the slots: `shared_a_lora_linear`); None: ordinary slots.
    shared_a: str | None = None

    @cached_property
    def contiguous_slots(self) -> slice | None:
        """slots as a slice when they are consecutive (the buffers are then read as views).

        Cached: a step's batch is built once and read by every LoRA layer (120 calls a step
        on SmolLM2), and the comparison costs a few tensor ops each time."""
        first, n = int(self.slots[0]), int(self.slots.numel())
        if bool((self.slots == torch.arange(first, first + n)).all()):
            return slice(first, first + n)
        return None


def batched_lora_linear(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a_stacked: Sequence[torch.Tensor],
    lora_b_stacked: Sequence[torch.Tensor],
    batch: SlotBatch,
    output_slices: Sequence[int],
    scale: float = 1.0,
    offset_start: int = 0,
) -> None:
    """Multi-LoRA for one token per slot: one batched shrink and one batched expand per slice.

    Args:
        y: (T, >= offset_start + sum(output_slices)), updated in place.
        x: (T, in).
        lora_a_stacked[i]: (S_max, 1, max_rank, in); lora_b_stacked[i]: (S_max, 1, out_i,
            max_rank): vLLM's slot buffers.
        batch: the slots, the row of each slot's token, and the rank to compute at.

    Semantics (as `grouped_lora_linear` with one-row groups):
        for j, (s, t) in enumerate(zip(batch.slots, batch.rows)):
            offset = offset_start
            for i in range(len(output_slices)):
                A = lora_a_stacked[i][s, 0, :batch.rank, :]  # (r, in)
                B = lora_b_stacked[i][s, 0, :, :batch.rank]  # (out_i, r)
                y[t, offset:offset + out_i] += scale * B @ (A @ x[t])
                offset += out_i
        computed as  h = xs (S, 1, in) @ A^T (S, in, r);  y[rows] += h @ B^T (S, r, out_i):
        the row-vector form, which MKL's batched GEMM runs 2-3x faster than the column form.
    """
    r = batch.rank
    view = batch.contiguous_slots
    xs = x.index_select(0, batch.rows).unsqueeze(1)  # (S, 1, in)
    outs = []
    for a_all, b_all in zip(lora_a_stacked, lora_b_stacked, strict=True):
        a = a_all[view, 0, :r] if view is not None else \
            a_all.index_select(0, batch.slots)[:, 0, :r]
        b = _slot_b(b_all, batch, r)
        if a.dtype != x.dtype:
            a, b = a.to(x.dtype), b.to(x.dtype)
        h = torch.bmm(xs, a.transpose(1, 2))  # (S, 1, r)
        if scale != 1.0:
            h.mul_(scale)
        outs.append(torch.bmm(h, b.transpose(1, 2)).squeeze(1))  # (S, out_i)
    _scatter_slices(y, batch.rows, outs, output_slices, offset_start)


def _scatter_slices(y: torch.Tensor, rows: torch.Tensor, outs: list[torch.Tensor],
                    output_slices: Sequence[int], offset_start: int) -> None:
    """y[rows, offset_start:] += the slices' outputs side by side: one scatter-add per layer,
    not one per slice (the scatter, not the copy, is what costs: ~12% of the op measured).
    A width that does not match output_slices fails in index_add_'s shape check."""
    total = sum(output_slices)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
    y[:, offset_start:offset_start + total].index_add_(0, rows, out)


def _slot_b(b_all: torch.Tensor, batch: SlotBatch, r: int) -> torch.Tensor:
    """(S, out, r) B of each slot of the batch: a view when the slots are consecutive."""
    view = batch.contiguous_slots
    if view is not None:
        return b_all[view, 0, :, :r]
    return b_all.index_select(0, batch.slots)[:, 0, :, :r]


def shared_a_lora_linear(
    y: torch.Tensor,
    x: torch.Tensor,
    a_shared: torch.Tensor,
    lora_b_stacked: Sequence[torch.Tensor],
    batch: SlotBatch,
    output_slices: Sequence[int],
    scale: float = 1.0,
    offset_start: int = 0,
) -> None:
    """`batched_lora_linear` for slots that all hold the same A: merges of shared-A experts,
    (sum_k w_k s_k B_k) A. The shrink is one GEMM for every slot, and no slot's A is read.

    Args:
        a_shared: (n * r, in), slice i's A at rows [i*r, (i+1)*r): what every slot holds.
        the rest: as `batched_lora_linear`.

    Semantics (as `batched_lora_linear` with lora_a_stacked[i][s, 0, :r] = A_i for every s):
        for j, (s, t) in enumerate(zip(batch.slots, batch.rows)):
            for i in range(n):
                y[t, slice i] += scale * lora_b_stacked[i][s, 0, :, :r] @ (A_i @ x[t])
    """
    n = len(output_slices)
    r = a_shared.shape[0] // n
    xs = x.index_select(0, batch.rows)  # (S, in)
    a = a_shared if a_shared.dtype == x.dtype else a_shared.to(x.dtype)
    h = xs @ a.T  # (S, n * r): one shrink for every slot and slice
    if scale != 1.0:
        h.mul_(scale)
    outs = []
    for i, b_all in enumerate(lora_b_stacked):
        b = _slot_b(b_all, batch, r)
        if b.dtype != x.dtype:
            b = b.to(x.dtype)
        outs.append(torch.bmm(h[:, i * r:(i + 1) * r].unsqueeze(1),
                              b.transpose(1, 2)).squeeze(1))
    _scatter_slices(y, batch.rows, outs, output_slices, offset_start)


# --------------------------------------------------------------------------- mix op


def stack_expert_factors(
    factors: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor] | None]],
    scalings: Sequence[float],
    ranks: Sequence[int],
    in_dim: int,
    output_slices: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Stack K experts' factors for `mix_lora_linear`, scaling folded into B.

    Args:
        factors[k][i]: expert k's (A (r_k, in), B (out_i, r_k)) for output slice i, or None
            when the expert does not adapt that slice (it then contributes zero).
        scalings[k]: s_k = alpha_k / r_k.
        ranks[k]: r_k.

    Returns:
        a_cat (n * R, in) with R = sum r_k: slice i's rows are [i*R, (i+1)*R), expert k's
        at [i*R + off_k, i*R + off_k + r_k) with off_k = sum of r_j for j < k;
        b_slices[i] (out_i, R): expert k's columns [off_k, off_k + r_k) hold s_k * B_ik.
    """
    n, big_r = len(output_slices), sum(ranks)
    a_cat = torch.zeros(n * big_r, in_dim, dtype=dtype)
    b_slices = [torch.zeros(out, big_r, dtype=dtype) for out in output_slices]
    off = 0
    for k, (per_slice, s, r) in enumerate(zip(factors, scalings, ranks, strict=True)):
        for i, ab in enumerate(per_slice):
            if ab is None:
                continue
            a, b = ab
            if a.shape != (r, in_dim) or b.shape != (output_slices[i], r):
                raise ValueError(
                    f"expert {k} slice {i}: A {tuple(a.shape)} / B {tuple(b.shape)} do not "
                    f"match rank {r}, in {in_dim}, out {output_slices[i]}"
                )
            a_cat[i * big_r + off: i * big_r + off + r] = a
            b_slices[i][:, off:off + r] = b.to(torch.float64).mul(s).to(dtype)
        off += r
    return a_cat, b_slices


def expand_weights(weights: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """(T, K) per-token expert weights -> (T, sum r_k): w_tk repeated over expert k's columns."""
    return weights.repeat_interleave(ranks, dim=1)


def mix_lora_linear(
    y: torch.Tensor,
    x: torch.Tensor,
    a_cat: torch.Tensor,
    b_slices: Sequence[torch.Tensor],
    output_slices: Sequence[int],
    col_weights: torch.Tensor,
    rows: Rows | None = None,
    cols: torch.Tensor | None = None,
    scale: float = 1.0,
    offset_start: int = 0,
) -> None:
    """Every token's own weighted sum of resident experts, in two GEMMs (plus one per slice).

    Args:
        y: (T, >= offset_start + sum(output_slices)), updated in place.
        x: (T, in).
        a_cat: (n * R, in), b_slices[i]: (out_i, R): the stacked experts of one layer
            (`stack_expert_factors`; B already scaled by s_k).
        col_weights: (T', R') weight of each rank column for each computed token, w_tk
            repeated r_k times (`expand_weights`); T' = number of `rows`, R' = len(cols).
            (1, R') when all these tokens have the same weights (one request's segment).
        rows: the tokens that have a routing (a slice or indices); None: all T tokens.
        cols: the rank columns of the experts in use (the union U over the batch), increasing;
            None: all R columns. Selecting copies the factors, so the caller passes None when
            U covers most columns (zero weights then cost compute, not correctness).

    Semantics:
        for t in rows:
            offset = offset_start
            for i in range(n):
                y[t, offset:offset + out_i] += scale * sum_k w_tk * B_ik @ (A_ik @ x[t])
                offset += out_i
        computed as
            h = x[rows] @ A_U.T              # (T', n * R'): one shrink for all slices
            h *= col_weights (per slice)      # token t's weights, column by column
            y[rows, slice i] += h_i @ B_iU.T  # one expand per slice
    """
    n = len(output_slices)
    big_r = b_slices[0].shape[1]
    if cols is not None:
        cols_n = (cols.unsqueeze(0) + big_r * torch.arange(n).unsqueeze(1)).reshape(-1)
        a_cat = a_cat.index_select(0, cols_n)
        b_slices = [b.index_select(1, cols) for b in b_slices]
    r = b_slices[0].shape[1]
    xs = _take_rows(x, rows)
    if a_cat.dtype != x.dtype:
        a_cat, b_slices = a_cat.to(x.dtype), [b.to(x.dtype) for b in b_slices]
    h = xs @ a_cat.T  # (T', n * r)
    w = col_weights.to(h.dtype)
    if scale != 1.0:
        w = w * scale
    h.view(h.shape[0], n, r).mul_(w.unsqueeze(1))
    offset = offset_start
    for i, (b, out) in enumerate(zip(b_slices, output_slices, strict=True)):
        _add_rows(y[:, offset:offset + out], rows, h[:, i * r:(i + 1) * r], b)
        offset += out


def mix_lora_linear_ref(
    y: torch.Tensor,
    x: torch.Tensor,
    factors: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor] | None]],
    scalings: Sequence[float],
    weights: torch.Tensor,
    output_slices: Sequence[int],
    scale: float = 1.0,
    offset_start: int = 0,
) -> None:
    """Plain twin of `mix_lora_linear`: y_t += scale * sum_k w_tk s_k B_k A_k x_t, token by token.

    factors[k][i] = expert k's (A, B) for slice i or None; weights (T, K), a zero row for a
    token without a routing.
    """
    for t in range(x.shape[0]):
        offset = offset_start
        for i, n in enumerate(output_slices):
            acc = torch.zeros(n, dtype=torch.float64)
            for k, per_slice in enumerate(factors):
                w = float(weights[t, k])
                if w == 0.0 or per_slice[i] is None:
                    continue
                a, b = per_slice[i]
                acc += w * scalings[k] * (b.double() @ (a.double() @ x[t].double()))
            y[t, offset:offset + n] += (scale * acc).to(y.dtype)
            offset += n
