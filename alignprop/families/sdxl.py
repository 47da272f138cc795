"""Stable Diffusion XL (base): two CLIP text encoders, a UNet with pooled-text and size conditioning.

Conditioning as `StableDiffusionXLPipeline` builds it: the penultimate hidden states of both
encoders (CLIP ViT-L `text_encoder`, OpenCLIP bigG `text_encoder_2`) concatenated, the pooled
projection of encoder 2 as `text_embeds`, and `time_ids` = (original size, crop top-left, target
size) = (H, W, 0, 0, H, W) of the image. The time ids are derived from the latent's own shape at
each denoiser call, not stored in the Cond: one encoded negative prompt then serves every image
size (sample.buckets), and the ids can never disagree with the latent they condition.

fp16: the stock SDXL VAE overflows in float16 (its config says `force_upcast`); with such a VAE and
half-precision weights the VAE is kept in float32 and decoding runs outside autocast, as the
diffusers pipeline does. `pretrained.vae=madebyollin/sdxl-vae-fp16-fix` decodes in fp16 instead.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from alignprop.families.base import Cond, Family
from alignprop.families.sd import clip_ids

# the size micro-conditioning: original (H, W), crop top-left (0, 0), target (H, W)
TIME_IDS_PER_IMAGE = 6


class SDXL(Family):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    # the invisible watermark is a post-processing step of the pipeline, not a model
    skip_components = {"add_watermarker": False}

    def __init__(self, components: dict[str, Any], force_zeros_for_empty_prompt: bool = True):
        super().__init__(components)
        self.unet = components["unet"]
        self.tokenizer, self.tokenizer_2 = components["tokenizer"], components["tokenizer_2"]
        self.text_encoder = components["text_encoder"]
        self.text_encoder_2 = components["text_encoder_2"]
        # the pipeline's rule: an empty negative prompt is all-zero conditioning (SDXL base: True)
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        from diffusers import DDIMScheduler

        # Sampling is DDIM whatever scheduler the folder ships (its betas and prediction type kept).
        if not isinstance(self.scheduler, DDIMScheduler):
            self.scheduler = DDIMScheduler.from_config(self.scheduler.config)
            self.components["scheduler"] = self.scheduler
        self._upcast_vae()

    @classmethod
    def from_pipeline(cls, pipe: Any, spec: Any = None) -> SDXL:
        family = cls(dict(pipe.components), bool(pipe.config.get("force_zeros_for_empty_prompt")))
        family.spec = spec if spec is not None else family.spec
        return family

    def _upcast_vae(self) -> None:
        """A half-precision VAE whose config says force_upcast decodes in fp32 (it overflows in fp16)."""
        vae = self.vae
        if next(vae.parameters()).dtype == torch.float16 and vae.config.get("force_upcast", False):
            warnings.warn(
                "the SDXL VAE overflows in fp16 (its config says force_upcast): it is kept in fp32, "
                "which costs decoder memory; pretrained.vae=madebyollin/sdxl-vae-fp16-fix decodes in fp16",
                stacklevel=2,
            )
            vae.to(torch.float32)

    # ---- what the solver calls

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Cond:
        device = self.text_encoder_2.device
        out1 = self.text_encoder(
            clip_ids(self.tokenizer, prompts, device), output_hidden_states=True
        )
        out2 = self.text_encoder_2(
            clip_ids(self.tokenizer_2, prompts, device), output_hidden_states=True
        )
        hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        dtype = self.text_encoder_2.dtype
        return Cond(
            {
                "encoder_hidden_states": hidden.to(dtype),  # (B, 77, D1 + D2)
                "text_embeds": out2.text_embeds,  # (B, P) pooled, projected
            }
        )

    def encode_negative(self, prompt: str) -> Cond:
        if prompt == "" and self.force_zeros_for_empty_prompt:
            cond = self.encode([""])
            return Cond({k: torch.zeros_like(v) for k, v in cond.tensors.items()})
        return self.encode([prompt])

    def time_ids(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, 6) size conditioning for latents x: original = target = the image size, crop (0, 0)."""
        h, w = x.shape[-2] * self.vae_factor, x.shape[-1] * self.vae_factor
        ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=dtype, device=x.device)
        return ids.expand(x.shape[0], TIME_IDS_PER_IMAGE)

    def denoise(self, model, x, t, cond):
        text_embeds = cond["text_embeds"]
        added = {"text_embeds": text_embeds, "time_ids": self.time_ids(x, text_embeds.dtype)}
        return model(
            x, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added
        ).sample

    def native_size(self) -> tuple[int, int]:
        side = self.unet.config.sample_size * self.vae_factor
        return side, side

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if next(self.vae.parameters()).dtype != torch.float32:
            return super().decode(latents)
        # an fp32 VAE (upcast, or fp32 run): autocast would run its convs in fp16 again
        with torch.autocast(latents.device.type, enabled=False):
            return super().decode(latents.float())
