"""Speed switches that leave the math alone: compilation with a persistent cache, CUDA graphs,
merged LoRA weights for the steps without autograd, channels_last.

`train.compile_unet` compiles the denoiser, the VAE decoder and the reward's image models with
static shapes (`dynamic=False`): one graph per batch size and grad mode, never a dynamic-shape
recompile; K only changes how many times each graph is called. Inductor's compiled graphs are
cached on disk under the user's cache dir, so the warm-up is paid once per shape and machine.

`train.cuda_graphs` replays the guided denoiser call of the steps without autograd (all but
the last K) as a CUDA graph captured once per shape: fixed shapes, and the LoRA weights are
read from the same memory at every replay (AdamW updates parameters in place).

`sample.merge_lora` runs the steps without autograd on merged weights: each LoRA layer's base
weight is swapped for W + scale * B @ A (the base dtype, computed once per trajectory into a
buffer kept on the module) with the adapter off, so a layer is one matmul instead of the base
matmul plus the adapter's casts, two small matmuls, a scale and an add. Measured by
benchmarks/op_count.py on an SD-1.5-sized UNet with the default LoRA (128 layers, 93.5 M
targeted weights) under bf16 autocast: 2,103 non-view ops (kernel launches on a GPU) per
no-grad call with the adapter, 823 merged (the bare UNet's count). The cost is one base-dtype
copy of the targeted weights (187 MB in bf16 for SD 1.5). The steps with gradient always
run the adapter itself.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignprop.errors import ConfigError


def fast_path(
    config: Any, family: Any, reward_fn: Any, device: torch.device
) -> tuple[torch.nn.Module, GuidedGraphs | None]:
    """The denoiser to call (compiled if train.compile_unet) and the CUDA graphs (train.cuda_graphs);
    train.channels_last moves the denoiser and the VAE to channels_last first."""
    denoiser = family.denoiser
    if config.train.get("channels_last", False):
        for module in (denoiser, family.vae):
            module.to(memory_format=torch.channels_last)
    if config.train.compile_unet:
        compile_cache()
        denoiser = torch.compile(denoiser, dynamic=False)
        compile_module(getattr(family.vae, "decoder", family.vae))
        for module in getattr(reward_fn, "modules", ()):
            compile_module(module)
    graphs = None
    if config.train.get("cuda_graphs", False):
        if device.type != "cuda":
            raise ConfigError(f"train.cuda_graphs needs a CUDA device, not {device}")
        graphs = GuidedGraphs()
    return denoiser, graphs


def compile_cache() -> Path:
    """Keep inductor's compiled graphs (and Triton kernels) on disk across runs; return the folder.

    TORCHINDUCTOR_CACHE_DIR, if set, wins; else <user cache>/alignprop/inductor.
    """
    from alignprop.models import default_cache_dir  # the one owner of the cache location

    path = os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default_cache_dir() / "inductor"))
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    return Path(path)


def compile_module(module: torch.nn.Module) -> torch.nn.Module:
    """Compile a module in place (its identity and state_dict keys unchanged), static shapes."""
    module.compile(dynamic=False)
    return module


def _mergeable(layer: Any) -> bool:
    """A peft LoRA Linear whose active adapters are plain LoRA (no DoRA or other variant)
    with no dropout in effect: merging it gives the same function."""
    if layer.merged or layer.disable_adapters or not isinstance(layer.base_layer, torch.nn.Linear):
        return False
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        drop = layer.lora_dropout[name]
        if name in layer.lora_variant or (
            layer.training and not isinstance(drop, torch.nn.Identity)
        ):
            return False
    return True


def _is_sharded(model: torch.nn.Module) -> bool:
    """FSDP (1 or 2) shards base weights (DTensors under FSDP2): swapping their storage is not
    safe there."""
    wrapped = any(
        "FullyShardedDataParallel" in type(m).__name__ or type(m).__name__.startswith("FSDP")
        for m in (model, *model.modules())
    )
    return wrapped or any(type(p).__name__ == "DTensor" for p in model.parameters())


@contextlib.contextmanager
def merged_lora(model: torch.nn.Module) -> Iterator[int]:
    """Inside: every mergeable LoRA layer of `model` runs on its merged weight, adapter off.

    No autograd may run inside (the merged buffers are not differentiable). Yields the number
    of layers merged (0 without LoRA, or under FSDP). The base weights' storage is swapped, not
    written, so they come back bit for bit; the merged buffers live on the bare module (one
    per layer, reused, so CUDA graphs captured inside read the current merge at each replay).
    """
    from peft.tuners.lora import Linear as LoraLinear

    from alignprop.lora_io import unwrap

    bare = unwrap(model)
    layers = [m for m in bare.modules() if isinstance(m, LoraLinear) and _mergeable(m)]
    if not layers or _is_sharded(model):
        yield 0
        return
    buffers = bare.__dict__.setdefault("_alignprop_merged", {})
    swapped = []
    device_type = layers[0].base_layer.weight.device.type
    no_amp = (
        torch.autocast(device_type, enabled=False)
        if torch.amp.is_autocast_available(device_type)
        else contextlib.nullcontext()  # e.g. the meta device (FLOP counts)
    )
    try:  # the merge itself in fp32, whatever autocast the caller runs under
        with torch.no_grad(), no_amp:
            for layer in layers:
                weight = layer.base_layer.weight
                acc = torch.promote_types(weight.dtype, torch.float32)  # fp64 models stay fp64
                delta = sum(
                    layer.get_delta_weight(name).to(acc)
                    for name in layer.active_adapters
                    if name in layer.lora_A
                )
                buf = buffers.get(id(layer))
                if (
                    buf is None
                    or buf.shape != weight.shape
                    or buf.dtype != weight.dtype
                    or buf.device != weight.device
                ):
                    buf = buffers[id(layer)] = torch.empty_like(weight)
                buf.copy_(weight.to(acc) + delta)
                swapped.append((layer, weight.data))
                weight.data = buf
                layer._disable_adapters = True
        bare._alignprop_merged_active = True
        yield len(layers)
    finally:
        for layer, data in swapped:
            layer.base_layer.weight.data = data
            layer._disable_adapters = False
        bare._alignprop_merged_active = False


def lora_merged(model: torch.nn.Module) -> bool:
    """Whether `model` runs inside merged_lora now (a CUDA graph captured there must not replay outside)."""
    from alignprop.lora_io import unwrap

    return getattr(unwrap(model), "_alignprop_merged_active", False)


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    x: torch.Tensor
    t: torch.Tensor
    cond: Any  # families.Cond of static buffers
    out: torch.Tensor


class GuidedGraphs:
    """CUDA graphs of the guided denoiser call without autograd, captured once per shape and model."""

    def __init__(self, warmup: int = 2):
        self.warmup = warmup
        self.graphs: dict[tuple, _Graph] = {}

    def wrap(self, fn: Any, model: torch.nn.Module, guidance_scale: float):
        """fn(x, t) of solvers.guided, replayed as a graph when it runs on CUDA without autograd."""

        def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled() or x.device.type != "cuda":
                return fn(x, t)
            cond = fn.cond
            key = (
                id(model), guidance_scale, tuple(x.shape), x.dtype, tuple(t.shape), t.dtype,
                tuple((k, tuple(v.shape), v.dtype) for k, v in cond.tensors.items()),
                torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
                lora_merged(model),
            )  # fmt: skip
            g = self.graphs.get(key)
            if g is None:
                g = self.graphs[key] = self._capture(fn, x, t, cond)
            g.x.copy_(x)
            g.t.copy_(t)
            for k, v in cond.tensors.items():
                g.cond.tensors[k].copy_(v)
            g.graph.replay()
            return g.out.clone()  # the next replay overwrites g.out

        return call

    def _capture(self, fn: Any, x: torch.Tensor, t: torch.Tensor, cond: Any) -> _Graph:
        x, t = x.clone(), t.clone()
        cond = type(cond)({k: v.clone() for k, v in cond.tensors.items()})
        # Autocast's cache of half copies of the fp32 LoRA weights would be baked into the
        # graph and go stale after an optimizer step: capture with the cache off.
        amp = torch.autocast(
            "cuda", dtype=torch.get_autocast_dtype("cuda"),
            enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False,
        )  # fmt: skip
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with (
            torch.cuda.stream(side),
            amp,
        ):  # lazy init (cuBLAS handles, compile) outside the capture
            for _ in range(self.warmup):
                fn(x, t, cond)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with amp, torch.cuda.graph(graph):
            out = fn(x, t, cond)
        return _Graph(graph, x, t, cond, out)
