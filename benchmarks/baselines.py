"""Reference implementations (transformers + PEFT) of what the product does not serve:
the multitask fine-tuned adapter, ensembling of experts, and test-time training (TTT).

The product serves the base model and merged experts; these rows exist to compare against.
They reuse train time's code (`training/evaluate.py` for suffix perplexity and the per-row
adapter mix, `training/experts.py` for LoRA training), so the baselines are trained and scored
exactly as the experts are. The base row is scored here too and compared with the product's
`Score`, which checks that both paths agree.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import BenchLibrary, TestDoc


class Reference:
    """The base model in transformers with every expert (and the multitask adapter) resident
    beside it, mixed per batch row (`training.evaluate.AdapterMixer`)."""

    def __init__(self, bench: BenchLibrary, batch_size: int = 8):
        from training.evaluate import AdapterMixer, load_model
        from ttmm_vllm.library import read_adapter

        self.bench = bench
        self.batch_size = batch_size
        self.model, self.tokenizer = load_model(bench.model_dir)
        experts = [bench.library.read_expert(e.id) for e in bench.manifest.active_experts]
        self.position = {e.expert_id: j for j, e in enumerate(experts)}
        adapters = list(experts)
        mt = bench.manifest.extras.get("multitask")
        self.multitask = None
        if mt:
            self.multitask = len(adapters)
            adapters.append(read_adapter(bench.library.resolve(mt["file"])))
        self.mixer = AdapterMixer(self.model, adapters)

    def close(self) -> None:
        self.mixer.remove()

    def weights(self, routings: Sequence[tuple[Sequence[int], Sequence[float]]]) -> np.ndarray:
        """(docs, adapters) mix weights from (expert ids, weights) per document."""
        w = np.zeros((len(routings), self.mixer.n))
        for i, (ids, ws) in enumerate(routings):
            for e, x in zip(ids, ws, strict=True):
                w[i, self.position[e]] = x
        return w

    def nll(self, docs: Sequence[TestDoc], prefix: int, weights: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
        """Summed suffix NLL and suffix tokens per document (base model when weights is None)."""
        from training.evaluate import suffix_nll

        return suffix_nll(self.model, self.tokenizer, [d.text for d in docs], prefix,
                          max_tokens=self.bench.max_tokens, batch_size=self.batch_size,
                          mixer=self.mixer if weights is not None else None, weights=weights)

    def multitask_nll(self, docs: Sequence[TestDoc], prefix: int):
        if self.multitask is None:
            raise ValueError("the library has no multitask adapter (build with --multitask)")
        w = np.zeros((len(docs), self.mixer.n))
        w[:, self.multitask] = 1.0
        return self.nll(docs, prefix, w)

    def ensemble_nll(self, doc: TestDoc, prefix: int, ids: Sequence[int],
                     weights: Sequence[float], chunk: int = 5) -> tuple[float, int]:
        """Ensembling: p(x_t) = sum_k w_k p_k(x_t | x_<t), one forward pass per expert.

        Only each expert's probability of the actual next token is needed, so the mixture is a
        log-sum-exp over experts of (log w_k + log p_k(x_t)); `chunk` experts share a batch.
        """
        import torch

        x = torch.tensor([list(doc.ids)])
        target = x[0, 1:]
        lps = []
        with torch.inference_mode():
            for s in range(0, len(ids), chunk):
                part = ids[s:s + chunk]
                w = np.zeros((len(part), self.mixer.n))
                for j, e in enumerate(part):
                    w[j, self.position[e]] = 1.0
                self.mixer.set_weights(w)
                try:
                    logits = self.model(input_ids=x.expand(len(part), -1)).logits[:, :-1]
                finally:
                    self.mixer.set_weights(None)
                lp = torch.log_softmax(logits.float(), -1)  # (experts, T-1, vocab)
                lps.append(lp.gather(-1, target.expand(len(part), -1)[..., None])[..., 0])
        lp = torch.cat(lps).double()  # (experts, T-1): log p_k(x_{t+1})
        logw = torch.log(torch.tensor(list(weights), dtype=torch.float64))[:, None]
        mixed = torch.logsumexp(logw + lp, 0)[prefix - 1:]  # tokens >= prefix
        return float(-mixed.sum()), int(mixed.numel())

    def adapter_nll(self, doc: TestDoc, prefix: int, adapter) -> tuple[float, int]:
        """Suffix NLL under one extra adapter (a TTT adapter), hooked in for this call."""
        from training.evaluate import AdapterMixer, suffix_nll

        mixer = AdapterMixer(self.model, [adapter])
        try:
            nll, cnt = suffix_nll(self.model, self.tokenizer, [doc.text], prefix,
                                  max_tokens=self.bench.max_tokens, mixer=mixer,
                                  weights=np.ones((1, 1)))
        finally:
            mixer.remove()
        return float(nll[0]), int(cnt[0])


@dataclass
class TTTStep:
    """One prompt's test-time training: what it retrieved and what it cost."""

    neighbours: list[int]  # training-document rows, nearest first
    retrieve_ms: float
    train_s: float  # wall time of train_adapter (model load + N steps)
    adapter: object  # ttmm_vllm.library.ExpertWeights


