"""Operator count of one no-grad denoiser call: bare, with the LoRA adapter, on merged weights.

On a GPU at the training batch the steps without autograd are launch-bound (B=8 costs the
same per step as B=4 on an H200), so the number of operators each call dispatches is what
`sample.merge_lora` and CUDA graphs cut. This counts them on any device (CPU here), under the
autocast that training runs: every aten op, and those that are not views (each of these is at
least one kernel launch on a GPU).

  python benchmarks/op_count.py            # SD-1.5-sized UNet (random weights), bf16 autocast
  python benchmarks/op_count.py --tiny     # the tiny SD kit (what the test runs)

Prints one JSON line per variant: {"variant", "aten_ops", "kernel_ops", "lora_layers"}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from alignprop import checks, families, fast, models
from alignprop.lora_io import adapters_disabled


class OpCount(TorchDispatchMode):
    """Counts the aten ops dispatched inside it, and those whose output is not a view."""

    def __init__(self):
        super().__init__()
        self.ops = self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.kernels += not func.is_view
        return func(*args, **(kwargs or {}))


def build(tiny: bool, dtype: torch.dtype) -> families.Family:
    if tiny:
        config = checks.load_config(
            Path(__file__).resolve().parents[1] / "config" / "align_prop.py:tiny"
        )
        checks.apply_tiny(config)
        return families.load_family(config.pretrained, dtype, torch.device("cpu"))
    import benchmark  # this folder's benchmark.py (Python puts the script's folder on sys.path)

    from alignprop import tiny as tiny_mod

    tok = tiny_mod.write_clip_tokenizer(Path(tempfile.mkdtemp(prefix="ops_tok_")))
    return benchmark.sd15_family(dtype, torch.device("cpu"), 0, tok)


def count(family: families.Family, autocast: bool) -> list[dict]:
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
    x = torch.randn(
        2, *family.latent_shape(h // 8, w // 8)
    )  # a small latent: counts don't depend on it
    cond = family.encode(["a cat", "a dog"])
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
        return {
            "variant": variant,
            "aten_ops": mode.ops,
            "kernel_ops": mode.kernels,
            "lora_layers": layers,
        }

    return [call(v) for v in ("bare", "adapter", "merged")]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tiny", action="store_true", help="the tiny SD kit instead of SD-1.5 sizes")
    p.add_argument(
        "--no-autocast", action="store_true", help="fp32, no bf16 autocast (as a CPU run trains)"
    )
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1 if a.tiny else 2)
    family = build(a.tiny, torch.float32 if a.tiny or a.no_autocast else torch.bfloat16)
    for row in count(family, autocast=not a.no_autocast):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
