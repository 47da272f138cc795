"""Speed switches that leave the math alone: compilation with a persistent cache, CUDA graphs.

`train.compile_unet` compiles the denoiser, the VAE decoder and the reward's image models with
static shapes (`dynamic=False`): one graph per batch size and grad mode, never a dynamic-shape
recompile; K only changes how many times each graph is called. Inductor's compiled graphs are
cached on disk under the user's cache dir, so the warm-up is paid once per shape and machine.

`train.cuda_graphs` replays the guided denoiser call of the steps without autograd (all but
the last K) as a CUDA graph captured once per shape: fixed shapes, and the LoRA weights are
read from the same memory at every replay (AdamW updates parameters in place).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignprop.errors import ConfigError


def fast_path(
    config: Any, family: Any, reward_fn: Any, device: torch.device
) -> tuple[torch.nn.Module, GuidedGraphs | None]:
    """The denoiser to call (compiled if train.compile_unet) and the CUDA graphs (train.cuda_graphs)."""
    denoiser = family.denoiser
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
    from alignprop.tiny import default_cache_dir  # the one owner of the cache location

    path = os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default_cache_dir() / "inductor"))
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    return Path(path)


def compile_module(module: torch.nn.Module) -> torch.nn.Module:
    """Compile a module in place (its identity and state_dict keys unchanged), static shapes."""
    module.compile(dynamic=False)
    return module


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
