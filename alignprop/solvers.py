"""Differentiable sampling: truncation once, one small update rule per solver.

One `sample()` call is one trajectory of B images. The truncation point is drawn once for it:
the first `num_steps - K` steps run with no autograd at all (no graph, no checkpoint), the last
K steps build a graph, each denoiser call checkpointed as `sample.checkpoint` says (CHECKPOINTS;
the default keeps memory flat in K). Under `torch.no_grad()` (or with `truncation=None`) the same
function is the evaluation sampler.

A solver is a small class: built from the family's scheduler for a number of steps, it gives
the denoiser's input timestep for step i and the update x_i -> x_{i+1} from the model output.
Adding one is one class plus one line in SOLVERS.
"""

from __future__ import annotations

import contextlib
import math
import types
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from alignprop import fast
from alignprop.errors import ConfigError

TRUNCATIONS = ("fixed", "uniform", "gaussian", "full")
# How each differentiable denoiser call is checkpointed (sample.checkpoint):
#   none        the call's whole graph is kept until backward (memory grows with K)
#   step        one torch.utils.checkpoint around the call: memory flat in K, but its backward
#               recomputes a whole denoiser forward at batch 2B with every activation (the peak)
#   block       the denoiser's own per-block checkpointing (diffusers): a low peak, but each of
#               the K calls keeps its block inputs (memory grows with K)
#   step+block  both: the step's recomputation itself runs block by block (flat in K, low peak,
#               one more forward per grad step)
CHECKPOINTS = ("none", "step", "block", "step+block")
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
    # see CHECKPOINTS; grad_checkpoint=False (older configs) means "none"
    checkpoint: str = "step+block"
    # training sizes (height, width), one drawn per micro-batch; () = the size above
    buckets: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        if self.checkpoint not in CHECKPOINTS:
            raise ConfigError(
                f"sample.checkpoint={self.checkpoint!r} is not known; valid: {list(CHECKPOINTS)}"
            )
        if self.decode_chunk < 0:
            raise ConfigError(
                f"sample.decode_chunk={self.decode_chunk} must be >= 0 (0 = all at once)"
            )

    @property
    def checkpoint_mode(self) -> str:
        """The checkpointing of grad steps in effect (grad_checkpoint=False turns it off)."""
        return self.checkpoint if self.grad_checkpoint else "none"

    # FLUX.1 (dev and schnell): the true CFG weight against the negative prompt (1 = off)
    true_cfg_scale: float = 1.0
    # images per VAE decode (0 = the whole batch); with grad each chunk is checkpointed (see decode)
    decode_chunk: int = 0
    # the steps without autograd on merged LoRA weights (alignprop.fast.merged_lora)
    merge_lora: bool = True

    @classmethod
    def from_config(cls, s: Any) -> Sampling:
        height = s.get("height", 0) or s.resolution
        width = s.get("width", 0) or s.resolution
        return cls(
            s.num_steps, s.guidance_scale, s.eta, s.grad_checkpoint, height, width,
            s.negative_prompt, s.get("checkpoint", "step+block"),
            parse_buckets(s.get("buckets", "")), s.get("true_cfg_scale", 1.0),
            s.get("decode_chunk", 0), s.get("merge_lora", True),
        )  # fmt: skip

    def size(self, family: Any) -> tuple[int, int]:
        """(height, width) in pixels: the configured size or the family's native one."""
        nh, nw = family.native_size()
        return self.height or nh, self.width or nw

    def draw_bucket(self) -> tuple[int, int] | None:
        """A training micro-batch's (H, W) from buckets (None = the size above).

        Drawn from the global torch RNG, the stream that draws prompts and noise and that
        checkpoints save, so a resumed run draws the same buckets; without buckets nothing is drawn.
        """
        if not self.buckets:
            return None
        return self.buckets[int(torch.randint(len(self.buckets), (1,)))]


