"""Bring your own adapters: a library from existing PEFT LoRA folders, without `ttmm build`.

    create_library(out, base_model, embedder)    an empty library for a base model + embedder
    inspect_adapter(folder, base_shapes)         what a PEFT folder holds, or why it is refused
    import_adapter(library, folder, samples)     copy it in as a new expert; its centroid is the
                                                 re-normalised mean embedding of sample texts
    tune_library(library, samples_by_expert)     router defaults from held-out samples
    validate_library(library)                    every problem of a library, listed

An imported expert is what a built one is: a PEFT folder under `experts/NNNN` (the adapter's
own config and safetensors, copied byte for byte), a manifest entry (its own rank and alpha:
ranks may differ) and a centroid row. With `pending=True` the folder also gets the
`ttmm-expert.json` an AddExpert RPC reads, and the manifest is left alone: that is how an
adapter joins a library a server is serving (`ttmm expert add ID`).

What is refused, each with a message that names the reason: an adapter for another base model
(its modules' shapes against the base model's own linear layers, from the base's config;
`base_model_name_or_path` is only a hint), modules the base does not have, DoRA, weights not in
safetensors, a PEFT type other than LoRA, fan_in_fan_out (Conv1D models), and the LoRA variants
a weighted sum of B A cannot express (trained biases or extra modules, per-module ranks, ...).
rsLoRA is accepted: only its scaling differs (alpha / sqrt(r)).

Tuning (`tune_library`) reuses the build's grid (training/tune.py: `tune`): each held-out
sample's first `query_tokens` tokens are routed, the rest is scored under the merge they route
to, and the grid point (variant, max_active, beta, tau) with the lowest perplexity wins. Routing
accuracy (pass@1, pass@3: is the sample's own adapter among the top k centroids) is measured on
the same prefixes and reported; it does not depend on beta or tau.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ttmm_vllm.library import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CENTROIDS,
    MANIFEST,
    PENDING_EXPERT,
    EmbedderRef,
    ExpertInfo,
    Library,
    LibraryError,
    LoraSpec,
    Manifest,
    ModelRef,
    RouterDefaults,
    atomic_write_json,
    expert_dirname,
    model_fingerprint,
    sha256_file,
    write_library,
)
from ttmm_vllm.library.format import LibraryLimits, check_expert_info

log = logging.getLogger(__name__)

_PEFT_PREFIX = "base_model.model."
_FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
# Weight files that are not safetensors (pickles: loading one can run code)
_PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Modules a ttmm engine never wraps with LoRA (vLLM-CPU's logits LoRA; embeddings)
_UNSERVED = ("lm_head", "embed_tokens", "wte", "wpe", "embed_out")


class AdapterRefused(LibraryError):
    """An adapter that cannot join a library; the message names the adapter and the reason."""


# --------------------------------------------------------------------------- inputs


def resolve_folder(spec: str | os.PathLike, what: str = "adapter") -> Path:
    """A local folder, or a Hugging Face id downloaded (or found in the cache) by
    huggingface_hub. Offline (HF_HUB_OFFLINE=1, the ttmm default) only the cache answers."""
    p = Path(spec).expanduser()
    if p.is_dir():
        return p.resolve()
    if p.exists():
        raise AdapterRefused(f"{what} {spec}: not a folder")
    text = str(spec)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise AdapterRefused(f"{what} {spec}: no such folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=[
            "*.json", "*.safetensors", "*.bin", "*.txt", "*.model"]))
    except Exception as e:  # noqa: BLE001 - any hub failure is one line for the user
        raise AdapterRefused(
            f"{what} {spec}: no such folder, and the Hugging Face hub did not give it "
            f"({type(e).__name__}; set HF_HUB_OFFLINE=0 to download)") from None


def read_samples(path: str | os.PathLike) -> list[str]:
    """Sample documents: JSONL ({"text": ...} per line) or plain text (one document per
    paragraph: blank lines separate them)."""
    path = Path(path).expanduser()
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LibraryError(f"samples {path}: cannot read ({type(e).__name__}: {e})") from None
    first = next((line for line in raw.splitlines() if line.strip()), "")
    if path.suffix == ".jsonl" or first.lstrip().startswith("{"):
        texts = [r["text"] for r in _jsonl(path, raw, ("text",))]
    else:
        paragraphs = [" ".join(line.strip() for line in block.splitlines())
                      for block in _blocks(raw)]
        texts = [t for t in paragraphs if t]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise LibraryError(f"samples {path}: no documents")
    return texts


def read_labelled_samples(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(expert, text) pairs from a JSONL file of {"expert": id or title, "text": ...}."""
    path = Path(path).expanduser()
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LibraryError(f"samples {path}: cannot read ({type(e).__name__}: {e})") from None
    return [(str(r["expert"]), r["text"]) for r in _jsonl(path, raw, ("expert", "text"))]


