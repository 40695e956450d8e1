"""ExpertCache on shared-A libraries: whole first reads checked against the library's A,
B-only re-reads, and an LRU that counts only what each expert holds alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ttmm_vllm.library import Library, LibraryError
from ttmm_vllm.library.adapter_io import read_adapter, write_adapter
from ttmm_vllm.library.expert_cache import ExpertCache
from ttmm_vllm.merge import merge_experts
from ttmm_vllm.testing import write_random_library


def _library(tmp_path, model_dir, shared: bool) -> Library:
    cent = np.random.default_rng(0).normal(size=(3, 8))
    root = write_random_library(tmp_path / "lib", model_dir, cent, rank=4, seed=1,
                                shared_a=shared)
    return Library.open(root)


def _recording(lib: Library) -> list[tuple[int, bool]]:
    """Record each read as (expert id, B only?) on this library object."""
    calls = []
    read = lib.read_expert

    def spy(expert_id, verify_checksum=False, shared_a=None):
        calls.append((expert_id, shared_a is not None))
        return read(expert_id, verify_checksum=verify_checksum, shared_a=shared_a)

    lib.read_expert = spy
    return calls


def _b_bytes(w) -> int:
    return sum(b.numel() * b.element_size() for _, b in w.modules.values())


def test_shared_a_rereads_only_b_and_merges_the_same(tmp_path, tiny_model_dir):
    lib = _library(tmp_path, tiny_model_dir, shared=True)
    fresh = [Library.open(lib.root).read_expert(i) for i in range(3)]
    one = _b_bytes(fresh[0])
    cache = ExpertCache(lib, max_bytes=one)  # room for one expert's B's
    calls = _recording(lib)
    first = cache.get(0)
    cache.get(1)  # evicts 0
    again = cache.get(0)
    assert calls == [(0, False), (1, False), (0, True)]  # whole, whole, then B only
    assert cache.nbytes == one  # A's belong to the library, not to an expert
    for name, (a, b) in again.modules.items():
        assert a is first.modules[name][0]  # one A tensor per module
        assert torch.equal(a, fresh[0].modules[name][0])
        assert torch.equal(b, fresh[0].modules[name][1])
    ws = [0.5, 0.3, 0.2]
    got = merge_experts([again, cache.get(1), cache.get(2)], ws, shared_a=True)
    want = merge_experts(fresh, ws, shared_a=True)
    for name, (a, b) in want.modules.items():
        assert torch.equal(got.modules[name][0], a) and torch.equal(got.modules[name][1], b)


def test_a_shared_a_library_refuses_an_expert_with_its_own_a(tmp_path, tiny_model_dir):
    lib = _library(tmp_path, tiny_model_dir, shared=True)
    folder = lib.resolve(lib.manifest.expert(1).file)
    w = read_adapter(folder, 1)
    name = sorted(w.modules)[0]
    modules = dict(w.modules)
    modules[name] = (w.modules[name][0] + 1.0, w.modules[name][1])
    write_adapter(folder, modules, rank=w.rank, alpha=w.scaling * w.rank)
    cache = ExpertCache(lib, verify_checksums=False)  # the file changed: skip its checksum
    cache.get(0)
    with pytest.raises(LibraryError, match=f"expert 1: module {name} has a different A"):
        cache.get(1)
    assert cache.get(2).expert_id == 2  # the others still serve


def test_a_dropped_expert_is_read_whole_again(tmp_path, tiny_model_dir):
    lib = _library(tmp_path, tiny_model_dir, shared=True)
    cache = ExpertCache(lib, max_bytes=1)  # keeps only the latest expert
    calls = _recording(lib)
    cache.get(0)
    cache.get(1)
    cache.drop(0)  # replaced on disk: its A must be checked again
    cache.get(0)
    assert calls == [(0, False), (1, False), (0, False)]


def test_ordinary_libraries_always_read_whole_experts(tmp_path, tiny_model_dir):
    lib = _library(tmp_path, tiny_model_dir, shared=False)
    cache = ExpertCache(lib, max_bytes=1)
    calls = _recording(lib)
    for i in (0, 1, 0):
        w = cache.get(i)
    assert calls == [(0, False), (1, False), (0, False)]
    assert cache.nbytes == w.nbytes