def parse_buckets(spec: str, field: str = "sample.buckets") -> tuple[tuple[int, int], ...]:
    """ "512x768,768x512" -> ((512, 768), (768, 512)) as (height, width); "" -> ()."""
    out = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        h, sep, w = part.lower().partition("x")
        if not (sep and h.isdigit() and w.isdigit()):
            raise ConfigError(
                f"{field}={spec!r}: {part!r} is not HEIGHTxWIDTH (e.g. 512x768,768x512)"
            )
        out.append((int(h), int(w)))
    return tuple(out)


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
        sigma = self.sigma(i)
        if sigma <= 0:
            raise ValueError(f"step {i} is deterministic (sigma = 0): it has no log-probability")
        z = (x_next.detach().float() - self.mean(i, x, out).float()) / sigma
        logp = -0.5 * z**2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)
        return logp.mean(dim=tuple(range(1, logp.ndim)))

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
    """

    def __init__(
        self, scheduler: Any, num_steps: int, eta: float, prediction_type: str, *,
        sigmas: Any = None, mu: float | None = None,
    ):  # fmt: skip
        if prediction_type != "flow":
            raise ConfigError(
                f"the model's prediction_type={prediction_type!r} has no flow rule; valid: flow"
            )
        if eta != 0.0:
            raise ConfigError(
                f"sample.eta={eta}: flow-matching families sample with a deterministic Euler "
                "solver; set sample.eta=0"
            )
        self.eta = 0.0
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

    def model_time(self, i: int) -> float:
        return self.timesteps[i]

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

    def step(
        self, i: int, x: torch.Tensor, out: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        return x + self.dt[i] * out


SOLVERS: dict[str, type] = {"ddim": DDIM, "flow": Flow}


def make_solver(family: Any, num_steps: int, eta: float, latent_shape: tuple = ()) -> Any:
    """The family's solver for a num_steps chain on latents of latent_shape (B, C, h, w)."""
    kw = family.solver_kwargs(num_steps, latent_shape)
    return SOLVERS[family.solver](family.scheduler, num_steps, eta, family.prediction_type, **kw)


def guided(
    family: Any, model: torch.nn.Module, guidance_scale: float, uncond: Any, cond: Any, dtype,
    true_cfg_scale: float = 1.0,
):  # fmt: skip
    """The guided model output f(x, t) for one step: one denoiser call on [uncond, cond].

    FLUX (family.true_cfg_only) is guided as FluxPipeline guides it: CFG only when
    true_cfg_scale > 1; FLUX.1-dev (distilled guidance) gets guidance_scale as an input, and
    FLUX.1-schnell (no guidance embedding) ignores it.
    """
    from alignprop.families.base import Cond

    bsz = len(cond)
    distilled = family.distilled_guidance
    cfg_scale = true_cfg_scale if family.true_cfg_only else guidance_scale
    use_cfg = uncond is not None and cfg_scale != 1.0

    c = Cond.cat([uncond.expand(bsz), cond]) if use_cfg else cond  # (2B, ...) with guidance
    c = c.to(dtype=dtype)
    if distilled:  # the guidance input, one fp32 value per row as the pipeline passes it
        g = torch.full((len(c),), float(guidance_scale), device=family.device)
        c = Cond({**c.tensors, "guidance": g})

    def fn(x: torch.Tensor, t: torch.Tensor, cond_in: Cond = c) -> torch.Tensor:
        x_in = torch.cat([x, x]) if use_cfg else x
        t_in = t.expand(x_in.shape[0])
        out = family.denoise(model, x_in.to(dtype), t_in, cond_in).to(x.dtype)
        if use_cfg:
            out_u, out_c = out.chunk(2)
            out = out_u + cfg_scale * (out_c - out_u)
        return out

    fn.cond = c  # the guided conditioning: CUDA graphs copy it into their static inputs
    return fn


def set_block_checkpointing(denoiser: torch.nn.Module, on: bool) -> None:
    """Turn the denoiser's own per-block checkpointing on/off (it acts only while grad is enabled).

    On, each block is checkpointed by `_block_checkpoint` (installed every time, so a plain
    diffusers `enable_gradient_checkpointing()` from elsewhere is replaced by it).
    """
    if not hasattr(denoiser, "enable_gradient_checkpointing"):
        if not on:
            return
        raise ConfigError(
            f"sample.checkpoint=block needs a denoiser with enable_gradient_checkpointing() (diffusers "
            f"models); {type(denoiser).__name__} has none: use sample.checkpoint=step"
        )
    if on:
        denoiser.enable_gradient_checkpointing(_block_checkpoint)
    elif getattr(denoiser, "is_gradient_checkpointing", False):
        denoiser.disable_gradient_checkpointing()


