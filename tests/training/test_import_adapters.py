"""Bring your own adapters (training/import_adapters.py, `ttmm library`, `ttmm expert`).

Three LoRA adapters are trained separately with PEFT on the tiny model (music, space and
cooking documents of the synthetic corpus; different ranks and target modules) and saved by
PEFT itself, as a user's adapters would be. A library is made from them with their training
documents as samples, and:

- held-out documents of each topic route to their own adapter (the library's Router), and
  `tune` reports that accuracy and writes tuned defaults;
- the same adapters, placed in the session server's library with `--pending` and added live
  through the admin RPC on a second front door of the session's service (no second vLLM
  engine), are served with the new library's routing, and the served tokens equal
  transformers + PEFT (`ttmm_vllm.testing.Reference` on the new library) with the same merged
  weights; afterwards the session library is put back as it was;
- every refusal happens, with its message, and leaves the library as it was.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from training.import_adapters import (
    AdapterRefused,
    create_library,
    import_adapter,
    inspect_adapter,
    read_samples,
    tune_library,
    validate_library,
)
from ttmm_vllm.cli import main
from ttmm_vllm.library import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CENTROIDS,
    MANIFEST,
    Library,
    LibraryError,
    expert_dirname,
)

# topic -> (rank, alpha, target modules): ranks and modules differ between adapters
ADAPTERS = {
    "music": (4, 8.0, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                       "down_proj")),
    "space": (2, 4.0, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "cooking": (4, 4.0, ("gate_proj", "up_proj", "down_proj")),
}
TRAIN_DOCS = 16  # per topic; the rest of the topic's documents are held out
ADMIN = "byo-admin"
USER = "tok-byo"


def train_peft_adapter(model_dir: Path, texts: list[str], out: Path, *, rank: int,
                       alpha: float, targets: tuple[str, ...], seed: int) -> Path:
    """Train with the build's trainer (training/experts.py: train_adapter), then save with
    PEFT's own save_pretrained: a folder as any PEFT user has one."""
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from training.experts import ExpertJob, TrainSettings, train_adapter

    settings = TrainSettings(rank=rank, alpha=alpha, target_modules=targets, lr=2e-2,
                             batch_size=4, epochs=3, max_tokens=128, threads=1,
                             progress=False)
    trained = train_adapter(ExpertJob(name=out.name, expert_id=-1, base_model=str(model_dir),
                                      base_fingerprint="", texts=tuple(texts),
                                      settings=settings, seed=seed, out_dir=str(out)))
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha,
                                            target_modules=list(targets), lora_dropout=0.0,
                                            bias="none", task_type="CAUSAL_LM"))
    state = {}
    for mod, (a, b) in trained.modules.items():
        state[f"base_model.model.{mod}.lora_A.weight"] = a
        state[f"base_model.model.{mod}.lora_B.weight"] = b
    set_peft_model_state_dict(model, state)
    model.save_pretrained(str(out))
    assert (out / ADAPTER_WEIGHTS).exists() and (out / ADAPTER_CONFIG).exists()
    return out


