"""Stage 4c (`--branch-from-multitask`): experts branched from the multitask model.

At a small per-expert budget most of what fine-tuning learns is shared by every cluster (the
corpus' style, the quantised base's errors), and an expert trained from the base sees only 1/K
of the steps that would teach it. Branch-Train-Merge's answer: train one model on everything
first, then seed every expert from it. Here the multitask adapter is folded into the base
weights (W + s B A for every adapted projection) and saved as a full checkpoint in the library
(`branched/base`: config, safetensors, tokenizer); each expert is then trained from that
checkpoint on its cluster, exactly as a plain expert is trained from the base. An expert stays
a plain PEFT adapter, of the folded checkpoint; the manifest names that checkpoint (with its
fingerprint) as `serving_base`, and serving merges the experts on top of it unchanged.

A branched library served in base mode (no experts) is the multitask model itself.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ttmm_vllm.library import model_fingerprint, read_adapter

log = logging.getLogger(__name__)

FOLDER = "branched"
BASE = f"{FOLDER}/base"  # the folded checkpoint, library-relative


def expert_dirname(expert_id: int) -> str:
    """Where a branched expert lives in the library (plain ones: `experts/NNNN`)."""
    return f"{FOLDER}/experts/{expert_id:04d}"


def fold_adapter(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike,
                 out_dir: str | os.PathLike) -> str:
    """Write base + the adapter's delta as a model folder at `out_dir`; returns its fingerprint.

    The delta is computed in float32 and the weights are saved in the base's own dtype. The
    folder is written beside its destination and renamed into place, so a killed build leaves
    either nothing or the whole checkpoint; an existing `out_dir` is replaced.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    adapter = read_adapter(adapter_dir)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype="auto")
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        for name, (a, b) in adapter.modules.items():
            try:
                weight = model.get_submodule(name).weight
            except AttributeError:
                raise ValueError(f"the adapter adapts {name!r}, which {base_dir} lacks") from None
            delta = adapter.scaling * (b.float() @ a.float())  # (out, r) @ (r, in)
            weight.copy_((weight.float() + delta).to(dtype))
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    fingerprint = model_fingerprint(out_dir)
    log.info("folded %s into %s (fingerprint %s)", adapter_dir, out_dir, fingerprint)
    return fingerprint
