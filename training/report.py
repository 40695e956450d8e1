"""The build report: `report.json` (everything), `report.md` (the tables a person reads) and
`tuning.png` (holdout perplexity against beta, one line per variant and tau)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ttmm_vllm.library import atomic_write_bytes, atomic_write_json

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
TUNING_PLOT = "tuning.png"


def _f(x: Any, digits: int = 2) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) and x == x else "-"


def markdown(r: dict[str, Any]) -> str:
    lines = ["# Library build report", ""]
    lines += ["## Stages", "", "| stage | seconds | cached |", "| --- | --- | --- |"]
    for name, t in r["timings"].items():
        lines.append(f"| {name} | {_f(t.get('seconds'), 1)} | {'yes' if t.get('cached') else ''} |")
    lines += ["", f"{r['documents']} documents; cluster sizes {r['cluster_sizes']}.", ""]
    lines += ["## Experts", "",
              "| id | title | train docs | holdout | tokens | loss first -> last | seconds |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for e in r["experts"]:
        lines.append(f"| {e['id']} | {e['title']} | {e['documents']} | {e['holdout']} | "
                     f"{e.get('tokens', '-')} | {_f(e.get('loss_first'), 3)} -> "
                     f"{_f(e.get('loss_last'), 3)} | {_f(e.get('seconds'), 1)} |")
    if r.get("multitask"):
        m = r["multitask"]
        lines += ["", f"Multitask adapter: {m.get('documents')} documents, {m.get('tokens')} "
                      f"tokens, {_f(m.get('seconds'), 1)} s."]
    t = r["tuning"]
    router = r["router"]
    lines += ["", "## Routing defaults", "",
              f"beta {router['beta']}, tau {router['tau']}, variant "
              f"{router['sparse_softmax']!r}, query tokens {router['query_tokens']}, "
              f"max active {router['max_active']}, ood_threshold "
              f"{_f(router['ood_threshold'], 4)} ({t['ood_percentile']}th percentile of "
              f"holdout top similarities)."]
    if t.get("tuned"):
        best = "; ".join(f"{v} {_f(b['perplexity'], 3)} (beta {b['beta']}, tau {b['tau']})"
                         for v, b in t["best_by_variant"].items())
        verdict = (f"a tie, so {router['sparse_softmax']!r} (listed first) is kept"
                   if t.get("variant_tie") else f"{router['sparse_softmax']!r} won")
        lines += ["", f"Best holdout perplexity per sparse-softmax variant: {best}: {verdict}.",
            f"Top-1 routing accuracy on the evaluation documents: "
            f"{_f(t['routing_accuracy_top1'], 3)}.", "",
            f"## Holdout perplexity ({len(t['eval_documents'])} documents; suffix after "
            f"{router['query_tokens']} tokens; the same documents chose beta/tau)", ""]
        names = list(t["perplexity"])
        lines += ["| cluster | docs | " + " | ".join(names) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in names) + " |"]
        for row in t["per_cluster"]:
            lines.append(f"| {row['cluster']} | {row['documents']} | "
                         + " | ".join(_f(row.get(n)) for n in names) + " |")
        lines.append("| all | " + str(len(t["eval_documents"])) + " | "
                     + " | ".join(_f(t["perplexity"][n]) for n in names) + " |")
        wins = sum(1 for row in t["per_cluster"]
                   if row.get("own expert", 1e9) < row.get("base", -1))
        lines += ["", f"Own expert beats the base on {wins} of {len(t['per_cluster'])} "
                      "clusters (the paper's Figure 6, left)."]
        lines += ["", "## Tuning grid", "", "| variant | beta | tau | perplexity | mean active |",
                  "| --- | --- | --- | --- | --- |"]
        for p in t["grid"]:
            lines.append(f"| {p['variant']} | {p['beta']} | {p['tau']} | "
                         f"{_f(p['perplexity'], 3)} | {_f(p['mean_active'], 1)} |")
    return "\n".join(lines) + "\n"


def plot_tuning(grid: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, tau in sorted({(p["variant"], p["tau"]) for p in grid}):
        pts = sorted((p["beta"], p["perplexity"]) for p in grid
                     if p["variant"] == variant and p["tau"] == tau)
        ax.plot([b for b, _ in pts], [v for _, v in pts], marker="o",
                linestyle="-" if variant == "paper" else "--", label=f"{variant}, tau={tau}")
    ax.set_xscale("log")
    ax.set_xlabel("beta (temperature)")
    ax.set_ylabel("holdout perplexity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_report(out: Path, report: dict[str, Any]) -> None:
    out = Path(out)
    atomic_write_json(out / REPORT_JSON, report)
    atomic_write_bytes(out / REPORT_MD, markdown(report).encode())
    if report["tuning"].get("tuned"):
        plot_tuning(report["tuning"]["grid"], out / TUNING_PLOT)


def load_report(library_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(library_dir) / REPORT_JSON).read_text())
