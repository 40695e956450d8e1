"""The build report: `report.json` (everything), `report.md` (what a person reads, verdict
first) and three plots: `tuning.png` (tuning-document perplexity against each routing knob),
`routing.png` (pass@k of each routing embedding, the paper's Figure 6 right) and
`heatmap.png` (expert x cluster perplexity on the test documents, Figure 6 left)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ttmm_vllm.library import atomic_write_bytes, atomic_write_json

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
TUNING_PLOT = "tuning.png"
ROUTING_PLOT = "routing.png"
HEATMAP_PLOT = "heatmap.png"


def _f(x: Any, digits: int = 2) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) and x == x else "-"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def verdict(pair: dict[str, Any]) -> str:
    """One sentence on a paired difference a - b (perplexity; negative: a is better)."""
    d, lo, hi = pair["difference"], pair["lo"], pair["hi"]
    span = f"{_f(d)} (95% paired interval {_f(lo)} to {_f(hi)})"
    if hi < 0:
        return f"**{pair['a']} beats {pair['b']}**: {span}, beyond noise."
    if lo > 0:
        return f"**{pair['b']} beats {pair['a']}**: {pair['a']} minus {pair['b']} is {span}."
    return f"{pair['a']} and {pair['b']} are within noise: difference {span}."


def answer(pair: dict[str, Any]) -> str:
    """Does a beat b (lower perplexity)? yes / no / not distinguishable, by the paired interval."""
    if pair["hi"] < 0:
        return "yes"
    if pair["lo"] > 0:
        return "no"
    return "not distinguishable (interval includes 0)"


QUESTIONS = {"finetuning": "Does TTMM (served default) beat compute-matched fine-tuning?",
             "single": "Does merging beat the single best expert?",
             "own": "Does merging beat the own-cluster expert?"}


def _claims(ev: dict[str, Any]) -> list[str]:
    """Three lines: the evaluation's `claims` answered from their paired intervals."""
    pairs = {(p["a"], p["b"]): p for p in ev["pairs"]}
    rows = ev["rows"]
    lines = []
    for key, claim in ev.get("claims", {}).items():
        q, a, b = QUESTIONS[key], claim["a"], claim["b"]
        p = pairs.get((a, b))
        if p is None:
            why = {"finetuning": "no multitask adapter (build with --multitask)"
                   if claim.get("baseline") == "multitask" else
                   "no compute-matched adapter (built with --no-compute-matched)",
                   "single": "no TTMM 1 row (--active-counts without 1)"}.get(key, "no row")
            lines.append(f"- {q} **not measured**: {why}.")
            continue
        d, ref = p["difference"], rows[b]["perplexity"]
        rel = f"{_f(100 * d / ref, 1)}%; " if ref else ""
        line = (f"- {q} **{answer(p)}**: {a} minus {b} = {_f(d)} perplexity ({rel}95% paired "
                f"interval {_f(p['lo'])} to {_f(p['hi'])})")
        if claim.get("note"):
            line += f"; baseline: {claim['note']}"
        lines.append(line + ".")
    return lines


def _summary(r: dict[str, Any]) -> list[str]:
    b, routing, ev = r["branch"], r["routing"], r.get("evaluation")
    lines = ["## Summary", ""]
    line = f"Expert set served: **{b['chosen']}** ({b['rule']}"
    if b.get("tuned_perplexity"):
        line += "; tuned perplexity " + ", ".join(
            f"{n} {_f(v, 3)}" for n, v in b["tuned_perplexity"].items())
    lines.append(line + ").")
    p1 = {k: m.get("pass_tune", {}).get("1") for k, m in routing["by_kind"].items()}
    lines.append(f"Routing embedding: **{routing['chosen']}** ({routing['rule']}; pass@1 "
                 + ", ".join(f"{k} {_f(v, 3)}" for k, v in p1.items()) + ").")
    if ev:
        rows = ev["rows"]
        served = ev["served_row"]
        lines.append(
            f"On {ev['documents']} test documents (holdout, never tuned on): served TTMM "
            f"({served}) {_f(rows[served]['perplexity'])}, multitask fine-tuning "
            f"{_f(rows.get('multitask', {}).get('perplexity'))}, base "
            f"{_f(rows['base']['perplexity'])}.")
        claims = _claims(ev)
        if claims:
            lines += [""] + claims
        lines += [""] + [f"- {verdict(p)}" for p in ev["pairs"]]
    else:
        lines.append("No test-document evaluation (built with --no-tune or without test "
                     "documents).")
    return lines + [""]