def _block_checkpoint(block: Any, *args: Any, **kwargs: Any) -> Any:
    """One denoiser block under a non-reentrant checkpoint whose recomputation sees the same LoRA state.

    The backward recomputes the block outside the call that ran it: a block run with its
    adapters off (the KL term's base call) is recomputed with them off again, not with the LoRA.
    """
    from alignprop.lora_io import adapters_are_off, adapters_disabled

    if not (isinstance(block, torch.nn.Module) and adapters_are_off(block)):
        return _checkpoint(block, *args, use_reentrant=False, **kwargs)

    def bare(*a: Any, **k: Any) -> Any:
        with adapters_disabled(block):
            return block(*a, **k)

    return _checkpoint(bare, *args, use_reentrant=False, **kwargs)


# How the VAE decoder is checkpointed during a grad step (sample.decoder_checkpoint):
#   none   its whole graph is kept until backward
#   block  diffusers' own, one checkpoint per up-block and the mid-block: the backward's
#          recomputation of the last up-block (128 channels at full resolution) holds all its
#          layers' activations at once (the step's peak)
#   layer  one checkpoint per resnet, upsampler and attention of the mid- and up-blocks: the
#          backward recomputes one layer at a time (one more decoder forward, as block)
DECODER_CHECKPOINTS = ("none", "block", "layer")
_PLAIN_FORWARD = "_alignprop_plain_forward"  # on a layer while its forward is checkpointed


def decoder_checkpoint_mode(value: Any) -> str:
    """sample.decoder_checkpoint as one of DECODER_CHECKPOINTS (True = block, False = none)."""
    if isinstance(value, bool):
        return "block" if value else "none"
    mode = value.lower() if isinstance(value, str) else None
    mode = {"true": "block", "false": "none"}.get(mode, mode)
    if mode not in DECODER_CHECKPOINTS:
        raise ConfigError(
            f"sample.decoder_checkpoint={value!r} is not known; valid: "
            f"{list(DECODER_CHECKPOINTS)} (True = block, False = none)"
        )
    return mode


def _checkpointed_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A decoder layer's forward under its own checkpoint while grad is enabled, plain without."""
    own = self.__dict__[_PLAIN_FORWARD]
    fn, args = (own, args) if own is not None else (type(self).forward, (self, *args))
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    return _checkpoint(fn, *args, use_reentrant=False, **kwargs)


