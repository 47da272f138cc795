"""FLUX.1: a transformer on 2x2-packed latents predicting a flow velocity, conditioned on CLIP-L
(pooled) + T5-XXL, with the guidance scale as a distilled input (FLUX.1-dev; FLUX.1-schnell has
none and ignores it) and optional true CFG (sample.true_cfg_scale > 1), as FluxPipeline samples.

The solver works on the unpacked (B, 16, h, w) latent; `denoise` packs it for the transformer
and unpacks the velocity. `pack(noise)` is what `FluxPipeline(latents=...)` takes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from alignprop.families.base import Cond
from alignprop.families.flowbase import FlowFamily, calculate_shift, t5_ids
from alignprop.families.sd import clip_ids


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): each 2x2 patch becomes one token."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w), the inverse of `pack`."""
    b, _, d = tokens.shape
    x = tokens.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h2: int, w2: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """RoPE positions (0, row, col) of the h2 x w2 packed tokens, row-major: (h2 * w2, 3)."""
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1] = torch.arange(h2)[:, None]
    ids[..., 2] = torch.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3).to(device=device, dtype=dtype)


class Flux(FlowFamily):
    name = "flux"
    pipeline_class = "FluxPipeline"
    default_max_sequence_length = 512
    text_encoder_names = ("text_encoder", "text_encoder_2")
    true_cfg_only = True  # as FluxPipeline: CFG only when true_cfg_scale > 1

    @property
    def distilled_guidance(self) -> bool:  # FLUX.1-dev yes, FLUX.1-schnell no
        return bool(self.transformer.config.guidance_embeds)

    def _encode(self, prompts: list[str]) -> Cond:
        clip, t5 = self.components["text_encoder"], self.components["text_encoder_2"]
        ids = clip_ids(self.components["tokenizer"], prompts, clip.device)
        pooled = clip(ids, output_hidden_states=False).pooler_output  # (B, 768)
        ids = t5_ids(self.components["tokenizer_2"], prompts, self.max_sequence_length, t5.device)
        hidden = t5(ids)[0]  # (B, L, 4096)
        return Cond({"encoder_hidden_states": hidden, "pooled_projections": pooled}).to(self.device)

    def denoise(self, model, x, t, cond):
        _, _, h, w = x.shape
        hidden = cond["encoder_hidden_states"]
        out = model(
            hidden_states=pack(x),
            timestep=t.to(x.dtype) / 1000,  # the pipeline's scaling: the transformer takes sigma
            guidance=cond.tensors.get("guidance"),
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=hidden,
            txt_ids=torch.zeros(hidden.shape[1], 3, device=x.device, dtype=hidden.dtype),
            img_ids=image_ids(h // 2, w // 2, x.device, x.dtype),
            return_dict=False,
        )[0]
        return unpack(out, h, w)

    def solver_kwargs(self, num_steps: int, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        # FluxPipeline's schedule: sigmas linspace(1, 1/n, n), shifted by mu(image tokens).
        seq = (latent_shape[-2] // 2) * (latent_shape[-1] // 2)
        return {
            "sigmas": np.linspace(1.0, 1 / num_steps, num_steps),
            "mu": calculate_shift(seq, self.scheduler.config),
        }

    def native_size(self) -> tuple[int, int]:
        side = self.vae.config.get("sample_size", 1024)  # FluxPipeline's default 128 latents
        return side, side


def flux_dev_configs() -> dict[str, dict]:
    """Real-size component configs of black-forest-labs/FLUX.1-dev (for random-weight benchmarks).

    Keys: transformer (FluxTransformer2DModel), vae (AutoencoderKL), text_encoder (CLIPTextConfig
    of CLIPTextModel), text_encoder_2 (T5Config of T5EncoderModel), scheduler.
    """
    from alignprop.families.sd3 import clip_l_config, t5_xxl_config, vae16_config

    return {
        "transformer": dict(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
            pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
        ),
        "vae": vae16_config(scaling_factor=0.3611, shift_factor=0.1159),
        "text_encoder": clip_l_config(),
        "text_encoder_2": t5_xxl_config(),
        "scheduler": {
            "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
            "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
            "max_image_seq_len": 4096,
        },
    }  # fmt: skip