def _quality(ev: dict[str, Any]) -> list[str]:
    lines = [f"## Quality on the test documents ({ev['documents']} holdout documents, never "
             f"tuned on; {int(ev['level'] * 100)}% bootstrap over documents, "
             f"{ev['resamples']} resamples)", ""]
    lines += _table(["method", "perplexity", "95% interval"],
                    [[n, _f(v["perplexity"]), f"{_f(v['lo'])}-{_f(v['hi'])}"]
                     for n, v in ev["rows"].items()])
    lines += ["", "TTMM k: at most k active experts, with the beta/tau that tuned best for k on "
              "the tuning documents: " + "; ".join(
                  f"{s}: " + ", ".join(f"k={k} beta {p['beta']} tau {p['tau']}"
                                       for k, p in d["ttmm"].items())
                  for s, d in ev["sets"].items()) + ".", "", "Paired differences (a - b):", ""]
    lines += _table(["a", "b", "difference", "95% paired interval", "P(a better)"],
                    [[p["a"], p["b"], _f(p["difference"]), f"{_f(p['lo'])} to {_f(p['hi'])}",
                      _f(p["p_a_better"])] for p in ev["pairs"]])
    names = list(ev["rows"])
    lines += ["", "Per cluster:", ""]
    lines += _table(["cluster", "docs", *names],
                    [[c["cluster"], c["documents"], *(_f(c.get(n)) for n in names)]
                     for c in ev["per_cluster"]])
    for s, d in ev["sets"].items():
        if "heatmap" in d:
            m = d["heatmap"]
            k = len(m)
            cols = [c for c in range(k) if m[0][c] == m[0][c]]  # clusters with documents
            diag = sum(1 for c in cols if min(m[e][c] for e in range(k)) == m[c][c])
            lines += ["", f"{s}: the cluster's own expert is the best single expert on {diag} "
                          f"of {len(cols)} clusters ({HEATMAP_PLOT}, the paper's Figure 6 "
                          "left)."]
    return lines + [""]


def _routing(r: dict[str, Any]) -> list[str]:
    lines = ["## Routing accuracy (pass@k: the document's own cluster among the k centroids "
             "nearest its prefix)", ""]
    rows = []
    for kind, m in r["by_kind"].items():
        for split in ("tune", "test"):
            acc = m.get(f"pass_{split}")
            if acc:
                rows.append([kind, split, *(_f(acc.get(k), 3) for k in ("1", "3", "10"))])
    lines += _table(["embedding", "documents", "pass@1", "pass@3", "pass@10"], rows)
    return lines + ["", f"Kept: {r['chosen']} ({ROUTING_PLOT}).", ""]


