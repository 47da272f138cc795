"""Fixed-noise evaluation of the base model and LoRA checkpoints under the training reward and config.eval_rewards.

    python scripts/evaluate.py --config config/align_prop.py:evaluate --checkpoints logs/run_a logs/run_b --out eval/
    python scripts/evaluate.py --config config/align_prop.py:evaluate --mix logs/run_a logs/run_b \
        --coefs 0,0.25,0.5,0.75,1 --out eval_mix/ [--config.prompts.num_eval=16] [--wandb]

    python scripts/evaluate.py --config config/align_prop.py:evaluate --checkpoints logs/run_a \
        --lora-scales 0,0.25,0.5,0.75,1 --config.eval_repeats=4 --out eval_scales/

Rows: `base` (unless --no-base), each checkpoint (run folder, checkpoint folder or .safetensors),
then with --mix A: c * dW_A for each coefficient c, with --mix A B: (1 - c) * dW_A + c * dW_B
(weight deltas are mixed, not LoRA factors). Writes DIR/results.csv, results.md (checkpoint x
reward, mean ± std), scores.csv (per image), grid_<row>.png and config.json. With
config.eval_repeats >= 2 (seeds per prompt) every row also gets its diversity across seeds.
--lora-scales sweeps the one checkpoint at each scale c (c * dW, 0 = base) instead and adds the
reward-versus-diversity trade-off: tradeoff.md and tradeoff.png. A two-LoRA --mix with two rewards
(the training reward and eval_rewards) adds their trade-off along the soup: mix_tradeoff.md and
mix_tradeoff.png (the paper's aesthetic + compressibility soup:
--config.reward=aesthetic --config.eval_rewards=jpeg --mix logs/aesthetic_run logs/compressibility_run).
"""

from __future__ import annotations

import sys

from alignprop.cli import ArgumentParser

DEFAULT_CONFIG = "config/align_prop.py:evaluate"


def parse_args(argv: list[str]):
    """Split off the list-valued flags (absl has no nargs); the rest are config flags."""
    p = ArgumentParser(
        prog="evaluate.py", description=__doc__.strip().splitlines()[0], add_help=False
    )
    p.add_argument("--checkpoints", nargs="+", default=[], metavar="CKPT")
    p.add_argument("--mix", nargs="+", default=[], metavar="LORA", help="one or two LoRAs")
    p.add_argument("--coefs", default="0,0.25,0.5,0.75,1", help="soup coefficients for --mix")
    p.add_argument("--lora-scales", default="", help="sweep one --checkpoints LoRA at these scales")
    p.add_argument("--out", default="", help="output folder (required)")
    p.add_argument("--no-base", action="store_true", help="do not evaluate the base model")
    p.add_argument("--wandb", action="store_true", help="also log the table and grids to wandb")
    args, rest = p.parse_known_args(argv)
    if any(a in ("-h", "--help") for a in rest):
        p.print_help()
        print("\nconfig flags: --config FILE:NAME, --config.a.b=value (see config/base.py)")
        sys.exit(0)
    if not args.out:
        p.error("--out DIR is required")
    if args.lora_scales and (len(args.checkpoints) != 1 or args.mix):
        p.error("--lora-scales sweeps one LoRA: give exactly one --checkpoints and no --mix")
    if not (args.checkpoints or args.mix or not args.no_base):
        p.error("nothing to evaluate: give --checkpoints and/or --mix, or drop --no-base")
    return args, rest


def main(argv: list[str]) -> int:
    from alignprop import checks, cli, evaluation
    from alignprop.errors import ConfigError

    # ---- every check that needs no model: flags, config, LoRA files, the output folder
    args, rest = parse_args(argv)
    config, extra = cli.parse_config(rest, DEFAULT_CONFIG, "evaluate.py")
    if extra:
        raise ConfigError(f"unexpected argument {extra[0]!r}")
    checks.apply_tiny(
        config, explicit_model=any(a.startswith("--config.pretrained.model") for a in rest)
    )
    checks.validate_config(config, training=False)
    if args.wandb:
        checks.check_wandb_login("--wandb")
    if args.lora_scales:
        out = checks.check_writable(args.out, "--out")
        (out / "config.json").write_text(config.to_json_best_effort(indent=2))
        scales = evaluation.parse_coefs(args.lora_scales)
        evaluation.scale_sweep(config, args.checkpoints[0], scales, out)
        print((out / "tradeoff.md").read_text())
        return 0
    coefs = evaluation.parse_coefs(args.coefs) if args.mix else []
    entries = evaluation.build_entries(args.checkpoints, args.mix, coefs, not args.no_base)
    out = checks.check_writable(args.out, "--out")
    (out / "config.json").write_text(config.to_json_best_effort(indent=2))
    results = evaluation.evaluate(config, entries, out)
    if len(args.mix) == 2 and len(results.rewards) >= 2:
        evaluation.mix_tradeoff(entries, results, out)
        print((out / "mix_tradeoff.md").read_text())
    if args.wandb:
        evaluation.log_wandb(config, results, out)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    from alignprop.cli import run

    sys.exit(run(main))
