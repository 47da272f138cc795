"""FLUX.1-dev / SD3.5-medium sized random transformers on one GPU: peak memory and time of one
AlignProp step (1024 px, B=1, K=1, block checkpointing, checkpointed VAE decode).

    OUT=results python benchmarks/flow_memory.py     # writes $OUT/gpu_mem.json

Prompt embeddings are random tensors (text encoders offloaded) and the loss is the image mean
(no reward model). Not yet run: the GPU machine of issue #11 had no diffusers installed.
"""

import json
import os
import time

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
)

from alignprop import models, solvers
from alignprop.families import Cond
from alignprop.families.flux import Flux, flux_dev_configs
from alignprop.families.sd3 import SD3, sd35_medium_configs

out = {}
dev = torch.device("cuda")


def build(name):
    cfgs = flux_dev_configs() if name == "flux" else sd35_medium_configs()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(dev):
        tr = (FluxTransformer2DModel if name == "flux" else SD3Transformer2DModel)(
            **cfgs["transformer"]
        )
        vae = AutoencoderKL(**cfgs["vae"])
    torch.set_default_dtype(torch.float32)
    comps = {
        "transformer": tr,
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(**cfgs["scheduler"]),
    }
    fam = (Flux if name == "flux" else SD3)(comps).freeze(dev)
    return fam


def run(name, steps, guidance, k, block=True, reps=2):
    fam = build(name)
    torch.manual_seed(0)
    params = models.add_lora(
        fam.denoiser, 4, 4.0, fam.lora_targets, exclude_modules=fam.lora_exclude
    )
    if block:
        fam.denoiser.enable_gradient_checkpointing()
    fam.vae.enable_gradient_checkpointing()
    if name == "flux":
        cond = Cond(
            {
                "encoder_hidden_states": torch.randn(1, 512, 4096, device=dev),
                "pooled_projections": torch.randn(1, 768, device=dev),
            }
        )
    else:
        cond = Cond(
            {
                "encoder_hidden_states": torch.randn(1, 333, 4096, device=dev),
                "pooled_projections": torch.randn(1, 2048, device=dev),
            }
        )
    uncond = Cond({k_: v.clone() for k_, v in cond.tensors.items()})
    opts = solvers.Sampling(steps, guidance, height=1024, width=1024)
    trunc = solvers.Truncation("fixed", k, 1, 1, 42.0, 5.0)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            images, info = solvers.sample(
                fam, cond, uncond, opts, truncation=trunc, dtype=torch.bfloat16
            )
        loss = images.float().mean()
        loss.backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    g = sum(p.grad.float().norm() ** 2 for p in params if p.grad is not None) ** 0.5
    res = dict(
        weights_gib=round(base, 2),
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
        sec_per_sample=[round(t, 2) for t in times],
        K=info["K"],
        grad_norm=float(g),
        block_checkpoint=block,
    )
    del fam, params, images, loss
    torch.cuda.empty_cache()
    return res


jobs = [
    ("flux", 28, 3.5, 1, True),
    ("flux", 28, 3.5, 1, False),
    ("flux", 28, 3.5, 4, True),
    ("sd3", 40, 4.5, 1, True),
]
for job in jobs:
    key = f"{job[0]}_K{job[3]}_{'block' if job[4] else 'wholecall'}"
    try:
        out[key] = run(*job)
    except torch.cuda.OutOfMemoryError as e:
        out[key] = {"oom": str(e)[:200]}
        torch.cuda.empty_cache()
    print(key, out[key], flush=True)
    out["device"] = torch.cuda.get_device_name()
    os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
    json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "gpu_mem.json"), "w"), indent=1)
