"""Differentiable DDIM sampling with classifier-free guidance and truncated backpropagation.

One call is one trajectory of B images. The truncation point is drawn once for it: the first
`num_steps - K` denoising steps run with no autograd at all (no graph, no checkpoint), the last
K steps build a graph, each UNet call under `torch.utils.checkpoint`, so memory stays flat in K.
Called under `torch.no_grad()` (or with `truncation=None`) the same function is the evaluation sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

TRUNCATIONS = ("fixed", "uniform", "gaussian", "full")
PAPER_STEPS = 50  # the gaussian cut's mean and std are stated for a 50-step chain


@dataclass
class Truncation:
    """How many of the last denoising steps carry gradient (K), and how K is drawn per trajectory."""

    strategy: str = "fixed"  # fixed | uniform | gaussian | full
    k: int = 1  # K for `fixed`
    k_min: int = 1  # inclusive bounds of K for `uniform`
    k_max: int = 50
    cut_mean: float = (
        42.0  # `gaussian`: cut index ~ N(mean, std) on a 50-step chain, K = steps - cut
    )
    cut_std: float = 5.0

    def validate(self, num_steps: int) -> None:
        """Raise ValueError naming the field if K cannot be drawn for a num_steps chain."""
        if self.strategy not in TRUNCATIONS:
            raise ValueError(
                f"truncation.strategy={self.strategy!r} is not known; valid: {list(TRUNCATIONS)}"
            )
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if self.strategy == "fixed" and not 1 <= self.k <= num_steps:
            raise ValueError(f"truncation.k={self.k} must be in [1, num_steps={num_steps}]")
        if self.strategy == "uniform" and not 1 <= self.k_min <= self.k_max <= num_steps:
            raise ValueError(
                f"truncation.k_min={self.k_min}, k_max={self.k_max} must satisfy 1 <= k_min <= k_max <= num_steps={num_steps}"
            )
        if self.strategy == "gaussian" and not self.cut_std > 0:
            raise ValueError(f"truncation.cut_std must be > 0, got {self.cut_std}")

    def draw(self, num_steps: int, generator: torch.Generator | None = None) -> int:
        """Draw K for one trajectory from the run's generator."""
        self.validate(num_steps)
        if self.strategy == "fixed":
            return self.k
        if self.strategy == "full":
            return num_steps
        if self.strategy == "uniform":
            return int(torch.randint(self.k_min, self.k_max + 1, (1,), generator=generator))
        scale = num_steps / PAPER_STEPS
        for _ in range(10_000):
            z = float(torch.randn(1, generator=generator))
            cut = round(self.cut_mean * scale + self.cut_std * scale * z)
            if 0 <= cut < num_steps:  # redraw until the cut leaves at least one step with gradient
                return num_steps - cut
        raise ValueError(
            f"truncation.cut_mean={self.cut_mean} lies too far outside the {num_steps}-step chain"
        )

    def expected_k(self, num_steps: int) -> float:
        """E[K] under this strategy, computed from its definition (used to check the sampler)."""
        if self.strategy in ("fixed", "full"):
            return float(self.k if self.strategy == "fixed" else num_steps)
        if self.strategy == "uniform":
            return (self.k_min + self.k_max) / 2
        scale = num_steps / PAPER_STEPS
        mu, sd = self.cut_mean * scale, self.cut_std * scale

        def cdf(x: float) -> float:
            return 0.5 * (1 + math.erf((x - mu) / (sd * math.sqrt(2))))

        # round() sends [c - 0.5, c + 0.5) to c; rejection keeps 0 <= c < num_steps.
        probs = [cdf(c + 0.5) - cdf(c - 0.5) for c in range(num_steps)]
        return sum(p * (num_steps - c) for c, p in enumerate(probs)) / sum(probs)


