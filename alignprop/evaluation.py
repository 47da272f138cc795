"""Fixed-noise evaluation of a base model and LoRA checkpoints (and soups of them) under several rewards.

Every entry (base, a checkpoint, a soup coefficient) is sampled from the same initial latents,
drawn once from a generator seeded with config.eval_seed, exactly as the trainer draws its eval
noise, so differences between rows come from the weights alone.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignprop import checkpoints, families, inference, lora_io, models, rewards, solvers
from alignprop.diversity import diversity_metrics
from alignprop.errors import ConfigError
from alignprop.prompts import load_prompts


@dataclass
class Entry:
    """One row of the results table: a label and the LoRAs (path, scale) applied to the base."""

    label: str
    loras: list[tuple[str, float]] = field(default_factory=list)


def checkpoint_label(path: str) -> str:
    """A short readable name for a run folder, checkpoint folder or LoRA file."""
    p = Path(path)
    if p.is_file() and p.name == lora_io.LORA_WEIGHT_NAME:
        p = p.parent
    elif p.is_file():
        return p.stem
    if checkpoints.CHECKPOINT_RE.search(p.name) and p.parent.name == "checkpoints":
        return f"{p.parent.parent.name}/{p.name}"
    if p.name == "final":
        return p.parent.name
    return p.name or str(path)


def parse_coefs(text: str) -> list[float]:
    """'0,0.25,1' -> [0.0, 0.25, 1.0]."""
    try:
        coefs = [float(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"--coefs={text!r}: expected comma-separated numbers") from None
    if not coefs:
        raise ConfigError("--coefs is empty")
    return coefs


def build_entries(
    checkpoints: Sequence[str],
    mix: Sequence[str] = (),
    coefs: Sequence[float] = (),
    include_base: bool = True,
) -> list[Entry]:
    """Rows: base, each checkpoint at scale 1, then the soup at each coefficient.

    A soup of one LoRA A at c is c * dW_A; of two LoRAs A, B it is (1 - c) * dW_A + c * dW_B.
    """
    entries = [Entry("base")] if include_base or "base" in checkpoints else []
    for ckpt in checkpoints:
        if ckpt != "base":
            lora_io.check_lora_file(ckpt, "--checkpoints")  # fail before any model loads
            entries.append(Entry(checkpoint_label(ckpt), [(ckpt, 1.0)]))
    if mix:
        if len(mix) > 2:
            raise ConfigError(f"--mix takes one or two LoRAs, got {len(mix)}")
        for path in mix:
            lora_io.check_lora_file(path, "--mix")
        names = [checkpoint_label(p) for p in mix]
        for c in coefs:
            if len(mix) == 1:
                entries.append(Entry(f"{names[0]} x{c:g}", [(mix[0], c)]))
            else:
                entries.append(
                    Entry(f"mix({names[0]},{names[1]})@{c:g}", [(mix[0], 1 - c), (mix[1], c)])
                )
    seen: dict[str, int] = {}
    for e in entries:  # labels are table keys and file names: make them unique
        n = seen.get(e.label, 0)
        seen[e.label] = n + 1
        if n:
            e.label = f"{e.label}#{n + 1}"
    return entries


def reward_specs(config: Any) -> list[str]:
    """The training reward first, then each eval reward not already listed."""
    specs = [config.reward if isinstance(config.reward, str) else _spec_str(config.reward)]
    for name in (s.strip() for s in config.eval_rewards.split(",")):
        if name and name not in specs:
            specs.append(name)
    return specs


def _spec_str(spec: Any) -> str:
    return ",".join(f"{k}={v:g}" for k, v in dict(spec).items())


@dataclass
class Results:
    """Per-image scores {label: {reward: Tensor[N]}} and the prompts, in image order."""

    prompts: list[str]
    draws: list[int]
    scores: dict[str, dict[str, torch.Tensor]]
    rewards: list[str]
    # {label: {"diversity": .., "diversity_min": ..}} when eval_repeats >= 2
    diversity: dict[str, dict[str, float]] = field(default_factory=dict)

    def summary(self) -> list[dict[str, Any]]:
        rows = []
        for label, by_reward in self.scores.items():
            row: dict[str, Any] = {"checkpoint": label, "n": len(self.prompts)}
            for r in self.rewards:
                v = by_reward[r]
                row[f"{r}_mean"] = v.mean().item()
                row[f"{r}_std"] = v.std().item() if v.numel() > 1 else 0.0
            row.update(self.diversity.get(label, {}))
            rows.append(row)
        return rows


@dataclass
class EvalSet:
    """The held-out prompts in image order and their fixed initial latents."""

    prompts: list[str]
    draws: list[int]
    noise: torch.Tensor  # (N, C, H/f, W/f)

    @property
    def num_draws(self) -> int:
        """Seeds per prompt (config.eval_repeats): >= 2 measures diversity across them."""
        return max(self.draws) + 1 if self.draws else 0


def eval_set(config: Any, family, size: tuple[int, int]) -> EvalSet:
    """Eval prompts x config.eval_repeats draws; image k shows prompt k % P from draw k // P.

    The noise comes from its own generator seeded with config.eval_seed, so it never touches the
    training stream and draw 0 is the same for training's eval and scripts/evaluate.py.
    """
    texts = load_prompts(config.prompts.eval, config.prompts.template, field="prompts.eval")
    texts = texts[: config.prompts.num_eval] if config.prompts.num_eval else texts
    repeats = int(config.get("eval_repeats", 1))
    prompts = [t for _ in range(repeats) for t in texts]
    draws = [d for d in range(repeats) for _ in texts]
    return EvalSet(
        prompts, draws, inference.fixed_noise(family, len(prompts), size, config.eval_seed)
    )


def score_fixed_noise(
    family,
    ev: EvalSet,
    opts: solvers.Sampling,
    fns: dict[str, Any],
    *,
    batch_size: int,
    dtype: torch.dtype,
    eta_seed: int,
    model: torch.nn.Module | None = None,
    diversity: dict[str, float] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The one evaluation path: sample ev's prompts from its noise, score every batch under every reward.

    Returns ({name: Tensor[N]}, images (N, 3, H, W) on CPU). The parts of a combined first
    reward are scored too, under their own names. Given a dict `diversity` and >= 2 draws per
    prompt, it is filled with {"diversity", "diversity_min"} (alignprop.diversity) from the
    first reward's `embed` (its own vision tower; no randomness drawn).
    """
    scores: dict[str, list[torch.Tensor]] = {}
    first = next(iter(fns))
    embed = getattr(fns[first], "embed", None) if diversity is not None else None
    embed = embed if ev.num_draws >= 2 else None
    embeds: list[torch.Tensor] = []

    def on_batch(images: torch.Tensor, texts: list[str]) -> None:
        if embed is not None:
            embeds.append(embed(images).float().cpu())
        for name, fn in fns.items():
            r, info = fn(images, texts)
            scores.setdefault(name, []).append(r.float().cpu())
            if name == first and len(info["parts"]) > 1:
                for part, v in info["parts"].items():
                    scores.setdefault(part, []).append(v.float().cpu())

    images = inference.generate(
        family, ev.prompts, ev.noise, opts, batch_size=batch_size, dtype=dtype,
        eta_seed=eta_seed, model=model, on_batch=on_batch,
    )  # fmt: skip
    if embeds:  # image k is prompt k % P from draw k // P: (S * P, D) -> (P, S, D)
        e = torch.cat(embeds)
        e = e.view(ev.num_draws, -1, e.shape[-1]).transpose(0, 1)
        diversity.update(diversity_metrics(e, prefix=""))
    return {name: torch.cat(v) for name, v in scores.items()}, images


