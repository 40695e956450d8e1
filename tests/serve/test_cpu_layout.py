"""The vLLM-CPU thread layout `ttmm serve` picks (serve/cpu_layout.py): pure, so checked
without starting vLLM."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ttmm_vllm.serve.cpu_layout import (
    LAYOUT_VARS,
    SMALL_MACHINE_CPUS,
    apply_cpu_layout,
    cpu_layout,
)

RESERVE_NONE = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def test_small_machines_bind_every_cpu_to_the_worker():
    for n in range(2, SMALL_MACHINE_CPUS + 1):
        assert cpu_layout(n, {}) == RESERVE_NONE
    assert cpu_layout(2, {"PATH": "/usr/bin", "OMP_NUM_THREADS": "1"}) == RESERVE_NONE


def test_one_cpu_and_large_machines_keep_vllms_default():
    assert cpu_layout(1, {}) == {}
    for n in (SMALL_MACHINE_CPUS + 1, 8, 64, 256):
        assert cpu_layout(n, {}) == {}


@pytest.mark.parametrize("var", LAYOUT_VARS)
@pytest.mark.parametrize("value", ["auto", "nobind", "0-1", "0", "1", ""])
def test_the_users_layout_wins(var, value):
    assert cpu_layout(2, {var: value}) == {}


def test_ttmm_cpu_layout_vllm_keeps_vllms_defaults_and_rejects_unknown_modes():
    assert cpu_layout(2, {"TTMM_CPU_LAYOUT": "vllm"}) == {}
    assert cpu_layout(2, {"TTMM_CPU_LAYOUT": "auto"}) == RESERVE_NONE
    assert cpu_layout(2, {"TTMM_CPU_LAYOUT": ""}) == RESERVE_NONE
    with pytest.raises(ValueError, match="TTMM_CPU_LAYOUT"):
        cpu_layout(2, {"TTMM_CPU_LAYOUT": "fastest"})


@given(st.integers(1, 1024), st.dictionaries(
    st.sampled_from([*LAYOUT_VARS, "OMP_NUM_THREADS", "LD_PRELOAD", "HOME"]),
    st.text(max_size=8)))
def test_never_overrides_what_the_environment_has(n, env):
    chosen = cpu_layout(n, env)
    assert not set(chosen) & set(env)
    assert set(chosen) <= set(LAYOUT_VARS)


def test_apply_sets_and_returns_the_choice_in_the_given_environment():
    env = {"HOME": "/root"}
    assert apply_cpu_layout(env, cpu_count=2) == RESERVE_NONE
    assert env == {"HOME": "/root", **RESERVE_NONE}
    assert apply_cpu_layout(env, cpu_count=2) == {}  # now set: left as it is
    user = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}
    assert apply_cpu_layout(user, cpu_count=2) == {}
    assert user == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}
