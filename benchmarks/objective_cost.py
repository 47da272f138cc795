"""Compute and memory of one update per objective, beside AlignProp's, on one model at one K.

Each objective of alignprop.objectives runs `--updates` updates after one warm-up update, from
the same named config with truncation fixed at --k (the RL objectives, which draw no K, with
config/base.py's truncation and their own sections; `--batch` sets the images per update of all,
so that an update costs the same number of reward queries); printed per objective: the median
seconds per update, its ratio to alignprop's, and on CUDA the peak memory allocated during its
updates (and its ratio). `--random-weights sd|sd3` builds full-size random-weight models on the
device (benchmarks/benchmark.py's: SD 1.5 or SD3.5 medium, a random CLIP-L aesthetic reward), so
that a machine without the hub measures the real sizes.

  python benchmarks/objective_cost.py --tiny                       # CPU, tiny random SD 1.5
  python benchmarks/objective_cost.py --config aesthetic --k 1     # a GPU, SD 1.5 at 512 px
  python benchmarks/objective_cost.py --config aesthetic_k1 --random-weights sd --batch 8 \\
      --objectives alignprop,draft_lv,refl,drtune,direct_align,ddpo   # a GPU, offline
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from alignprop import cli

ROOT = Path(__file__).resolve().parents[1]
PATHWISE = ("alignprop", "draft_lv", "refl", "drtune", "direct_align")
RL = ("ddpo", "flow_grpo", "diffusion_nft")


def as_objective(config, name: str, batch: int):
    """The config for objective `name`: an RL one gets base.py's truncation and loss_coeff (it
    reads neither), DDPO eta 1, groups that divide the batch; `batch` > 0: images per update."""
    config = config.copy_and_resolve_references()
    config.train.algorithm = name
    if batch:
        config.train.total_batch_size = config.train.samples_per_epoch = batch
        config.sample.batch_size = min(config.sample.batch_size, batch)
    if name in RL:
        from alignprop.objectives.base import base_defaults

        config.truncation = base_defaults().truncation
        config.train.loss_coeff = base_defaults().train.loss_coeff
        total = config.train.total_batch_size
        if name == "ddpo":
            config.sample.eta = 1.0
            config.train.ddpo.minibatches = 1
        else:
            section = config.train[name]
            section.group_size = 4 if total % 4 == 0 else 2
    return config


def random_models(kind: str, config, device):
    """(family, reward_fn): benchmarks/benchmark.py's full-size random-weight models on device."""
    import importlib.util
    import tempfile

    from alignprop import families, models, tiny

    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "benchmarks" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    dtype = models.resolve_dtype(config.mixed_precision, device)
    tok_dir = tiny.write_clip_tokenizer(Path(tempfile.mkdtemp(prefix="cost_tok_")))
    pretrained = families.Pretrained.from_config(config.pretrained)
    family = bench.random_family(kind, dtype, device, config.seed, tok_dir, pretrained)
    return family, bench.sd15_aesthetic(config, dtype, device, config.seed)


def measure(config, name: str, updates: int, out_dir: Path, random_weights: str = "") -> dict:
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from alignprop import checks, objectives
    from alignprop.run import Run

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    config = config.copy_and_resolve_references()
    config.train.algorithm = name
    checks.apply_tiny(config)  # tiny=True: the tiny models' folders (written on first use)
    batch = checks.validate_config(config)
    acc = Accelerator(mixed_precision=config.mixed_precision, cpu=config.device == "cpu")
    family = reward_fn = None
    if random_weights:
        family, reward_fn = random_models(random_weights, config, acc.device)
    run = Run(config, acc, batch, out_dir / name, family, reward_fn, objective=objectives.get(name))
    run.update()  # warm-up: first-call allocations, lazy inits
    cuda = run.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(run.device)
    secs = []
    for _ in range(updates):
        t0 = time.perf_counter()
        run.update()
        if cuda:
            torch.cuda.synchronize()
        secs.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(run.device) / 2**30 if cuda else None
    row = {"objective": name, "sec_per_update": statistics.median(secs), "peak_gib": peak,
           "images_per_update": batch.total}  # fmt: skip
    del run, family, reward_fn
    acc.free_memory()
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tiny", action="store_true", help="the `tiny` config on CPU")
    p.add_argument("--config", default="", help="named config of config/align_prop.py")
    p.add_argument("--k", type=int, default=2, help="truncation.k (fixed) for every objective")
    p.add_argument("--updates", type=int, default=5, help="timed updates per objective")
    p.add_argument("--objectives", default=",".join(PATHWISE), help="comma-separated names")
    p.add_argument("--steps", type=int, default=0, help="sample.num_steps (0 = the config's)")
    p.add_argument(
        "--precision", default="", help="mixed_precision: no | fp16 | bf16 (default: the config's)"
    )
    p.add_argument("--resolution", type=int, default=0, help="sample.resolution (0 = the config's)")
    p.add_argument(
        "--batch", type=int, default=0, help="images per update of all (0 = the config's)"
    )
    p.add_argument(
        "--random-weights", default="", choices=["", "sd", "sd3"],
        help="full-size random-weight models of this family on the device (no hub needed)",
    )  # fmt: skip
    p.add_argument("--out", default="logs/objective_cost")
    args = p.parse_args(argv)
    import importlib.util

    from alignprop.errors import ConfigError

    spec = importlib.util.spec_from_file_location(
        "efficiency", ROOT / "benchmarks" / "efficiency.py"
    )
    efficiency = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(efficiency)
    named_config = efficiency.named_config  # the named configs, loaded as efficiency.py loads them

    name = "tiny" if args.tiny or not args.config else args.config
    config = named_config(name)
    if args.updates < 1 or args.k < 1:
        raise ConfigError("--updates and --k must be >= 1")
    config.truncation.strategy, config.truncation.k = "fixed", args.k
    config.log_with, config.eval_freq = "none", 0
    names = [n.strip() for n in args.objectives.split(",") if n.strip()]
    unknown = [n for n in names if n not in PATHWISE + RL]
    if unknown:
        raise ConfigError(f"--objectives: {unknown} not known; valid: {list(PATHWISE + RL)}")
    for flag in ("batch", "steps", "resolution"):
        if getattr(args, flag) < 0:
            raise ConfigError(
                f"--{flag} must be >= 0 (0 = the config's), got {getattr(args, flag)}"
            )
    if args.steps:
        config.sample.num_steps = args.steps
    if args.precision:
        config.mixed_precision = args.precision
    if args.resolution:
        config.sample.resolution = args.resolution
    out = Path(args.out)
    rows = [
        measure(as_objective(config, n, args.batch), n, args.updates, out, args.random_weights)
        for n in names
    ]
    base = next((r for r in rows if r["objective"] == "alignprop"), rows[0])
    for r in rows:
        r["time_vs_alignprop"] = r["sec_per_update"] / base["sec_per_update"]
        if r["peak_gib"] is not None:
            r["memory_vs_alignprop"] = r["peak_gib"] / base["peak_gib"]
        print(json.dumps(r))
    out.mkdir(parents=True, exist_ok=True)
    (out / "objective_cost.json").write_text(
        json.dumps({"config": name, "k": args.k, "rows": rows}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, sys.argv[1:]))
