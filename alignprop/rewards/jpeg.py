"""JPEG compressibility (DDPO's non-differentiable reward): minus the encoded size in kB.

Each image is clamped to [-1, 1], quantised to 8 bits and encoded by PIL at
reward_models.compressibility.quality (DDPO's 95);
the reward is -(bytes / 1000). It has no gradient w.r.t. the pixels, so only RL algorithms
(train.algorithm=ddpo) can train on it; as an eval reward it serves both.
"""

from __future__ import annotations

import io

import torch

# the JPEG quality DDPO scores compressibility at
QUALITY = 95


def jpeg_kb(image: torch.Tensor, quality: int = QUALITY) -> float:
    """Encoded size in kB of one image in [-1, 1] (3, H, W)."""
    from alignprop.inference import to_pil

    buf = io.BytesIO()
    to_pil(image).save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000


def make_reward(cfg, device: torch.device | str, dtype: torch.dtype):
    """Compressibility reward -kB; loss kB (detached: nothing to backpropagate)."""

    from .compressibility import _quality

    quality = _quality(cfg) if "compressibility" in cfg else QUALITY

    def reward_fn(images: torch.Tensor, prompts) -> tuple[torch.Tensor, dict]:
        sizes = [jpeg_kb(img, quality) for img in images.detach().float().cpu()]
        rewards = -torch.tensor(sizes, dtype=torch.float32, device=images.device)  # (B,)
        return rewards, {"loss": -rewards}

    return reward_fn


# the registry reads this: gradient-based training (alignprop) refuses the reward
make_reward.differentiable = False
