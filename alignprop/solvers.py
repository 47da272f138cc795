"""Differentiable sampling: truncation once, one small update rule per solver.

One `sample()` call is one trajectory of B images. The truncation point is drawn once for it:
the first `num_steps - K` steps run with no autograd at all (no graph, no checkpoint), the last
K steps build a graph, each denoiser call under `torch.utils.checkpoint`, so memory stays flat in
K. Under `torch.no_grad()` (or with `truncation=None`) the same function is the evaluation sampler.

A solver is a small class: built from the family's scheduler for a number of steps, it gives
the denoiser's input timestep for step i and the update x_i -> x_{i+1} from the model output.
Adding one is one class plus one line in SOLVERS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from alignprop.errors import ConfigError

TRUNCATIONS = ("fixed", "uniform", "gaussian", "full")
PAPER_STEPS = 50  # the gaussian cut's mean and std are stated for a 50-step chain


@dataclass(frozen=True)
class Truncation:
    """How many of the last steps carry gradient (K), drawn once per trajectory (defaults: config/base.py)."""

    strategy: str
    k: int
    k_min: int
    k_max: int
    cut_mean: float
    cut_std: float

    @classmethod
    def from_config(cls, t: Any) -> Truncation:
        return cls(t.strategy, t.k, t.k_min, t.k_max, t.cut_mean, t.cut_std)

    def validate(self, num_steps: int) -> None:
        """Raise ConfigError naming the field if K cannot be drawn for a num_steps chain."""
        if self.strategy not in TRUNCATIONS:
            raise ConfigError(
                f"truncation.strategy={self.strategy!r} is not known; valid: {list(TRUNCATIONS)}"
            )
        if num_steps < 1:
            raise ConfigError(f"sample.num_steps must be >= 1, got {num_steps}")
        if self.strategy == "fixed" and not 1 <= self.k <= num_steps:
            raise ConfigError(f"truncation.k={self.k} must be in [1, sample.num_steps={num_steps}]")
        if self.strategy == "uniform" and not 1 <= self.k_min <= self.k_max <= num_steps:
            raise ConfigError(
                f"truncation.k_min={self.k_min}, k_max={self.k_max} must satisfy 1 <= k_min <= k_max <= sample.num_steps={num_steps}"
            )
        if self.strategy == "gaussian" and not self.cut_std > 0:
            raise ConfigError(f"truncation.cut_std must be > 0, got {self.cut_std}")

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
        raise ConfigError(
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


@dataclass(frozen=True)
class Sampling:
    """The sampling settings shared by training, evaluation and scripts (config.sample)."""

    num_steps: int
    guidance_scale: float
    eta: float = 0.0
    grad_checkpoint: bool = True
    height: int = 0  # 0 = the family's native size
    width: int = 0
    negative_prompt: str = ""

    @classmethod
    def from_config(cls, s: Any) -> Sampling:
        height = s.get("height", 0) or s.resolution
        width = s.get("width", 0) or s.resolution
        return cls(
            s.num_steps, s.guidance_scale, s.eta, s.grad_checkpoint, height, width,
            s.negative_prompt,
        )  # fmt: skip

    def size(self, family: Any) -> tuple[int, int]:
        """(height, width) in pixels: the configured size or the family's native one."""
        nh, nw = family.native_size()
        return self.height or nh, self.width or nw