def _jsonl(path: Path, raw: str, keys: Sequence[str]) -> list[dict]:
    rows = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError as e:
            raise LibraryError(f"samples {path}, line {n}: not JSON ({e})") from None
        if not isinstance(r, dict) or any(k not in r for k in keys) \
                or not isinstance(r.get("text"), str):
            raise LibraryError(f"samples {path}, line {n}: expected an object with "
                               + ", ".join(f'"{k}"' for k in keys) + " (text a string)")
        rows.append(r)
    return rows


def _blocks(raw: str) -> list[str]:
    blocks, cur = [], []
    for line in raw.splitlines():
        if line.strip():
            cur.append(line)
        elif cur:
            blocks.append("\n".join(cur))
            cur = []
    if cur:
        blocks.append("\n".join(cur))
    return blocks


# --------------------------------------------------------------------------- the base model


def base_linear_shapes(model_dir: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """Module name -> (in, out) of every linear layer of a model, from its config alone (the
    model is instantiated on the meta device: no weight is read). The names are the model's
    own, as PEFT names adapted modules."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(str(model_dir))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # noqa: BLE001 - an unreadable config is the user's to fix
        raise LibraryError(f"base model {model_dir}: cannot read its config "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return {name: (int(m.in_features), int(m.out_features))
            for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


# --------------------------------------------------------------------------- one adapter


@dataclass(frozen=True)
class AdapterInfo:
    """What an accepted PEFT LoRA folder holds."""

    path: Path
    rank: int
    alpha: float
    scaling: float  # alpha / r, or alpha / sqrt(r) with rsLoRA
    rslora: bool
    modules: dict[str, tuple[int, int]]  # module -> (in, out)
    base_hint: str  # the config's base_model_name_or_path (a hint only)

    @property
    def targets(self) -> tuple[str, ...]:
        """The projection names it adapts (`q_proj`, ...), as a library's LoraSpec lists them."""
        return tuple(sorted({m.rsplit(".", 1)[-1] for m in self.modules}))


# Config keys whose non-empty value makes an adapter something a weighted sum of B A is not
_REFUSED_KEYS = {
    "use_dora": "DoRA (use_dora): its magnitude vectors rescale the merged weight, so DoRA "
                "adapters do not merge exactly; ttmm merges plain LoRA",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers, e.g. GPT-2): ttmm serves LoRA on "
                      "linear layers only",
    "modules_to_save": "modules_to_save: the adapter carries fully trained modules besides "
                       "LoRA, which a weighted merge cannot mix",
    "lora_bias": "lora_bias: a trained bias is not a LoRA factor",
    "rank_pattern": "rank_pattern: per-module ranks are not supported (one r per adapter)",
    "alpha_pattern": "alpha_pattern: per-module alphas are not supported (one lora_alpha "
                     "per adapter)",
    "target_parameters": "target_parameters: LoRA on raw parameters (not linear layers) is "
                         "not supported",
    "trainable_token_indices": "trainable_token_indices: the adapter trains embedding rows",
    "layer_replication": "layer_replication: the adapter changes the model's layer stack",
    "use_qalora": "QA-LoRA (use_qalora): its pooled input is not a plain B A update",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) applies only after "
                               "its invocation tokens",
    "kasa_config": "KaSA (kasa_config) changes the base weights",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not a plain B A update",
    "arrow_config": "Arrow (arrow_config) is a routing of its own, not one adapter",
    "megatron_config": "megatron_config: tensor-parallel layers are not supported",
}
# init_lora_weights values that change the base weights (the adapter is relative to them)
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def _refuse(adapter: Path | str, reason: str) -> AdapterRefused:
    return AdapterRefused(f"adapter {adapter}: refused: {reason}")


