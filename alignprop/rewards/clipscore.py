"""CLIPScore: text-image alignment as `scale * cosine(image, own prompt)` under CLIP ViT-L/14.

Unlike the metric's `max(cos, 0)`, the cosine is not clipped, so the gradient never vanishes.
"""

from __future__ import annotations

import torch

from . import clip_models


def make_reward(cfg, device: torch.device | str, dtype: torch.dtype):
    """CLIPScore reward: r = scale * cosine(image, own prompt); loss `-r`."""
    c = cfg.clipscore
    model = clip_models.load_model("clipscore.clip", c.clip, device, dtype)
    image_input, tokenizer = clip_models.load_processor("clipscore.clip", c.clip)
    return clip_models.similarity_reward(model, image_input, tokenizer, float(c.scale), dtype)
