"""The plugin through vLLM's real engine (AsyncLLM, EngineCore, CPU worker) on the tiny model.

One routing served four ways must give the same greedy tokens and log-probabilities (sampled
and prompt): a rank-expanded merged adapter written to disk, served by the plugin's grouped op
and by vLLM's stock ops (plugin off); the same routing merged inside the worker, "expand"
(a LoRAModel from resident tensors) and "mix" (resident experts mixed per token). Requests of
several routings and base requests run concurrently, and base requests batched with adapters
must equal base requests alone. A live "mix" adapter re-routed through `collective_rpc`
changes the tokens that follow.

Two engines, one at a time: the plugin-off engine runs its requests and shuts down first.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from ttmm_vllm.library import Library, write_adapter
from ttmm_vllm.merge import merge_experts
from ttmm_vllm.vllm_plugin.config import PluginConfig, engine_kwargs, reroute, routing_request

pytestmark = pytest.mark.engine

# fp32 throughout. The four paths compute the same sum of products in different orders (the
# grouped op per slot at the real rank, the stock op padded to max_lora_rank, mix: weights
# applied between shrink and expand); over this 2-layer model that moves log-probabilities by
# ~1e-6. 1e-3 is far below what a wrong merge does (a missing or mis-weighted expert moves
# them by 0.1 or more here) and above any reordering noise.
LOGPROB_TOL = 1e-3
MAX_TOKENS = 8
ROUTINGS = {  # expert ids and weights
    "a": ([0, 2], [0.3, 0.7]),
    "b": ([1, 3, 2], [0.5, 0.25, 0.25]),
    "c": ([3], [1.0]),
}
PROMPTS = [
    "guitar piano melody chord the band song singer lyric",
    "rocket telescope orbit moon the planet star galaxy comet",
    "dough oven butter garlic the salt recipe chef spice",
]
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=32,
              seed=0, kv_cache_memory_bytes=64 << 20)


def _start(model_dir, config: PluginConfig):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    kw = dict(ENGINE, model=str(model_dir), tokenizer=str(model_dir))
    kw.update(engine_kwargs(config, max_loras=8, max_lora_rank=16, max_cpu_loras=24))
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**kw))


async def _generate(llm, prompt_ids, lora_request=None, max_tokens=MAX_TOKENS):
    """Greedy tokens, their log-probabilities and the prompt's log-probabilities."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0,
                            prompt_logprobs=0, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    final = None
    async for out in llm.generate({"prompt_token_ids": list(prompt_ids)}, params,
                                  uuid.uuid4().hex, lora_request=lora_request):
        final = out
    o = final.outputs[0]
    lps = [d[t].logprob for t, d in zip(o.token_ids, o.logprobs, strict=True)]
    plps = [d[t].logprob for t, d in zip(prompt_ids[1:], final.prompt_logprobs[1:],
                                         strict=True)]
    return list(o.token_ids), lps, plps


async def _run_batch(llm, jobs: dict):
    """jobs: key -> (prompt ids, LoRARequest | None), all submitted at once."""
    for _, lora in jobs.values():
        if lora is not None:
            await llm.add_lora(lora)  # load errors surface here, not inside a step
    keys = list(jobs)
    outs = await asyncio.gather(*(_generate(llm, *jobs[k]) for k in keys))
    return dict(zip(keys, outs, strict=True))


