"""Perplexity of a base model, alone or with weighted LoRA adapters, on document suffixes.

The tuning and the report score each holdout document's suffix (the tokens after the query
prefix) under the model merged for that document. `AdapterMixer` adds

    x (sum_k w_k s_k B_k A_k)^T  =  ((x A*^T) * c) B*^T,   A* = [A_1; ...], c = [w_k s_k]_r

to every adapted projection through forward hooks: the same linear map as the dense merge
`W + merge.dense_delta(...)` (checked against it in the tests), but with a weight row per
document, so a batch may mix documents routed differently and nothing dense is built per
document. `merged_state` is the dense reference, for `torch.func.functional_call`.

Benchmarks reuse `load_model`, `AdapterMixer` and `suffix_nll`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ttmm_vllm.library import ExpertWeights
from ttmm_vllm.merge import apply_delta, dense_delta


def load_model(model_dir: str | Path):
    """(model, tokenizer), float32, eval mode, no gradients."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


class AdapterMixer:
    """LoRA adapters resident beside a base model, mixed per batch row by weights.

    `set_weights(w)` with w of shape (batch, n_adapters) turns the mix on for the next forward
    passes; `set_weights(None)` gives the base model back. Per module the adapters' factors
    are stacked once (A* rows, B* columns); a weight setting keeps only the ranks of adapters
    with a non-zero weight in the batch, so a batch routed to three experts costs three.
    """

    def __init__(self, model, adapters: Sequence[ExpertWeights]):
        import torch

        if not adapters:
            raise ValueError("AdapterMixer needs at least one adapter")
        self.n = len(adapters)
        self._hooks = []
        # module -> (A* (R, in), B* (out, R), owner (R,) adapter index, scale (R,) alpha / r)
        self._stacked: dict[str, tuple[torch.Tensor, ...]] = {}
        self._active: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        for name in sorted({m for a in adapters for m in a.modules}):
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"adapter module {name!r} is not in the model") from None
            parts = [(k, a.modules[name], a.scaling) for k, a in enumerate(adapters)
                     if name in a.modules]
            a_star = torch.cat([ab[0].float() for _, ab, _ in parts])
            b_star = torch.cat([ab[1].float() for _, ab, _ in parts], dim=1)
            owner = torch.cat([torch.full((ab[0].shape[0],), k) for k, ab, _ in parts])
            scale = torch.cat([torch.full((ab[0].shape[0],), s) for _, ab, s in parts])
            self._stacked[name] = (a_star, b_star, owner, scale)
            self._hooks.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if self._active is None:
                return None
            a, b, c = self._active[name]
            if a.shape[0] == 0:
                return None
            x = inputs[0]  # (batch, tokens, in)
            h = (x @ a.T) * c[:, None, :]  # (batch, tokens, R_active)
            return output + h @ b.T  # (batch, tokens, out)

        return hook

    def set_weights(self, weights: np.ndarray | None) -> None:
        import torch

        if weights is None:
            self._active = None
            return
        w = torch.as_tensor(np.asarray(weights, dtype=np.float32))
        if w.ndim != 2 or w.shape[1] != self.n:
            raise ValueError(f"weights must have shape (batch, {self.n}), got {tuple(w.shape)}")
        used = (w != 0).any(0)  # (n,)
        active = {}
        for name, (a, b, owner, scale) in self._stacked.items():
            keep = used[owner]
            active[name] = (a[keep], b[:, keep], w[:, owner[keep]] * scale[keep])
        self._active = active

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def merged_state(model, adapters: Sequence[ExpertWeights], weights: Sequence[float]) -> dict:
    """The adapted weights merged densely (base + sum w_k s_k B_k A_k), for
    `torch.func.functional_call` (which takes the model's own tensors for every other key)."""
    delta = dense_delta(adapters, weights)
    state = model.state_dict()
    merged = apply_delta(state, delta)
    return {f"{name}.weight": merged[f"{name}.weight"] for name in delta}