class RunEval:
    """A training run's evaluation: held-out prompts, fixed noise and the eval rewards, built once."""

    def __init__(self, config: Any, family, opts: solvers.Sampling, reward_fn: Any, device, dtype):
        self.config, self.family, self.opts, self.dtype = config, family, opts, dtype
        self.set = eval_set(config, family, (opts.height, opts.width))
        self.rewards = {"reward": reward_fn}
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # loading must not advance the training RNG
            for name in [s for s in config.eval_rewards.split(",") if s]:
                self.rewards[name] = rewards.get_reward(name, config.reward_models, device, dtype)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> tuple[dict[str, float], torch.Tensor, list[str]]:
        """Score the set from its noise under every eval reward; return metrics, images, captions."""
        ev, c = self.set, self.config
        div: dict[str, float] = {}  # filled when eval_repeats >= 2
        scores, images = score_fixed_noise(
            self.family, ev, self.opts, self.rewards, batch_size=c.sample.batch_size,
            dtype=self.dtype, eta_seed=c.eval_seed + 1, model=model, diversity=div,
        )  # fmt: skip
        metrics = {f"eval/{k}": v for k, v in div.items()}
        for name, v in scores.items():
            metrics[f"eval/{name}_mean"] = v.mean().item()
            metrics[f"eval/{name}_std"] = v.std().item() if v.numel() > 1 else 0.0
        r = scores["reward"].tolist()
        captions = [f"{p} | {x:.3f}" for p, x in zip(ev.prompts, r, strict=True)]
        return metrics, images, captions


