import json
import shutil

import pytest

from ttmm_vllm.library import Library, LibraryError


def test_tiny_library_opens_and_validates(tiny_library, tiny_model_dir):
    lib = Library.open(tiny_library, base_model_dir=tiny_model_dir)
    assert lib.num_experts == 4
    assert lib.centroids.shape == (4, lib.manifest.embedder.dim)
    w = lib.read_expert(0, verify_checksum=True)
    assert w.rank == 4 and w.scaling == 2.0
    assert len(w.modules) == 2 * 7


def _copy(src, tmp_path):
    dst = tmp_path / "lib"
    shutil.copytree(src, dst)
    return dst


def test_corrupted_expert_is_refused(tiny_library, tmp_path):
    lib = _copy(tiny_library, tmp_path)
    f = lib / "experts/0002/adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(LibraryError, match="expert 2 .*checksum mismatch"):
        Library.open(lib)


def test_missing_expert_is_refused(tiny_library, tmp_path):
    lib = _copy(tiny_library, tmp_path)
    shutil.rmtree(lib / "experts/0001")
    with pytest.raises(LibraryError, match="expert 1 .*missing"):
        Library.open(lib)


def test_unknown_format_version_is_refused(tiny_library, tmp_path):
    lib = _copy(tiny_library, tmp_path)
    m = json.loads((lib / "manifest.json").read_text())
    m["format_version"] = 99
    (lib / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(LibraryError, match="unknown library format version 99"):
        Library.open(lib)


def test_mismatched_base_model_is_refused(tiny_library, tmp_path, tiny_model_dir):
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-3
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LibraryError, match="is not the model this library was built on"):
        Library.open(tiny_library, base_model_dir=other)


def test_mismatched_embedder_is_refused(tiny_library):
    with pytest.raises(LibraryError, match="embedder dimension 384"):
        Library.open(tiny_library, embedder_dim=384)


def test_paths_cannot_escape_the_library(tiny_library):
    lib = Library.open(tiny_library)
    with pytest.raises(LibraryError, match="escapes"):
        lib.resolve("../../etc/passwd")


# ----------------------------------------------------------------------------- issue 17:
# metadata and tensors validated on open and on add, ids bounded, messages path-free