@pytest.fixture(scope="module")
def topics(corpus) -> dict[str, dict[str, list[str]]]:
    """topic -> {"train": documents the adapter learns (its samples), "held": the rest}."""
    out = {}
    for t in ADAPTERS:
        docs = [d["text"] for d in corpus if d["topic"] == t]
        out[t] = {"train": docs[:TRAIN_DOCS], "held": docs[TRAIN_DOCS:]}
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir, topics) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("byo-adapters")
    return {t: train_peft_adapter(tiny_model_dir, topics[t]["train"], root / t, rank=r,
                                  alpha=a, targets=m, seed=i)
            for i, (t, (r, a, m)) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def samples(tmp_path_factory, topics) -> dict[str, Path]:
    """Each adapter's training documents as a sample file: JSONL for one, plain text (one
    document per paragraph) for the others."""
    root = tmp_path_factory.mktemp("byo-samples")
    out = {}
    for i, (t, parts) in enumerate(topics.items()):
        if i == 0:
            path = root / f"{t}.jsonl"
            path.write_text("".join(json.dumps({"text": x}) + "\n" for x in parts["train"]))
        else:
            path = root / f"{t}.txt"
            # a paragraph over two lines, and extra blank lines: still one document each
            path.write_text("\n\n\n".join(x.replace(" the ", "\nthe ", 1)
                                          for x in parts["train"]) + "\n")
        assert read_samples(path) == parts["train"]
        out[t] = path
    return out


@pytest.fixture(scope="module")
def byo_library(tmp_path_factory, tiny_model_dir, tiny_embedder_dir, adapters, samples):
    """The library made with the CLI, as a user would: create, then one import per adapter."""
    out = tmp_path_factory.mktemp("byo") / "lib"
    assert main(["library", "create", "--base-model", str(tiny_model_dir), "--embedder",
                 str(tiny_embedder_dir), "--out", str(out)]) == 0
    for t, path in adapters.items():
        assert main(["library", "import", str(out), str(path), "--samples", str(samples[t]),
                     "--title", t, "--group", "byo"]) == 0
    return out


# --------------------------------------------------------------------------- the library


def test_create_makes_an_empty_library_that_serving_refuses(tmp_path, tiny_model_dir,
                                                             tiny_embedder_dir):
    lib = create_library(tmp_path / "empty", tiny_model_dir, tiny_embedder_dir)
    assert lib.num_experts == 0 and lib.centroids.shape == (0, lib.manifest.embedder.dim)
    Library.open(lib.root, allow_empty=True)
    with pytest.raises(LibraryError, match="has no experts: nothing to route to.*"
                                           "ttmm library import"):
        Library.open(lib.root)
    problems, _ = validate_library(lib.root)
    assert problems == ["no experts: nothing to route to (add adapters with "
                        "`ttmm library import`)"]
    with pytest.raises(LibraryError, match="already a library"):
        create_library(lib.root, tiny_model_dir, tiny_embedder_dir)


def test_imported_library_is_valid_with_each_adapters_rank(byo_library, adapters, capsys):
    lib = Library.open(byo_library)
    m = lib.manifest
    assert [(e.id, e.title, e.rank, e.alpha, e.group, e.size) for e in m.experts] == [
        (i, t, r, a, "byo", TRAIN_DOCS) for i, (t, (r, a, _)) in enumerate(ADAPTERS.items())]
    assert set(m.lora.target_modules) == {x for _, _, mods in ADAPTERS.values() for x in mods}
    assert m.lora.rank == 4
    for e in m.experts:  # the adapter's own files, byte for byte
        src = adapters[e.title]
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            assert (lib.expert_dir(e.id) / name).read_bytes() == (src / name).read_bytes()
    assert np.allclose(np.linalg.norm(lib.centroids, axis=1), 1, atol=1e-5)
    assert main(["library", "validate", str(byo_library)]) == 0
    assert "OK: 3 experts (ranks 2, 4)" in capsys.readouterr().out


def test_held_out_documents_route_to_their_own_adapter(byo_library, topics, tiny_model_dir,
                                                       tiny_embedder_dir):
    from transformers import AutoTokenizer

    from ttmm_vllm.routing.embed import SentenceEmbedder, query_text
    from ttmm_vllm.routing.router import CentroidIndex, Mode, Router, RoutingParams

    lib = Library.open(byo_library)
    titles = lib.titles()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    emb = SentenceEmbedder(tiny_embedder_dir)
    router = Router(CentroidIndex(lib.centroids), RoutingParams(mode=Mode.TOP1))
    qt = lib.manifest.router.query_tokens
    for t, parts in topics.items():
        for doc in parts["held"]:
            r = router.route(emb.embed([query_text(tok, doc, qt)])[0])
            assert titles[r.expert_ids[0]] == t, doc[:60]


def test_tune_reports_routing_accuracy_and_writes_defaults(byo_library, topics, tmp_path,
                                                           capsys):
    lib_dir = tmp_path / "lib"
    shutil.copytree(byo_library, lib_dir)
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"expert": t, "text": x}) + "\n"
                            for t, parts in topics.items() for x in parts["held"]))
    report_file = tmp_path / "report.json"
    assert main(["library", "tune", str(lib_dir), "--samples", str(held), "--betas", "0.05",
                 "0.3", "10", "--taus", "0", "0.01", "--json", str(report_file)]) == 0
    out = capsys.readouterr().out
    assert "routing accuracy: pass@1 1.000  pass@3 1.000" in out, out
    assert "written to the manifest" in out
    report = json.loads(report_file.read_text())
    assert report["samples"] == sum(len(p["held"]) for p in topics.values())
    assert report["grid_points"] == 2 * 2 * 3 * 2  # variants x max_active (1, 3) x betas x taus
    m = Library.open(lib_dir).manifest
    assert (m.router.beta, m.router.tau, m.router.max_active, m.router.sparse_softmax) == (
        report["beta"], report["tau"], report["max_active"], report["variant"])
    assert m.extras["tune"]["pass_at"] == {"1": 1.0, "3": 1.0}
    # the trained adapters help on their own topics' held-out text
    assert report["perplexity"] < report["base_perplexity"]
    # per-expert files (EXPERT=FILE, by id or title) give the same samples; a dry run
    files = []
    for i, (t, parts) in enumerate(topics.items()):
        f = tmp_path / f"{t}-held.txt"
        f.write_text("\n\n".join(parts["held"]))
        files += ["--samples", f"{i if i else t}={f}"]
    r = tune_library(Library.open(lib_dir), {0: topics["music"]["held"],
                                             2: topics["cooking"]["held"]},
                     betas=(0.05,), taus=(0.0,), write=False)
    assert r.experts == {0: len(topics["music"]["held"]), 1: 0,
                         2: len(topics["cooking"]["held"])} and not r.written
    assert main(["library", "tune", str(lib_dir), *files, "--betas", "0.05", "--taus", "0",
                 "--dry-run"]) == 0
    assert "pass@1 1.000" in capsys.readouterr().out