def evaluate(
    config: Any, entries: Sequence[Entry], out_dir: str | os.PathLike, log=print
) -> Results:
    """Sample every entry from the same fixed noise, score it under every reward, write images and tables to out_dir."""
    from alignprop.families import note_ignored_guidance
    from alignprop.tracking import save_grid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = models.resolve_device(config.device)
    dtype = models.resolve_dtype(config.mixed_precision, device)
    family = families.load_family(config.pretrained, dtype, device)
    family.set_frames(config.sample.get("num_frames", 0), config.sample.get("reward_frames", ""))
    note_ignored_guidance(
        family, config.sample.guidance_scale, "sample.guidance_scale", "sample.true_cfg_scale"
    )
    opts = solvers.Sampling.from_config(config.sample)
    ev = eval_set(config, family, opts.size(family))
    specs = reward_specs(config)
    fns = {r: rewards.get_reward(r, config.reward_models, device, dtype) for r in specs}
    log(f"evaluating {len(entries)} entries on {len(ev.prompts)} images under {specs}")

    scores: dict[str, dict[str, torch.Tensor]] = {}
    diversities: dict[str, dict[str, float]] = {}
    for entry in entries:
        names = [
            lora_io.load_lora(family.denoiser, path, f"eval{i}", family=family)
            for i, (path, _) in enumerate(entry.loras)
        ]
        if names:
            lora_io.set_scales(family.denoiser, names, [scale for _, scale in entry.loras])
        div: dict[str, float] = {}
        got, images = score_fixed_noise(
            family, ev, opts, fns, batch_size=config.sample.batch_size, dtype=dtype,
            eta_seed=config.eval_seed + 1, diversity=div,
        )  # fmt: skip
        if names:
            family.denoiser.delete_adapters(names)
        scores[entry.label] = {r: got[r] for r in specs}
        if div:
            diversities[entry.label] = div
        captions = [
            f"{t} | {x:.3f}" for t, x in zip(ev.prompts, got[specs[0]].tolist(), strict=True)
        ]
        save_grid(images, captions, out / f"grid_{inference.slug(entry.label, 80)}")
        log(
            f"{entry.label}: "
            + ", ".join(f"{r}={v.mean():.4f}" for r, v in scores[entry.label].items())
            + "".join(f", {k}={v:.4f}" for k, v in div.items())
        )
    results = Results(ev.prompts, ev.draws, scores, specs, diversities)
    write_results(results, entries, out)
    return results


def write_results(results: Results, entries: Sequence[Entry], out_dir: Path) -> None:
    """results.csv and results.md (checkpoint x reward, mean ± std), scores.csv (per image)."""
    rows = results.summary()
    sources = {e.label: ";".join(f"{p}:{s:g}" for p, s in e.loras) for e in entries}
    fields = ["checkpoint", "loras", "n"]
    fields += [f"{r}_{k}" for r in results.rewards for k in ("mean", "std")]
    div_cols = ["diversity", "diversity_min"] if results.diversity else []
    fields += div_cols
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in rows:
            w.writerow({**row, "loras": sources.get(row["checkpoint"], "")})
    lines = [
        "| checkpoint | " + " | ".join(results.rewards + div_cols) + " |",
        "|---|" + "---|" * len(results.rewards + div_cols),
    ]
    for row in rows:
        cells = [_pm(row[f"{r}_mean"], row[f"{r}_std"]) for r in results.rewards]
        cells += [f"{row[c]:.4f}" if c in row else "" for c in div_cols]
        lines.append(f"| {row['checkpoint']} | " + " | ".join(cells) + " |")
    n = rows[0]["n"] if rows else 0
    (out_dir / "results.md").write_text(
        f"Fixed-noise evaluation, {n} images per row (mean ± std over images).\n\n"
        + "\n".join(lines)
        + "\n"
    )
    with open(out_dir / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["checkpoint", "image", "prompt", "draw", *results.rewards])
        for label, by_reward in results.scores.items():
            for k, (prompt, draw) in enumerate(zip(results.prompts, results.draws, strict=True)):
                w.writerow(
                    [
                        label,
                        k,
                        prompt,
                        draw,
                        *(f"{by_reward[r][k].item():.6g}" for r in results.rewards),
                    ]
                )