def _tuning(r: dict[str, Any]) -> list[str]:
    t, router = r["tuning"], r["router"]
    lines = ["## Routing defaults", "",
             f"beta {router['beta']}, tau {router['tau']}, variant "
             f"{router['sparse_softmax']!r}, max active {router['max_active']}, query tokens "
             f"{router['query_tokens']}, ood_threshold {_f(router['ood_threshold'], 4)} "
             f"({t['ood_percentile']}th percentile of holdout top similarities)."]
    if not t.get("tuned"):
        return lines + ["", "Not tuned (--no-tune): the paper's defaults.", ""]
    lines += ["", f"Tuned on {len(t['eval_documents'])} tuning documents ({TUNING_PLOT}: "
                  "perplexity against each knob, the others at their best)."]
    for name, s in t["by_set"].items():
        best = "; ".join(f"{v} {_f(b['perplexity'], 3)} (beta {b['beta']}, tau {b['tau']}, "
                         f"max active {b.get('max_active')})"
                         for v, b in s["best_by_variant"].items())
        lines += ["", f"### {name} experts: best {_f(s['perplexity'], 3)} (beta {s['beta']}, "
                      f"tau {s['tau']}, max active {s['max_active']}, {s['variant']!r}); per "
                      f"variant: {best}", ""]
        lines += _table(["variant", "max active", "beta", "tau", "perplexity", "mean active"],
                        [[p["variant"], p.get("max_active"), p["beta"], p["tau"],
                          _f(p["perplexity"], 3), _f(p["mean_active"], 1)] for p in s["grid"]])
    return lines + [""]


