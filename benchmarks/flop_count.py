"""FLOPs of one AlignProp training step, counted on the meta device (no weights, no GPU, seconds).

The step is what AlignProp.loss_on and its backward run: prompt encoding, the sampling chain
(no-grad steps, the last K with gradient, checkpointed as the config says), the VAE decode, the
reward, the backward with every recomputation. The models are the benchmark's full-size
random-weight ones (benchmarks/benchmark.py), built on the meta device, so nothing is
allocated; torch.utils.flop_counter.FlopCounterMode counts matmuls, convolutions and attention
from the shapes. As in benchmark.py, chains of K and K+1 steps are counted and extrapolated to
--num-steps (each step before the cut costs the same).

Cross-check: the published recipe's switches (--checkpoint step --decoder-checkpoint block
--decode-chunk 0 --no-merge-lora) count 364.1 TFLOP at SD-1.5 size, B=4, K=1; the same counter
on an H200 running the step counted 364.6 (commit 6dbc2df).

  python benchmarks/flop_count.py                                     # SD 1.5 sizes, B=4,8, K=1,10,50
  python benchmarks/flop_count.py --family flux --num-steps 28 --batch-sizes 1 --ks 1,10

It takes benchmark.py's flags (the timing ones are ignored) and prints one JSON line per point:
tflop_per_step, tflop_nograd_step (one step before the cut) and tflop_per_sample.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import benchmark  # this folder's benchmark.py (Python puts the script's folder on sys.path)
import torch
from torch.utils.flop_counter import FlopCounterMode

from alignprop import cli, models, solvers, tiny
from alignprop.errors import ConfigError

META = torch.device("meta")


def step_flops(family, reward_fn, config, batch: int, k: int, num_steps: int, dtype) -> float:
    """FLOPs of one loss_on + backward at (batch, K) with a num_steps chain."""
    opts = solvers.Sampling.from_config(config.sample)
    height, width = opts.size(family)
    opts = dataclasses.replace(opts, num_steps=num_steps, height=height, width=width)
    trunc = solvers.Truncation("fixed", k, k, k, 0.0, 1.0)
    texts = ["a photo of a cat"] * batch
    with FlopCounterMode(display=False) as counter:
        cond = family.encode(texts)
        uncond = family.encode_negative(config.sample.negative_prompt)
        images, _ = solvers.sample(family, cond, uncond, opts, truncation=trunc, dtype=dtype)
        _, info = reward_fn(images, texts)
        (config.train.loss_coeff * info["loss"].mean()).backward()
    return float(counter.get_total_flops())


def count(args) -> list[dict]:
    config = benchmark.alignprop_config(args, benchmark.base_config(args))
    config.pretrained.offload_text_encoders = False  # meta tensors cannot move to the CPU
    dtype = models.resolve_dtype(args.precision)
    tok_dir = tiny.write_clip_tokenizer(Path(tempfile.mkdtemp(prefix="flops_tok_")))
    family, reward_fn = benchmark.build_models(args, config, dtype, META, tok_dir)
    with torch.random.fork_rng(devices=[]):
        models.make_trainable(
            family.denoiser, config.lora, family.lora_targets, family.lora_exclude
        )
    solvers.set_decoder_checkpointing(family.vae, config.sample.decoder_checkpoint)
    rows = []
    for k in args.ks:
        for b in args.batch_sizes:
            n0, n1 = k, min(k + 1, args.num_steps)
            f0 = step_flops(family, reward_fn, config, b, k, n0, dtype)
            f1 = step_flops(family, reward_fn, config, b, k, n1, dtype) if n1 > n0 else f0
            total = f0 + (args.num_steps - k) * (f1 - f0)
            rows.append({
                "family": args.family, "batch": b, "K": k, "num_steps": args.num_steps,
                "resolution": list(solvers.Sampling.from_config(config.sample).size(family)),
                "tflop_per_step": total / 1e12, "tflop_nograd_step": (f1 - f0) / 1e12,
                "tflop_per_sample": total / 1e12 / b, "checkpoint": config.sample.checkpoint,
                "decoder_checkpoint": config.sample.decoder_checkpoint,
                "decode_chunk": config.sample.decode_chunk, "merge_lora": config.sample.merge_lora,
            })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = sys.argv[1:] if argv is None else argv
    if "--batch-sizes" not in argv:
        argv = [*argv, "--batch-sizes", "4,8"]
    if "--ks" not in argv:
        argv = [*argv, "--ks", "1,10,50"]
    args = benchmark.parse_args([*argv, "--recipes", "alignprop", "--device", "cpu"])
    if args.tiny:
        raise ConfigError("--tiny: flop_count.py counts the full-size models; leave it out")
    if args.family in benchmark.REAL_2025:
        raise ConfigError(
            f"--family {args.family}: its encoder and masks select tokens by value, which the "
            "meta device cannot run; benchmark.py counts its FLOPs on a GPU "
            "(benchmarks/gpu_bench.sh PARTS=families2025)"
        )
    if "--precision" not in argv:
        args.precision = "bf16"  # as on a GPU (the count does not depend on it)
    for row in count(args):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(cli.run(main))
