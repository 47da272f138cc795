"""Operator count of one no-grad denoiser call: bare, with the LoRA adapter, on merged weights.

On a GPU at the training batch the steps without autograd are launch-bound (B=8 costs the
same per step as B=4 on an H200), so the number of operators each call dispatches is what
`sample.merge_lora` and CUDA graphs cut. This counts them on the CPU under the autocast that
training runs: every aten op, and those that are not views (each of these is at least one
kernel launch on a GPU). The count does not depend on the image size, so a small latent is used.

  python benchmarks/op_count.py                  # SD-1.5-sized UNet, bf16 autocast
  python benchmarks/op_count.py --family sdxl    # sdxl | sd3 | flux: the benchmark's full sizes
  python benchmarks/op_count.py --tiny           # the tiny SD kit (what the test runs)

Full-size families are built on the meta device (benchmarks/benchmark.py's random-weight
models) and only the denoiser is given memory on the CPU (uninitialised: values do not change
which ops run); the conditioning is random with the shapes the family's encoders give.
Prints one JSON line per variant: {"family", "variant", "aten_ops", "kernel_ops", "lora_layers"}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from alignprop import checks, cli, families, fast, models
from alignprop.families import Cond
from alignprop.lora_io import adapters_disabled

FULL_SIZE = ("sd", "sdxl", "sd3", "flux")


class OpCount(TorchDispatchMode):
    """Counts the aten ops dispatched inside it, and those whose output is not a view."""

    def __init__(self):
        super().__init__()
        self.ops = self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.kernels += not func.is_view
        return func(*args, **(kwargs or {}))


def build(name: str | None) -> tuple[families.Family, Cond]:
    """(family, guided conditioning of 2 prompts on the CPU): the tiny kit, or a full size."""
    prompts = ["a cat", "a dog"]
    if name is None:
        config = checks.load_config(
            Path(__file__).resolve().parents[1] / "config" / "align_prop.py:tiny"
        )
        checks.apply_tiny(config)
        family = families.load_family(config.pretrained, torch.float32, torch.device("cpu"))
        return family, family.encode(prompts)
    import benchmark  # this folder's benchmark.py (Python puts the script's folder on sys.path)

    from alignprop import tiny

    tok = tiny.write_clip_tokenizer(Path(tempfile.mkdtemp(prefix="ops_tok_")))
    family = benchmark.random_family(name, torch.bfloat16, torch.device("meta"), 0, tok)
    meta_cond = family.encode(prompts)
    family.denoiser.to_empty(device="cpu")  # memory for the denoiser alone, left uninitialised
    gen = torch.Generator().manual_seed(0)
    cond = Cond({k: _like(v, gen) for k, v in meta_cond.tensors.items()})
    if family.distilled_guidance:  # FLUX.1-dev's guidance input, as solvers.guided passes it
        cond = Cond({**cond.tensors, "guidance": torch.full((len(prompts),), 3.5)})
    return family, cond


def _like(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A CPU tensor of t's shape and dtype with random values (ids for integer tensors)."""
    if t.is_floating_point():
        return torch.randn(t.shape, generator=gen).to(t.dtype)
    return torch.zeros(t.shape, dtype=t.dtype)


def count(family: families.Family, cond: Cond, autocast: bool) -> list[dict]:
    """Op counts of one guided-batch denoiser call (batch 2: uncond, cond) in three variants."""
    from peft.tuners.lora import Linear as LoraLinear

    unet = family.denoiser
    models.add_lora(unet, 4, 4.0, family.lora_targets)
    with torch.no_grad():  # B = 0 at init: give the adapter a value (the count does not care)
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    layers = sum(isinstance(m, LoraLinear) for m in unet.modules())
    h, w = family.native_size()
    x = torch.randn(2, *family.latent_shape(h // 8, w // 8))  # counts don't depend on the size
    t = torch.tensor([500.0, 500.0])
    dtype = next(unet.parameters()).dtype

    def call(variant: str) -> dict:
        mode = OpCount()
        ctx = {
            "bare": lambda: adapters_disabled(unet),
            "adapter": contextlib.nullcontext,
            "merged": lambda: fast.merged_lora(unet),
        }[variant]
        amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
        with torch.no_grad(), amp, ctx():
            with mode:
                family.denoise(unet, x.to(dtype), t, cond.to(dtype=dtype))
        return {"variant": variant, "aten_ops": mode.ops, "kernel_ops": mode.kernels,
                "lora_layers": layers}  # fmt: skip

    return [call(v) for v in ("bare", "adapter", "merged")]


def main(argv: list[str] | None = None) -> None:
    p = cli.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tiny", action="store_true", help="the tiny SD kit instead of full sizes")
    p.add_argument(
        "--family", choices=FULL_SIZE, default="sd", help="full-size family (default sd)"
    )
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1 if a.tiny else 2)
    family, cond = build(None if a.tiny else a.family)
    # the tiny kit runs in fp32 as on a CPU; full sizes in bf16 under autocast, as on a GPU
    for row in count(family, cond, autocast=not a.tiny):
        print(json.dumps({"family": "tiny" if a.tiny else a.family, **row}), flush=True)


if __name__ == "__main__":
    sys.exit(cli.run(main))