# --------------------------------------------------------------------------- refusals


def _variant(src: Path, dest: Path, *, config: dict | None = None,
             drop_weights: bool = False) -> Path:
    shutil.copytree(src, dest)
    if config is not None:
        cfg = json.loads((dest / ADAPTER_CONFIG).read_text())
        cfg.update(config)
        (dest / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    if drop_weights:
        import torch
        from safetensors.torch import load_file

        torch.save(load_file(str(dest / ADAPTER_WEIGHTS)), dest / "adapter_model.bin")
        (dest / ADAPTER_WEIGHTS).unlink()
    return dest


def _rewrite_tensors(path: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    save_file(fn(load_file(str(path / ADAPTER_WEIGHTS))), str(path / ADAPTER_WEIGHTS))


def _other_base_adapter(out: Path) -> Path:
    """A PEFT adapter of a Llama with hidden size 96 (the tiny one has 64), same names."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=96, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.peft_config["default"].base_model_name_or_path = "someone/llama-96"
    model.save_pretrained(str(out))
    return out


def test_refusals_name_their_reason_and_leave_the_library_alone(byo_library, adapters,
                                                                samples, tmp_path):
    music = adapters["music"]
    lib_dir = tmp_path / "lib"
    shutil.copytree(byo_library, lib_dir)
    before = {p: (lib_dir / p).read_bytes() for p in (MANIFEST, CENTROIDS)}
    texts = read_samples(samples["music"])

    def dora_weights(t):
        t = dict(t)
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = \
            t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"][:, 0].clone()
        return t

    def unknown_module(t):  # a layer the 2-layer base does not have
        return {k.replace("layers.1.", "layers.7."): v for k, v in t.items()}

    dora_w = _variant(music, tmp_path / "dora-w")
    _rewrite_tensors(dora_w, dora_weights)
    unknown = _variant(music, tmp_path / "unknown")
    _rewrite_tensors(unknown, unknown_module)
    base = Library.open(lib_dir).manifest.base_model.name
    cases = {  # what the message says -> the adapter
        ("DoRA (use_dora)",): _variant(music, tmp_path / "dora", config={"use_dora": True}),
        ("DoRA weights", "lora_magnitude_vector"): dora_w,
        ("no adapter_model.safetensors (found adapter_model.bin)", "only safetensors"):
            _variant(music, tmp_path / "bin", drop_weights=True),
        ("made for another base model: model.layers.0.self_attn.q_proj maps 96 -> 96 in the "
         f"adapter, 64 -> 64 in the base model {base}", "'someone/llama-96'"):
            _other_base_adapter(tmp_path / "other-base"),
        (f"adapts modules the base model {base} does not have: model.layers.7.mlp.down_proj",):
            unknown,
        ("peft_type 'IA3' is not LORA",): _variant(music, tmp_path / "ia3",
                                                   config={"peft_type": "IA3"}),
        ("fan_in_fan_out",): _variant(music, tmp_path / "fifo",
                                      config={"fan_in_fan_out": True}),
        ("modules_to_save",): _variant(music, tmp_path / "mts",
                                       config={"modules_to_save": ["lm_head"]}),
        ("module model.layers.0.mlp.down_proj has A [4, 128] and B [64, 4]; expected "
         "A [8, in]",): _variant(music, tmp_path / "rank", config={"r": 8}),
    }
    for says, path in cases.items():
        with pytest.raises(AdapterRefused) as e:
            import_adapter(lib_dir, path, samples=texts)
        assert str(e.value).startswith(f"adapter {path}: refused: ")
        assert all(x in str(e.value) for x in says), (says, str(e.value))
        assert {p: (lib_dir / p).read_bytes() for p in before} == before
        assert not (lib_dir / expert_dirname(3)).exists()
    # the CLI says it in one line, with exit 1
    assert main(["library", "import", str(lib_dir), str(tmp_path / "dora")]) == 1
    # rsLoRA is accepted: only the scaling differs
    rs = import_adapter(lib_dir, _variant(music, tmp_path / "rslora",
                                          config={"use_rslora": True}), samples=texts)
    assert rs.adapter.rslora and rs.adapter.scaling == pytest.approx(8.0 / 2.0)
    assert Library.open(lib_dir).read_expert(rs.info.id).scaling == pytest.approx(4.0)
    # an adapter's pieces, checked alone (no base shapes: the header checks only)
    assert inspect_adapter(music).rank == 4


def test_cli_user_mistakes_are_one_line(byo_library, tmp_path, capsys):
    cases = [
        ["library", "import", str(tmp_path / "nowhere"), str(tmp_path)],
        ["library", "import", str(byo_library), str(tmp_path / "no-adapter")],
        ["library", "validate", str(tmp_path)],
        ["library", "tune", str(byo_library), "--samples", "nobody=x.txt"],
        ["library", "create", "--base-model", str(tmp_path), "--embedder", str(tmp_path),
         "--out", str(tmp_path / "new")],
    ]
    for argv in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) in (1, 2) and "Traceback" not in "".join(err), (argv, err)


def test_validate_lists_every_problem(byo_library, tmp_path, capsys):
    lib_dir = tmp_path / "lib"
    shutil.copytree(byo_library, lib_dir)
    w = lib_dir / expert_dirname(1) / ADAPTER_WEIGHTS  # corrupted: one byte flipped
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    m = json.loads((lib_dir / MANIFEST).read_text())
    m["experts"][2]["rank"] = 8  # a rank that is not the tensors'
    m["base_model"]["fingerprint"] = "0" * 16  # built on another model
    (lib_dir / MANIFEST).write_text(json.dumps(m))
    problems, _ = validate_library(lib_dir)
    assert len(problems) == 3, problems
    assert main(["library", "validate", str(lib_dir)]) == 1
    err = capsys.readouterr().err
    assert "3 problems" in err
    assert "checksum mismatch" in err and "is not the model this library was built on" in err
    assert "expert 2: module" in err and "declared rank 8" in err


# --------------------------------------------------------------------------- served


@pytest.fixture(scope="module")
def byo_door(loop, server):
    """A second front door on the session's service: admin and a client of group "byo"."""
    from ttmm_vllm.serve.grpc_server import Server, ServerConfig

    cfg = ServerConfig(port=0, tokens={USER: "byo-user"}, admin_tokens=frozenset({ADMIN}),
                       client_groups={"byo-user": ("byo",)}, health_probe_s=0)
    door = loop.run(Server.start(server.service, cfg, own_service=False))
    yield f"127.0.0.1:{door.port}"
    loop.run(door.stop(grace=1))


@pytest.fixture
def served_byo(server, byo_door, tiny_library, adapters, samples, capsys):
    """The three adapters imported into the session server's library with --pending and added
    live with `ttmm expert add`; removed and the library put back afterwards."""
    library = server.service.library
    snapshot = library.snapshot()
    ids = []
    try:
        for t, path in adapters.items():
            assert main(["library", "import", str(tiny_library), str(path), "--samples",
                         str(samples[t]), "--title", t, "--group", "byo", "--pending"]) == 0
            eid = int(capsys.readouterr().out.split("serve it: ttmm expert add ")[1].split()[0])
            assert main(["expert", "add", str(eid), "--target", byo_door, "--token",
                         ADMIN]) == 0
            assert f"serving expert {eid} '{t}'" in capsys.readouterr().out
            ids.append(eid)
        yield dict(zip(adapters, ids, strict=True))
    finally:
        for eid in ids:
            main(["expert", "remove", str(eid), "--target", byo_door, "--token", ADMIN])
        library.restore(snapshot)
        for eid in ids:
            shutil.rmtree(Path(tiny_library) / expert_dirname(eid), ignore_errors=True)


def test_served_output_equals_peft_with_the_same_merged_weights(
        server, served_byo, byo_door, byo_library, topics, tiny_model_dir, tiny_embedder_dir,
        capsys):
    from ttmm_vllm.client import TTMMClient
    from ttmm_vllm.routing.embed import SentenceEmbedder, query_text
    from ttmm_vllm.routing.router import CentroidIndex, Router, RoutingParams
    from ttmm_vllm.testing import Reference

    new = Library.open(byo_library)
    by_title = {e.title: e.id for e in new.manifest.experts}
    to_new = {served_byo[t]: by_title[t] for t in served_byo}
    session = server.service.library.manifest
    for t, sid in served_byo.items():  # the same adapter bytes in both libraries
        assert session.expert(sid).sha256 == new.manifest.expert(by_title[t]).sha256
    ref = Reference(tiny_model_dir, new)
    emb = SentenceEmbedder(tiny_embedder_dir)
    router = Router(CentroidIndex(new.centroids), RoutingParams())
    assert main(["expert", "list", "--target", byo_door, "--token", USER]) == 0
    listed = capsys.readouterr().out
    assert "3 experts" in listed and all(t in listed for t in ADAPTERS)
    moved = 0
    with TTMMClient(byo_door, token=USER) as c:
        c.wait_ready(30)
        qt = c.list_experts().query_tokens
        for t, parts in topics.items():
            for doc in parts["held"][:2]:
                prompt = " ".join(doc.split()[:12])
                params = dict(beta=0.3, tau=0.0, max_active=3)
                resp = c.generate(prompt, max_tokens=8, timeout=120, **params)
                got = [(to_new[e.expert_id], e.weight) for e in resp.routing.experts]
                # the new library's routing, computed here: the same experts and weights
                q = emb.embed([query_text(ref.tokenizer, prompt, qt)])[0]
                want = router.route(q, RoutingParams(**params)).canonical()
                assert [i for i, _ in got] == list(want.expert_ids), prompt
                np.testing.assert_allclose([w for _, w in got], want.weights, atol=1e-5)
                top = max(got, key=lambda x: x[1])[0]
                assert new.titles()[top] == t  # the topic's own adapter weighs most
                ids = ref.tokenizer(prompt, add_special_tokens=False)["input_ids"]
                expected = ref.greedy(ids, 8, [i for i, _ in got], [w for _, w in got])
                assert list(resp.token_ids) == expected, (prompt, got)
                moved += expected != ref.greedy(ids, 8)
    assert moved >= 2, "the merged adapters do not change the greedy tokens: a vacuous check"


def test_expert_cli_refusals_are_one_line(byo_door, capsys):
    assert main(["expert", "add", "999", "--target", byo_door, "--token", ADMIN]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ttmm expert add: INVALID_ARGUMENT: ")
    assert main(["expert", "remove", "1", "--target", byo_door, "--token", USER]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main(["expert", "list", "--target", "127.0.0.1:1", "--timeout", "5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("cannot reach 127.0.0.1:1" in err[0] or "DEADLINE" in err[0])


def test_libraries_built_by_ttmm_validate_and_take_imports_unless_their_a_is_shared(
        tmp_path, tiny_model_dir, tiny_embedder_dir, corpus, adapters, samples):
    from ttmm_vllm import testing as tiny

    texts = read_samples(samples["music"])
    for shared in (False, True):
        lib = tiny.build_random_library(tmp_path / f"shared-{shared}", tiny_model_dir,
                                        tiny_embedder_dir, docs=corpus, shared_a=shared)
        assert validate_library(lib)[0] == []
        if shared:
            with pytest.raises(AdapterRefused, match="share one lora_A per module"):
                import_adapter(lib, adapters["music"], samples=texts)
        else:
            done = import_adapter(lib, adapters["music"], samples=texts, title="music 2")
            assert done.info.id == 4 and done.nearest[1] == "music"
            assert validate_library(lib)[0] == []