@pytest.fixture(scope="session")
def prompt_ids(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    return [tok(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="session")
def shared_library(tmp_path_factory, tiny_model_dir):
    """Four random rank-4 experts that share one A per module (LoraSpec.shared_a)."""
    import numpy as np

    from ttmm_vllm.testing import write_random_library

    return write_random_library(tmp_path_factory.mktemp("shared-a"), tiny_model_dir,
                                np.random.default_rng(3).normal(size=(4, 8)), rank=4,
                                alpha=8.0, seed=3, a_scale=0.3, b_scale=0.3, shared_a=True)


@pytest.fixture(scope="session")
def disk_adapters(tiny_library, shared_library, tmp_path_factory):
    """Each routing's exact merge, written as a PEFT folder (issue 4's baseline): rank-expanded
    for the plain library, rank 4 for the shared-A one ("shared-<name>")."""
    root = tmp_path_factory.mktemp("merged")
    out = {}
    for prefix, lib_dir, shared in (("", tiny_library, False), ("shared-", shared_library, True)):
        lib = Library.open(lib_dir)
        for name, (ids, ws) in ROUTINGS.items():
            merged = merge_experts([lib.read_expert(i) for i in ids], ws, shared_a=shared)
            assert merged.rank == (4 if shared else 4 * len(ids)) and merged.rel_error == 0
            write_adapter(root / (prefix + name), merged.modules, rank=merged.rank,
                          alpha=merged.alpha)
            out[prefix + name] = str(root / (prefix + name))
    return out


def _disk(name, lora_id, path):
    from vllm.lora.request import LoRARequest

    return LoRARequest(f"disk-{name}", lora_id, path)


def _jobs(prompt_ids, tiny_library, disk_adapters, kinds, shared_library=None):
    """Every prompt with every routing for each kind, plus every prompt with no adapter.
    Kinds "shared-disk" / "shared-expand" serve the shared-A library."""
    jobs = {}
    for p, ids in enumerate(prompt_ids):
        jobs[("base", None, p)] = (ids, None)
        for j, (name, (experts, ws)) in enumerate(ROUTINGS.items()):
            if "disk" in kinds:
                jobs[("disk", name, p)] = (ids, _disk(name, 1 + j, disk_adapters[name]))
            if "expand" in kinds:
                jobs[("expand", name, p)] = (ids, routing_request(
                    11 + j, str(tiny_library), experts, ws, strategy="expand"))
            if "mix" in kinds:  # strategy "" -> the worker's default, "mix"
                jobs[("mix", name, p)] = (ids, routing_request(21 + j, str(tiny_library),
                                                               experts, ws))
            if "shared-disk" in kinds:
                jobs[("shared-disk", name, p)] = (ids, _disk(f"shared-{name}", 31 + j,
                                                             disk_adapters[f"shared-{name}"]))
            if "shared-expand" in kinds:
                jobs[("shared-expand", name, p)] = (ids, routing_request(
                    51 + j, str(shared_library), experts, ws, strategy="expand"))
    return jobs


@pytest.fixture(scope="session")
def stock_results(loop, tiny_model_dir, tiny_library, shared_library, disk_adapters, prompt_ids):
    """Plugin off (vLLM's stock CPU ops): disk adapters, in-worker expand, base; a "mix"
    adapter refused with a clear error. Runs, then shuts its engine down."""
    llm = loop.run(asyncio.to_thread(_start, tiny_model_dir, PluginConfig(enabled=False)))
    try:
        # At most 7 adapters at once in 8 slots: the stock op's -1 -> last-slot bug (NOTES)
        # cannot touch the base requests.
        jobs = _jobs(prompt_ids, tiny_library, disk_adapters, kinds=("disk",))
        results = loop.run(_run_batch(llm, jobs))
        jobs = _jobs(prompt_ids, tiny_library, disk_adapters, kinds=("expand",))
        results.update(loop.run(_run_batch(llm, jobs)))
        for kind in ("shared-disk", "shared-expand"):  # the GPU path's code: stock ops
            # No base requests here: with more adapters than slots loaded by now, the stock
            # op's -1 -> last-slot bug would reach them (the base rows come from above).
            jobs = {k: v for k, v in _jobs(prompt_ids, tiny_library, disk_adapters, (kind,),
                                           shared_library).items() if k[0] != "base"}
            results.update(loop.run(_run_batch(llm, jobs)))
        mix = routing_request(99, str(tiny_library), [0], [1.0], strategy="mix")
        try:
            loop.run(llm.add_lora(mix))
            mix_error = None
        except Exception as e:  # noqa: BLE001 - the message is what we check
            mix_error = str(e)
        loop.run(llm.check_health())
        return results, mix_error
    finally:
        llm.shutdown()


@pytest.fixture(scope="session")
def plugin_llm(loop, tiny_model_dir, tiny_library, stock_results):
    """Plugin on, library preloaded, default in-worker strategy "mix"."""
    llm = loop.run(asyncio.to_thread(_start, tiny_model_dir,
                                     PluginConfig(library=str(tiny_library))))
    yield llm
    llm.shutdown()


@pytest.fixture(scope="session")
def plugin_results(loop, plugin_llm, tiny_library, shared_library, disk_adapters, prompt_ids):
    base_alone = loop.run(_run_batch(plugin_llm, {p: (ids, None)
                                                  for p, ids in enumerate(prompt_ids)}))
    jobs = _jobs(prompt_ids, tiny_library, disk_adapters, kinds=("disk", "expand", "mix"))
    results = loop.run(_run_batch(plugin_llm, jobs))
    jobs = {k: v for k, v in _jobs(prompt_ids, tiny_library, disk_adapters, ("shared-expand",),
                                   shared_library).items() if k[0] != "base"}
    results.update(loop.run(_run_batch(plugin_llm, jobs)))
    return base_alone, results


def _assert_same(got, want, what):
    toks, lps, plps = got
    toks_w, lps_w, plps_w = want
    assert toks == toks_w, f"{what}: tokens differ"
    for a, b in zip(lps + plps, lps_w + plps_w, strict=True):
        assert abs(a - b) <= LOGPROB_TOL, f"{what}: log-probabilities differ ({a} vs {b})"


def test_four_paths_agree(plugin_results, stock_results):
    _, got = plugin_results
    stock, _ = stock_results
    for name in ROUTINGS:
        for p in range(len(PROMPTS)):
            want = stock[("disk", name, p)]  # vLLM's own ops on the disk merge
            for kind in ("disk", "expand", "mix"):
                _assert_same(got[(kind, name, p)], want, f"plugin {kind} {name} prompt {p}")
            _assert_same(stock[("expand", name, p)], want, f"stock expand {name} prompt {p}")


def test_shared_a_merges_are_exact_at_rank_r_on_both_op_sets(loop, plugin_llm,
                                                              plugin_results, stock_results):
    """Shared-A experts: the in-worker merge is (sum_k w_k s_k B_k) A at the experts' rank,
    served by the plugin's ops and by vLLM's stock ops (the GPU path's code) alike, equal to
    the exact merge from disk."""
    _, got = plugin_results
    stock, _ = stock_results
    for name in ROUTINGS:
        for p in range(len(PROMPTS)):
            want = stock[("shared-disk", name, p)]
            _assert_same(stock[("shared-expand", name, p)], want, f"stock shared {name} {p}")
            _assert_same(got[("shared-expand", name, p)], want, f"plugin shared {name} {p}")
    for j in range(len(ROUTINGS)):
        (built,) = loop.run(plugin_llm.collective_rpc("ttmm_adapter_info", args=(51 + j,)))
        assert built["rank"] == 4 and built["rel_error"] == 0.0


def test_adapters_change_outputs(plugin_results):
    """Guard against a vacuous agreement: every routing moves the prompt log-probabilities
    away from the base model's, and from the other routings'."""
    _, got = plugin_results
    for p in range(len(PROMPTS)):
        rows = [got[("base", None, p)][2]] + [got[("mix", n, p)][2] for n in ROUTINGS]
        for i in range(len(rows)):
            for j in range(i):
                assert max(abs(a - b) for a, b in zip(rows[i], rows[j], strict=True)) > 0.05


def test_base_requests_batched_with_adapters_equal_base_alone(plugin_results, stock_results):
    alone, got = plugin_results
    stock, _ = stock_results
    for p in range(len(PROMPTS)):
        _assert_same(got[("base", None, p)], alone[p], f"base prompt {p} in a mixed batch")
        _assert_same(stock[("base", None, p)], alone[p], f"stock base prompt {p}")


def test_mix_refused_without_plugin_ops(stock_results):
    _, mix_error = stock_results
    assert mix_error is not None and "plugin's LoRA ops" in mix_error


def test_worker_holds_bank_and_routes(loop, plugin_llm, plugin_results, tiny_library):
    (info,) = loop.run(plugin_llm.collective_rpc("ttmm_info"))
    assert info["mix_ops_active"] and info["config"]["worker_merge"] == "mix"
    bank = info["banks"][str(Path(tiny_library).resolve())]
    assert bank["experts"] == [0, 1, 2, 3] and bank["layers"] == 8  # 2 layers x 4 LoRA layers
    assert info["routes"][21] == [[0, 2], [0.3, 0.7]]
    assert info["ranks"][1] == 8 and info["ranks"][12] == 12  # disk "a"; expand "b"


def test_rerouting_a_live_mix_adapter(loop, plugin_llm, plugin_results, tiny_library,
                                      prompt_ids):
    """The routing of a "mix" adapter id changes in the worker (no new adapter, no reload):
    later requests with that id, and the rest of a request in flight, follow it."""
    _, got = plugin_results
    ids_a, ws_a = ROUTINGS["a"]
    ids_c, ws_c = ROUTINGS["c"]
    lora = routing_request(41, str(tiny_library), ids_a, ws_a, tag=uuid.uuid4().hex)

    async def sequential():
        first = await _generate(plugin_llm, prompt_ids[0], lora)
        await reroute(plugin_llm, 41, ids_c, ws_c)
        second = await _generate(plugin_llm, prompt_ids[1], lora)
        await reroute(plugin_llm, 41, ids_a, ws_a)
        return first, second

    first, second = loop.run(sequential())
    _assert_same(first, got[("mix", "a", 0)], "before re-routing")
    _assert_same(second, got[("mix", "c", 1)], "after re-routing to 'c'")

    async def in_flight():
        """Switch after the first streamed tokens of a long request."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        req = routing_request(42, str(tiny_library), ids_a, ws_a, tag=uuid.uuid4().hex)
        await plugin_llm.add_lora(req)
        params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True,
                                output_kind=RequestOutputKind.DELTA)
        toks, switched_at = [], None
        async for out in plugin_llm.generate({"prompt_token_ids": prompt_ids[2]}, params,
                                             uuid.uuid4().hex, lora_request=req):
            toks += out.outputs[0].token_ids
            if switched_at is None:
                switched_at = len(toks)
                await reroute(plugin_llm, 42, ids_c, ws_c)
        unswitched = await _generate(plugin_llm, prompt_ids[2],
                                     routing_request(43, str(tiny_library), ids_a, ws_a,
                                                     tag="unswitched"), max_tokens=48)
        return toks, switched_at, unswitched[0]

    toks, switched_at, unswitched = loop.run(in_flight())
    assert toks[:switched_at] == unswitched[:switched_at]
    assert toks != unswitched  # the rest of the request followed the new routing


def test_live_changes_restack_the_mix_bank_without_rereading_it(loop, plugin_llm, plugin_results,
                                                                tiny_library, prompt_ids,
                                                                tmp_path):
    """A live RemoveExpert/AddExpert changes a resident "mix" bank from its own tensors (the
    engine loop never re-reads the library: only an added expert is read), adapters whose
    experts all survive move to the new bank with the same outputs, one naming a removed
    expert keeps the old bank, and an adapter routed before a removal but loaded after it
    serves the remaining experts instead of failing inside the engine step."""
    import json
    import shutil

    from ttmm_vllm.library import ADAPTER_WEIGHTS, PENDING_EXPERT, expert_dirname

    root = tmp_path / "lib"
    shutil.copytree(tiny_library, root)
    lib = Library.open(root)
    keeper = routing_request(61, str(root), [0, 2], [0.3, 0.7])
    loser = routing_request(62, str(root), [1, 3], [0.5, 0.5])
    before = loop.run(_run_batch(plugin_llm, {"keep": (prompt_ids[0], keeper),
                                              "lose": (prompt_ids[1], loser)}))
    # expert 4: a copy of expert 3, pending; expert 0's file then corrupted, so any re-read
    # of the library (with its checksums) would fail
    shutil.copytree(root / expert_dirname(3), root / expert_dirname(4))
    (root / expert_dirname(4) / PENDING_EXPERT).write_text(json.dumps(
        {"title": "copy of 3", "size": 1, "centroid": lib.centroids[3].tolist()}))
    (root / expert_dirname(0) / ADAPTER_WEIGHTS).write_bytes(b"corrupted after loading")

    def info():
        (i,) = loop.run(plugin_llm.collective_rpc("ttmm_info"))
        return i

    lib.commit_removed(3)
    loop.run(plugin_llm.collective_rpc("ttmm_remove_expert", args=(str(root), 3)))
    held = info()
    assert held["banks"][str(root.resolve())]["experts"] == [0, 1, 2]
    assert held["routes_on_retired_banks"] == [62]  # keeps the bank with expert 3
    again = loop.run(_run_batch(plugin_llm, {"keep": (prompt_ids[0], keeper),
                                             "lose": (prompt_ids[1], loser)}))
    _assert_same(again["keep"], before["keep"], "an adapter moved to the new bank")
    _assert_same(again["lose"], before["lose"], "an adapter on the retired bank")

    added, centroid = lib.pending_expert(4)
    lib.commit_added(added, centroid)
    loop.run(plugin_llm.collective_rpc("ttmm_add_expert", args=(str(root), 4)))
    assert info()["banks"][str(root.resolve())]["experts"] == [0, 1, 2, 4]
    late = loop.run(_run_batch(plugin_llm, {
        "late": (prompt_ids[1], routing_request(63, str(root), [1, 3], [0.5, 0.5])),
        "one": (prompt_ids[1], routing_request(64, str(root), [1], [1.0])),
        "new": (prompt_ids[1], routing_request(65, str(root), [1, 4], [0.5, 0.5])),
    }))
    _assert_same(late["late"], late["one"], "routed to a removed expert: the rest served")
    _assert_same(late["new"], before["lose"], "the added copy of expert 3 serves like it")