def markdown(r: dict[str, Any]) -> str:
    lines = ["# Library build report", ""]
    lines += _summary(r)
    if r.get("evaluation"):
        lines += _quality(r["evaluation"])
    lines += _routing(r["routing"])
    lines += _tuning(r)
    lines += ["## Experts", "", f"Served set: {r['branch']['chosen']}. " + "; ".join(
        f"{n}: trained from {s['model']} ({_f(s['train_seconds'], 0)} s, mean last loss "
        f"{_f(s['loss_last'], 3)})" for n, s in r["expert_sets"].items()) + ".", ""]
    cfg = r.get("config", {})
    if cfg.get("shared_a"):
        rank = cfg.get("rank")
        lines += [f"Shared A (--shared-a): every expert has the same frozen, seeded A per "
                  f"module and only its B was trained, so a merge of any number of experts is "
                  f"exact at rank {rank} and serves like a single rank-{rank} adapter (the "
                  "multitask adapter, if any, trained its own A).", ""]
    lines += _table(["id", "title", "train docs", "holdout", "tokens", "loss first -> last",
                     "seconds"],
                    [[e["id"], e["title"], e["documents"], e["holdout"], e.get("tokens", "-"),
                      f"{_f(e.get('loss_first'), 3)} -> {_f(e.get('loss_last'), 3)}",
                      _f(e.get("seconds"), 1)] for e in r["experts"]])
    for key, label in (("multitask", "Multitask adapter"),
                       ("multitask_matched", "Compute-matched multitask adapter")):
        m = r.get(key)
        if m:
            lines += ["", f"{label}: {m.get('documents')} documents, {m.get('tokens')} "
                          f"tokens, {m.get('steps')} steps, {_f(m.get('seconds'), 1)} s."]
    if r.get("multitask") and not r.get("multitask_matched"):
        lines += ["", "No compute-matched adapter: " + (
            "the plain experts make one pass over the multitask adapter's documents, so the "
            "equal-data multitask adapter is already compute-matched."
            if "branched" not in r["expert_sets"] else "built with --no-compute-matched.")]
    lines += ["", "## Stages", ""]
    lines += _table(["stage", "seconds", "cached"],
                    [[n, _f(t.get("seconds"), 1), "yes" if t.get("cached") else ""]
                     for n, t in r["timings"].items()])
    lines += ["", f"{r['documents']} documents; cluster sizes {r['cluster_sizes']}."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_tuning(by_set: dict[str, dict[str, Any]], path: Path) -> None:
    """Perplexity against beta (a line per expert set and max_active), tau and max_active,
    each knob varied with the others at their best for that set."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for si, (name, s) in enumerate(by_set.items()):
        grid = s["grid"]
        style = ["-", "--", ":"][si % 3]
        for active in sorted({p["max_active"] for p in grid}):
            pts = {}
            for p in grid:
                if p["max_active"] == active:
                    b = p["beta"]
                    pts[b] = min(pts.get(b, float("inf")), p["perplexity"])
            xs = sorted(pts)
            axes[0].plot(xs, [pts[x] for x in xs], marker="o", linestyle=style,
                         label=f"{name}, max active {active}")
        for knob, ax in (("tau", axes[1]), ("max_active", axes[2])):
            fixed = {k: s[k] for k in ("variant", "beta", "tau", "max_active") if k != knob}
            pts = sorted((p[knob], p["perplexity"]) for p in grid
                         if all(p[k] == v for k, v in fixed.items()))
            ax.plot([x for x, _ in pts], [v for _, v in pts], marker="o", linestyle=style,
                    label=name)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("beta (temperature; best tau)")
    axes[1].set_xlabel("tau (sparsity; best beta, max active)")
    axes[2].set_xlabel("max active experts (best beta, tau)")
    for ax in axes:
        ax.set_ylabel("tuning-document perplexity")
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_routing(routing: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for kind, m in routing["by_kind"].items():
        split = "test" if m.get("curve_test") else "tune"
        curve = m.get(f"curve_{split}") or []
        ax.plot(range(1, len(curve) + 1), curve, marker=".",
                label=f"{kind} ({split} documents)" + (" (kept)" if kind == routing["chosen"]
                                                       else ""))
    ax.set_xlabel("k (centroids considered)")
    ax.set_ylabel("pass@k: own cluster among top k")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_heatmap(sets: dict[str, dict[str, Any]], path: Path) -> None:
    """Expert x cluster perplexity; colour: log perplexity relative to the cluster's mean over
    experts (clusters differ far more in difficulty than experts do), brighter is better."""
    import numpy as np

    plt = _pyplot()
    maps = {n: np.asarray(d["heatmap"], dtype=float) for n, d in sets.items() if "heatmap" in d}
    fig, axes = plt.subplots(1, len(maps), figsize=(6 * len(maps), 5.2), squeeze=False)
    for ax, (name, m) in zip(axes[0], maps.items(), strict=True):
        rel = np.log(m) - np.nanmean(np.log(m), axis=0, keepdims=True)
        im = ax.imshow(-rel, cmap="viridis")
        k = len(m)
        if k <= 20:
            for e in range(k):
                for c in range(k):
                    if m[e, c] == m[e, c]:
                        label = f"{m[e, c]:.1f}" if m[e, c] < 1000 else f"{m[e, c]:.2g}"
                        ax.text(c, e, label, ha="center", va="center", fontsize=5,
                                color="white" if -rel[e, c] < np.nanmedian(-rel) else "black")
        step = max(1, k // 16)
        ax.set_xticks(range(0, k, step))
        ax.set_yticks(range(0, k, step))
        ax.set_xlabel("cluster (test documents)")
        ax.set_ylabel("expert")
        ax.set_title(f"{name} experts: perplexity (brighter: better than the cluster's mean)",
                     fontsize=8)
        fig.colorbar(im, ax=ax, label="- log(ppl / cluster geometric mean)")
    _save(fig, path)


def write_report(out: Path, report: dict[str, Any]) -> None:
    out = Path(out)
    atomic_write_json(out / REPORT_JSON, report)
    atomic_write_bytes(out / REPORT_MD, markdown(report).encode())
    if report["tuning"].get("tuned"):
        plot_tuning(report["tuning"]["by_set"], out / TUNING_PLOT)
    if any(m.get("curve_tune") or m.get("curve_test")
           for m in report["routing"]["by_kind"].values()):
        plot_routing(report["routing"], out / ROUTING_PLOT)
    ev = report.get("evaluation")
    if ev and any("heatmap" in d for d in ev["sets"].values()):
        plot_heatmap(ev["sets"], out / HEATMAP_PLOT)


def load_report(library_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(library_dir) / REPORT_JSON).read_text())