def _pm(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return str(mean)
    return f"{mean:.4f} ± {std:.4f}"


def log_wandb(config: Any, results: Results, out_dir: Path) -> None:
    """Send the table and the grids to wandb (imported lazily; WANDB_MODE is honoured)."""
    import wandb

    run = wandb.init(
        project=config.wandb_project,
        job_type="eval",
        config=json.loads(config.to_json_best_effort()),
        dir=str(out_dir),
    )
    rows = results.summary()
    table = wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])
    grids = {}
    for label in results.scores:
        stem = out_dir / f"grid_{inference.slug(label, 80)}"
        path = (
            stem.with_suffix(".png")
            if stem.with_suffix(".png").exists()
            else stem.with_suffix(".webp")
        )
        grids[f"grid/{label}"] = wandb.Image(str(path))  # a clip's .webp: its first frame
    run.log({"results": table, **grids})
    run.finish()


def mix_tradeoff(entries: Sequence[Entry], results: Results, out_dir: str | os.PathLike) -> Path:
    """The trade-off between the first two rewards along a two-LoRA soup (the paper's LoRA soup of
    an aesthetic run and a compressibility run): mix_tradeoff.md, one line per coefficient c
    ((1 - c) dW_A + c dW_B) with every reward's mean, and mix_tradeoff.png, rewards[0] (x)
    against rewards[1] (y), the soups as a curve labelled by c, base and checkpoints as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(results.rewards) < 2:
        raise ConfigError(
            "the soup's trade-off plot needs two rewards: the training reward and one of "
            "eval_rewards (e.g. --config.reward=aesthetic --config.eval_rewards=jpeg)"
        )
    by_label = {row["checkpoint"]: row for row in results.summary()}
    soups = [(e.loras[1][1], by_label[e.label]) for e in entries if len(e.loras) == 2]
    others = [(e.label, by_label[e.label]) for e in entries if len(e.loras) != 2]
    keys = [f"{r}_mean" for r in results.rewards]
    lines = [
        "| c (weight of B) | " + " | ".join(results.rewards) + " |",
        "|" + "---:|" * (len(keys) + 1),
    ]
    for c, row in sorted(soups, key=lambda t: t[0]):
        lines.append(f"| {c:g} | " + " | ".join(f"{row[k]:.4g}" for k in keys) + " |")
    out = Path(out_dir)
    (out / "mix_tradeoff.md").write_text("\n".join(lines) + "\n")
    x, y = keys[:2]
    fig, ax = plt.subplots(figsize=(5, 4))
    pts = sorted(soups, key=lambda t: t[0])
    ax.plot([r[x] for _, r in pts], [r[y] for _, r in pts], "o-", lw=1, label="soup")
    for c, r in pts:
        ax.annotate(f"{c:g}", (r[x], r[y]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for label, r in others:
        ax.plot(r[x], r[y], "s", label=label)
    ax.set_xlabel(results.rewards[0])
    ax.set_ylabel(results.rewards[1])
    ax.set_title("LoRA soup (1 - c) A + c B", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "mix_tradeoff.png", dpi=100)
    plt.close(fig)
    return out / "mix_tradeoff.png"


def scale_sweep(
    config: Any, checkpoint: str, scales: Sequence[float], out_dir: str | os.PathLike, log=print
) -> Results:
    """Evaluate one LoRA at each scale c (c * dW, scale 0 = the base) and write the reward-versus-
    diversity trade-off: tradeoff.md and tradeoff.png (alignprop.diversity) beside the results."""
    from alignprop.diversity import plot_tradeoff, tradeoff_table
    from alignprop.errors import ConfigError

    if config.get("eval_repeats", 1) < 2:
        raise ConfigError(
            f"--lora-scales measures diversity across seeds: set --config.eval_repeats >= 2 "
            f"(got {config.get('eval_repeats', 1)})"
        )
    entries = build_entries([], [checkpoint], scales, include_base=False)
    results = evaluate(config, entries, out_dir, log=log)
    by_label = {row["checkpoint"]: row for row in results.summary()}
    rows = []
    for e in entries:
        row = by_label[e.label]
        rows.append(
            {
                "scale": e.loras[0][1],
                **{f"{r}_mean": row[f"{r}_mean"] for r in results.rewards},
                "diversity": row.get("diversity", float("nan")),
            }
        )
    out = Path(out_dir)
    (out / "tradeoff.md").write_text(tradeoff_table(rows))
    plot_tradeoff(rows, out / "tradeoff.png")
    return results
