"""`ttmm demo`'s pure parts (cli/demo.py): its defaults build a small library fast and skip
the tuning grid, a finished library is reused, the prompts go out at once, and what it prints
(stage timings, experts, throughput) reads plainly. The demo itself is not run here."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from training.titles import cluster_titles
from ttmm_vllm.cli import build_parser
from ttmm_vllm.cli.demo import (
    PROMPTS,
    Batch,
    demo_config,
    demo_corpus,
    format_result,
    library_is_current,
    send_batch,
    stage_summary,
    throughput_summary,
)
from ttmm_vllm.library import MANIFEST
from ttmm_vllm.stubs import pb2


def _args(*argv: str):
    return build_parser().parse_args(["demo", *argv])


def _config(tmp_path: Path, *argv: str):
    return demo_config(tmp_path, tmp_path / "base", tmp_path / "embedder",
                       tmp_path / "corpora" / "wiki-demo-1000.jsonl", _args(*argv))


def test_defaults_build_a_small_library_for_serving(tmp_path):
    cfg = _config(tmp_path)
    # about 18k training tokens at most: a minute or so of LoRA training on 2 CPU cores
    assert cfg.k * cfg.max_docs_per_expert * cfg.max_tokens <= 20_000
    assert _args().limit <= 1500 and cfg.limit is None  # the corpus is the demo's sample
    assert not cfg.tune and cfg.test_docs == 0 and not cfg.heatmap
    assert cfg.routing_candidates == ("sentence-transformers",)
    assert cfg.out == tmp_path / "libraries" / f"demo-wiki-k{cfg.k}"
    assert _config(tmp_path, "-K", "4").out.name == "demo-wiki-k4"


def test_the_sample_spreads_over_the_corpus_and_is_written_once(tmp_path):
    wiki = tmp_path / "wiki.jsonl"
    wiki.write_text("".join(json.dumps({"id": f"{i:03}", "text": "t"}) + "\n"
                            for i in range(100)))
    sample = demo_corpus(wiki, 10)
    assert sample == tmp_path / "wiki-demo-10.jsonl"
    ids = [json.loads(line)["id"] for line in sample.read_text().splitlines()]
    assert ids == [f"{i:03}" for i in range(0, 100, 10)]
    wiki.write_text("")  # the sample is kept: the build's cache key names its path
    assert demo_corpus(wiki, 10).read_text() == sample.read_text()
    small = tmp_path / "small.jsonl"
    small.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert demo_corpus(small, 1000).read_text() == small.read_text()  # fewer: all of them
    with pytest.raises(ValueError, match="--limit"):
        demo_corpus(wiki, 0)


def test_a_finished_library_with_the_same_settings_is_reused(tmp_path):
    cfg = _config(tmp_path)
    assert not library_is_current(cfg)  # nothing there
    cfg.out.mkdir(parents=True)
    (cfg.out / MANIFEST).write_text(json.dumps({"extras": {"build": cfg.to_json()}}))
    assert library_is_current(cfg)
    assert library_is_current(_config(tmp_path))  # the same settings next time
    assert not library_is_current(_config(tmp_path, "--docs-per-expert", "12"))
    (cfg.out / MANIFEST).write_text("{not json")
    assert not library_is_current(cfg)


def test_stage_summary_is_one_line_per_build():
    timings = {"documents": {"seconds": 3.21, "cached": False},
               "embeddings": {"seconds": 41.7, "cached": True},
               "train": {"seconds": 70.4, "cached": False, "trained": 6, "skipped": 0},
               "train: experts": {"seconds": 69.0, "cached": False},
               "titles": {"seconds": 0.12, "cached": False},
               "this run (wall)": {"seconds": 121.9, "cached": False}}
    assert stage_summary(timings) == ("documents 3.2 s, embeddings 42 s (cached), train 70 s "
                                      "(6 trained), titles 0.1 s; total 122 s")


def test_the_batch_goes_out_at_once_and_comes_back_in_prompt_order():
    class FakeClient:
        def __init__(self, n: int):
            self.in_flight, self.most, self.all_sent = 0, 0, asyncio.Event()
            self.n, self.options = n, []

        async def generate(self, prompt, **options):
            self.options.append(options)
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            if self.most == self.n:
                self.all_sent.set()
            await asyncio.wait_for(self.all_sent.wait(), 5)  # every prompt is in flight
            await asyncio.sleep((len(prompt) % 3) * 0.01)  # finish out of order
            self.in_flight -= 1
            return SimpleNamespace(text=prompt.upper(), completion_tokens=len(prompt))

    client = FakeClient(len(PROMPTS))
    batch = asyncio.run(send_batch(client, PROMPTS, mode="base", max_tokens=8))
    assert client.most == len(PROMPTS)
    assert [r.text for r in batch.responses] == [p.upper() for p in PROMPTS]
    assert client.options == [{"mode": "base", "max_tokens": 8}] * len(PROMPTS)
    assert batch.tokens == sum(len(p) for p in PROMPTS) and batch.seconds > 0


def test_throughput_summary_gives_both_rates_and_their_ratio():
    def batch(tokens: list[int], seconds: float) -> Batch:
        return Batch([SimpleNamespace(completion_tokens=t) for t in tokens], seconds)

    text = throughput_summary(batch([40, 40, 40], 6.0), batch([40, 40, 40], 4.0))
    assert "120 tokens in 6.0 s = 20.0 tokens/s" in text
    assert "120 tokens in 4.0 s = 30.0 tokens/s" in text
    assert text.endswith("routed / base throughput: 0.67")
    assert throughput_summary(batch([1], 1.0), batch([0], 1.0)).endswith("nan")


def _response(text: str, experts: list[tuple[int, float, str]]) -> pb2.GenerateResponse:
    r = pb2.GenerateResponse(text=text, completion_tokens=5)
    for i, w, title in experts:
        r.routing.experts.add(expert_id=i, weight=w, similarity=0.5, title=title)
    r.timings.embed_ms, r.timings.merge_ms, r.timings.generate_ms = 4.0, 20.0, 1500.0
    return r


def test_a_result_names_its_experts_heaviest_first_without_escape_codes():
    routed = _response(" in 1789 the king", [(2, 0.25, "Hoist: lifting"),
                                              (0, 0.75, "Storming of the Bastille, Louis XVI: "
                                                        "king, revolution, france")])
    base = _response(" the people", [])
    text = format_result(1, "The French Revolution", routed, base)
    assert "\033" not in text
    lines = text.splitlines()
    assert lines[0] == "[1] The French Revolution"
    assert lines[2].split() == ["0.75", "#0", "Storming", "of", "the", "Bastille,", "Louis",
                                "XVI:", "king,", "revolution,", "france"]
    assert lines[3].split()[:2] == ["0.25", "#2"]
    assert "ttmm: ... in 1789 the king" in text and "base: ... the people" in text
    assert "\033[1m" in format_result(1, "p", routed, base, bold=True)


def test_titles_lead_with_the_central_documents():
    texts = ["the crane lifts the load and the hoist lifts the crate",
             "blood flows through the heart and the vessels carry blood"]
    titles = cluster_titles(texts, [["Crane (machine)", "Forklift", "Hoist"], []])
    assert titles[0].startswith("Crane (machine), Forklift, Hoist: ")
    assert "crane" in titles[0].split(": ")[1] and ": " not in titles[1]
    # long article titles are dropped (or the first cut) to keep the title short
    long = cluster_titles(texts, [["A" * 300, "B"], ["C" * 30, "D" * 30]], max_chars=60)
    assert all(len(t) <= 60 for t in long) and long[0].startswith("AAA")
    assert long[1].startswith("C" * 30 + ": ")