class DDIM:
    """DDIM (eta 0 deterministic, eta 1 DDPM-like) on eps or v predictions, as diffusers defines it."""

    def __init__(self, scheduler: Any, num_steps: int, eta: float, prediction_type: str):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(
                f"the model's prediction_type={prediction_type!r} has no DDIM rule; valid: epsilon, v_prediction"
            )
        if not 0.0 <= eta <= 1.0:
            raise ConfigError(f"sample.eta={eta} must be in [0, 1] (0 = DDIM, 1 = DDPM-like)")
        self.eta, self.prediction_type = eta, prediction_type
        scheduler.set_timesteps(num_steps)
        self.timesteps = [int(t) for t in scheduler.timesteps]
        ac = scheduler.alphas_cumprod.double()
        step = scheduler.config.num_train_timesteps // num_steps
        final = (
            torch.tensor(1.0, dtype=torch.float64) if scheduler.config.set_alpha_to_one else ac[0]
        )
        self.a_t = [float(ac[t]) for t in self.timesteps]
        self.a_prev = [
            float(ac[t - step]) if t - step >= 0 else float(final) for t in self.timesteps
        ]

    def model_time(self, i: int) -> float:
        return float(self.timesteps[i])

    def sigma(self, i: int) -> float:
        at, ap = self.a_t[i], self.a_prev[i]
        return self.eta * math.sqrt((1 - ap) / (1 - at) * (1 - at / ap))

    def mean(self, i: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The deterministic part of x_{i+1} (the step's mean)."""
        at, ap = self.a_t[i], self.a_prev[i]
        if self.prediction_type == "epsilon":
            eps = out
            x0 = (x - math.sqrt(1 - at) * eps) / math.sqrt(at)
        else:
            x0 = math.sqrt(at) * x - math.sqrt(1 - at) * out
            eps = math.sqrt(at) * out + math.sqrt(1 - at) * x
        sigma = self.sigma(i)
        return math.sqrt(ap) * x0 + math.sqrt(max(1 - ap - sigma**2, 0.0)) * eps

    def step(
        self, i: int, x: torch.Tensor, out: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        x_next = self.mean(i, x, out)
        sigma = self.sigma(i)
        if sigma > 0:
            noise = torch.randn(x.shape, generator=generator).to(x.device)
            x_next = x_next + sigma * noise
        return x_next


SOLVERS: dict[str, type] = {"ddim": DDIM}


def make_solver(family: Any, num_steps: int, eta: float) -> Any:
    """The family's solver for a num_steps chain."""
    return SOLVERS[family.solver](family.scheduler, num_steps, eta, family.prediction_type)


def guided(
    family: Any, model: torch.nn.Module, guidance_scale: float, uncond: Any, cond: Any, dtype
):
    """The guided model output f(x, t) for one step: one denoiser call on [uncond, cond]."""
    bsz = len(cond)
    use_cfg = uncond is not None and guidance_scale != 1.0
    from alignprop.families.base import Cond

    c = Cond.cat([uncond.expand(bsz), cond]) if use_cfg else cond  # (2B, ...) with guidance
    c = c.to(dtype=dtype)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_in = torch.cat([x, x]) if use_cfg else x
        t_in = t.expand(x_in.shape[0])
        out = family.denoise(model, x_in.to(dtype), t_in, c).float()
        if use_cfg:
            out_u, out_c = out.chunk(2)
            out = out_u + guidance_scale * (out_c - out_u)
        return out

    return fn


def sample(
    family: Any,
    cond: Any,
    uncond: Any,
    opts: Sampling,
    *,
    model: torch.nn.Module | None = None,
    truncation: Truncation | None = None,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    kl: bool = False,
) -> tuple[torch.Tensor, dict]:
    """Sample B images (in [-1, 1], before clamping) for B prompts' conditioning; return (images, info).

    `model` is the denoiser to call (a DDP/compiled wrapper in training; default the family's).
    `generator` (CPU) draws x_T, K and the eta noise; `latents` overrides x_T. info["K"] is the
    number of steps that carried gradient.

    `kl=True` adds info["kl"]: the KL-to-base regulariser, the mean over the K differentiable
    steps of the mean squared difference (over elements) between the guided output (after CFG,
    what the step uses) of the LoRA model and of the base model (adapters disabled, no autograd)
    at the same x: one extra denoiser call per step. For a Gaussian DDIM step (eta > 0) the
    true KL is ||mu_lora - mu_base||^2 / (2 sigma_t^2) and mu_lora - mu_base = c_t * (out_lora -
    out_base) with c_t = sqrt(1 - a_prev - sigma_t^2) - sqrt(a_prev (1 - a_t) / a_t) for eps
    models and c_t = sqrt(a_t (1 - a_prev - sigma_t^2)) - sqrt(a_prev (1 - a_t)) for v models, so
    the term is the KL up to the per-step constant c_t^2 / (2 sigma_t^2) (times the element
    count); at eta = 0 the steps are deterministic and it is a plain L2 pull towards the base.
    """
    model = model if model is not None else family.denoiser
    device = family.device
    dtype = dtype or next(family.denoiser.parameters()).dtype
    builds_graph = torch.is_grad_enabled() and truncation is not None
    k = truncation.draw(opts.num_steps, generator) if builds_graph else 0
    if latents is None:
        shape = family.latent_shape(*opts.size(family))
        latents = torch.randn((len(cond), *shape), generator=generator)  # (B, C, H/f, W/f)
    x = latents.to(device=device, dtype=torch.float32)

    solver = make_solver(family, opts.num_steps, opts.eta)
    fn = guided(family, model, opts.guidance_scale, uncond, cond, dtype)
    t_dev = torch.tensor(
        [solver.model_time(i) for i in range(opts.num_steps)], device=device
    )  # one copy to the device, not one per step
    cut = opts.num_steps - k
    kl_terms = []
    for i in range(opts.num_steps):
        grad_step = builds_graph and i >= cut
        with torch.set_grad_enabled(grad_step):
            if grad_step and opts.grad_checkpoint:
                out = _checkpoint(fn, x, t_dev[i : i + 1], use_reentrant=False)
            else:
                out = fn(x, t_dev[i : i + 1])
            if kl and grad_step:
                kl_terms.append(
                    _kl_to_base(family, model, opts, uncond, cond, dtype, x, t_dev[i : i + 1], out)
                )
            x = solver.step(i, x, out, generator)

    with torch.set_grad_enabled(builds_graph):
        images = family.decode(x)  # (B, 3, H, W)
    info = {"K": k, "latents": x.detach()}
    if kl:
        info["kl"] = torch.stack(kl_terms).mean() if kl_terms else torch.zeros((), device=device)
    return images, info


def _kl_to_base(family, model, opts, uncond, cond, dtype, x, t, out) -> torch.Tensor:
    """Mean squared difference between the LoRA's guided output and the base model's (no grad)."""
    from alignprop.lora_io import adapters_disabled, unwrap

    bare = unwrap(model)  # the base call needs no DDP sync and no compiled graph
    with torch.no_grad(), adapters_disabled(bare):
        base = guided(family, bare, opts.guidance_scale, uncond, cond, dtype)(x, t)
    return (out - base).pow(2).mean()
