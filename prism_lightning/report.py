"""``report.json`` and ``report.md``: a verdict per experiment, then the tables behind it.

Every comparison between two modes is **paired over seeds**: each seed runs every mode on the same
warmup, features and data order, so the report gives, for mode a against mode b, the mean and the
standard deviation of the per-seed difference and the number of seeds on which a did better.
"""

from __future__ import annotations

import json
import math
import platform
from collections import defaultdict
from pathlib import Path

from prism_lightning.eval import metrics as M
from prism_lightning.io import atomic_write_text
from prism_lightning.select import explained_text
from prism_lightning.view import NAN, fmt_stat, render_html, render_md

BASELINES = ("loss", "random")  # the free baselines every verdict names
RANK_METRIC = "within_subtask.auroc"
# behaviour metrics of the fine-tunes: (label, higher is better)
BEHAVIOUR = {M.EXACT_MATCH: ("exact match", True), M.UNWANTED: ("unwanted answers", False)}


def _finite(values) -> list[float]:
    return [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def _stats(values: list[float]) -> tuple[float, float]:
    vals = _finite(values)
    if not vals:
        return float("nan"), float("nan")
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std




def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("prism-lightning", "torch", "lightning", "transformers", "peft", "torchmetrics", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _rank_value(run: dict, mode: str, key: str = RANK_METRIC) -> float:
    view, metric = key.split(".")
    return run["ranking"].get("modes", {}).get(mode, {}).get(view, {}).get(metric, float("nan"))


TIE = 5e-4  # differences below the report's precision (3 decimals of AUROC, 0.1 point of a rate) are ties


def paired(runs: list[dict], a: str, b: str, value, higher_better: bool = True) -> dict:
    """Per-seed difference ``value(run, a) - value(run, b)`` (sign flipped when lower is better).

    Returns mean, std, wins / ties (seeds where a is better by more than ``TIE`` / within it), n (seeds
    where both are defined), and the two means.
    """
    sign = 1 if higher_better else -1
    pairs = [(value(r, a), value(r, b)) for r in runs]
    pairs = [(x, y) for x, y in pairs if not (math.isnan(x) or math.isnan(y))]
    diffs = [sign * (x - y) for x, y in pairs]
    mean, std = _stats(diffs)
    return {"a": a, "b": b, "mean": mean, "std": std, "wins": sum(d > TIE for d in diffs),
            "ties": sum(abs(d) <= TIE for d in diffs), "n": len(diffs),
            "a_mean": _stats([x for x, _ in pairs])[0], "b_mean": _stats([y for _, y in pairs])[0]}


def _finetune_value(metric: str):
    return lambda run, mode: run["finetune"].get(mode, {}).get(metric, float("nan"))


def _best(means: dict[str, float], higher_better: bool) -> str | None:
    ok = {k: v for k, v in means.items() if not math.isnan(v)}
    if not ok:
        return None
    return (max if higher_better else min)(ok, key=ok.get)


def _num(v: float, pct: bool) -> str:
    return f"{v * 100:.1f}%" if pct else f"{v:.3f}"


def _diff(v: float, pct: bool) -> str:
    return f"{v * 100:+.1f} points" if pct else f"{v:+.3f}"


def _versus(cmp: dict, pct: bool) -> str:
    spread = f" ± {cmp['std'] * 100:.1f}" if pct else f" ± {cmp['std']:.3f}"
    mean = _diff(cmp["mean"], pct)
    if pct:
        mean = mean.replace(" points", "")
    text = f"vs {cmp['b']} {mean}{spread if cmp['n'] > 1 else ''}{' points' if pct else ''}"
    ties = f", {cmp['ties']} tied" if cmp["ties"] else ""
    return f"{text} (better on {cmp['wins']}/{cmp['n']} seeds{ties})"


def _sentence(what: str, focus: str, best: str, cmps: list[dict], pct: bool, higher_better: bool) -> str:
    """One plain sentence: who is best at ``what`` and how ``focus`` compares with each other mode."""
    if not cmps:
        return ""
    own = cmps[0]["a_mean"]
    head = (f"**{what}**: {focus} is best ({_num(own, pct)})" if best == focus else
            f"**{what}**: {best} is best; {focus} gets {_num(own, pct)}")
    better = [c for c in cmps if c["mean"] > 0 and c["wins"] == c["n"]]
    worse = [c for c in cmps if c["mean"] < 0 and c["wins"] + c["ties"] == 0]
    tied = [c for c in cmps if c["ties"] == c["n"]]
    plain = ""
    seeds = "on every seed" if cmps[0]["n"] > 1 else "on its one seed"
    for group, word in ((better, "better than"), (worse, "worse than"), (tied, "the same as")):
        if group:
            names = ", ".join(f"{c['b']} ({_num(c['b_mean'], pct)})" for c in group)
            plain += f" {focus} does {word} {names} {seeds}."
    details = "; ".join(_versus(c, pct) for c in cmps)
    direction = "higher" if higher_better else "lower"
    return f"{head}, {direction} is better.{plain} Paired over seeds (positive = {focus} better): {details}."


def verdict(name: str, runs: list[dict], focus: str = "prism") -> list[str]:
    """The verdict lines of one experiment (markdown bullets): ``focus`` (or the first mode run) vs each other mode."""
    first = runs[0]
    modes = list(first["ranking"].get("modes", {})) or [k for k in first.get("finetune", {})
                                                         if k not in ("full", "oracle", "base", "prism_reselect")]
    if modes and focus not in modes:
        focus = modes[0]
    lines: list[str] = []
    others = [m for m in modes if m != focus]
    if focus in modes and first["ranking"].get("modes"):
        means = {m: _stats([_rank_value(r, m) for r in runs])[0] for m in modes}
        cmps = [paired(runs, focus, m, _rank_value) for m in others]
        lines.append("- " + _sentence("Finding the harmful rows (within-skill AUROC)", focus,
                                      _best(means, True), cmps, False, True))
    ft = first.get("finetune") or {}
    metric = first.get("metric", M.EXACT_MATCH)
    if ft and metric in BEHAVIOUR:
        label, higher = BEHAVIOUR[metric]
        value = _finetune_value(metric)
        mean = {k: _stats([value(r, k) for r in runs])[0] for k in ft}
        if "base" in mean:
            note = ""
            if first["kind"] == "forward" and higher:
                note = (" (below 25%: a skill it lacks, which the selection must teach)" if mean["base"] < 0.25 else
                        " (25% or more: the model already has this skill, so a selection can hardly show a gain)")
            lines.append(f"- Before any fine-tune the model scores {_num(mean['base'], True)} {label} on "
                         f"`{first['subtask']}`{note}.")
        if first["kind"] == "repair" and "oracle" in mean and "full" in mean:
            gap = (mean["full"] - mean["oracle"]) * (-1 if higher else 1)
            hurts = gap >= 0.10
            lines.append(f"- The contamination {'hurts' if hurts else 'does not hurt enough to judge a repair'}: "
                         f"full pool {_num(mean['full'], True)} vs clean pool (oracle) {_num(mean['oracle'], True)} "
                         f"{label} ({_diff(gap, True)} for the oracle).")
            if hurts:
                rec = {m: (mean["full"] - mean[m]) * (-1 if higher else 1) / gap for m in modes if m in mean}
                lines.append("- Share of that gap recovered by removing each mode's bottom rows: "
                             + ", ".join(f"{m} {rec[m]:.0%}" for m in modes if m in rec) + ".")
        sel = {m: mean[m] for m in modes if m in mean}
        if focus in sel:
            cmps = [paired(runs, focus, m, value, higher) for m in others if m in sel]
            lines.append("- " + _sentence(f"Fine-tuned on the selection ({label} on `{first['subtask']}`)",
                                          focus, _best(sel, higher), cmps, True, higher))
        if "prism_reselect" in mean and "prism" in mean:
            cmp = paired(runs, "prism_reselect", "prism", value, higher)
            lines.append(f"- Re-selected between epochs with the preference weights at the current model "
                         f"(`prism_reselect`, {_num(mean['prism_reselect'], True)} {label}) against the static "
                         f"`prism` selection: {_versus(cmp, True)}.")
    return lines


def summarise(results: list[dict]) -> dict:
    """Group per-seed results by experiment: per mode, mean/std of every number, and the verdict."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        groups[r["experiment"]].append(r)
    summary = {}
    for name, runs in groups.items():
        rows: dict[str, dict] = defaultdict(dict)
        for mode in runs[0]["ranking"].get("modes", {}):
            for view in ("whole_pool", "within_subtask"):
                for metric in ("auroc", "precision_at_k", "recall_at_k"):
                    rows[mode][f"{view}.{metric}"] = _stats([_rank_value(r, mode, f"{view}.{metric}") for r in runs])
        for mode in runs[0]["finetune"]:
            for metric in runs[0]["finetune"][mode]:
                rows[mode][metric] = _stats([r["finetune"][mode][metric] for r in runs])
        stage_seconds = {k: _stats([r["seconds"][k] for r in runs]) for k in runs[0]["seconds"]}
        first = runs[0]
        summary[name] = {"kind": first["kind"], "subtask": first["subtask"], "seeds": len(runs),
                         "metric": first.get("metric", M.EXACT_MATCH), "target_noise": first["target_noise"],
                         "study": first.get("study"), "preconditioner": first.get("preconditioner"),
                         "modes": dict(rows), "stage_seconds": stage_seconds, "verdict": verdict(name, runs),
                         "prism_vs_uniform": paired(runs, "prism", "prism_uniform", _rank_value)
                         if {"prism", "prism_uniform"} <= set(rows) else None,
                         "plots": [f"{name}/seed-{r['seed']}/selection/roc.png" for r in runs],
                         "explained": {"seed": first["seed"], "rows": first.get("explained") or []}}
    return summary


COLUMNS = [("whole_pool.auroc", "AUROC (pool)", False), ("within_subtask.auroc", "AUROC (in skill)", False),
           ("within_subtask.precision_at_k", "P@k (in skill)", False), (M.EXACT_MATCH, "exact match %", True),
           (M.WANTED, "wanted %", True), (M.UNWANTED, "unwanted %", True)]
EXPLAIN_HEAD = [("rank", "rank"), ("id", "row"), ("subtask", "skill"), ("label", "label"), ("score", "score"),
                ("prompt", "prompt"), ("completion", "completion"), (None, "strongest target pair"), (None, "share"),
                (None, "all parts")]
HOW_TO_READ = ("How to read the numbers: AUROC is how well -score separates the injected harmful rows from the clean "
               "ones (0.5 = chance), measured within the contaminated skill (finding the skill's rows is easy and "
               "finds no harmful one) and over the whole pool; P@k is the share of harmful rows among the "
               "lowest-scored fraction. After each fine-tune: exact match on the skill's held-out rows, and the "
               "share of held-out pairs answered the wanted or the unwanted way (greedy answer, at the point where "
               "the two answers of the pair first differ). `base` is the model before any fine-tune, `full` the "
               "whole pool, `oracle` the clean pool.")


def explanations(root: Path, name: str, seed: int) -> dict[str, list[dict]]:
    """Every mode's ``explain.jsonl`` of one experiment and seed, as the page's table rows."""
    out = {}
    for path in sorted((root / name / f"seed-{seed}" / "selection").glob("*/explain.jsonl")):
        rows = []
        for line in path.read_text().splitlines():
            r = json.loads(line)
            prompt, answer = explained_text(r)
            rows.append({"row": r["row"], "rank": r["rank"], "id": r["id"], "subtask": r.get("subtask", ""),
                         "label": r.get("label"), "score": r["score"], "prompt": prompt, "completion": answer,
                         "pairs": r["pairs"], "other_pairs": r["other_pairs"]})
        out[path.parent.name] = rows
    return out


def _experiment_view(root: Path, name: str, s: dict) -> dict:
    """One experiment as both pages show it: its verdict, its table, plots and the rows to look at."""
    n = s["seeds"]
    table = {"head": ["mode", *(label for _, label, _ in COLUMNS), "fine-tune s"], "rows": []}
    for mode, m in s["modes"].items():
        secs = m.get("seconds", NAN)[0]
        table["rows"].append([mode, *(fmt_stat(m.get(key, NAN), n, pct) for key, _, pct in COLUMNS),
                              "–" if math.isnan(secs) else f"{secs:.0f}"])
    plots = []
    if s["plots"] and any(m.get(RANK_METRIC) for m in s["modes"].values()):
        plots = [s["plots"][0], s["plots"][0].replace("roc.png", "score_distributions.png")]
    rows = (s.get("explained") or {}).get("rows") or []
    seed = (s.get("explained") or {}).get("seed", 0)
    top = [{"rank": r["rank"], "id": r["id"], "subtask": r["subtask"],
            "label": "–" if r.get("label") is None else ("yes" if r["label"] else "no"), "score": f"{r['score']:.3g}",
            "prompt": r["prompt"], "completion": r["completion"], "pair": r["pair"], "pair_subtask": r["pair_subtask"],
            "pair_prompt": r["pair_prompt"], "share": "–" if r.get("pair_share") is None else f"{r['pair_share']:.0%}"}
           for r in rows]
    explained = explanations(root, name, seed)
    focus = rows[0]["mode"] if rows else ("prism" if "prism" in explained else next(iter(explained), None))
    return {"name": name, "kind": s["kind"], "subtask": s["subtask"], "seeds": n, "study": s.get("study"),
            "preconditioner": s["preconditioner"], "noise": f"{s['target_noise']:.0%}", "verdict": s["verdict"],
            "table": table, "plots": plots,
            "stage_seconds": ", ".join(f"{k} {v[0]:.0f}s" for k, v in s["stage_seconds"].items()),
            "top": top, "top_mode": focus, "top_seed": seed,
            "top_what": "most harmful rows" if s["kind"] == "repair" else "top selected rows",
            "explanations": explained}


def _studies_view(summary: dict) -> list[dict]:
    """One table per study: within-skill AUROC per mode, one column per experiment of the study."""
    studies: dict[str, dict] = defaultdict(dict)
    for name, s in summary.items():
        if s.get("study"):
            studies[s["study"]][name] = s
    out = []
    for study, exps in studies.items():
        modes = list(next(iter(exps.values()))["modes"])
        out.append({"name": study,
                    "columns": [f"{k} ({v['preconditioner']}, noise {v['target_noise']:.0%})" for k, v in exps.items()],
                    "rows": [[mode, *(fmt_stat(v["modes"].get(mode, {}).get(RANK_METRIC, NAN), v["seeds"])
                                      for v in exps.values())] for mode in modes]})
    return out


def _weights_view(summary: dict) -> list[list[str]]:
    out = []
    for name, c in ((k, v["prism_vs_uniform"]) for k, v in summary.items()):
        if c and c["n"]:
            spread = f" ± {c['std']:.3f}" if c["n"] > 1 else ""
            out.append([name, f"{c['a_mean']:.3f}", f"{c['b_mean']:.3f}", f"{c['mean']:+.3f}{spread}",
                        f"{c['wins']}/{c['n']} seeds", f"{c['ties']}/{c['n']} seeds"])
    return out


def view_model(report: dict, root: str | Path) -> dict:
    """What ``report.md`` and ``report.html`` show, formatted once (``view.render_md``, ``view.render_html``)."""
    root = Path(root)
    experiments = [_experiment_view(root, name, s) for name, s in report["summary"].items()]
    return {"model": report["model"]["name_or_path"], "lora_r": report["lora"]["r"],
            "modes": report["settings"]["modes"], "seeds": report["settings"]["seeds"], "how_to_read": HOW_TO_READ,
            "experiments": experiments, "studies": _studies_view(report["summary"]),
            "weights": _weights_view(report["summary"]), "settings": json.dumps(report["settings"], indent=2),
            "versions": report["versions"], "root": str(root), "explain_head": EXPLAIN_HEAD,
            "data": {"explain": {e["name"]: e["explanations"] for e in experiments
                                 if e["explanations"] and not e["study"]}}}


def write_report(root: str | Path, report: dict) -> dict:
    """Write ``report.json`` (every number), ``report.md`` (verdicts first, then tables) and ``report.html``
    (the same to look at, with searchable explanation tables) under ``root``, both from one ``view_model``."""
    root = Path(root)
    report["summary"] = summarise(report["results"])
    report["versions"] = versions()
    report["report_md"] = str(root / "report.md")
    report["report_html"] = str(root / "report.html")
    atomic_write_text(root / "report.json", json.dumps(report, indent=2, default=str))
    model = view_model(report, root)
    atomic_write_text(root / "report.md", render_md(model))
    atomic_write_text(root / "report.html", render_html(model))
    return report