class TTT:
    """Test-time training (Hardt & Sun, 2024), the paper's baseline (Appendix E).

    For a prompt: embed it with the library's embedder, retrieve its N nearest training
    documents (hnswlib, inner product over the build's cached document embeddings; only the
    documents the experts and the multitask adapter trained on, so every method sees the same
    data), and take one gradient step on each, nearest first (batch size 1), on a fresh LoRA of
    the experts' rank with the experts' optimiser settings and lr 5e-4.
    """

    def __init__(self, bench: BenchLibrary, neighbours: int, lr: float = 5e-4, seed: int = 0):
        import hnswlib

        from training.documents import read_jsonl
        from ttmm_vllm.routing.embed import SentenceEmbedder

        self.bench, self.n, self.lr, self.seed = bench, neighbours, lr, seed
        work = self._work_dir()
        docs = read_jsonl(work / "documents.jsonl")
        emb = np.load(work / "embeddings.npy")
        extras = bench.manifest.extras
        split = np.load(bench.root / extras.get("split", "split.npy"))
        ids_file = bench.root / extras.get("document_ids", "document_ids.txt")
        listed = ids_file.read_text().splitlines()  # one id per line; ids may hold spaces
        if not (len(docs) == len(emb) == len(split) == len(listed)) or \
                [d["id"] for d in docs] != listed:
            raise ValueError(f"{work}: cached documents/embeddings do not match the library's "
                             "document list (rebuilt since?)")
        train = np.flatnonzero(split == 0)
        self.texts = [docs[i]["text"] for i in train]
        self.index = hnswlib.Index(space="ip", dim=emb.shape[1])
        self.index.init_index(max_elements=len(train), ef_construction=200, M=16)
        self.index.add_items(emb[train].astype(np.float32), np.arange(len(train)))
        self.index.set_ef(max(200, neighbours))
        self.embedder = SentenceEmbedder(bench.embedder_path)
        if self.embedder.dim != emb.shape[1]:
            raise ValueError(f"embedder {bench.embedder_path} has dimension "
                             f"{self.embedder.dim}, the cached embeddings {emb.shape[1]}")

    def _work_dir(self) -> Path:
        """The build's stage cache (documents.jsonl + embeddings.npy), default LIBRARY/.build."""
        cands = [self.bench.root / ".build"]
        if self.bench.build.get("work_dir"):
            cands.insert(0, Path(self.bench.build["work_dir"]).expanduser())
        for c in cands:
            if (c / "embeddings.npy").exists() and (c / "documents.jsonl").exists():
                return c
        raise FileNotFoundError(
            f"TTT needs the build's cached document embeddings; none of {cands} has "
            "embeddings.npy and documents.jsonl (was the library copied without .build?)")

    def settings(self):
        from training.experts import TrainSettings

        b, lora = self.bench.build, self.bench.manifest.lora
        return TrainSettings(
            rank=lora.rank, alpha=lora.alpha, target_modules=tuple(lora.target_modules),
            lr=self.lr, batch_size=1, weight_decay=float(b.get("weight_decay", 0.01)),
            adam_betas=tuple(b.get("adam_betas", (0.9, 0.999))),
            adam_eps=float(b.get("adam_eps", 1e-8)), epochs=1, max_tokens=self.bench.max_tokens,
            progress=False)

    def retrieve(self, query: str, n: int | None = None) -> list[int]:
        q = self.embedder.embed([query])
        labels, _ = self.index.knn_query(q, k=min(n or self.n, len(self.texts)))
        return [int(i) for i in labels[0]]  # nearest first

    def train(self, query: str, n: int | None = None, seed: int = 0) -> TTTStep:
        from training.experts import ExpertJob, train_adapter
        from ttmm_vllm.library import ExpertWeights

        t0 = time.perf_counter()
        rows = self.retrieve(query, n)
        retrieve_ms = (time.perf_counter() - t0) * 1e3
        s = self.settings()
        job = ExpertJob(name="ttt", expert_id=-1, base_model=str(self.bench.model_dir),
                        base_fingerprint="", texts=tuple(self.texts[i] for i in rows),
                        settings=s, seed=self.seed + seed, out_dir="")
        t1 = time.perf_counter()
        trained = train_adapter(job)
        train_s = time.perf_counter() - t1
        adapter = ExpertWeights(-1, trained.modules, s.alpha / s.rank, s.rank)
        return TTTStep(rows, retrieve_ms, train_s, adapter)


def ttt_cost(ttt: TTT, queries: Sequence[str]) -> dict[str, float]:
    """TTT's per-prompt overhead, measured: retrieval, and the N gradient steps without the
    model load (a TTT server would keep the base model loaded; only the LoRA is fresh).

    `train_adapter` loads the model each call, so each prompt is trained twice, on its 1 and
    on its N nearest documents: one step costs (t_N - t_1) / (N - 1), and N steps N times it.
    """
    retrieve, step, with_load = [], [], []
    for i, q in enumerate(queries):
        one = ttt.train(q, n=1, seed=i)
        full = ttt.train(q, seed=i)
        n = len(full.neighbours)
        retrieve.append(full.retrieve_ms)
        per_step = (full.train_s - one.train_s) / (n - 1) if n > 1 else full.train_s
        step.append(max(per_step, 0.0) * 1e3)
        with_load.append(full.retrieve_ms / 1e3 + full.train_s)
    n = ttt.n
    return {"neighbours": n, "prompts": len(queries),
            "retrieve_ms": float(np.median(retrieve)), "step_ms": float(np.median(step)),
            "steps_s": float(np.median(step)) * n / 1e3,
            "overhead_s": float(np.median(retrieve)) / 1e3 + float(np.median(step)) * n / 1e3,
            "with_model_load_s": float(np.median(with_load)),
            # the paper's N = 100, from the measured step time (steps cost about the same)
            "overhead_100_steps_s": float(np.median(retrieve)) / 1e3
            + float(np.median(step)) * 100 / 1e3}
