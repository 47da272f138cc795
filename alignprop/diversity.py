"""Diversity of generated images, and the reward-versus-diversity trade-off of a LoRA scale sweep.

Reward hacking often shows as collapse: every seed of a prompt converges on the same image the
reward likes. Diversity here is measured on image embeddings (e.g. `reward_fn.embed`, the
reward's own vision tower): the mean pairwise cosine distance `1 - cos(a, b)` between the images
of one prompt from different seeds. 0 means the seeds give identical embeddings (collapse);
values grow as the images differ (for CLIP embeddings of unrelated natural images ~0.3 to 0.6;
the maximum, 2, would mean opposite embeddings).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F


def _pairwise_distances(embeds: torch.Tensor) -> torch.Tensor:
    """(..., N, D) -> (..., N*(N-1)/2): cosine distances 1 - cos over distinct pairs i < j."""
    x = F.normalize(embeds.detach().double(), dim=-1)
    n = x.shape[-2]
    cos = x @ x.transpose(-1, -2)  # (..., N, N)
    i, j = torch.triu_indices(n, n, offset=1, device=x.device)
    return (1.0 - cos[..., i, j]).clamp(min=0.0)  # rounding can make identical pairs -1e-16


def pairwise_diversity(embeds: torch.Tensor) -> float:
    """Mean cosine distance `1 - cos` over all distinct pairs of the N embeddings (N, D).

    0 when all embeddings point the same way (identical images: no diversity), larger when they
    differ (at most 2). Embeddings need not be normalised. N = 1 has no pairs and gives 0.
    """
    if embeds.ndim != 2:
        raise ValueError(f"expected embeddings of shape (N, D), got {tuple(embeds.shape)}")
    if embeds.shape[0] < 2:
        return 0.0
    return _pairwise_distances(embeds).mean().item()


def diversity_per_prompt(embeds: torch.Tensor) -> torch.Tensor:
    """(P, S, D) embeddings of P prompts x S seeds -> Tensor[P] float32: each prompt's pairwise diversity.

    Entry p is `pairwise_diversity(embeds[p])`: how different the S images of prompt p are
    across seeds (0 = every seed gives the same image). S = 1 gives zeros.
    """
    if embeds.ndim != 3:
        raise ValueError(
            f"expected embeddings of shape (prompts, seeds, D), got {tuple(embeds.shape)}"
        )
    if embeds.shape[1] < 2:
        return torch.zeros(embeds.shape[0], device=embeds.device)
    return _pairwise_distances(embeds).mean(-1).float()


def diversity_metrics(embeds: torch.Tensor, prefix: str = "eval/") -> dict[str, float]:
    """Metrics for a (P, S, D) eval batch: `{prefix}diversity` (mean over prompts of the per-prompt
    diversity) and `{prefix}diversity_min` (the most collapsed prompt)."""
    per_prompt = diversity_per_prompt(embeds)
    return {
        f"{prefix}diversity": per_prompt.mean().item(),
        f"{prefix}diversity_min": per_prompt.min().item(),
    }


# ---------------------------------------------------------------- LoRA scale sweep


def _reward_keys(rows: Sequence[Mapping]) -> list[str]:
    keys = []
    for row in rows:
        for k in row:
            if k.endswith("_mean") and k not in keys:
                keys.append(k)
    return keys


def _fmt(v) -> str:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return "" if v is None else str(v)
    return "nan" if isinstance(v, float) and math.isnan(v) else f"{v:.4g}"


def tradeoff_table(rows: Sequence[Mapping]) -> str:
    """Markdown table of a LoRA scale sweep, one line per scale (ascending).

    Each row is `{"scale": s, "<reward>_mean": ..., "diversity": ...}` (more `*_mean` columns
    allowed). Read it to pick a scale: rewards usually rise with the scale while diversity
    falls; a scale past the point where diversity drops sharply buys reward with collapse.
    """
    if not rows:
        raise ValueError("tradeoff_table: no rows")
    missing = [i for i, r in enumerate(rows) if "scale" not in r]
    if missing:
        raise ValueError(f"tradeoff_table: rows {missing} have no 'scale'")
    cols = ["scale", *_reward_keys(rows)]
    if any("diversity" in r for r in rows):
        cols.append("diversity")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    for row in sorted(rows, key=lambda r: r["scale"]):
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot_tradeoff(rows: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """Plot reward (y) against diversity (x) for a LoRA scale sweep, each point labelled by its scale.

    One curve per `*_mean` reward column; rows need `scale` and `diversity`. Returns the PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((r for r in rows if "diversity" in r and "scale" in r), key=lambda r: r["scale"])
    keys = _reward_keys(rows)
    if not rows or not keys:
        raise ValueError("plot_tradeoff: need rows with 'scale', 'diversity' and a '<reward>_mean'")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=True):
        pts = [(r["diversity"], r[key], r["scale"]) for r in rows if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", lw=1)
        for x, y, s in pts:
            ax.annotate(f"{s:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("diversity (mean pairwise 1 - cos)")
        ax.set_ylabel(key)
        ax.set_title(f"{key} vs diversity by LoRA scale", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
