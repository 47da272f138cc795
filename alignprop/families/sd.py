"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a UNet predicting eps (1.x, 2.x base) or v (2.x 768)."""

from __future__ import annotations

from typing import Any

import torch

from alignprop.families.base import Cond, Family


def clip_ids(tokenizer: Any, prompts: list[str], device: torch.device) -> torch.Tensor:
    """Token ids padded and cut to the tokenizer's context length (77 for CLIP)."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)  # (B, 77)


class SD(Family):
    name = "sd"
    pipeline_class = "StableDiffusionPipeline"
    skip_components = {"safety_checker": None, "feature_extractor": None}

    def __init__(self, components: dict[str, Any]):
        super().__init__(components)
        self.unet = components["unet"]
        self.tokenizer = components["tokenizer"]
        self.text_encoder = components["text_encoder"]
        from diffusers import DDIMScheduler

        # Sampling is DDIM whatever scheduler the folder ships (its betas and prediction type kept).
        if not isinstance(self.scheduler, DDIMScheduler):
            self.scheduler = DDIMScheduler.from_config(self.scheduler.config)
            self.components["scheduler"] = self.scheduler

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Cond:
        ids = clip_ids(self.tokenizer, prompts, self.text_encoder.device)
        return Cond({"encoder_hidden_states": self.text_encoder(ids)[0]})  # (B, 77, D)

    def denoise(self, model, x, t, cond):
        return model(x, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample

    def native_size(self) -> tuple[int, int]:
        side = self.unet.config.sample_size * self.vae_factor
        return side, side