def _decoder_layers(vae: torch.nn.Module) -> list[torch.nn.Module]:
    """The resnets, upsamplers and attentions of the decoder's mid-block and up-blocks."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D, Upsample2D

    decoder = getattr(vae, "decoder", None)
    parts = [getattr(decoder, "mid_block", None), *getattr(decoder, "up_blocks", ())]
    kinds = (ResnetBlock2D, Upsample2D, Attention)
    layers = [m for p in parts if p is not None for m in p.modules() if isinstance(m, kinds)]
    if not layers:
        raise ConfigError(
            f"sample.decoder_checkpoint=layer needs a diffusers VAE decoder with mid/up blocks; "
            f"{type(vae).__name__} has none: use block or none"
        )
    return layers


def set_decoder_checkpointing(vae: torch.nn.Module, mode: Any) -> None:
    """Checkpoint the VAE decoder as `mode` says (DECODER_CHECKPOINTS; True/False too).

    Idempotent, and each mode undoes the others. "layer" replaces the forward of each layer
    instance (parameters and state_dict keys unchanged); it acts only while grad is enabled.
    """
    mode = decoder_checkpoint_mode(mode)
    if mode == "block" and not hasattr(vae, "enable_gradient_checkpointing"):
        raise ConfigError(
            f"sample.decoder_checkpoint=block needs a VAE with enable_gradient_checkpointing() "
            f"(diffusers models); {type(vae).__name__} has none: use layer or none"
        )
    for m in vae.modules():  # undo "layer"
        if _PLAIN_FORWARD in m.__dict__:
            own = m.__dict__.pop(_PLAIN_FORWARD)
            if own is None:
                del m.forward
            else:
                m.forward = own
    if mode == "block":
        vae.enable_gradient_checkpointing()
    elif hasattr(vae, "disable_gradient_checkpointing"):
        vae.disable_gradient_checkpointing()
    if mode == "layer":
        for m in _decoder_layers(vae):
            setattr(m, _PLAIN_FORWARD, m.__dict__.get("forward"))
            m.forward = types.MethodType(_checkpointed_forward, m)


# where the gradient enters the chain (solvers.sample's `how`); K = truncation.draw, T = num_steps
HOWS = {
    "last": "the last K steps carry gradient (AlignProp, DRaFT-K)",
    "spread": "K steps spread over the whole chain carry gradient, each with a stop-gradient on "
    "its denoiser input (DRTune)",
    "x0": "the chain stops at step T - K, whose one differentiable call predicts x0 (ReFL)",
    "renoise": "the whole chain without autograd; `copies` re-noisings of x0 to step T - K's "
    "level, each denoised by the last K steps with gradient (DRaFT-LV)",
    "inject": "the whole chain without autograd; x0 noised with known noise to step T - K's "
    "level, one differentiable deterministic step, x0 recovered with that noise (Direct-Align)",
}


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
    graphs: Any = None,
    kl: bool = False,
    record: bool = False,
    how: str = "last",
    copies: int = 1,
) -> tuple[torch.Tensor, dict]:
    """Sample B images (in [-1, 1], before clamping) for B prompts' conditioning; return (images, info).

    `model` is the denoiser to call (a DDP/compiled wrapper in training; default the family's).
    `generator` (CPU) draws x_T, K and the eta noise; `latents` overrides x_T. info["K"] is the
    K drawn by `truncation` (0 without autograd or truncation). `how` (HOWS) says where the
    gradient enters; every `how` is the plain chain without autograd. `graphs`
    (alignprop.fast.GuidedGraphs) replays the steps before the first differentiable one
    without autograd as CUDA graphs. "renoise" returns copies x B images, copy-major.

    `kl=True` adds info["kl"], the mean over the differentiable denoiser calls of the pull of
    the LoRA's outputs to the base model's (`_Chain.grad_call` says what it is per eta).

    `record=True` (RL objectives; no autograd) keeps the trajectory: info["trajectory"] holds
    every latent x_T .. x_0 as (B, T+1, C, h, w) and info["log_probs"] each step's Gaussian
    log-probability log p(x_{i+1} | x_i) as (B, T) (0 for a deterministic step), both on the
    unmerged adapter (no merged weights, no CUDA graphs), so that a later recomputation of a
    step's log-probability with the same weights gives the same value.
    """
    if record and (torch.is_grad_enabled() and truncation is not None or kl):
        raise ValueError(
            "sample(record=True) keeps a trajectory without autograd: no truncation, no kl"
        )
    if how not in HOWS:
        raise ValueError(f"sample(how={how!r}): valid: {list(HOWS)}")
    device = family.device
    dtype = dtype or next(family.denoiser.parameters()).dtype
    builds_graph = torch.is_grad_enabled() and truncation is not None
    k = truncation.draw(opts.num_steps, generator) if builds_graph else 0
    if latents is None:
        shape = family.latent_shape(*opts.size(family))
        latents = torch.randn((len(cond), *shape), generator=generator)  # (B, C, H/f, W/f)
    # the chain's state: fp32 under a half-precision model, fp64 under an fp64 one (gradient checks)
    x = latents.to(device=device, dtype=torch.promote_types(dtype, torch.float32))
    ch = _Chain(family, cond, uncond, opts, model, dtype, tuple(x.shape), kl, generator)
    if record and not hasattr(ch.solver, "log_prob"):
        raise ConfigError(
            f"the {family.solver!r} solver of the {family.name} family has no step log-probabilities "
            "to record (an RL objective needs a stochastic solver)"
        )
    grad_steps, end = _grad_plan(how, k, opts.num_steps, generator)
    if builds_graph and k:
        set_block_checkpointing(family.denoiser, ch.mode in ("block", "step+block"))
    first = min(grad_steps, default=end)
    x, trajectory, log_probs = ch.prefix(x, first, graphs, record)
    x = ch.steps(x, range(first, end), grad_steps, stop_input=how == "spread")
    if builds_graph and k:
        x = _tail(ch, how, x, opts.num_steps - k, copies)
    with torch.set_grad_enabled(builds_graph):
        images = decode(family, x, opts.decode_chunk)  # (B, 3, H, W); "renoise": (copies x B, ...)
    info = {"K": k, "latents": x.detach(), "grad_steps": sorted(grad_steps)}
    if record:
        info["trajectory"] = torch.stack(trajectory, dim=1)  # (B, T+1, C, h, w)
        info["log_probs"] = torch.stack(log_probs, dim=1)  # (B, T)
    if kl:
        info["kl"] = torch.stack(ch.kl_terms).mean() if ch.kl_terms else x.new_zeros(())
    return images, info


def _grad_plan(how: str, k: int, num_steps: int, generator: Any) -> tuple[set[int], int]:
    """(the chain steps whose denoiser call carries gradient, the step the chain stops before)."""
    if not k:
        return set(), num_steps
    if how == "last":
        return set(range(num_steps - k, num_steps)), num_steps
    if how == "spread":  # one step in each of K strides, at an offset drawn once per trajectory
        stride = num_steps // k
        offset = int(torch.randint(stride, (1,), generator=generator))
        return {offset + j * stride for j in range(k)}, num_steps
    if how == "x0":
        return set(), num_steps - k
    return set(), num_steps  # "renoise" / "inject": the whole chain without autograd, then _tail


class _Chain:
    """One trajectory's solver, guided denoiser and differentiable calls (with their KL terms)."""

    def __init__(self, family, cond, uncond, opts, model, dtype, shape, kl, generator):
        self.family, self.cond, self.uncond, self.opts, self.dtype = (
            family,
            cond,
            uncond,
            opts,
            dtype,
        )
        self.model = model if model is not None else family.denoiser
        self.solver = make_solver(family, opts.num_steps, opts.eta, shape)
        self.fn = guided(
            family, self.model, opts.guidance_scale, uncond, cond, dtype, opts.true_cfg_scale
        )
        self.t_dev = torch.tensor(
            [self.solver.model_time(i) for i in range(opts.num_steps)], device=family.device
        )  # one copy to the device, not one per step
        self.mode, self.generator = opts.checkpoint_mode, generator
        self.kl, self.kl_terms = kl, []

    def guided_for(self, cond: Any) -> Any:
        """The guided denoiser of other conditioning (the same prompts, repeated)."""
        o = self.opts
        return guided(self.family, self.model, o.guidance_scale, self.uncond, cond, self.dtype, o.true_cfg_scale)  # fmt: skip

    def grad_call(self, i: int, x: torch.Tensor, fn: Any = None, cond: Any = None) -> torch.Tensor:
        """The guided output at step i with autograd (under the step checkpoint when on); with
        kl, the base model's output at the same x is kept beside it.

        The KL term: the mean over the differentiable denoiser calls of the mean over
        elements of (out_lora - out_base)^2, the guided outputs (after CFG, what the step uses) of
        the LoRA model and of the base model (adapters off, weights frozen) at the same x: one
        extra denoiser call per step. The base call is differentiable in x, since from the second
        differentiable step on x itself depends on the LoRA. What the term is, per eta: for a
        Gaussian DDIM step (eta > 0) the true per-step KL is ||mu_lora - mu_base||^2 / (2 sigma_t^2)
        with mu_lora - mu_base = c_t (out_lora - out_base), c_t = sqrt(1 - a_prev - sigma_t^2) -
        sqrt(a_prev (1 - a_t) / a_t) (eps) or sqrt(a_t (1 - a_prev - sigma_t^2)) - sqrt(a_prev (1 -
        a_t)) (v): the term weights every step alike where the KL weights step t by c_t^2 /
        (2 sigma_t^2) (times the element count), a weight that varies 77x (eps) to 6,900x (v) over a
        50-step chain at eta 1. At eta = 0 (and for the deterministic flow solver) the steps carry no
        noise, there is no KL, and the term is a plain L2 pull of the outputs towards the base.
        """
        fn, t = fn or self.fn, self.t_dev[i : i + 1]
        step_ckpt = self.mode in ("step", "step+block")
        with torch.enable_grad():
            out = _checkpoint(fn, x, t, use_reentrant=False) if step_ckpt else fn(x, t)
            if (
                self.kl
            ):  # the base output's dependence on x (on the LoRA, from the second step on) counts
                base_fn = _base_model_fn(
                    self.family, self.model, self.opts, self.uncond,
                    cond if cond is not None else self.cond, self.dtype,
                )  # fmt: skip
                if step_ckpt:
                    base = _checkpoint(_base_call, base_fn, self.model, x, t, use_reentrant=False)
                else:
                    base = _base_call(base_fn, self.model, x, t)
                self.kl_terms.append((out - base).pow(2).mean())
        return out

    def prefix(self, x: torch.Tensor, first: int, graphs: Any, record: bool):
        """Steps 0 .. first-1 without autograd (merged LoRA and CUDA graphs when on, unless
        recording); returns (x_first, the latents so far, their step log-probabilities)."""
        fn = self.fn
        if graphs is not None and not record:
            fn = graphs.wrap(self.fn, self.model, self.opts.guidance_scale)
        merging = self.opts.merge_lora and first and not record
        merge = fast.merged_lora(self.model) if merging else contextlib.nullcontext()
        trajectory, log_probs = [x], []
        with merge, torch.no_grad():
            for i in range(first):
                out = fn(x, self.t_dev[i : i + 1])
                x_next = self.solver.step(i, x, out, self.generator)
                if record:
                    trajectory.append(x_next)
                    log_probs.append(_step_log_prob(self.solver, i, x, out, x_next))
                x = x_next
        return x, trajectory, log_probs

    def steps(
        self, x, span: range, grad_steps: set[int], stop_input: bool = False, fn=None, cond=None
    ):
        """Steps `span` of the chain from x: those in grad_steps call the denoiser with autograd
        (on x detached when stop_input), the others without; every update x -> x_{i+1} is kept
        in the graph, so the gradient also flows along the solver's linear path in x."""
        for i in span:
            if i in grad_steps:
                if not stop_input and not x.requires_grad:
                    # every grad step's input then requires grad: one compiled graph serves any K
                    x = x.detach().requires_grad_()
                out = self.grad_call(i, x.detach() if stop_input else x, fn, cond)
            else:
                with torch.no_grad():
                    out = (fn or self.fn)(x.detach(), self.t_dev[i : i + 1])
            with torch.set_grad_enabled(x.requires_grad or out.requires_grad):
                x = self.solver.step(i, x, out, self.generator)
        return x


def _tail(ch: _Chain, how: str, x: torch.Tensor, start: int, copies: int) -> torch.Tensor:
    """The differentiable end of the "x0", "renoise" and "inject" chains from step `start` = T - K."""
    s, g = ch.solver, ch.generator
    if how == "x0":  # x is the chain's x_start: one differentiable call predicts x0 from it
        return s.predict_x0(start, x, ch.grad_call(start, x))
    if how == "renoise":
        x0 = x.detach().repeat(copies, *([1] * (x.ndim - 1)))
        eps = torch.randn(x0.shape, generator=g).to(x0)
        cond = type(ch.cond).cat([ch.cond] * copies)
        fn = ch.guided_for(cond)
        span = range(start, ch.opts.num_steps)
        return ch.steps(s.add_noise(start, x0, eps), span, set(span), fn=fn, cond=cond)
    if how == "inject":  # the step is deterministic (eta 0) so that the known noise recovers x0
        det = s if s.eta == 0.0 else make_solver(ch.family, ch.opts.num_steps, 0.0, tuple(x.shape))
        eps = torch.randn(x.shape, generator=g).to(x)
        x_in = det.add_noise(start, x.detach(), eps)
        x_next = det.step(start, x_in, ch.grad_call(start, x_in), None)
        return det.recover_x0(start + 1, x_next, eps)
    return x


def _step_log_prob(solver: Any, i: int, x: torch.Tensor, out: torch.Tensor, x_next: torch.Tensor):
    """log p(x_next | x) of step i, (B,); 0 where the step is deterministic (sigma = 0)."""
    if solver.sigma(i) > 0:
        return solver.log_prob(i, x, out, x_next)
    return torch.zeros(len(x), device=x.device)


def decode(family: Any, x: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """family.decode of the latents x, `chunk` images at a time (0 = all at once).

    The decoder's backward is a training step's memory peak: the recomputation of its last
    up-block (128 channels at full resolution) holds every image of the batch at once. With grad,
    each chunk is decoded under its own checkpoint, so the forward keeps only the latents and
    the backward recomputes one chunk at a time (one more decoder forward per image).
    """
    if not chunk or chunk >= len(x):
        return family.decode(x)
    if not torch.is_grad_enabled():
        return torch.cat([family.decode(c) for c in x.split(chunk)])
    return torch.cat([_checkpoint(family.decode, c, use_reentrant=False) for c in x.split(chunk)])


def _base_model_fn(family, model, opts, uncond, cond, dtype):
    """The guided call of the bare denoiser (no DDP sync, no compiled graph), built once per trajectory."""
    from alignprop.lora_io import unwrap

    return guided(
        family, unwrap(model), opts.guidance_scale, uncond, cond, dtype, opts.true_cfg_scale
    )


def _base_call(base_fn, model, x, t) -> torch.Tensor:
    """The base model's guided output at x (adapters off, its weights frozen; differentiable in x)."""
    from alignprop.lora_io import adapters_disabled, unwrap

    with adapters_disabled(unwrap(model)):
        return base_fn(x, t)
