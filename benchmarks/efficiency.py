"""Reward reached per reward query and per training second, for every objective on one model.

Each objective (alignprop.objectives; --algorithms, default every one that applies to the
family) runs in this process as scripts/train.py builds it (alignprop.run.Run), from its named
config (its own recipe: learning rate, batch, K or PPO fields), with every shared condition set
from AlignProp's config: model, reward, training and eval prompts, resolution, guidance, the
evaluation sampler (sample.num_steps = --steps; sample.eta = --eta on the DDIM families, where
DDPO needs a stochastic chain; 0 on the flow families, where Flow-GRPO samples its own SDE for
training), seed. Each runs until it has scored its budget of training images (reward queries):
--budget for the reward-gradient objectives, --rl-factor times that for the RL ones (ddpo, flow_grpo,
diffusion_nft).

Progress is the mean reward of the fixed eval set (evaluation.score_fixed_noise, the same
batching for all: held-out prompts x --eval-repeats draws, fixed initial and eta noise), measured
every --eval-every queries; seconds are training seconds (the sum of sec_per_step: sampling,
reward, backward, optimizer), evaluation excluded; on a GPU they are GPU-seconds too (one
process, one GPU). At the end of each objective the held-out judges (--judges, from the same
noise) and eval/diversity (--eval-repeats >= 2) show a method that games its reward.

The table: for each fraction f of AlignProp's budget (25%, 50%, 100%), the eval reward AlignProp
has at f x budget queries is the target; each objective's queries and seconds to first reach it
("not reached" with the queries it had). Peak memory per objective on CUDA.

Output in --out: curves.jsonl (one row per eval point), summary.json, efficiency_<family>.png.
  python benchmarks/efficiency.py --tiny                 # CPU: tiny random SD 1.5 and SD3
  python benchmarks/efficiency.py --family sd --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --reward aesthetic --budget 2048 --rl-factor 25 --eval-every 256      # a GPU
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
PATHWISE = ("alignprop", "draft_lv", "refl", "drtune", "direct_align")
# the RL objectives and the solver each trains on (alignprop.objectives.ddpo.RL_SOLVER)
RL = {"ddpo": "ddim", "flow_grpo": "flow", "diffusion_nft": "flow"}
SOLVER = {"sd": "ddim", "sd3": "flow", "flux": "flow"}
# --tiny or not -> family -> objective -> its named config; an objective missing here runs the
# family's alignprop config with train.algorithm set
CONFIGS = {
    True: {
        "sd": {"alignprop": "tiny", "ddpo": "tiny_ddpo", **{n: f"tiny_{n}" for n in PATHWISE[1:]}},
        "sd3": {"alignprop": "tiny_sd3", "flow_grpo": "tiny_sd3_flow_grpo",
                "diffusion_nft": "tiny_sd3_diffusion_nft"},
        "flux": {"alignprop": "tiny_flux", "flow_grpo": "tiny_flux_flow_grpo"},
    },
    False: {
        "sd": {"alignprop": "aesthetic", "ddpo": "aesthetic_ddpo",
               **{n: f"aesthetic_{n}" for n in PATHWISE[1:]}},
        "sd3": {"alignprop": "sd3_aesthetic", "flow_grpo": "sd3_flow_grpo",
                "diffusion_nft": "sd3_diffusion_nft"},
        "flux": {"alignprop": "flux_aesthetic", "flow_grpo": "flux_flow_grpo"},
    },
}  # fmt: skip
# --tiny's default evaluation chain: 10 of the tiny SD config's 20 steps (half the cost; the
# reward moves more on it), tiny SD3/FLUX's own 6
TINY_STEPS = {"sd": 10}
# set on every objective's config from AlignProp's (the conditions that must be alike)
SHARED = (
    "reward", "pretrained.model", "pretrained.family", "prompts.train", "prompts.eval",
    "prompts.template", "sample.guidance_scale", "sample.resolution", "sample.height",
    "sample.width", "sample.negative_prompt", "mixed_precision", "tiny", "tiny_kit",
)  # fmt: skip


JUDGES: dict = {}  # (name, device, dtype) -> the held-out judge's reward function


def applicable(family: str) -> list[str]:
    """The objectives that run on a family: every pathwise one, and the RL one of its solver."""
    return list(PATHWISE) + [a for a, solver in RL.items() if solver == SOLVER[family]]


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


def _field(config, field: str):
    """(section, name) of a dotted field, or None when the config has no such field."""
    *parents, name = field.split(".")
    for part in parents:
        if part not in config:
            return None
        config = config[part]
    return (config, name) if name in config else None


def build_configs(args, family: str) -> dict:
    """{algorithm: config} for one family: each objective's named config, with the shared
    conditions copied from AlignProp's and the benchmark's own settings."""
    names = dict(CONFIGS[args.tiny][family])
    names.update(args.config_of.get(family, {}))
    ap = named_config(names["alignprop"], "--alignprop-config")
    configs = {}
    for algorithm in args.algorithms_of[family]:
        name = names.get(algorithm, names["alignprop"])
        flag = "--ddpo-config" if algorithm == "ddpo" else "--config"
        c = named_config(name, flag) if algorithm != "alignprop" else copy.deepcopy(ap)
        c.train.algorithm = algorithm
        for field in SHARED:
            src, dst = _field(ap, field), _field(c, field)
            if src and dst:
                dst[0][dst[1]] = src[0][src[1]]
        c.tiny, c.seed, c.log_with = args.tiny, args.seed, "none"
        if args.model:
            c.pretrained.model = args.model
        if args.reward:
            c.reward = args.reward
        if args.resolution:
            c.sample.resolution = args.resolution
        c.eval_rewards = args.judges
        c.sample.eta = args.eta if SOLVER[family] == "ddim" else 0.0
        c.sample.num_steps = (
            args.steps or TINY_STEPS.get(family, 0) * args.tiny or ap.sample.num_steps
        )
        c.prompts.num_eval = args.num_eval
        c.eval_repeats = args.eval_repeats
        if args.device:
            c.device = args.device
        configs[algorithm] = c
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
    config,
    budget: int,
    eval_every: int,
    eval_batch: int,
    out_dir: Path,
    log=print,
    family: str = "sd",
) -> tuple[list[dict], dict]:
    """Train one objective for `budget` reward queries; eval rows every `eval_every` queries,
    then its judges and diversity from the same noise: (rows, the end's judges row)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from alignprop import evaluation, objectives, rewards
    from alignprop.run import Run

    config = copy.deepcopy(config)
    b = preflight(config, budget, eval_every)
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    acc = Accelerator(mixed_precision=config.mixed_precision, cpu=config.device == "cpu")
    set_seed(config.seed)
    algorithm = config.train.algorithm
    cuda = acc.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    run = Run(config, acc, b, out_dir / family / algorithm, objective=objectives.get(algorithm))
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
            "family": family,
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
    end = {"family": family, "algorithm": algorithm, "queries": run.state.samples_seen,
           "train_seconds": seconds, "gpu_seconds": seconds if cuda else None,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}  # fmt: skip
    fns = {"reward": run.reward_fn}
    for name in [n for n in config.eval_rewards.split(",") if n]:
        key = (name, str(run.device), run.dtype)
        if key not in JUDGES:  # loaded once for every objective of the benchmark
            JUDGES[key] = rewards.get_reward(name, config.reward_models, run.device, run.dtype)
        fns[name] = JUDGES[key]
    div: dict[str, float] = {}
    with torch.no_grad():
        scores, _ = evaluation.score_fixed_noise(
            run.family, ev, run.opts, fns, batch_size=eval_batch, dtype=run.dtype,
            eta_seed=config.eval_seed + 1, model=acc.unwrap_model(run.model),
            diversity=div if config.eval_repeats > 1 else None,
        )  # fmt: skip
    end.update({f"eval/{k}_mean": v.mean().item() for k, v in scores.items()})
    end.update({f"eval/{k}": v for k, v in div.items()})
    log(json.dumps({"end": end}))
    del run
    acc.free_memory()
    return rows, end


def reach(rows: list[dict], target: float) -> dict | None:
    """The first eval row at or above target."""
    return next((r for r in rows if r["eval_reward"] >= target), None)


def table(by: dict[str, list[dict]], budget: int) -> list[dict]:
    """Per fraction of AlignProp's budget: its eval reward there, and each objective's queries and
    seconds to first reach it (None: not reached within its own budget, the bound)."""
    ap, out = by["alignprop"], []
    for f in FRACTIONS:
        at = [r for r in ap if r["queries"] <= f * budget][-1]
        item = {"fraction": f, "alignprop_queries": at["queries"],
                "alignprop_seconds": at["train_seconds"], "target_eval_reward": at["eval_reward"],
                "objectives": {}}  # fmt: skip
        for algorithm, rows in by.items():
            hit = reach(rows, at["eval_reward"])
            item["objectives"][algorithm] = {
                "reached": hit is not None,
                "queries": hit["queries"] if hit else None,
                "seconds": hit["train_seconds"] if hit else None,
                "bound_queries": rows[-1]["queries"],
            }
        out.append(item)
    return out


def cell(o: dict, at: dict) -> str:
    if not o["reached"]:
        return f"not reached in {o['bound_queries']}"
    if not at["alignprop_queries"]:
        return "at the start"
    ratio = o["queries"] / at["alignprop_queries"]
    return f"{o['queries']} ({ratio:.2g}x), {o['seconds']:.1f} s"


def markdown(family: str, items: list[dict], ends: dict[str, dict]) -> str:
    """The family's table: queries (x AlignProp's) and seconds to reach AlignProp's eval reward
    at each fraction of its budget; then each objective's end (its judges, diversity, memory)."""
    algos = list(ends)
    lines = [f"{family}: queries (x AlignProp's) and training seconds to reach AlignProp's eval reward",
             "", "| objective | " + " | ".join(
                 f"{i['fraction']:.0%}: {i['target_eval_reward']:.4f}" for i in items) + " |",
             "|---" * (len(items) + 1) + "|"]  # fmt: skip
    for a in algos:
        lines.append(f"| {a} | " + " | ".join(cell(i["objectives"][a], i) for i in items) + " |")
    keys = sorted({k for e in ends.values() for k in e if k.startswith("eval/")})
    lines += ["", "| objective | queries | seconds | peak GiB | " + " | ".join(keys) + " |",
              "|---" * (len(keys) + 4) + "|"]  # fmt: skip
    for a in algos:
        e = ends[a]
        mem = f"{e['peak_mem_gib']:.2f}" if e["peak_mem_gib"] is not None else "(CPU)"
        vals = " | ".join(f"{e[k]:.4f}" if k in e else "" for k in keys)
        lines.append(f"| {a} | {e['queries']} | {e['train_seconds']:.1f} | {mem} | {vals} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for algorithm in dict.fromkeys(r["algorithm"] for r in rows):
        rs = [r for r in rows if r["algorithm"] == algorithm]
        for ax, x in zip(axes, ("queries", "train_seconds"), strict=True):
            ax.plot([r[x] for r in rs], [r["eval_reward"] for r in rs], marker="o", label=algorithm)
    axes[0].set_xlabel("reward queries (training images scored)")
    axes[1].set_xlabel("training seconds")
    for ax in axes:
        ax.set_ylabel("eval reward (fixed noise)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv):
    p = cli.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tiny", action="store_true", help="tiny random models on CPU")
    p.add_argument(
        "--family", default=None, help="sd, sd3, flux, comma-separated (--tiny: sd,sd3; else sd)"
    )
    p.add_argument(
        "--algorithms", default="", help="comma-separated objectives (default: all that apply)"
    )
    p.add_argument("--model", default="", help="hub id or folder (default: the configs')")
    p.add_argument("--reward", default="aesthetic", help="training and eval reward")
    p.add_argument(
        "--judges",
        default=None,
        help="held-out eval rewards at the end (--tiny: hps; else hps,pickscore)",
    )
    p.add_argument(
        "--alignprop-config", default=None, help="AlignProp's named config (e.g. tiny, aesthetic)"
    )
    p.add_argument(
        "--ddpo-config", default=None, help="DDPO's named config (e.g. tiny_ddpo, aesthetic_ddpo)"
    )
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="NAME=CONFIG",
        help="an objective's named config (repeatable), e.g. flow_grpo=sd3_flow_grpo",
    )
    p.add_argument(
        "--budget", type=int, default=None, help="reward queries of each reward-gradient objective"
    )
    p.add_argument(
        "--rl-factor",
        "--ddpo-factor",
        dest="rl_factor",
        type=float,
        default=None,
        help="an RL objective's budget / the others' (--ddpo-factor: its former name)",
    )
    p.add_argument("--eval-every", type=int, default=None, help="queries between eval points")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="sample.num_steps of evaluation for all (default: AlignProp config's; --tiny SD: 10)",
    )
    p.add_argument(
        "--eta", type=float, default=1.0, help="sample.eta on the DDIM families (DDPO needs > 0)"
    )
    p.add_argument(
        "--resolution",
        type=int,
        default=0,
        help="sample.resolution for all (0 = AlignProp config's)",
    )
    p.add_argument("--num-eval", type=int, default=0, help="eval prompts (0 = all)")
    p.add_argument("--eval-repeats", type=int, default=2, help="fixed-noise draws per eval prompt")
    p.add_argument("--eval-batch", type=int, default=4, help="images per eval batch (all)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="", help='"" = accelerate\'s choice, "cpu" forces CPU')
    p.add_argument("--out", default="logs/efficiency")
    args = p.parse_args(argv)
    tiny_defaults = dict(family="sd,sd3", budget=128, rl_factor=4, eval_every=32, judges="hps")  # fmt: skip
    gpu_defaults = dict(family="sd", budget=2048, rl_factor=25, eval_every=256, judges="hps,pickscore")  # fmt: skip
    for k, v in (tiny_defaults if args.tiny else gpu_defaults).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for flag in ("budget", "eval_every", "eval_repeats", "eval_batch"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if not args.rl_factor > 0 or args.num_eval < 0:
        p.error("--rl-factor must be > 0 and --num-eval >= 0")
    _resolve_selection(p, args)
    return args


def _resolve_selection(p, args) -> None:
    """args.algorithms_of (family -> objectives) and args.config_of (family -> {objective: config})."""
    from alignprop import objectives

    fams = [f for f in args.family.split(",") if f]
    for f in fams:
        if f not in SOLVER:
            p.error(f"--family {f!r} is not known; valid: {list(SOLVER)}")
    wanted = [a for a in args.algorithms.split(",") if a]
    for a in wanted:
        objectives.get(a)  # an unknown name: the valid ones
    args.algorithms_of = {}
    for f in fams:
        algos = [a for a in (wanted or applicable(f)) if a in applicable(f)]
        if "alignprop" not in algos:
            algos.insert(0, "alignprop")  # the reference every row is measured against
        args.algorithms_of[f] = algos
    given = {}
    for item in args.config:
        name, _, config = item.partition("=")
        if not config:
            p.error(f"--config {item!r}: give NAME=CONFIG, e.g. flow_grpo=tiny_sd3_flow_grpo")
        given[name] = config
    if args.alignprop_config:
        given["alignprop"] = args.alignprop_config
    if args.ddpo_config:
        given["ddpo"] = args.ddpo_config
    args.config_of = {f: given for f in fams}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import os

    os.environ.setdefault("WANDB_MODE", "disabled")
    out = Path(args.out)
    plans = []  # (family, algorithm, config, budget), every one checked before any model loads
    from alignprop import objectives

    for family in args.algorithms_of:
        for algorithm, config in build_configs(args, family).items():
            rl = not objectives.get(algorithm).differentiable_reward
            budget = int(round(args.budget * args.rl_factor)) if rl else args.budget
            preflight(copy.deepcopy(config), budget, args.eval_every)
            plans.append((family, algorithm, config, budget))
    from alignprop import checks

    checks.check_writable(out, "--out")
    t0 = time.time()
    rows, ends = [], {}
    with open(out / "curves.jsonl", "w") as f:

        def log(line: str) -> None:
            print(line, flush=True)
            f.write(line + "\n")
            f.flush()

        for family, algorithm, config, budget in plans:
            r, end = run_one(config, budget, args.eval_every, args.eval_batch, out, log, family)
            rows += r
            ends.setdefault(family, {})[algorithm] = end
    summary = {"families": {}, "wall_seconds": time.time() - t0}
    for family, fam_ends in ends.items():
        by = {
            a: [r for r in rows if r["family"] == family and r["algorithm"] == a] for a in fam_ends
        }
        items = table(by, args.budget)
        configs = {a: c for fam, a, c, _ in plans if fam == family}
        c_ap = configs["alignprop"]
        conditions = {
            "model": f"tiny random {family} (alignprop.tiny)" if args.tiny else c_ap.pretrained.model,
            "reward": c_ap.reward, "judges": args.judges,
            "prompts": {"train": c_ap.prompts.train, "eval": c_ap.prompts.eval},
            "seed": args.seed, "eval_num_steps": c_ap.sample.num_steps, "eta": c_ap.sample.eta,
            "guidance_scale": c_ap.sample.guidance_scale, "eval_every": args.eval_every,
            "progress": "eval/reward_mean on the fixed eval set (evaluation.score_fixed_noise)",
            "objectives": {a: {"lr": c.train.learning_rate, "images_per_update": c.train.total_batch_size,
                               "budget": next(b for fam, x, _, b in plans if fam == family and x == a)}
                           for a, c in configs.items()},
        }  # fmt: skip
        summary["families"][family] = {"conditions": conditions, "table": items, "end": fam_ends}
        title = f"{conditions['model']}, reward {c_ap.reward}, seed {args.seed}, {c_ap.sample.num_steps} eval steps"
        plot([r for r in rows if r["family"] == family], out / f"efficiency_{family}.png", title)
        print("\n" + markdown(family, items, fam_ends) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(
        f"curves: {out / 'curves.jsonl'}; plots: {out}/efficiency_<family>.png; summary: {out / 'summary.json'}"
    )
    return summary


if __name__ == "__main__":
    sys.exit(cli.run(lambda argv: main(argv) and 0))
