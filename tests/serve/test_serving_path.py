"""The serving-path cost model (serve/serving_path.py): pure, so every branch is checked."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ttmm_vllm.serve.serving_path import LORA_RANKS, allowed_rank, choose

CPU = dict(on_cpu=True, rank_budget=None, expert_rank=16)


def test_shared_a_libraries_get_exact_rank_r_slots_at_any_size():
    for k in (4, 16, 256, 4096):
        p = choose(requested="auto", shared_a=True, num_experts=k, **CPU)
        assert (p.worker_merge, p.max_lora_rank, p.dtype) == ("expand", 16, "float32")


def test_small_libraries_mix_large_ones_get_rank_budget_slots():
    assert choose(requested="auto", shared_a=False, num_experts=8, **CPU).worker_merge == "mix"
    big = choose(requested="auto", shared_a=False, num_experts=9, **CPU)
    assert (big.worker_merge, big.max_lora_rank) == ("expand", 16)
    assert "9 x 16 > 128" in big.why
    assert choose(requested="auto", shared_a=False, num_experts=16, **CPU).worker_merge \
        == "expand"  # 32 distinct routings over 16 experts: slots measured faster than mix
    assert choose(requested="auto", shared_a=False, num_experts=17, mix_max_rank=512,
                  **CPU).worker_merge == "mix"
    wide = choose(requested="auto", shared_a=False, num_experts=1024,
                  **dict(CPU, rank_budget=32))
    assert (wide.worker_merge, wide.max_lora_rank) == ("expand", 32)


def test_gpus_never_mix_and_default_to_bf16():
    p = choose(requested="auto", shared_a=False, num_experts=4, **dict(CPU, on_cpu=False))
    assert (p.worker_merge, p.dtype, p.plugin_ops) == ("expand", "bfloat16", False)
    with pytest.raises(ValueError, match="needs the plugin's CPU LoRA ops"):
        choose(requested="mix", shared_a=False, num_experts=4, **dict(CPU, on_cpu=False))
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        choose(requested="auto", shared_a=False, num_experts=4, dtype="float32",
               **dict(CPU, on_cpu=False))


def test_mix_without_plugin_ops_is_refused_and_auto_falls_back():
    with pytest.raises(ValueError, match="drop --no-plugin-ops"):
        choose(requested="mix", shared_a=False, num_experts=4, plugin_ops=False, **CPU)
    p = choose(requested="auto", shared_a=False, num_experts=4, plugin_ops=False, **CPU)
    assert p.worker_merge == "expand"
    with pytest.raises(ValueError, match="worker_merge must be"):
        choose(requested="fast", shared_a=False, num_experts=4, **CPU)


@given(st.integers(1, 600))
def test_allowed_rank_is_the_smallest_vllm_rank_that_holds_it(r):
    got = allowed_rank(r)
    assert got in LORA_RANKS and (got >= r or got == 512)
    assert all(x < r for x in LORA_RANKS if x < got)
