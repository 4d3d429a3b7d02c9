"""Plots for rankings: score distributions of harmful vs clean rows, and ROC curves (PNG)."""

from __future__ import annotations

from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_score_distributions(scores: dict[str, torch.Tensor], harmful: torch.Tensor, path: str | Path,
                             title: str = "") -> Path:
    """One histogram panel per mode: scores of harmful vs clean rows."""
    plt = _pyplot()
    modes = list(scores)
    cols = min(4, len(modes))
    rows = (len(modes) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    h = harmful.bool()
    for ax, mode in zip(axes.flat, modes):
        s = scores[mode].double()
        ax.hist(s[~h].numpy(), bins=30, alpha=0.6, label="clean", density=True)
        if h.any():
            ax.hist(s[h].numpy(), bins=30, alpha=0.6, label="harmful", density=True)
        ax.set_title(mode, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(modes):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title or "score distributions", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_roc(scores: dict[str, torch.Tensor], harmful: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """ROC curves of ``-score`` as a detector of harmful rows, one line per mode."""
    from prism_lightning.eval.ranking import auroc, roc

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    for mode, s in scores.items():
        fpr, tpr = roc(-s, harmful)
        auc = auroc(-s, harmful)
        ax.plot(fpr.numpy(), tpr.numpy(), label=f"{mode} ({auc:.2f})", lw=1.2)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title or "harmful-row detection (ROC)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
