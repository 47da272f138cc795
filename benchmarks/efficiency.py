"""Sample and compute efficiency: AlignProp (reward backprop) against DDPO (PPO) on one model and reward.

Both algorithms run in this process as the runs scripts/train.py builds (alignprop.run.Run
with the objective of alignprop.objectives), from the same named configs, on the same model,
reward, training and eval prompts, seed and sampler (sample.num_steps, guidance, and eta = --eta for both: DDPO
needs a stochastic chain, AlignProp backpropagates through the same one). Each runs until it has
scored its budget of training images (reward queries): --budget for AlignProp, --ddpo-factor
times that for DDPO.

Progress is the mean reward of the fixed eval set (evaluation.score_fixed_noise through
the same batching for both: held-out prompts x --eval-repeats draws, fixed initial and eta noise), measured every --eval-every
queries; the training batch's mean reward is recorded too. Seconds are training seconds (the
sum of sec_per_step: sampling, reward, backward, optimizer), evaluation excluded.

The ratio: for each fraction f of AlignProp's budget (25%, 50%, 100%), the eval reward AlignProp
has at f x budget queries is the target; DDPO's queries (and seconds) to first reach it, divided
by AlignProp's, is the ratio ("not reached" when DDPO never gets there within its budget).

Output in --out: curves.jsonl (one row per eval point), summary.json, efficiency.png.
  python benchmarks/efficiency.py --tiny                     # CPU, tiny random models, minutes
  python benchmarks/efficiency.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --reward aesthetic \\
      --budget 2048 --ddpo-factor 25 --eval-every 256        # a GPU
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import time
from pathlib import Path

from alignprop import cli
from alignprop.errors import ConfigError

FRACTIONS = (0.25, 0.5, 1.0)
ROOT = Path(__file__).resolve().parents[1]


def named_config(name: str, flag: str = "--config"):
    """A named experiment from config/align_prop.py (loaded by path, as ml_collections does)."""
    spec = importlib.util.spec_from_file_location(
        "alignprop_config_align_prop", ROOT / "config" / "align_prop.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module.get_config(name)
    except ValueError as err:  # an unknown name: the list of valid ones
        raise ConfigError(f"{flag} {name}: {err}") from None


def _get(config, field: str):
    for part in field.split("."):
        config = config[part]
    return config


def build_configs(args) -> dict:
    """{algorithm: config}: the two named configs with every shared condition set alike."""
    names = {"alignprop": args.alignprop_config, "ddpo": args.ddpo_config}
    configs = {}
    for algorithm, name in names.items():
        c = named_config(name, f"--{algorithm}-config")
        c.train.algorithm = algorithm
        c.tiny = args.tiny
        c.seed = args.seed
        c.log_with = "none"
        if args.model:
            c.pretrained.model = args.model
        if args.reward:
            c.reward = args.reward
        c.eval_rewards = ""
        c.sample.eta = args.eta
        c.sample.num_steps = args.steps
        c.prompts.num_eval = args.num_eval
        c.eval_repeats = args.eval_repeats
        if args.device:
            c.device = args.device
        configs[algorithm] = c
    shared = (
        "reward",
        "pretrained.model",
        "prompts.train",
        "prompts.eval",
        "sample.guidance_scale",
    )
    for field in shared:
        values = {a: _get(c, field) for a, c in configs.items()}
        if len({json.dumps(v, default=str) for v in values.values()}) > 1:
            raise ConfigError(
                f"{field} differs between the configs: {values}; set it alike in both"
            )
    return configs


def preflight(config, budget: int, eval_every: int):
    """The config checked as train.py checks it, and the eval points against its batch (no models)."""
    from alignprop import checks

    checks.apply_tiny(config)
    b = checks.validate_config(config, processes=1)
    if eval_every % b.total or budget % eval_every:
        raise ConfigError(
            f"--eval-every={eval_every} must be a multiple of {config.train.algorithm}'s "
            f"train.total_batch_size={b.total}, and divide its budget {budget}"
        )
    return b


def run_one(
    config, budget: int, eval_every: int, eval_batch: int, out_dir: Path, log=print
) -> list[dict]:
    """Train one algorithm for `budget` reward queries; eval rows every `eval_every` queries."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from alignprop import ddpo, evaluation

    config = copy.deepcopy(config)
    b = preflight(config, budget, eval_every)
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    acc = Accelerator(mixed_precision=config.mixed_precision, cpu=config.device == "cpu")
    set_seed(config.seed)
    algorithm = config.train.algorithm
    run = ddpo.trainer_class(algorithm)(config, acc, b, out_dir / algorithm)
    set_seed(config.seed, device_specific=True)

    # the one evaluation path, in batches of eval_batch for both (the eta noise depends on batching)
    ev = evaluation.eval_set(config, run.family, (run.opts.height, run.opts.width))

    def row(run, train_reward: float | None, seconds: float) -> dict:
        with torch.no_grad():
            scores, _ = evaluation.score_fixed_noise(
                run.family, ev, run.opts, {"reward": run.reward_fn}, batch_size=eval_batch,
                dtype=run.dtype, eta_seed=config.eval_seed + 1, model=acc.unwrap_model(run.model),
            )  # fmt: skip
        r = {
            "algorithm": algorithm,
            "update": run.state.update,
            "queries": run.state.samples_seen,
            "train_seconds": seconds,
            "train_reward": train_reward,
            "eval_reward": scores["reward"].mean().item(),
        }
        log(json.dumps(r))
        return r

    seconds, recent = 0.0, []
    rows = [row(run, None, 0.0)]
    while run.state.samples_seen < budget:
        m = run.update()
        seconds += m["sec_per_step"]
        recent.append(m["reward_mean"])
        if run.state.samples_seen % eval_every == 0:
            rows.append(row(run, sum(recent) / len(recent), seconds))
            recent = []
    del run
    acc.free_memory()
    return rows


