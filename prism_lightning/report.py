"""``report.json`` and ``report.md``: one table per experiment, mean ± std over seeds."""

from __future__ import annotations

import json
import math
import platform
from collections import defaultdict
from pathlib import Path

from prism_lightning.store.feature_store import atomic_write_text


def _stats(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan")
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std


def _fmt(pair: tuple[float, float], seeds: int, pct: bool = False) -> str:
    mean, std = pair
    if math.isnan(mean):
        return "–"
    scale = 100 if pct else 1
    text = f"{mean * scale:.1f}" if pct else f"{mean:.3f}"
    return text + (f" ± {std * scale:.1f}" if pct else f" ± {std:.3f}") if seeds > 1 else text


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("prism-lightning", "torch", "lightning", "transformers", "peft", "torchmetrics", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def summarise(results: list[dict]) -> dict:
    """Group per-seed results by experiment: per mode, mean/std of every number."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        groups[r["experiment"]].append(r)
    summary = {}
    for name, runs in groups.items():
        rows: dict[str, dict] = defaultdict(dict)
        modes = list(runs[0]["ranking"].get("modes", {}))
        for mode in modes:
            for view in ("whole_pool", "within_subtask"):
                for metric in ("auroc", "precision_at_k", "recall_at_k"):
                    vals = [r["ranking"]["modes"][mode][view][metric] for r in runs]
                    rows[mode][f"{view}.{metric}"] = _stats(vals)
        for mode in runs[0]["finetune"]:
            for metric in ("exact_match", "exact_match_all", "pref_acc", "mistake_rate", "seconds"):
                rows[mode][metric] = _stats([r["finetune"][mode][metric] for r in runs])
        stage_seconds = {k: _stats([r["seconds"][k] for r in runs]) for k in runs[0]["seconds"]}
        summary[name] = {"kind": runs[0]["kind"], "subtask": runs[0]["subtask"], "seeds": len(runs),
                         "target_noise": runs[0]["target_noise"], "modes": dict(rows),
                         "stage_seconds": stage_seconds,
                         "plots": [f"{name}/seed-{r['seed']}/selection/roc.png" for r in runs]}
    return summary


def _experiment_md(name: str, s: dict) -> list[str]:
    n = s["seeds"]
    lines = [f"## {name}", "",
             f"{s['kind']} on skill `{s['subtask']}`, {n} seed(s), target noise {s['target_noise']:.0%}. "
             "AUROC: how well -score separates injected harmful rows (0.5 = chance); P@k: share of "
             "harmful rows among the lowest-scored fraction. Fine-tune columns: greedy exact match on "
             "the skill's held-out rows, and the mistake rate (share of held-out pairs where the model "
             "prefers the unwanted answer).", ""]
    head = ["mode", "AUROC (pool)", "AUROC (in skill)", "P@k (in skill)", "exact match %", "mistake rate %",
            "fine-tune s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mode, m in s["modes"].items():
        nan = (float("nan"), float("nan"))
        cells = [mode, _fmt(m.get("whole_pool.auroc", nan), n), _fmt(m.get("within_subtask.auroc", nan), n),
                 _fmt(m.get("within_subtask.precision_at_k", nan), n),
                 _fmt(m.get("exact_match", nan), n, pct=True), _fmt(m.get("mistake_rate", nan), n, pct=True),
                 "–" if math.isnan(m.get("seconds", nan)[0]) else f"{m['seconds'][0]:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    secs = ", ".join(f"{k} {v[0]:.0f}s" for k, v in s["stage_seconds"].items())
    lines += ["", f"Stage wall time (mean over seeds): {secs}.", "",
              f"![ROC]({s['plots'][0]}) ![scores]({s['plots'][0].replace('roc.png', 'score_distributions.png')})",
              ""]
    return lines


def _robustness_md(summary: dict) -> list[str]:
    noisy = {k: v for k, v in summary.items() if v["target_noise"] or k.startswith("robust")}
    if len(noisy) < 2:
        return []
    modes = list(next(iter(noisy.values()))["modes"])
    lines = ["## Target robustness (within-skill AUROC by share of swapped target pairs)", "",
             "| mode | " + " | ".join(f"{v['target_noise']:.0%} ({k})" for k, v in noisy.items()) + " |",
             "|" + "---|" * (len(noisy) + 1)]
    for mode in modes:
        cells = [_fmt(v["modes"][mode]["within_subtask.auroc"], v["seeds"]) for v in noisy.values()]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_report(root: str | Path, report: dict) -> dict:
    """Write ``report.json`` (every number) and ``report.md`` (tables) under ``root``."""
    root = Path(root)
    report["summary"] = summarise(report["results"])
    report["versions"] = versions()
    report["report_md"] = str(root / "report.md")
    atomic_write_text(root / "report.json", json.dumps(report, indent=2, default=str))
    lines = ["# prism_lightning report", "",
             f"Model `{report['model']['name_or_path']}` (LoRA r={report['lora']['r']}), "
             f"modes {report['settings']['modes']}, seeds {report['settings']['seeds']}.", ""]
    for name, s in report["summary"].items():
        lines += _experiment_md(name, s)
    lines += _robustness_md(report["summary"])
    lines += ["## Settings and versions", "", "```json", json.dumps(report["settings"], indent=2), "```", "",
              "| package | version |", "|---|---|"] + [f"| {k} | {v} |" for k, v in report["versions"].items()]
    atomic_write_text(root / "report.md", "\n".join(lines) + "\n")
    return report