def tokenize(tokenizer, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """No special tokens, first `max_tokens`: the same cut the training used."""
    return [t[:max_tokens] for t in
            tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def suffix_nll(model, tokenizer, texts: Sequence[str], prefix_tokens: int, *,
               max_tokens: int = 1024, batch_size: int = 8, mixer: AdapterMixer | None = None,
               weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Summed negative log-likelihood and token count of each text's tokens after the prefix.

    The first `prefix_tokens` tokens are context only (they chose the merge: scoring them
    would leak). weights: (n_texts, n_adapters) for `mixer`, one row per text; None = base.
    A text no longer than the prefix scores 0 tokens.
    """
    import torch

    if weights is not None and mixer is None:
        raise ValueError("weights need a mixer")
    if weights is not None and len(weights) != len(texts):
        raise ValueError(f"{len(weights)} weight rows for {len(texts)} texts")
    ids = tokenize(tokenizer, texts, max_tokens)
    nll = np.zeros(len(texts))
    count = np.zeros(len(texts), dtype=np.int64)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths together
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = [i for i in order[start:start + batch_size]
                        if len(ids[i]) > prefix_tokens]
                if not rows:
                    continue
                width = max(len(ids[i]) for i in rows)
                x = torch.full((len(rows), width), pad, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for j, i in enumerate(rows):
                    x[j, :len(ids[i])] = torch.tensor(ids[i])
                    mask[j, :len(ids[i])] = 1
                if mixer is not None:
                    mixer.set_weights(None if weights is None else weights[rows])
                logits = model(input_ids=x, attention_mask=mask).logits[:, :-1]
                target = x[:, 1:]
                scored = mask[:, 1:].clone()
                scored[:, : max(prefix_tokens - 1, 0)] = 0  # predicts tokens < prefix_tokens
                lp = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                    reduction="none").view(target.shape)
                nll[rows] = (lp * scored).sum(1).double().numpy()
                count[rows] = scored.sum(1).numpy()
    finally:
        if mixer is not None:
            mixer.set_weights(None)
    return nll, count


def perplexity(nll: np.ndarray, count: np.ndarray) -> float:
    """Token-level perplexity over a set of documents: exp(sum nll / sum tokens)."""
    total = int(np.sum(count))
    return float(np.exp(np.sum(nll) / total)) if total else float("nan")


class ScoreCache:
    """Suffix NLLs of fixed texts under many weightings, each (text, weight row) scored once.

    Tuning grids, the TTMM 1/3/10 rows and the expert x cluster heat map ask for many
    weightings that coincide per document (sharp temperatures and max_active 1 all give the
    top expert alone; the heat map's one-hot rows include every document's own and top
    expert), so rows are keyed by their weights rounded to `decimals` and only new ones run.
    """

    def __init__(self, model, tokenizer, texts: Sequence[str], prefix_tokens: int, *,
                 mixer: AdapterMixer | None = None, max_tokens: int = 1024,
                 batch_size: int = 8, decimals: int = 4):
        self.model, self.tokenizer, self.mixer = model, tokenizer, mixer
        self.texts = list(texts)
        self.prefix_tokens = prefix_tokens
        self.max_tokens, self.batch_size, self.decimals = max_tokens, batch_size, decimals
        self._done: dict[tuple[int, tuple], tuple[float, int]] = {}
        self.passes = 0  # documents actually scored (for the log)

    def score(self, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(nll, tokens) per text; weights (n_texts, n_adapters) for the mixer, None = the
        model alone. A row of weights wider than the mixer's adapters is an error."""
        n = len(self.texts)
        if weights is None:
            keys = [("base",)] * n
        else:
            weights = np.asarray(weights, dtype=np.float64)
            if weights.shape[0] != n:
                raise ValueError(f"{weights.shape[0]} weight rows for {n} texts")
            keys = [tuple(np.round(row, self.decimals).tolist()) for row in weights]
        todo = [i for i in range(n) if (i, keys[i]) not in self._done]
        if todo:
            nll, cnt = suffix_nll(
                self.model, self.tokenizer, [self.texts[i] for i in todo], self.prefix_tokens,
                max_tokens=self.max_tokens, batch_size=self.batch_size,
                mixer=self.mixer if weights is not None else None,
                weights=None if weights is None else weights[todo])
            for j, i in enumerate(todo):
                self._done[(i, keys[i])] = (float(nll[j]), int(cnt[j]))
            self.passes += len(todo)
        nll = np.array([self._done[(i, keys[i])][0] for i in range(n)])
        cnt = np.array([self._done[(i, keys[i])][1] for i in range(n)], dtype=np.int64)
        return nll, cnt