def ddim_schedule(scheduler: Any, num_steps: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Timesteps and the cumulative alphas at t and at the previous timestep, as diffusers' DDIM defines them."""
    scheduler.set_timesteps(num_steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    ac = scheduler.alphas_cumprod.double()
    step = scheduler.config.num_train_timesteps // num_steps
    final = torch.tensor(1.0, dtype=torch.float64) if scheduler.config.set_alpha_to_one else ac[0]
    a_t = torch.stack([ac[t] for t in timesteps])
    a_prev = torch.stack([ac[t - step] if t - step >= 0 else final for t in timesteps])
    return timesteps, a_t, a_prev


def sample(
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    scheduler: Any,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    *,
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    eta: float = 0.0,
    truncation: Truncation | None = None,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    grad_checkpoint: bool = True,
    height: int | None = None,
    width: int | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, dict]:
    """Sample B images (in [-1, 1], before clamping) for B prompt embeddings; return (images, info).

    `generator` (CPU) draws x_T, K and the eta noise; `latents` overrides x_T. With
    `truncation=None` or grad disabled, no step builds a graph. info["K"] is the number of
    steps that carried gradient.
    """
    device = cond.device
    dtype = dtype or cond.dtype
    bsz = cond.shape[0]
    prediction = scheduler.config.prediction_type
    if prediction not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"scheduler prediction_type={prediction!r} is not supported; valid: epsilon, v_prediction"
        )
    builds_graph = torch.is_grad_enabled() and truncation is not None
    k = truncation.draw(num_steps, generator) if builds_graph else 0
    if latents is None:
        cfg = getattr(unet, "module", unet).config  # unwrap DDP for the config
        vscale = 2 ** (len(vae.config.block_out_channels) - 1)
        h = (height or cfg.sample_size * vscale) // vscale
        w = (width or cfg.sample_size * vscale) // vscale
        latents = torch.randn((bsz, cfg.in_channels, h, w), generator=generator)  # (B, 4, H/8, W/8)
    x = latents.to(device=device, dtype=torch.float32)

    use_cfg = uncond is not None and guidance_scale != 1.0
    emb = torch.cat([uncond.expand(bsz, -1, -1), cond]) if use_cfg else cond  # (2B, 77, D)
    emb = emb.to(dtype)

    def eps_fn(x_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x_in = torch.cat([x_t, x_t]) if use_cfg else x_t
        out = unet(x_in.to(dtype), t, encoder_hidden_states=emb).sample.float()
        if use_cfg:
            out_u, out_c = out.chunk(2)
            out = out_u + guidance_scale * (out_c - out_u)
        return out

    timesteps, a_t, a_prev = ddim_schedule(scheduler, num_steps)
    cut = num_steps - k
    t_dev = torch.tensor(timesteps, device=device)  # one copy to the device, not one per step
    for i in range(num_steps):
        grad_step = builds_graph and i >= cut
        at, ap = float(a_t[i]), float(a_prev[i])
        tt = t_dev[i]
        with torch.set_grad_enabled(grad_step):
            if grad_step and grad_checkpoint:
                out = _checkpoint(eps_fn, x, tt, emb, use_reentrant=False)
            else:
                out = eps_fn(x, tt, emb)
            if prediction == "epsilon":
                eps = out
                x0 = (x - math.sqrt(1 - at) * eps) / math.sqrt(at)
            else:
                x0 = math.sqrt(at) * x - math.sqrt(1 - at) * out
                eps = math.sqrt(at) * out + math.sqrt(1 - at) * x
            sigma = eta * math.sqrt((1 - ap) / (1 - at) * (1 - at / ap))
            x = math.sqrt(ap) * x0 + math.sqrt(max(1 - ap - sigma**2, 0.0)) * eps
            if sigma > 0:
                noise = torch.randn(x.shape, generator=generator).to(device)
                x = x + sigma * noise

    with torch.set_grad_enabled(builds_graph):
        vae_dtype = next(vae.parameters()).dtype
        images = vae.decode(
            x.to(vae_dtype) / vae.config.scaling_factor
        ).sample.float()  # (B, 3, H, W)
    return images, {"K": k, "latents": x.detach()}