def ratios(ap: list[dict], dd: list[dict], budget: int) -> list[dict]:
    """DDPO's queries and seconds to reach AlignProp's eval reward at each fraction of its budget."""
    out = []
    for f in FRACTIONS:
        at = [r for r in ap if r["queries"] <= f * budget][-1]
        target = at["eval_reward"]
        hit = next((r for r in dd if r["eval_reward"] >= target), None)
        item = {
            "fraction": f,
            "alignprop_queries": at["queries"],
            "alignprop_seconds": at["train_seconds"],
            "target_eval_reward": target,
            "reached": hit is not None,
            "ddpo_queries": hit["queries"] if hit else None,
            "ddpo_seconds": hit["train_seconds"] if hit else None,
        }
        if hit and at["queries"]:
            item["query_ratio"] = hit["queries"] / at["queries"]
            item["seconds_ratio"] = hit["train_seconds"] / max(at["train_seconds"], 1e-9)
        elif not hit:  # a lower bound: DDPO's whole budget did not suffice
            item["query_ratio_lower_bound"] = dd[-1]["queries"] / max(at["queries"], 1)
        out.append(item)
    return out


def ratio_line(item: dict) -> str:
    head = (
        f"{item['fraction']:.0%} of AlignProp's budget ({item['alignprop_queries']} queries, "
        f"eval reward {item['target_eval_reward']:.4f}): "
    )
    if not item["reached"]:
        return head + (
            f"DDPO did not reach it in {item['query_ratio_lower_bound']:.1f}x the queries (not reached)"
        )
    if "query_ratio" not in item:
        return head + "reached at the start"
    return head + (
        f"DDPO needs {item['ddpo_queries']} queries ({item['query_ratio']:.1f}x) and "
        f"{item['ddpo_seconds']:.1f} s ({item['seconds_ratio']:.1f}x the seconds)"
    )


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for algorithm in ("alignprop", "ddpo"):
        rs = [r for r in rows if r["algorithm"] == algorithm]
        for ax, x in zip(axes, ("queries", "train_seconds"), strict=True):
            ax.plot([r[x] for r in rs], [r["eval_reward"] for r in rs], marker="o", label=algorithm)
    axes[0].set_xlabel("reward queries (training images scored)")
    axes[1].set_xlabel("training seconds")
    for ax in axes:
        ax.set_ylabel("eval reward (fixed noise)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = cli.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tiny", action="store_true", help="tiny random models on CPU")
    p.add_argument("--model", default="", help="hub id or folder (default: the configs')")
    p.add_argument(
        "--reward", default="aesthetic", help="training and eval reward (differentiable)"
    )
    p.add_argument("--alignprop-config", default=None, help="named config (tiny | aesthetic)")
    p.add_argument("--ddpo-config", default=None, help="named config (tiny_ddpo | aesthetic_ddpo)")
    p.add_argument("--budget", type=int, default=None, help="AlignProp's reward queries")
    p.add_argument("--ddpo-factor", type=float, default=None, help="DDPO's budget / AlignProp's")
    p.add_argument("--eval-every", type=int, default=None, help="queries between eval points")
    p.add_argument("--steps", type=int, default=None, help="sample.num_steps for both")
    p.add_argument("--eta", type=float, default=1.0, help="sample.eta for both (DDPO needs > 0)")
    p.add_argument("--num-eval", type=int, default=0, help="eval prompts (0 = all)")
    p.add_argument("--eval-repeats", type=int, default=2, help="fixed-noise draws per eval prompt")
    p.add_argument("--eval-batch", type=int, default=4, help="images per eval batch (both)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="", help='"" = accelerate\'s choice, "cpu" forces CPU')
    p.add_argument("--out", default="logs/efficiency")
    args = p.parse_args(argv)
    tiny_defaults = dict(alignprop_config="tiny", ddpo_config="tiny_ddpo", budget=128, ddpo_factor=4, eval_every=32, steps=10)  # fmt: skip
    gpu_defaults = dict(alignprop_config="aesthetic", ddpo_config="aesthetic_ddpo", budget=2048, ddpo_factor=25, eval_every=256, steps=50)  # fmt: skip
    for k, v in (tiny_defaults if args.tiny else gpu_defaults).items():
        if getattr(args, k) is None:
            setattr(args, k, v)

    for flag in ("budget", "eval_every", "steps", "eval_repeats", "eval_batch"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not args.ddpo_factor > 0 or args.num_eval < 0:
        p.error("--ddpo-factor must be > 0 and --num-eval >= 0")
    import os

    os.environ.setdefault("WANDB_MODE", "disabled")
    out = Path(args.out)
    configs = build_configs(args)
    budgets = {"alignprop": args.budget, "ddpo": int(round(args.budget * args.ddpo_factor))}
    for algorithm, config in configs.items():  # both checked before either loads a model
        preflight(copy.deepcopy(config), budgets[algorithm], args.eval_every)
    from alignprop import checks

    checks.check_writable(out, "--out")
    t0 = time.time()
    rows = []
    with open(out / "curves.jsonl", "w") as f:

        def log(line: str) -> None:
            print(line, flush=True)
            f.write(line + "\n")
            f.flush()

        for algorithm, config in configs.items():
            rows += run_one(config, budgets[algorithm], args.eval_every, args.eval_batch, out, log)
    ap = [r for r in rows if r["algorithm"] == "alignprop"]
    dd = [r for r in rows if r["algorithm"] == "ddpo"]
    result = ratios(ap, dd, args.budget)
    c_ap, c_dd = configs["alignprop"], configs["ddpo"]
    conditions = {
        "model": "tiny random SD 1.5 (alignprop.tiny)" if args.tiny else c_ap.pretrained.model,
        "reward": c_ap.reward,
        "prompts": {"train": c_ap.prompts.train, "eval": c_ap.prompts.eval},
        "seed": args.seed,
        "num_steps": args.steps,
        "eta": args.eta,
        "guidance_scale": c_ap.sample.guidance_scale,
        "budgets": budgets,
        "eval_every": args.eval_every,
        "progress": "eval/reward_mean on the fixed eval set (evaluation.score_fixed_noise)",
        "alignprop": {"config": args.alignprop_config, "lr": c_ap.train.learning_rate,
                      "images_per_update": c_ap.train.total_batch_size, "truncation": c_ap.truncation.to_dict()},
        "ddpo": {"config": args.ddpo_config, "lr": c_dd.train.learning_rate,
                 "images_per_update": c_dd.train.total_batch_size, **c_dd.train.ddpo.to_dict()},
        "wall_seconds": time.time() - t0,
    }  # fmt: skip
    summary = {"conditions": conditions, "ratios": result}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    title = f"{conditions['model']}, reward {conditions['reward']}, seed {args.seed}, {args.steps} steps, eta {args.eta}"
    plot(rows, out / "efficiency.png", title)
    for item in result:
        print("ratio: " + ratio_line(item))
    print(
        f"curves: {out / 'curves.jsonl'}; plot: {out / 'efficiency.png'}; summary: {out / 'summary.json'}"
    )
    return summary


if __name__ == "__main__":
    sys.exit(cli.run(lambda argv: main(argv) and 0))