def inspect_adapter(adapter_dir: str | os.PathLike,
                    base_shapes: Mapping[str, tuple[int, int]] | None = None, *,
                    base_name: str = "the base model") -> AdapterInfo:
    """Check a PEFT LoRA folder (config first, then the safetensors header: no tensor data is
    read) against a base model's linear layers (`base_linear_shapes`). AdapterRefused names
    the reason."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise _refuse(d, "not a folder")
    cfg_path = d / ADAPTER_CONFIG
    if not cfg_path.exists():
        raise _refuse(d, f"no {ADAPTER_CONFIG}: not a PEFT adapter folder")
    try:
        cfg = json.loads(cfg_path.read_text())
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise _refuse(d, f"{ADAPTER_CONFIG} is not valid JSON ({e})") from None
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise _refuse(d, f"peft_type {cfg.get('peft_type')!r} is not LORA (ttmm merges LoRA "
                         "adapters only)")
    for key, why in _REFUSED_KEYS.items():
        if cfg.get(key):
            raise _refuse(d, why)
    if cfg.get("bias", "none") not in ("none", None):
        raise _refuse(d, f"bias {cfg.get('bias')!r}: trained biases are not LoRA factors "
                         "(train with bias='none')")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise _refuse(d, f"init_lora_weights {init!r} changes the base weights: the adapter "
                         "is relative to that changed model (convert it to a plain LoRA first)")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if type(rank) is not int or rank < 1:
        raise _refuse(d, f"r must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) \
            or not math.isfinite(alpha) or alpha <= 0:
        raise _refuse(d, f"lora_alpha must be a finite number > 0, got {alpha!r}")
    rslora = bool(cfg.get("use_rslora"))
    weights = d / ADAPTER_WEIGHTS
    if not weights.exists():
        pickled = sorted(p.name for p in d.iterdir() if p.suffix in _PICKLED)
        found = f" (found {', '.join(pickled)})" if pickled else ""
        raise _refuse(d, f"no {ADAPTER_WEIGHTS}{found}: only safetensors weights are read "
                         "(a pickled checkpoint can run code when loaded); save it with "
                         "save_pretrained(..., safe_serialization=True)")
    modules = _adapter_modules(d, weights, rank)
    hint = str(cfg.get("base_model_name_or_path") or "")
    said = f" (its config names {hint!r} as its base)" if hint else ""
    unserved = sorted(m for m in modules if m.rsplit(".", 1)[-1] in _UNSERVED)
    if unserved:
        raise _refuse(d, f"adapts {unserved[0]}: ttmm serves LoRA on the transformer's "
                         "projections, not on embeddings or the output head")
    if base_shapes is not None:
        unknown = sorted(m for m in modules if m not in base_shapes)
        if unknown:
            more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
            raise _refuse(d, f"adapts modules {base_name} does not have: "
                             f"{', '.join(unknown[:3])}{more}{said}")
        for m, shape in sorted(modules.items()):
            if shape != base_shapes[m]:
                raise _refuse(d, f"made for another base model: {m} maps {shape[0]} -> "
                                 f"{shape[1]} in the adapter, {base_shapes[m][0]} -> "
                                 f"{base_shapes[m][1]} in {base_name}{said}")
    scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
    return AdapterInfo(d, rank, float(alpha), float(scaling), rslora, modules, hint)


def _adapter_modules(d: Path, weights: Path, rank: int) -> dict[str, tuple[int, int]]:
    """module -> (in, out) from the safetensors header; every tensor a LoRA A or B of rank r."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            header = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape()))
                      for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
    except Exception as e:  # noqa: BLE001 - any unreadable header is a refusal
        raise _refuse(d, f"{ADAPTER_WEIGHTS} is not a readable safetensors file "
                         f"({type(e).__name__})") from None
    pairs: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    for key, (dtype, shape) in header.items():
        name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
        if "lora_magnitude_vector" in name:
            raise _refuse(d, f"DoRA weights ({key}): DoRA adapters do not merge exactly; "
                             "ttmm merges plain LoRA")
        if "lora_embedding_" in name:
            raise _refuse(d, f"LoRA on an embedding layer ({key}): ttmm serves LoRA on "
                             "linear projections only")
        if ".lora_A." in name:
            pairs.setdefault(name.split(".lora_A.")[0], {})["A"] = (dtype, shape)
        elif ".lora_B." in name:
            pairs.setdefault(name.split(".lora_B.")[0], {})["B"] = (dtype, shape)
        else:
            raise _refuse(d, f"unexpected tensor {key!r}: a LoRA adapter holds lora_A and "
                             "lora_B weights only")
    if not pairs:
        raise _refuse(d, f"{ADAPTER_WEIGHTS} holds no LoRA weights")
    modules = {}
    for mod, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise _refuse(d, f"module {mod} lacks lora_A or lora_B")
        (da, sa), (db, sb) = ab["A"], ab["B"]
        if da not in _FLOAT_DTYPES or db not in _FLOAT_DTYPES:
            raise _refuse(d, f"module {mod} has dtype {da}/{db}; expected floats "
                             f"({', '.join(sorted(_FLOAT_DTYPES))})")
        if len(sa) != 2 or len(sb) != 2 or sa[0] != rank or sb[1] != rank:
            raise _refuse(d, f"module {mod} has A {list(sa)} and B {list(sb)}; expected "
                             f"A [{rank}, in] and B [out, {rank}] (r = {rank} in its config)")
        modules[mod] = (int(sa[1]), int(sb[0]))
    return modules


