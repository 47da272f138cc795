"""One small class per solver's update rule: built from the family's scheduler for a number
of steps, it gives the denoiser's input timestep for step i, the update x_i -> x_{i+1} from the
model output, and the noise levels (predict_x0, add_noise, recover_x0; DDIM: the step's
Gaussian and its log-probability; Flow: its SDE's at eta > 0). Adding one is one class plus one line in SOLVERS.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from alignprop.errors import ConfigError


def gaussian_log_prob(
    x_next: torch.Tensor, mean: torch.Tensor, sigma: float, i: int
) -> torch.Tensor:
    """log N(x_next; mean, sigma^2) per element, averaged over each sample's elements (DDPO's and
    Flow-GRPO's convention); (B,). x_next carries no gradient: the density is a function of mean."""
    if sigma <= 0:
        raise ValueError(f"step {i} is deterministic (sigma = 0): it has no log-probability")
    dtype = torch.promote_types(mean.dtype, torch.float32)  # fp32 under bf16, fp64 kept
    z = (x_next.detach().to(dtype) - mean.to(dtype)) / sigma
    logp = -0.5 * z**2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    return logp.mean(dim=tuple(range(1, logp.ndim)))


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
        if scheduler.config.get("thresholding", False):
            raise ConfigError(
                "the model's scheduler config sets thresholding (Imagen dynamic thresholding), which "
                "the DDIM solver does not implement"
            )
        # diffusers' DDIM clamps the predicted x0 when the config says clip_sample (its default
        # for configs without the key, as some snapshots' Euler configs are)
        clip = scheduler.config.get("clip_sample", False)
        self.clip_range = float(scheduler.config.get("clip_sample_range", 1.0)) if clip else None
        scheduler.set_timesteps(num_steps)
        self.timesteps = [int(t) for t in scheduler.timesteps]
        # Coefficients in float32, computed as diffusers' DDIMScheduler.step does: with x0 clipping
        # a chain amplifies round-off, and this keeps it bitwise on diffusers' path.
        ac = scheduler.alphas_cumprod.float()
        step = scheduler.config.num_train_timesteps // num_steps
        final = torch.tensor(1.0) if scheduler.config.set_alpha_to_one else ac[0]
        at = torch.stack([ac[t] for t in self.timesteps])
        ap = torch.stack([ac[t - step] if t - step >= 0 else final for t in self.timesteps])
        std = eta * ((1 - ap) / (1 - at) * (1 - at / ap)) ** 0.5
        self.a_t, self.a_prev = at.tolist(), ap.tolist()
        # (signal, noise) coefficients of the T + 1 noise levels: each step's input, then the end
        levels = torch.cat([at, ap[-1:]])
        self._level = list(zip((levels**0.5).tolist(), ((1 - levels) ** 0.5).tolist(), strict=True))
        self._sigma = std.tolist()
        self._coef = list(
            zip(
                (at**0.5).tolist(),  # sqrt(a_t)
                ((1 - at) ** 0.5).tolist(),  # sqrt(1 - a_t)
                (ap**0.5).tolist(),  # sqrt(a_prev)
                ((1 - ap - std**2).clamp(min=0) ** 0.5).tolist(),  # the direction to x_t
                strict=True,
            )
        )

    def model_time(self, i: int) -> float:
        return float(self.timesteps[i])

    def sigma(self, i: int) -> float:
        return self._sigma[i]

    def x0_eps(
        self, i: int, x: torch.Tensor, out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) predicted at step i from the model output (x0 clipped as the config says)."""
        sqrt_at, sqrt_1m_at = self._coef[i][:2]
        if self.prediction_type == "epsilon":
            eps = out
            x0 = (x - sqrt_1m_at * eps) / sqrt_at
        else:
            x0 = sqrt_at * x - sqrt_1m_at * out
            eps = sqrt_at * out + sqrt_1m_at * x
        if self.clip_range is not None:
            x0 = x0.clamp(-self.clip_range, self.clip_range)
        return x0, eps

    def predict_x0(self, i: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The clean latent the model predicts at step i (diffusers' pred_original_sample)."""
        return self.x0_eps(i, x, out)[0]

    def add_noise(self, i: int, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 noised to level i (step i's input; T: the chain's end): sqrt(a_t) x0 + sqrt(1 - a_t) eps."""
        signal, noise = self._level[i]
        return signal * x0 + noise * eps

    def recover_x0(self, i: int, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The x0 of x = add_noise at level i (0..T; T: after the last step) with known noise eps."""
        signal, noise = self._level[i]
        return (x - noise * eps) / signal

    def mean(self, i: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The deterministic part of x_{i+1} (the step's mean)."""
        x0, eps = self.x0_eps(i, x, out)
        sqrt_ap, direction = self._coef[i][2:]
        return sqrt_ap * x0 + direction * eps

    def log_prob(
        self, i: int, x: torch.Tensor, out: torch.Tensor, x_next: torch.Tensor
    ) -> torch.Tensor:
        """log N(x_next; mean(i, x, out), sigma(i)^2), averaged over each sample's elements (DDPO); (B,)."""
        return gaussian_log_prob(x_next, self.mean(i, x, out), self.sigma(i), i)

    def step(
        self, i: int, x: torch.Tensor, out: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        x_next = self.mean(i, x, out)
        sigma = self.sigma(i)
        if sigma > 0:
            noise = torch.randn(x.shape, generator=generator).to(x.device)
            x_next = x_next + sigma * noise
        return x_next


class Flow:
    """Euler steps on a predicted velocity over the family's shifted sigma schedule, as
    diffusers' FlowMatchEulerDiscreteScheduler defines it: x_{i+1} = x_i + (s_{i+1} - s_i) v.

    `sigmas` (FLUX passes its own linspace) and `mu` (resolution-dependent shift) come from the
    family (`Family.solver_kwargs`); the denoiser's input for step i is sigma_i * 1000.

    eta > 0 (train.flow_grpo.noise_level; sampling and evaluation use eta 0) turns the ODE into
    Flow-GRPO's SDE with the same marginals (arXiv 2505.05470, eq. 9): with t = s_i, dt = s_{i+1} - s_i
    < 0, the score of x_t = (1 - t) x0 + t eps being -(x + (1 - t) v) / t and the diffusion
    g_t = eta sqrt(t / (1 - t)), each step is the Gaussian

        x_{i+1} ~ N(x + dt (v + g_t^2 / (2 t) (x + (1 - t) v)),  g_t^2 |dt|)

    (the reverse-time drift v - g^2/2 score: the g^2/2 score drift and the g^2/2 diffusion cancel in
    the Fokker-Planck equation). At t = 1 (the first step of every schedule here) g is infinite;
    Flow-GRPO takes 1 - s_1 in place of 1 - t there, and so does this class.
    """

    def __init__(
        self, scheduler: Any, num_steps: int, eta: float, prediction_type: str, *,
        sigmas: Any = None, mu: float | None = None,
    ):  # fmt: skip
        if prediction_type != "flow":
            raise ConfigError(
                f"the model's prediction_type={prediction_type!r} has no flow rule; valid: flow"
            )
        if not 0.0 <= eta <= 1.0:
            raise ConfigError(
                f"the flow SDE's noise level eta={eta} must be in [0, 1] (0 = the deterministic "
                "Euler solver; Flow-GRPO trains at 0.7)"
            )
        self.eta = float(eta)
        kw = {} if mu is None else {"mu": mu}
        if sigmas is None:
            scheduler.set_timesteps(num_steps, **kw)
        else:
            scheduler.set_timesteps(sigmas=sigmas, **kw)
        self.timesteps = [float(t) for t in scheduler.timesteps]
        s = scheduler.sigmas.float()
        self.sigmas = s.tolist()  # num_steps + 1 noise levels, the last 0
        self.dt = (
            s[1:] - s[:-1]
        ).tolist()  # float32 differences, as the scheduler's step takes them
        self._sde = [self._sde_coefs(i) for i in range(num_steps)]

    def _sde_coefs(self, i: int) -> tuple[float, float, float]:
        """(c_x, c_v, std) of step i's Gaussian: mean = c_x x + c_v v, std = g_t sqrt(|dt|)."""
        t, dt = self.sigmas[i], self.dt[i]
        if self.eta == 0.0 or t <= 0.0:
            return 1.0, dt, 0.0
        t_den = self.sigmas[1] if t >= 1.0 else t  # Flow-GRPO's t = 1 rule
        g2 = self.eta**2 * t / (1.0 - t_den)  # g_t^2
        return 1.0 + g2 / (2 * t) * dt, (1.0 + g2 * (1.0 - t) / (2 * t)) * dt, math.sqrt(g2 * -dt)

    def model_time(self, i: int) -> float:
        return self.timesteps[i]

    def sigma(self, i: int) -> float:
        """The standard deviation of step i's Gaussian (0 at eta 0: the ODE)."""
        return self._sde[i][2]

    def predict_x0(self, i: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The clean latent the velocity predicts at step i: x - sigma_i v (v = eps - x0)."""
        return x - self.sigmas[i] * out

    def add_noise(self, i: int, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 noised to step i's input level: (1 - sigma_i) x0 + sigma_i eps."""
        return (1.0 - self.sigmas[i]) * x0 + self.sigmas[i] * eps

    def recover_x0(self, i: int, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The x0 of x = add_noise at level i (0..T; sigma_T = 0) with known noise eps."""
        s = self.sigmas[i]
        return (x - s * eps) / (1.0 - s)

    def mean(self, i: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The deterministic part of x_{i+1}: the Euler step at eta 0, the SDE's drift step above."""
        if self.sigma(i) == 0.0:
            return x + self.dt[i] * out
        c_x, c_v, _ = self._sde[i]
        return c_x * x + c_v * out

    def log_prob(
        self, i: int, x: torch.Tensor, out: torch.Tensor, x_next: torch.Tensor
    ) -> torch.Tensor:
        """log N(x_next; mean(i, x, out), sigma(i)^2), averaged over each sample's elements; (B,)."""
        return gaussian_log_prob(x_next, self.mean(i, x, out), self.sigma(i), i)

    def step(
        self, i: int, x: torch.Tensor, out: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        x_next = self.mean(i, x, out)
        if self.sigma(i) > 0:
            noise = torch.randn(x.shape, generator=generator).to(x.device)
            x_next = x_next + self.sigma(i) * noise
        return x_next


SOLVERS: dict[str, type] = {"ddim": DDIM, "flow": Flow}


def make_solver(family: Any, num_steps: int, eta: float, latent_shape: tuple = ()) -> Any:
    """The family's solver for a num_steps chain on latents of latent_shape (B, C, h, w)."""
    kw = family.solver_kwargs(num_steps, latent_shape)
    return SOLVERS[family.solver](family.scheduler, num_steps, eta, family.prediction_type, **kw)