def _edit_manifest(lib, **changes):
    m = json.loads((lib / "manifest.json").read_text())
    for k, v in changes.items():
        m["experts"][1][k] = v
    (lib / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("field,value,message", [
    ("size", -1, "size must be an integer >= 0"),
    ("rank", 0, r"rank must be an integer in \[1, 512\]"),
    ("rank", 1024, r"rank must be an integer in \[1, 512\]"),
    ("title", "t" * 1000, "title must be a string of at most 256"),
    ("group", "a b/../c", "group must be"),
    ("group", "", "group must be"),
    ("alpha", float("inf"), "alpha must be a finite number"),
])
def test_out_of_range_metadata_is_refused_on_open(tiny_library, tmp_path, field, value,
                                                  message):
    lib = _copy(tiny_library, tmp_path)
    _edit_manifest(lib, **{field: value})
    with pytest.raises(LibraryError, match=f"expert 1: {message}"):
        Library.open(lib)


def test_huge_expert_id_is_refused_on_open(tiny_library, tmp_path):
    lib = _copy(tiny_library, tmp_path)
    _edit_manifest(lib, id=4_000_000_000)
    with pytest.raises(LibraryError, match=r"id must be an integer in \[0, 1000000\)"):
        Library.open(lib)


def _rewrite_expert(lib_dir, expert_id, edit, *, fix_checksum=True):
    """Change an expert's tensors in place (edit(name, tensor) -> tensor)."""
    from safetensors.torch import load_file, save_file

    from ttmm_vllm.library import sha256_file

    f = lib_dir / f"experts/{expert_id:04d}/adapter_model.safetensors"
    tensors = {k: edit(k, v.clone()) for k, v in load_file(str(f)).items()}
    save_file(tensors, str(f))
    if fix_checksum:
        m = json.loads((lib_dir / "manifest.json").read_text())
        for e in m["experts"]:
            if e["id"] == expert_id:
                e["sha256"] = sha256_file(f)
        (lib_dir / "manifest.json").write_text(json.dumps(m))


def _inf_in_b(name, t):
    if ".lora_B." in name:
        t.view(-1)[0] = float("inf")
    return t


def test_expert_with_inf_is_refused_on_open(tiny_library, tmp_path):
    lib = _copy(tiny_library, tmp_path)
    _rewrite_expert(lib, 2, _inf_in_b)
    with pytest.raises(LibraryError, match="expert 2: tensor .*lora_B.* NaN or infinite"):
        Library.open(lib)


def test_expert_with_wrong_rank_or_dtype_is_refused_on_open(tiny_library, tmp_path):
    import torch

    lib = _copy(tiny_library, tmp_path)
    _rewrite_expert(lib, 3, lambda n, t: t[:2] if ".lora_A." in n else t)
    with pytest.raises(LibraryError, match=r"expert 3: module .* expected A \[4, in\]"):
        Library.open(lib, verify_checksums=False)  # the header check is cheap: always on
    lib2 = _copy(tiny_library, tmp_path / "b")
    _rewrite_expert(lib2, 3, lambda n, t: (t * 100).to(torch.int32))
    with pytest.raises(LibraryError, match="expert 3: module .* dtype I32"):
        Library.open(lib2)


def test_expert_with_foreign_module_shapes_is_refused_on_open(tiny_library, tmp_path):
    import torch

    lib = _copy(tiny_library, tmp_path)
    _rewrite_expert(lib, 1, lambda n, t: torch.cat([t, t], 0) if ".lora_B." in n else t)
    with pytest.raises(LibraryError, match="expert 1: module .* the library's experts map"):
        Library.open(lib)


def _pending(lib_dir, expert_id, *, meta=None, edit=None):
    """Place expert 0's adapter as a pending expert `expert_id` (ttmm-expert.json beside)."""
    import numpy as np

    from ttmm_vllm.library import PENDING_EXPERT, expert_dirname

    lib = Library.open(lib_dir)
    d = lib_dir / expert_dirname(expert_id)
    shutil.copytree(lib_dir / "experts/0000", d)
    if edit is not None:
        _rewrite_expert(lib_dir, expert_id, edit, fix_checksum=False)
    centroid = np.zeros(lib.manifest.embedder.dim, np.float32)
    centroid[0] = 1.0
    (d / PENDING_EXPERT).write_text(json.dumps(
        {"title": "new", "size": 3, "group": "g", "centroid": centroid.tolist(),
         **(meta or {})}))
    return Library.open(lib_dir)


def test_pending_expert_is_validated_before_anything_serves_it(tiny_library, tmp_path):
    lib_dir = _copy(tiny_library, tmp_path)
    lib = _pending(lib_dir, 4, edit=_inf_in_b)
    with pytest.raises(LibraryError, match="expert 4: tensor .* NaN or infinite"):
        lib.pending_expert(4)
    shutil.rmtree(lib_dir / "experts/0004")
    lib = _pending(lib_dir, 4, meta={"size": -5})
    with pytest.raises(LibraryError, match="expert 4: size must be an integer >= 0"):
        lib.pending_expert(4)
    shutil.rmtree(lib_dir / "experts/0004")
    lib = _pending(lib_dir, 4, meta={"group": "x" * 100})
    with pytest.raises(LibraryError, match="expert 4: group must be"):
        lib.pending_expert(4)
    shutil.rmtree(lib_dir / "experts/0004")
    lib = _pending(lib_dir, 4)
    with pytest.raises(LibraryError, match="rank 4 exceeds the engine's max_lora_rank 1"):
        lib.pending_expert(4, max_rank=1)
    info, centroid = lib.pending_expert(4, max_rank=8)
    assert info.rank == 4 and info.group == "g" and info.size == 3


def test_huge_pending_expert_id_does_not_grow_the_centroid_table(tiny_library, tmp_path):
    lib = Library.open(_copy(tiny_library, tmp_path))
    rows = lib.centroids.shape[0]
    for bad in (4_000_000_000, 1_000_000, -1):
        with pytest.raises(LibraryError, match=r"expert id must be in \[0, 1000000\)"):
            lib.pending_expert(bad)
    assert lib.centroids.shape[0] == rows


def test_library_messages_name_files_relative_to_the_library(tiny_library, tmp_path):
    lib_dir = _copy(tiny_library, tmp_path)
    lib = Library.open(lib_dir)
    f = lib_dir / "experts/0001/adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(LibraryError) as e:
        lib.check_expert(lib.manifest.expert(1))
    assert "experts/0001/adapter_model.safetensors" in str(e.value)
    assert str(lib_dir) not in str(e.value) and str(tmp_path) not in str(e.value)
    f.unlink()
    for call in (lambda: lib.check_expert(lib.manifest.expert(1)), lambda: lib.read_expert(1)):
        with pytest.raises(LibraryError) as e:
            call()
        assert str(tmp_path) not in str(e.value), e.value


def test_snapshot_and_restore_undo_a_live_change(tiny_library, tmp_path):
    lib_dir = _copy(tiny_library, tmp_path)
    lib = _pending(lib_dir, 4)
    snap = lib.snapshot()
    info, centroid = lib.pending_expert(4)
    lib.commit_added(info, centroid)
    assert 4 in {e.id for e in Library.open(lib_dir).manifest.active_experts}
    lib.restore(snap)
    reopened = Library.open(lib_dir)
    assert {e.id for e in reopened.manifest.experts} == {0, 1, 2, 3}
    assert reopened.centroids.shape[0] == 4
