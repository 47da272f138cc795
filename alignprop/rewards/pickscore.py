"""PickScore: a CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences (transformers CLIPModel).

The score is `exp(logit_scale) * cosine(image, own prompt)`, PickScore's own formula; the
temperature is read from the checkpoint (CLIP caps it at 100), so real scores sit near 20.
"""

from __future__ import annotations

import torch

from . import clip_models


def make_reward(cfg, device: torch.device | str, dtype: torch.dtype):
    """PickScore reward: r = exp(logit_scale) * cosine(image, own prompt); loss `-r`."""
    c = cfg.pickscore
    model = clip_models.load_model("pickscore.model", c.model, device, dtype)
    image_input, tokenizer = clip_models.load_processor("pickscore.processor", c.processor)
    scale = float(model.logit_scale.exp())
    return clip_models.similarity_reward(model, image_input, tokenizer, scale, dtype)
