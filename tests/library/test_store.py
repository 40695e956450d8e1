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
