"""The offline reference: transformers + PEFT running the same merged weights.

PEFT's own exact merge (`add_weighted_adapter(..., combination_type="cat")`, which stacks the
experts' factors with w_k s_k folded in and alpha = rank) is an implementation independent of
ttmm_vllm.merge, so agreement checks both the merge and the serving path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


class Reference:
    def __init__(self, model_dir: Path, library=None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = Path(model_dir)
        self.library = library
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.base = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        self.base.eval()
        self._peft = None
        self._merged: dict[tuple, str] = {}

    def model_for(self, expert_ids: Sequence[int], weights: Sequence[float]):
        """The base model with sum_k w_k s_k B_k A_k applied through PEFT (None: the base)."""
        if not expert_ids:
            if self._peft is not None:
                return _Disabled(self._peft)
            return self.base
        from peft import PeftModel

        names = [f"e{i}" for i in expert_ids]
        if self._peft is None:
            self._peft = PeftModel.from_pretrained(
                self.base, str(self.library.expert_dir(expert_ids[0])), adapter_name=names[0])
        for i, n in zip(expert_ids, names, strict=True):
            if n not in self._peft.peft_config:
                self._peft.load_adapter(str(self.library.expert_dir(i)), adapter_name=n)
        key = tuple(zip(expert_ids, (float(w) for w in weights), strict=True))
        merged = self._merged.setdefault(key, f"merged{len(self._merged)}")
        if merged not in self._peft.peft_config:
            self._peft.add_weighted_adapter(names, [float(w) for w in weights], merged,
                                            combination_type="cat")
        self._peft.set_adapter(merged)
        return self._peft

    @torch.inference_mode()
    def greedy(self, prompt_ids: Sequence[int], max_tokens: int, expert_ids=(), weights=()
               ) -> list[int]:
        model = self.model_for(expert_ids, weights)
        ids = torch.tensor([list(prompt_ids)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_tokens, do_sample=False, min_new_tokens=max_tokens,
                             pad_token_id=self.tokenizer.pad_token_id)
        return out[0, len(prompt_ids):].tolist()

    @torch.inference_mode()
    def logprobs(self, ids: Sequence[int], start: int, expert_ids=(), weights=()) -> list[float]:
        """log p(ids[i] | ids[:i]) for i >= start."""
        model = self.model_for(expert_ids, weights)
        x = torch.tensor([list(ids)])
        logits = model(input_ids=x).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        return [float(lp[i - 1, ids[i]]) for i in range(start, len(ids))]


class _Disabled:
    """The PEFT model with adapters disabled: the base model."""

    def __init__(self, peft):
        self.peft = peft

    def generate(self, **kw):
        with self.peft.disable_adapter():
            return self.peft.generate(**kw)

    def __call__(self, **kw):
        with self.peft.disable_adapter():
            return self.peft(**kw)
