"""An lm-eval-harness task over a library's test documents, so `lm_eval` measures perplexity
through the OpenAI door with no hub access.

lm-eval's own perplexity tasks (wikitext, ...) download their data from the Hugging Face hub.
This writes the library's held-out test documents (never tuned on: `BenchLibrary.
test_documents`) as a JSONL file and a task YAML beside it (`loglikelihood_rolling`: the whole
document is scored, as lm-eval's wikitext task does), which `lm_eval --include_path` reads:

    python -m benchmarks.lm_eval_task --library ~/.cache/ttmm/libraries/demo-wiki-k6
    lm_eval --model local-completions --include_path results/lm_eval --tasks ttmm_holdout \\
        --model_args model=ttmm,base_url=http://127.0.0.1:8000/v1/completions,...

(`pip install -e '.[eval]'` installs lm-eval.) Each request's merge is routed on the text it
scores, as the gRPC `Score` RPC does; `model=base` gives the base model in the same run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import BenchLibrary, log

TASK = "ttmm_holdout"


def task_yaml(data_file: Path, task: str = TASK) -> str:
    """lm-eval's task config: the documents as one test split, each scored whole."""
    return "\n".join([
        f"task: {task}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data_file.resolve()))}",
        "test_split: test",
        "output_type: loglikelihood_rolling",
        'doc_to_text: ""',
        'doc_to_target: "{{text}}"',
        "metric_list:",
        "  - metric: word_perplexity",
        "  - metric: byte_perplexity",
        "  - metric: bits_per_byte",
        "metadata:",
        "  version: 1.0",
        "",
    ])


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lm_eval_task", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--library", required=True, help="a library built by `ttmm build`")
    p.add_argument("--n", type=int, default=128, help="test documents (at most)")
    p.add_argument("--out", default="results/lm_eval", help="folder for the task and data")
    args = p.parse_args(argv)
    bench = BenchLibrary.open(args.library)
    docs = bench.test_documents(args.n, prefix_tokens=0, min_suffix=8)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps({"id": d.id, "text": bench.tokenizer.decode(d.ids)})
                            + "\n" for d in docs))
    (out / f"{TASK}.yaml").write_text(task_yaml(data))
    log(f"{len(docs)} test documents of {bench.root.name} -> {data}; task {TASK} in {out}")
    return out


if __name__ == "__main__":
    main()
