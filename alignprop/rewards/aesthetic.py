"""LAION aesthetic score: an MLP on the L2-normalised CLIP ViT-L/14 image embedding.

The head is the LAION improved-aesthetic-predictor (`sac+logos+ava1-l14-linearMSE.pth`),
trained with MSE on AVA-style ratings, so scores live on a 1..10 scale.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from alignprop.errors import ConfigError

from . import clip_models
from .loading import freeze, resolve_file
from .preprocess import to_model_input

LOSSES = ("target", "neg")


class AestheticHead(nn.Module):
    """The LAION MLP, 768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations (keys `layers.{0,2,4,6,7}`)."""

    def __init__(self, in_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)


@functools.cache
def _load_head(path: str, device: torch.device, dtype: torch.dtype) -> AestheticHead:
    state = torch.load(path, map_location="cpu", weights_only=True)
    head = AestheticHead(state["layers.0.weight"].shape[1])
    head.load_state_dict(state)  # strict: the public file loads unchanged
    return freeze(head, device, dtype)


def load_head(cfg, device: torch.device | str, dtype: torch.dtype) -> AestheticHead:
    """The frozen head from `cfg.head`, or from the hub (`cfg.head_repo`, `cfg.head_filename`)."""
    path = resolve_file("aesthetic.head", cfg.head, cfg.head_repo, cfg.head_filename)
    return _load_head(path, torch.device(device), dtype)


def make_reward(cfg, device: torch.device | str, dtype: torch.dtype):
    """Aesthetic reward; loss `|r - target|` ("target", as in AlignProp) or `-r` ("neg")."""
    c = cfg.aesthetic
    if c.loss not in LOSSES:
        raise ConfigError(f"reward_models.aesthetic.loss={c.loss!r}; choose one of {LOSSES}")
    clip = clip_models.load_model("aesthetic.clip", c.clip, device, dtype)
    image_input, _ = clip_models.load_processor("aesthetic.clip", c.clip)
    return aesthetic_reward(clip, image_input, load_head(c, device, dtype), c, dtype)


def aesthetic_reward(clip, image_input, head: AestheticHead, c, dtype: torch.dtype):
    """The reward on already-built models: a CLIP with `vision_model` and `visual_projection`
    (transformers CLIPModel or CLIPVisionModelWithProjection), its ImageInput and the head."""
    target, use_target = float(c.target), c.loss == "target"

    def reward_fn(images: torch.Tensor, prompts) -> tuple[torch.Tensor, dict]:
        pixels = to_model_input(images.to(clip.device), image_input, dtype)
        rewards = head(clip_models.image_embeds(clip, pixels)).squeeze(-1).float()  # (B,)
        loss = (rewards - target).abs() if use_target else -rewards
        return rewards, {"loss": loss}

    reward_fn.embed = clip_models.image_embedder(clip, image_input, dtype)
    reward_fn.modules = (clip.vision_model, head)  # what train.compile_unet compiles
    return reward_fn