# --------------------------------------------------------------------------- create


def create_library(out: str | os.PathLike, base_model: str | os.PathLike,
                   embedder: str | os.PathLike, *, embedder_kind: str = "sentence-transformers",
                   base_name: str | None = None, embedder_name: str | None = None,
                   router: RouterDefaults | None = None) -> Library:
    """An empty library (no expert yet) for a base model and an embedder. Both are recorded
    by absolute path (serving loads them from there unless told otherwise) and the base by
    fingerprint (a server refuses another model)."""
    from ttmm_vllm.routing.embed import load_embedder

    out = Path(out).expanduser()
    if (out / MANIFEST).exists():
        raise LibraryError(f"{out} is already a library")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LibraryError(f"{out} exists and is not an empty folder")
    base = resolve_folder(base_model, "base model")
    fingerprint = model_fingerprint(base)
    base_linear_shapes(base)  # a config transformers can read, refused here if not
    emb_path = base if embedder_kind == "base-hidden" else resolve_folder(embedder, "embedder")
    try:
        emb = load_embedder(embedder_kind, emb_path, embedder_name)
    except ValueError as e:
        raise LibraryError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - a folder that is not an embedder
        raise LibraryError(f"embedder {embedder}: cannot load it as {embedder_kind} "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    name = embedder_name or (f"base-hidden:{base.name}" if embedder_kind == "base-hidden"
                             else emb_path.name)
    manifest = Manifest(
        base_model=ModelRef(name=base_name or base.name, fingerprint=fingerprint,
                            path=str(base)),
        embedder=EmbedderRef(name=name, dim=int(emb.dim), kind=embedder_kind,
                             path=str(emb_path)),
        lora=LoraSpec(rank=1, alpha=1.0, target_modules=()),
        router=router or RouterDefaults(),
        experts=(),
        extras={"source": "ttmm library create"},
    )
    return write_library(out, manifest, np.zeros((0, int(emb.dim)), np.float32))


# --------------------------------------------------------------------------- import


@dataclass(frozen=True)
class Imported:
    """What `import_adapter` did."""

    info: ExpertInfo
    adapter: AdapterInfo
    samples: int
    pending: bool
    # the nearest other active expert by centroid cosine: (id, title, cosine), or None
    nearest: tuple[int, str, float] | None = None
    title_as_sample: bool = False


def open_for_import(root: str | os.PathLike) -> Library:
    return Library.open(root, verify_checksums=False, allow_empty=True)


def library_base_dir(lib: Library, base_model: str | os.PathLike | None = None) -> Path:
    """The base model folder of a library (or `base_model`), fingerprint-checked."""
    d = Path(base_model).expanduser() if base_model else lib.served_model_dir()
    if not d.is_dir():
        raise LibraryError(f"base model folder {d} not found (pass --base-model)")
    lib.check_base_model(d)
    return d


def next_expert_id(lib: Library) -> int:
    """One past every id the manifest (deleted ones included) or the experts folder uses."""
    used = [e.id for e in lib.manifest.experts]
    folder = lib.root / "experts"
    if folder.is_dir():
        used += [int(p.name) for p in folder.iterdir() if p.name.isdigit()]
    return max(used, default=-1) + 1


def import_adapter(library: str | os.PathLike | Library, adapter: str | os.PathLike, *,
                   samples: Sequence[str] | None = None, title: str | None = None,
                   group: str = "default", expert_id: int | None = None,
                   pending: bool = False, base_model: str | os.PathLike | None = None,
                   embedder_path: str | os.PathLike | None = None, embedder=None,
                   base_shapes: Mapping[str, tuple[int, int]] | None = None) -> Imported:
    """Copy a PEFT LoRA folder into the library as a new expert.

    samples: documents the adapter was trained on or is meant for; its centroid is their
    re-normalised mean embedding (the library's embedder). None: the title alone is embedded
    (a weak centroid: pass samples). pending: write `experts/NNNN/ttmm-expert.json` and leave
    the manifest alone, for a served library (`ttmm expert add NNNN` serves it), validated as
    AddExpert will. Otherwise the manifest and centroid table are updated (files first, the
    manifest last). `embedder`/`base_shapes`: already loaded (several imports in a row).
    """
    from training.centroids import centroids as mean_centroids
    from training.embeddings import embed_texts
    from ttmm_vllm.routing.embed import load_library_embedder

    lib = library if isinstance(library, Library) else open_for_import(library)
    m = lib.manifest
    src = resolve_folder(adapter)
    base_dir = library_base_dir(lib, base_model)
    shapes = base_shapes if base_shapes is not None else base_linear_shapes(base_dir)
    info = inspect_adapter(src, shapes, base_name=f"the base model {m.base_model.name}")
    if info.rank > lib.limits.max_rank:
        raise _refuse(src, f"rank {info.rank} exceeds {lib.limits.max_rank}, the largest "
                           "LoRA rank vLLM serves")
    if m.lora.shared_a:
        _check_shared_a(lib, src)
    title = title if title is not None else src.name
    texts = list(samples or ())
    title_as_sample = not texts
    if title_as_sample:
        if not title.strip():
            raise LibraryError("no samples and no title: nothing to compute the centroid from")
        texts = [title]
    eid = next_expert_id(lib) if expert_id is None else int(expert_id)
    rel = expert_dirname(eid)
    dest = lib.resolve(rel)
    if any(e.id == eid for e in m.experts) or dest.exists():
        raise LibraryError(f"expert id {eid} is taken ({rel} or a manifest entry exists)")
    probe = ExpertInfo(id=eid, title=title, size=len(samples or ()), file=rel, sha256="",
                       rank=info.rank, alpha=info.alpha, group=group)
    check_expert_info(probe, lib.limits)
    if embedder is None:
        embedder = load_library_embedder(m.embedder, embedder_path)
    vecs = embed_texts(embedder, texts, desc="embed samples")
    centroid = mean_centroids(vecs, [np.arange(len(texts))])[0]

    _copy_adapter(src, dest)
    try:
        sha = sha256_file(dest / ADAPTER_WEIGHTS)
        entry = dataclasses.replace(probe, sha256=sha)
        nearest = _nearest(lib, centroid)
        if pending:
            atomic_write_json(dest / PENDING_EXPERT, {
                "title": title, "size": entry.size, "group": group,
                "centroid": [float(x) for x in centroid], "sha256": sha})
            lib.pending_expert(eid)  # what AddExpert will check, checked now
        else:
            _commit(lib, entry, centroid, info)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return Imported(entry, info, len(samples or ()), pending, nearest, title_as_sample)


def _check_shared_a(lib: Library, src: Path) -> None:
    """A shared-A library merges B alone (every expert's A per module is the same): an adapter
    joins only with exactly that A (one trained by `ttmm build --shared-a` on this base)."""
    import torch

    from ttmm_vllm.library import read_adapter

    active = lib.manifest.active_experts
    if not active:
        return
    ref = lib.read_expert(active[0].id)
    new = read_adapter(src)
    for mod, (a, _) in sorted(new.modules.items()):
        want = ref.modules.get(mod)
        if want is None or want[0].shape != a.shape or not torch.equal(want[0], a.to(
                want[0].dtype)):
            raise _refuse(src, f"this library's experts share one lora_A per module "
                               f"(shared_a) and the adapter's {mod} has its own: import it "
                               "into a library without shared A")


def _copy_adapter(src: Path, dest: Path) -> None:
    """The adapter's config and safetensors, byte for byte, into `dest` (a temporary sibling
    renamed into place: a half-copied folder is never an expert)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copyfile(src / name, tmp / name)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _nearest(lib: Library, centroid: np.ndarray) -> tuple[int, str, float] | None:
    active = lib.manifest.active_experts
    if not active:
        return None
    cent = lib.centroids
    sims = [(float(cent[e.id] @ centroid), e) for e in active if e.id < len(cent)]
    if not sims:
        return None
    s, e = max(sims, key=lambda x: x[0])
    return e.id, e.title, s


def _commit(lib: Library, entry: ExpertInfo, centroid: np.ndarray, info: AdapterInfo) -> None:
    """The library's LoRA spec widened to the adapter's modules first (a crash after it leaves
    a harmless wider list), then the centroid row and the manifest entry."""
    m = lib.manifest
    targets = tuple(sorted(set(m.lora.target_modules) | set(info.targets)))
    ranks = [e.rank for e in m.active_experts] + [entry.rank]
    top = max(ranks)
    alpha = entry.alpha if top == entry.rank else m.lora.alpha
    extras = dict(m.extras)
    imported = dict(extras.get("imported") or {})
    imported[str(entry.id)] = {"from": str(info.path), "base_model_name_or_path": info.base_hint,
                               "rslora": info.rslora, "scaling": info.scaling}
    extras["imported"] = imported
    lora = dataclasses.replace(m.lora, rank=top, alpha=float(alpha), target_modules=targets)
    lib.write_manifest(dataclasses.replace(m, lora=lora, extras=extras))
    lib.commit_added(entry, centroid)


# --------------------------------------------------------------------------- tune


@dataclass
class TuneReport:
    """What `tune_library` measured and chose."""

    samples: int
    experts: dict[int, int]  # expert id -> held-out samples
    pass_at: dict[int, float]  # k -> share of samples whose adapter is in the top k
    pass1_by_expert: dict[int, float]
    variant: str
    beta: float
    tau: float
    max_active: int
    perplexity: float  # held-out suffixes under the chosen routing
    base_perplexity: float  # the same suffixes under the base model
    top1_perplexity: float  # ... under the top expert alone
    query_tokens: int
    grid_points: int
    written: bool = False
    criterion: str = ("lowest perplexity of each sample's text after its first query_tokens "
                      "tokens, under the merge those tokens route to (training/tune.py)")
    grid: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pass_at"] = {str(k): v for k, v in self.pass_at.items()}
        d["experts"] = {str(k): v for k, v in self.experts.items()}
        d["pass1_by_expert"] = {str(k): v for k, v in self.pass1_by_expert.items()}
        return d


def resolve_expert(lib: Library, key: str | int) -> int:
    """An active expert by id or by (unique) title."""
    active = lib.manifest.active_experts
    text = str(key).strip()
    if text.isdigit() and any(e.id == int(text) for e in active):
        return int(text)
    hits = [e.id for e in active if e.title == text]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise LibraryError(f"expert {text!r}: {len(hits)} experts have that title; use the id")
    raise LibraryError(f"expert {text!r}: no active expert has that id or title")


def tune_library(library: str | os.PathLike | Library,
                 samples: Mapping[int, Sequence[str]], *,
                 base_model: str | os.PathLike | None = None,
                 embedder_path: str | os.PathLike | None = None,
                 betas: Sequence[float] = (0.01, 0.02, 0.05, 0.1, 0.3, 1.0, 10.0),
                 taus: Sequence[float] = (0.0, 0.01, 0.03),
                 variants: Sequence[str] = ("paper", "threshold"),
                 active_counts: Sequence[int] = (1, 3, 10),
                 max_tokens: int = 1024, batch_size: int = 8,
                 write: bool = True) -> TuneReport:
    """Router defaults (variant, beta, tau, max_active) from held-out samples per expert
    (expert id -> texts), by the build's criterion (see the module docstring); pass@1/3 of
    the routing on the same samples. write: store them in the manifest (and the report in
    its extras)."""
    from training.evaluate import AdapterMixer, ScoreCache, load_model, perplexity
    from training.routing import own_rank, pass_at_k
    from training.tune import tune
    from ttmm_vllm.routing.embed import load_library_embedder

    lib = library if isinstance(library, Library) else Library.open(library)
    m = lib.manifest
    ids = sorted(e.id for e in m.active_experts)
    if len(ids) < 2:
        raise LibraryError("tuning needs a library of at least two experts (with one, every "
                           "prompt gets it)")
    unknown = sorted(set(samples) - set(ids))
    if unknown:
        raise LibraryError(f"samples for experts {unknown}, which the library does not serve")
    texts, labels = [], []
    for eid in ids:
        for t in samples.get(eid, ()):
            texts.append(t)
            labels.append(ids.index(eid))
    if not texts:
        raise LibraryError("no held-out samples")
    k = len(ids)
    taus = [t for t in taus if 0 <= t < 1 / k]
    counts = sorted({c for c in active_counts if c <= k} | {min(k, max(active_counts))})
    qt = m.router.query_tokens
    model, tokenizer = load_model(library_base_dir(lib, base_model))
    embedder = load_library_embedder(m.embedder, embedder_path)

    from training.embeddings import embed_texts, prefix_texts

    queries = embed_texts(embedder, prefix_texts(tokenizer, texts, qt), desc="embed prefixes")
    cent = lib.centroids[ids]
    sims = queries @ cent.T
    labels_a = np.asarray(labels)
    acc = pass_at_k(sims, labels_a, (1, 3))
    rank = own_rank(sims, labels_a)
    by_expert = {eid: float(np.mean(rank[labels_a == j] < 1))
                 for j, eid in enumerate(ids) if np.any(labels_a == j)}
    mixer = AdapterMixer(model, [lib.read_expert(i) for i in ids])
    try:
        cache = ScoreCache(model, tokenizer, texts, qt, mixer=mixer, max_tokens=max_tokens,
                           batch_size=batch_size)
        base_nll, base_cnt = cache.score(None)
        if int(base_cnt.sum()) == 0:
            raise LibraryError(f"no held-out sample is longer than the routing prefix "
                               f"({qt} tokens): give longer samples")
        t = tune(cache, sims, betas=betas, taus=taus, variants=variants, max_active=counts)
        onehot = np.zeros((len(texts), k))
        onehot[np.arange(len(texts)), np.argmax(sims, 1)] = 1.0
        top1 = perplexity(*cache.score(onehot))
    finally:
        mixer.remove()
    report = TuneReport(
        samples=len(texts), experts={eid: int(np.sum(labels_a == j)) for j, eid in
                                     enumerate(ids)},
        pass_at={int(a): float(b) for a, b in acc.items()}, pass1_by_expert=by_expert,
        variant=t.variant, beta=t.beta, tau=t.tau, max_active=t.max_active,
        perplexity=t.perplexity, base_perplexity=perplexity(base_nll, base_cnt),
        top1_perplexity=top1, query_tokens=qt, grid_points=len(t.grid),
        grid=[vars(p) for p in t.grid])
    if write:
        router = dataclasses.replace(m.router, beta=t.beta, tau=t.tau,
                                     max_active=t.max_active, sparse_softmax=t.variant)
        extras = dict(m.extras)
        summary = report.to_json()
        summary.pop("grid")
        extras["tune"] = summary
        lib.write_manifest(dataclasses.replace(m, router=router, extras=extras))
        report.written = True
    return report


# --------------------------------------------------------------------------- validate


def validate_library(root: str | os.PathLike, *, base_model: str | os.PathLike | None = None,
                     limits: LibraryLimits | None = None) -> tuple[list[str], dict[str, Any]]:
    """Every problem of a library, for libraries built anywhere: (problems, facts).

    Checked: the manifest; ids and metadata in range; the centroid table (shape, finite,
    unit rows for served experts); each served expert's files, checksum, finite values, its
    tensors' shapes against its declared rank, its config (r and lora_alpha as the manifest
    says; refusals as `inspect_adapter`); the base model's fingerprint and every adapted
    module's shape against the base model's linear layers. An empty problem list: valid."""
    root = Path(root).expanduser()
    problems: list[str] = []
    facts: dict[str, Any] = {}
    if not (root / MANIFEST).exists():
        return [f"{root} is not a ttmm library (no {MANIFEST})"], facts
    try:
        manifest = Manifest.from_json(json.loads((root / MANIFEST).read_text()))
    except (ValueError, LibraryError) as e:
        return [f"{MANIFEST}: {e}"], facts
    lib = Library(root.resolve(), manifest, limits)
    m = manifest
    active = m.active_experts
    facts.update(experts=len(active), deleted=len(m.experts) - len(active),
                 base_model=m.base_model.name, embedder=m.embedder.name)
    ids = [e.id for e in m.experts]
    if len(set(ids)) != len(ids):
        problems.append("the manifest lists an expert id twice")
    if not active:
        problems.append("no experts: nothing to route to (add adapters with "
                        "`ttmm library import`)")
    bad_ids = set()
    for e in m.experts:
        try:
            check_expert_info(e, lib.limits)
        except LibraryError as err:
            problems.append(str(err))
            bad_ids.add(e.id)
    cent = None
    if not (root / CENTROIDS).exists():
        problems.append(f"missing {CENTROIDS}")
    else:
        try:
            cent = lib.centroids
        except (OSError, ValueError) as err:
            problems.append(f"{CENTROIDS} is not readable: {err}")
    if cent is not None:
        if cent.ndim != 2 or cent.shape[1] != m.embedder.dim:
            problems.append(f"{CENTROIDS} has shape {cent.shape}, expected "
                            f"(K, {m.embedder.dim}) for the embedder {m.embedder.name}")
        else:
            for e in active:
                if e.id in bad_ids:
                    continue
                if e.id >= len(cent):
                    problems.append(f"expert {e.id}: no centroid row ({CENTROIDS} has "
                                    f"{len(cent)})")
                    continue
                row = cent[e.id]
                if not np.all(np.isfinite(row)):
                    problems.append(f"expert {e.id}: centroid has NaN or infinite values")
                elif abs(float(np.linalg.norm(row)) - 1) > 1e-3:
                    problems.append(f"expert {e.id}: centroid is not unit-norm "
                                    f"(norm {float(np.linalg.norm(row)):.4f})")
    base_dir = Path(base_model).expanduser() if base_model else None
    if base_dir is None:
        try:
            base_dir = lib.served_model_dir()
        except LibraryError as err:
            problems.append(str(err))
    shapes = None
    if base_dir is not None:
        if not base_dir.is_dir():
            problems.append(f"base model folder {base_dir} not found: cannot check its "
                            "fingerprint or the adapters' shapes (pass --base-model)")
        else:
            try:
                lib.check_base_model(base_dir)
            except LibraryError as err:
                problems.append(str(err))
            try:
                shapes = base_linear_shapes(base_dir)
            except LibraryError as err:
                problems.append(str(err))
    facts["base_model_dir"] = str(base_dir) if base_dir else None
    targets = set(m.lora.target_modules)
    ranks = []
    for e in active:
        if e.id in bad_ids:
            continue
        try:
            lib.check_expert(e, verify_checksum=True)
        except LibraryError as err:
            problems.append(str(err))
            continue
        d = lib.resolve(e.file)
        try:
            info = inspect_adapter(d, shapes, base_name=f"the base model {m.base_model.name}")
        except AdapterRefused as err:
            problems.append(f"expert {e.id} ({e.title!r}): "
                            + str(err).split(": refused: ", 1)[-1])
            continue
        if info.rank != e.rank or not math.isclose(info.alpha, e.alpha, rel_tol=1e-6):
            problems.append(f"expert {e.id} ({e.title!r}): its config says r={info.rank}, "
                            f"lora_alpha={info.alpha:g}; the manifest says rank {e.rank}, "
                            f"alpha {e.alpha:g}")
        outside = sorted(set(info.targets) - targets)
        if outside:
            problems.append(f"expert {e.id} ({e.title!r}): adapts {outside}, which the "
                            f"library's LoRA targets {sorted(targets)} leave out (a server "
                            "would not wrap them)")
        ranks.append(info.rank)
    facts["ranks"] = sorted(set(ranks))
    return problems, facts
