"""A run's report: matplotlib plots of metrics.jsonl and the eval grids over time, in one report.html.

write_report("logs/aesthetic_20240101_120000")   # -> .../report.html, plots in .../report/

Reward hacking shows in two plots when the data is there: the training reward and each eval
judge (eval/<name>_mean) min-max normalised on one axis (a judge falling while the reward rises),
and reward against eval/diversity coloured by step (more reward bought with less diverse images).
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from pathlib import Path
from typing import Any

_GRID_RE = re.compile(r"eval_(\d+)\.(png|webp)$")
_CONFIG_KEYS = ("name", "reward", "eval_rewards", "pretrained.model", "seed", "mixed_precision")


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of metrics.jsonl; "nan"/"inf" strings become floats and a torn last line is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a run killed mid-write leaves a partial line
            continue
        rows.append({k: _num(v) for k, v in row.items()})
    return rows


def _num(v: Any) -> Any:
    if isinstance(v, str) and v.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(v)
    return v


def _series(rows: list[dict], key: str, x_key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool) and x_key in r:
            xs.append(r[x_key])
            ys.append(float(v))
    return xs, ys


def eval_grids(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of images/eval_<step>.png (video families: .webp, animated), oldest first."""
    found = []
    for p in (Path(run_dir) / "images").glob("eval_*.*"):
        m = _GRID_RE.search(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def write_plots(rows: list[dict], out_dir: Path) -> list[tuple[str, Path]]:
    """Write the PNG plots that the metrics allow; return (title, path) for each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    x_key = "samples_seen" if any("samples_seen" in r for r in rows) else "step"
    keys = sorted({k for r in rows for k in r})
    plots: list[tuple[str, Path]] = []

    def save(fig, name: str, title: str) -> None:
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        plots.append((title, path))

    fig = _reward_plot(plt, rows, x_key)
    if fig is not None:
        save(fig, "reward.png", "Reward: train and eval")

    eval_keys = [
        k for k in keys if k.startswith("eval/") and k.endswith("_mean") and k != "eval/reward_mean"
    ]
    if eval_keys:
        fig = _panels(plt, rows, eval_keys, x_key, marker="o-")
        save(fig, "eval_rewards.png", "Eval rewards (fixed noise)")

    part_keys = [k for k in keys if k.startswith("reward/") and k.endswith("_mean")]
    if part_keys:
        fig = _panels(plt, rows, part_keys, x_key)
        save(fig, "reward_parts.png", "Reward parts (train)")

    _, ks = _series(rows, "K_mean", x_key)
    if ks:
        save(_k_hist(plt, ks), "k_hist.png", "Truncation K")

    speed_keys = [k for k in ("sec_per_step", "peak_mem_gib") if k in keys]
    if speed_keys:
        fig = _panels(plt, rows, speed_keys, "step")
        save(fig, "speed.png", "Speed and memory")

    opt_keys = [k for k in ("loss", "grad_norm", "lr") if k in keys]
    if opt_keys:
        fig = _panels(plt, rows, opt_keys, x_key)
        save(fig, "optimization.png", "Loss, gradient norm, learning rate")

    # Against "step", which every row has (eval-only rows may lack samples_seen).
    judge_keys = [k for k in eval_keys if any(map(math.isfinite, _series(rows, k, "step")[1]))]
    if judge_keys and any(_series(rows, k, "step")[1] for k in ("reward_mean", "eval/reward_mean")):
        fig = _normalized_plot(plt, rows, judge_keys, "step")
        save(fig, "reward_vs_judges.png", "Training reward vs eval judges (min-max normalised)")

    points = _reward_diversity_points(rows)
    if points:
        fig = _diversity_plot(plt, points)
        save(fig, "reward_vs_diversity.png", "Reward vs eval diversity over training")
    return plots


def _reward_plot(plt, rows: list[dict], x_key: str):
    """Train reward (with its std band) and the training reward at evaluation; None without either."""
    xs, mean = _series(rows, "reward_mean", x_key)
    ex, ey = _series(rows, "eval/reward_mean", x_key)
    if not (xs or ex):
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if xs:
        ax.plot(xs, mean, label="train reward_mean", lw=1)
        sx, std = _series(rows, "reward_std", x_key)
        if len(sx) == len(xs):
            lo = [m - s for m, s in zip(mean, std, strict=True)]
            hi = [m + s for m, s in zip(mean, std, strict=True)]
            ax.fill_between(xs, lo, hi, alpha=0.2, label="± std")
    if ex:
        ax.plot(ex, ey, "o-", label="eval reward_mean")
    ax.set_xlabel(x_key)
    ax.set_ylabel("reward")
    ax.legend()
    return fig


def _k_hist(plt, ks: list[float]):
    """Histogram of the truncation K per update (one bin per integer when the range is small)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    lo, hi = math.floor(min(ks)), math.ceil(max(ks))
    bins = [b - 0.5 for b in range(lo, hi + 2)] if hi - lo < 100 else 50
    ax.hist(ks, bins=bins)
    ax.set_xlabel("K (steps with gradient, mean per update)")
    ax.set_ylabel("updates")
    return fig


def _minmax(ys: list[float]) -> list[float]:
    """Scale finite values to [0, 1] over the run (a constant series sits at 0.5); NaN stays NaN."""
    finite = [y for y in ys if math.isfinite(y)]
    if not finite:
        return ys
    lo, hi = min(finite), max(finite)
    if hi == lo:
        return [0.5 if math.isfinite(y) else math.nan for y in ys]
    return [(y - lo) / (hi - lo) if math.isfinite(y) else math.nan for y in ys]


def _normalized_plot(plt, rows: list[dict], judge_keys: list[str], x_key: str):
    """One axis: the training reward and every eval judge, each min-max normalised over the run,
    so a judge that falls while the training reward rises (reward hacking) stands out."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs, ys = _series(rows, "reward_mean", x_key)
    if ys:
        ax.plot(xs, _minmax(ys), "-", lw=2, color="black", label="train reward_mean")
    ex, ey = _series(rows, "eval/reward_mean", x_key)
    if ey:
        ax.plot(ex, _minmax(ey), "s--", lw=1.5, color="black", ms=4, label="eval/reward_mean")
    for key in judge_keys:
        jx, jy = _series(rows, key, x_key)
        ax.plot(jx, _minmax(jy), "o-", lw=1, ms=4, label=key)
    ax.set_xlabel(x_key)
    ax.set_ylabel("normalised over the run (0 = min, 1 = max)")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=8, loc="best")
    return fig


def _by_step(rows: list[dict]) -> dict[int, dict]:
    """Rows merged per step (eval rows may be logged apart from the update's row)."""
    merged: dict[int, dict] = {}
    for r in rows:
        step = r.get("step")
        if isinstance(step, int | float) and not isinstance(step, bool):
            merged.setdefault(int(step), {}).update(r)
    return merged


def _reward_diversity_points(rows: list[dict]) -> list[tuple[int, float, float, str]]:
    """(step, diversity, reward, reward key) at each evaluation with eval/diversity; the reward is
    eval/reward_mean where logged, else that step's train reward_mean."""
    points = []
    for step, r in sorted(_by_step(rows).items()):
        div = r.get("eval/diversity")
        if not isinstance(div, int | float) or isinstance(div, bool) or not math.isfinite(div):
            continue
        for key in ("eval/reward_mean", "reward_mean"):
            v = r.get(key)
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                points.append((step, float(div), float(v), key))
                break
    return points


def _diversity_plot(plt, points: list[tuple[int, float, float, str]]):
    """Reward (y) against eval diversity (x), joined in step order and coloured by step: a run
    that hacks its reward moves up and to the left (more reward, less diverse images)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    steps = [p[0] for p in points]
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    ax.plot(xs, ys, "-", color="0.7", lw=1, zorder=1)
    sc = ax.scatter(xs, ys, c=steps, cmap="viridis", zorder=2)
    fig.colorbar(sc, ax=ax, label="step")
    keys = sorted({p[3] for p in points})
    ax.set_xlabel("eval/diversity (mean pairwise 1 - cos)")
    ax.set_ylabel(" / ".join(keys))
    return fig


def _panels(plt, rows: list[dict], keys: list[str], x_key: str, marker: str = "-"):
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        xs, ys = _series(rows, key, x_key)
        ax.plot(xs, ys, marker, lw=1, ms=3)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel(x_key)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    return fig


def _summary(rows: list[dict]) -> list[tuple[str, str]]:
    if not rows:
        return []
    last = rows[-1]
    # Rows are not updates: step 0 (before training) and eval-only rows are rows too.
    steps = [r["step"] for r in rows if isinstance(r.get("step"), int | float)]
    items = [("updates", str(int(max(steps))) if steps else "?"), ("rows logged", str(len(rows)))]
    items.append(("last step", str(last.get("step", "?"))))
    if "samples_seen" in last:
        items.append(("samples seen", str(last["samples_seen"])))
    for key in ("reward_mean", "eval/reward_mean"):
        _, ys = _series(rows, key, "step")
        if ys:
            items.append((f"{key} first → last", f"{ys[0]:.4g} → {ys[-1]:.4g}"))
    _, sec = _series(rows, "sec_per_step", "step")
    if sec:
        items.append(("median sec/step", f"{sorted(sec)[len(sec) // 2]:.3g}"))
    _, mem = _series(rows, "peak_mem_gib", "step")
    if mem:
        items.append(("peak memory (GiB)", f"{max(mem):.3g}"))
    return items


def _config_items(run_dir: Path) -> list[tuple[str, str]]:
    path = run_dir / "config.json"
    if not path.exists():
        return []
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError:
        return []
    items = []
    for dotted in _CONFIG_KEYS:
        node: Any = config
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            items.append((dotted, json.dumps(node) if not isinstance(node, str) else node))
    return items


def _table(items: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in items)
    return f"<table>{body}</table>"


def write_report(run_dir: str | os.PathLike) -> Path:
    """Write run_dir/report.html and its plots under run_dir/report/; return the HTML path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {str(run_dir)!r} does not exist")
    rows = read_metrics(run_dir)
    plots = write_plots(rows, run_dir / "report") if rows else []
    grids = eval_grids(run_dir)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(run_dir.name)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}"
        "th{text-align:left;padding-right:1em}img{max-width:100%}"
        "figure{margin:1em 0}</style></head><body>",
        f"<h1>{html.escape(run_dir.name)}</h1>",
    ]
    config_items = _config_items(run_dir)
    if config_items:
        parts += ["<h2>Config</h2>", _table(config_items)]
    parts.append("<h2>Summary</h2>")
    parts.append(_table(_summary(rows)) if rows else "<p>No metrics.jsonl rows yet.</p>")
    for title, path in plots:
        rel = path.relative_to(run_dir).as_posix()
        parts.append(
            f"<figure><h2>{html.escape(title)}</h2><img src='{html.escape(rel)}' alt='{html.escape(title)}'></figure>"
        )
    if grids:
        parts.append("<h2>Eval images over time (fixed noise)</h2>")
        for step, path in grids:
            rel = path.relative_to(run_dir).as_posix()
            parts.append(
                f"<figure><h3>step {step}</h3><img src='{html.escape(rel)}' alt='eval step {step}'></figure>"
            )
    parts.append("</body></html>")
    out = run_dir / "report.html"
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
