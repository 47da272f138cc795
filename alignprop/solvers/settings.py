"""Sampling settings: the truncation of backprop (K drawn once per trajectory), the sampler's
options (config.sample), and their checks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

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
