"""``report.json`` and ``report.md``: a verdict per experiment, then the tables behind it.

Every comparison between two modes is **paired over seeds**: each seed runs every mode on the same
warmup, features and data order, so the report gives, for mode a against mode b, the mean and the
standard deviation of the per-seed difference and the number of seeds on which a did better.
"""

from __future__ import annotations

import html
import json
import math
import platform
from collections import defaultdict
from pathlib import Path

from prism_lightning.eval import metrics as M
from prism_lightning.io import atomic_write_text
from prism_lightning.view import fmt_stat, write_html

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


def _experiment_md(name: str, s: dict) -> list[str]:
    n = s["seeds"]
    nan = (float("nan"), float("nan"))
    lines = [f"## {name}", "",
             f"{s['kind']} on skill `{s['subtask']}`, {n} seed(s), pool features preconditioned with "
             f"`{s['preconditioner']}`, target noise {s['target_noise']:.0%}.", ""]
    head = ["mode", "AUROC (pool)", "AUROC (in skill)", "P@k (in skill)", "exact match %", "wanted %",
            "unwanted %", "fine-tune s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mode, m in s["modes"].items():
        secs = m.get("seconds", nan)[0]
        cells = [mode, fmt_stat(m.get("whole_pool.auroc", nan), n), fmt_stat(m.get("within_subtask.auroc", nan), n),
                 fmt_stat(m.get("within_subtask.precision_at_k", nan), n),
                 fmt_stat(m.get(M.EXACT_MATCH, nan), n, pct=True), fmt_stat(m.get(M.WANTED, nan), n, pct=True),
                 fmt_stat(m.get(M.UNWANTED, nan), n, pct=True), "–" if math.isnan(secs) else f"{secs:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    secs = ", ".join(f"{k} {v[0]:.0f}s" for k, v in s["stage_seconds"].items())
    lines += ["", f"Stage wall time (mean over seeds): {secs}.", ""]
    if s["plots"] and any(m.get("within_subtask.auroc") for m in s["modes"].values()):
        lines += [f"![ROC]({s['plots'][0]}) "
                  f"![scores]({s['plots'][0].replace('roc.png', 'score_distributions.png')})", ""]
    return lines


def _cell(text) -> str:
    """A markdown table cell: HTML escaped (a viewer renders raw HTML), pipes escaped, one line."""
    return html.escape(str(text)).replace("|", "\\|").replace("\n", " ")


def _explained_md(name: str, s: dict) -> list[str]:
    """The rows to look at first (from the focus mode's ``explain.jsonl`` of the first seed)."""
    rows = s.get("explained", {}).get("rows") or []
    if not rows:
        return []
    what = "most harmful rows" if s["kind"] == "repair" else "top selected rows"
    seed = s["explained"]["seed"]
    lines = [f"The {len(rows)} {what} by `{rows[0]['mode']}` (seed {seed}), each with the target pair that "
             f"contributes most to its score (share of the score; `{name}/seed-{seed}/selection/"
             f"{rows[0]['mode']}/explain.jsonl` has every part):", "",
             "| rank | row | skill | labelled harmful | score | prompt → completion | strongest target pair | share |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = "–" if r.get("label") is None else ("yes" if r["label"] else "no")
        share = "–" if r.get("pair_share") is None else f"{r['pair_share']:.0%}"
        lines.append(f"| {r['rank']} | {_cell(r['id'])} | {_cell(r['subtask'])} | {label} | {r['score']:.3g} | "
                     f"{_cell(r['prompt'])} → {_cell(r['completion'])} | {_cell(r['pair'])} "
                     f"({_cell(r['pair_subtask'])}): {_cell(r['pair_prompt'])} | {share} |")
    return lines + [""]


def _studies_md(summary: dict) -> list[str]:
    """One table per study: within-skill AUROC per mode, one column per experiment of the study."""
    studies: dict[str, dict] = defaultdict(dict)
    for name, s in summary.items():
        if s.get("study"):
            studies[s["study"]][name] = s
    lines: list[str] = []
    for study, exps in studies.items():
        modes = list(next(iter(exps.values()))["modes"])
        cols = [f"{k} ({v['preconditioner']}, noise {v['target_noise']:.0%})" for k, v in exps.items()]
        lines += [f"## Study: {study} (within-skill AUROC)", "", "| mode | " + " | ".join(cols) + " |",
                  "|" + "---|" * (len(cols) + 1)]
        for mode in modes:
            cells = [fmt_stat(v["modes"].get(mode, {}).get(RANK_METRIC, (float("nan"),) * 2), v["seeds"])
                     for v in exps.values()]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _weights_md(summary: dict) -> list[str]:
    rows = [(k, v["prism_vs_uniform"]) for k, v in summary.items()
            if v.get("prism_vs_uniform") and v["prism_vs_uniform"]["n"]]
    if not rows:
        return []
    lines = ["## Preference weights: prism vs prism_uniform (within-skill AUROC, paired over seeds)", "",
             "| experiment | prism | prism_uniform | difference | prism better on | tied on |",
             "|---|---|---|---|---|---|"]
    for name, c in rows:
        spread = f" ± {c['std']:.3f}" if c["n"] > 1 else ""
        lines.append(f"| {name} | {c['a_mean']:.3f} | {c['b_mean']:.3f} | {c['mean']:+.3f}{spread} | "
                     f"{c['wins']}/{c['n']} seeds | {c['ties']}/{c['n']} seeds |")
    return lines + [""]


def write_report(root: str | Path, report: dict) -> dict:
    """Write ``report.json`` (every number), ``report.md`` (verdicts first, then tables) and ``report.html``
    (the same to look at, with searchable explanation tables: ``view``) under ``root``."""
    root = Path(root)
    report["summary"] = summarise(report["results"])
    report["versions"] = versions()
    report["report_md"] = str(root / "report.md")
    report["report_html"] = str(root / "report.html")
    atomic_write_text(root / "report.json", json.dumps(report, indent=2, default=str))
    lines = ["# prism_lightning report", "",
             f"Model `{report['model']['name_or_path']}` (LoRA r={report['lora']['r']}), "
             f"modes {report['settings']['modes']}, seeds {report['settings']['seeds']}.", "", "## Verdicts", ""]
    for name, s in report["summary"].items():
        if s["verdict"] and not s.get("study"):
            lines += [f"### {name}", "", *s["verdict"], ""]
    lines += ["How to read the numbers: AUROC is how well -score separates the injected harmful rows from "
              "the clean ones (0.5 = chance), measured within the contaminated skill (finding the skill's rows "
              "is easy and finds no harmful one) and over the whole pool; P@k is the share of harmful rows among "
              "the lowest-scored fraction. After each fine-tune: exact match on the skill's held-out rows, and the "
              "share of held-out pairs answered the wanted or the unwanted way (greedy answer, at the point where "
              "the two answers of the pair first differ). `base` is the model before any fine-tune, `full` the "
              "whole pool, `oracle` the clean pool.", ""]
    for name, s in report["summary"].items():
        if not s.get("study"):
            lines += _experiment_md(name, s) + _explained_md(name, s)
    lines += _studies_md(report["summary"])
    lines += _weights_md(report["summary"])
    lines += ["## Settings and versions", "", "```json", json.dumps(report["settings"], indent=2), "```", "",
              "| package | version |", "|---|---|"] + [f"| {k} | {v} |" for k, v in report["versions"].items()]
    atomic_write_text(root / "report.md", "\n".join(lines) + "\n")
    write_html(root, report)
    return report
