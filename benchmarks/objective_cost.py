"""Compute and memory of one update per objective, beside AlignProp's, on one model at one K.

Each objective of alignprop.objectives (all but ddpo, whose update is a different schedule)
runs `--updates` updates after one warm-up update, from the same named config with
truncation fixed at --k; printed per objective: the median seconds per update, its ratio to
alignprop's, and on CUDA the peak memory allocated during its updates (and its ratio).

  python benchmarks/objective_cost.py --tiny                       # CPU, tiny random SD 1.5
  python benchmarks/objective_cost.py --config aesthetic --k 1     # a GPU, SD 1.5 at 512 px
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


def measure(config, name: str, updates: int, out_dir: Path) -> dict:
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
    run = Run(config, acc, batch, out_dir / name, objective=objectives.get(name))
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
    return {"objective": name, "sec_per_update": statistics.median(secs), "peak_gib": peak}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tiny", action="store_true", help="the `tiny` config on CPU")
    p.add_argument("--config", default="", help="named config of config/align_prop.py")
    p.add_argument("--k", type=int, default=2, help="truncation.k (fixed) for every objective")
    p.add_argument("--updates", type=int, default=5, help="timed updates per objective")
    p.add_argument("--objectives", default=",".join(PATHWISE), help="comma-separated names")
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
    unknown = [n for n in names if n not in PATHWISE]
    if unknown:
        raise ConfigError(
            f"--objectives: {unknown} not pathwise objectives; valid: {list(PATHWISE)}"
        )
    out = Path(args.out)
    rows = [measure(config, n, args.updates, out) for n in names]
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
