"""Qwen-Image (Qwen/Qwen-Image, Qwen/Qwen-Image-2512): a 20B MMDiT on 2x2-packed latents of its
own Wan-style causal 3D VAE (one frame), conditioned on Qwen2.5-VL's last hidden state, as
QwenImagePipeline samples it.

What the pipeline does, and so do we:
- the prompt goes into a fixed system + user template, padded to the batch's longest; the last
  hidden state keeps each prompt's own tokens minus the first 34 (the system turn, counted in
  the real tokenizer's tokens: the pipeline drops 34 whatever the tokenizer), zero-padded again
  with a mask (so the conditioning of another batch has another length: `Cond.cat` pads);
- the transformer takes the 2x2-packed latent tokens, sigma (t / 1000), the mask and the image
  shape for its RoPE; the solver works on the unpacked (B, 16, H/8, W/8) latent, as FLUX.1;
- sigmas linspace(1, 1/n, n) with FLUX.1's resolution-dependent mu from the scheduler config;
- CFG only through true_cfg_scale > 1 against the negative prompt, and renormalised: the guided
  velocity of each token is rescaled to the norm of the conditional one (`combine_cfg`);
  guidance_scale is an input only of guidance-distilled checkpoints (guidance_embeds);
- decode: x * latents_std + latents_mean per channel, one frame through the 3D VAE.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from alignprop.families.base import Cond
from alignprop.families.flowbase import FlowFamily, calculate_shift
from alignprop.families.flux import pack, unpack

# the transformer blocks' joint attention (image stream, text stream), as FLUX.1
QWENIMAGE_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
)  # fmt: skip

PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, "
    "quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
# QwenImagePipeline.prompt_template_encode_start_idx: the template's system turn, in tokens
TEMPLATE_TOKENS = 34


class QwenImage(FlowFamily):
    name = "qwenimage"
    pipeline_class = "QwenImagePipeline"
    lora_targets = QWENIMAGE_LORA_TARGETS
    default_max_sequence_length = 1024  # the pipeline's cap (prompt tokens after the template)
    text_encoder_names = ("text_encoder",)
    true_cfg_only = True  # as QwenImagePipeline: CFG only when true_cfg_scale > 1

    @property
    def distilled_guidance(self) -> bool:  # guidance as an input: guidance-distilled checkpoints
        return bool(self.transformer.config.get("guidance_embeds", False))

    @property
    def lora_exclude(self) -> tuple[str, ...]:
        # the last block's text-stream output is computed and dropped: no gradient reaches it
        last = len(self.transformer.transformer_blocks) - 1
        return (f"transformer_blocks.{last}.attn.to_add_out",)

    @property
    def vae_factor(self) -> int:
        return 2 ** len(self.vae.config.temperal_downsample)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        self.check_size(height, width)
        f = self.vae_factor
        return (self.vae.config.z_dim, height // f, width // f)

    def _encode(self, prompts: list[str]) -> Cond:
        encoder, tokenizer = self.components["text_encoder"], self.components["tokenizer"]
        tokens = tokenizer(
            [PROMPT_TEMPLATE.format(p) for p in prompts],
            max_length=self.max_sequence_length + TEMPLATE_TOKENS,
            padding=True,
            truncation=True,
            return_tensors="pt",
        ).to(encoder.device)
        hidden = encoder(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
            output_hidden_states=True,
        ).hidden_states[-1]  # fmt: skip
        keep = tokens.attention_mask.bool()
        own = [
            h[m][TEMPLATE_TOKENS:] for h, m in zip(hidden, keep, strict=True)
        ]  # each prompt's tokens
        length = min(max(len(x) for x in own), self.max_sequence_length)
        feats = hidden.new_zeros(len(own), length, hidden.shape[-1])
        mask = torch.zeros(len(own), length, dtype=torch.bool, device=hidden.device)
        for i, x in enumerate(own):
            n = min(len(x), length)
            feats[i, :n], mask[i, :n] = x[:n], True
        return Cond({"encoder_hidden_states": feats, "encoder_mask": mask}).to(self.device)

    def denoise(self, model, x, t, cond):
        b, _, h, w = x.shape
        mask = cond["encoder_mask"]
        out = model(
            hidden_states=pack(x),
            encoder_hidden_states=cond["encoder_hidden_states"],
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            timestep=t.to(x.dtype) / 1000,
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            guidance=cond.tensors.get("guidance"),
            return_dict=False,
        )[0]
        return unpack(out, h, w)

    def combine_cfg(self, out_u, out_c, scale):
        """QwenImagePipeline's true CFG: u + s (c - u), each token's velocity (its 2x2 x C packed
        vector) rescaled to the norm of the conditional one."""
        h, w = out_c.shape[-2:]
        u, c = pack(out_u), pack(out_c)
        guided = u + scale * (c - u)
        guided = guided * (c.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))
        return unpack(guided, h, w)

    def solver_kwargs(self, num_steps: int, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        seq = (latent_shape[-2] // 2) * (latent_shape[-1] // 2)
        return {
            "sigmas": np.linspace(1.0, 1 / num_steps, num_steps),
            "mu": calculate_shift(seq, self.scheduler.config),
        }

    def vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The solver's latent as the VAE decodes it: (B, z, 1, h, w), its statistics undone."""
        vae = self.vae
        z = latents.to(next(vae.parameters()).dtype)
        mean = torch.tensor(vae.config.latents_mean, dtype=z.dtype, device=z.device)
        std = torch.tensor(vae.config.latents_std, dtype=z.dtype, device=z.device)
        return (z * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)).unsqueeze(2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(self.vae_latents(latents)).sample[:, :, 0]
        return images.to(torch.promote_types(images.dtype, torch.float32))

    def native_size(self) -> tuple[int, int]:
        # QwenImagePipeline's default: 128 latents x 8 = 1024 px (its card samples 1:1 at 1328).
        # Neither the VAE nor the transformer records a size: the tiny config sets 64 itself.
        return 1024, 1024
