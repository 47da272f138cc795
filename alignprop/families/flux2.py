"""FLUX.2 [klein] (black-forest-labs/FLUX.2-klein-4B, -9B and their -base models): an MMDiT with
shared modulation on 2x2-patchified 32-channel latents of the FLUX.2 VAE, conditioned on one
Qwen3 text model, as Flux2KleinPipeline samples it.

What the pipeline does, and so do we:
- the prompt goes through the tokenizer's chat template (one user turn, a generation prompt,
  thinking off), padded to max_sequence_length; the conditioning is hidden states 9, 18 and 27
  of the text model concatenated along the features (3 x hidden), padding included;
- the solver's latent is the pipeline's noise space: the VAE latent patchified 2x2 into 4C
  channels and normalised by the VAE's BatchNorm statistics, (B, 4C, H/16, W/16); `denoise`
  flattens it to tokens (no further packing) with 4-axis RoPE positions (t, row, col, layer),
  text tokens at (0, 0, 0, l); `decode` undoes the normalisation and the patchify;
- sigmas linspace(1, 1/n, n) shifted by the pipeline's empirical mu(image tokens, steps);
  the transformer takes sigma (t / 1000);
- CFG neg + g (pos - neg) against "" when g > 1, only on the base models: the distilled ones
  (model_index.json is_distilled, FLUX.2-klein-4B / -9B) never guide and ignore g.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from alignprop.families.base import Cond
from alignprop.families.flowbase import FlowFamily, qwen_chat_tokens

# Flux2Transformer2DModel's attention projections: the double-stream blocks' image and text
# streams (to_*, add_*) and the single-stream blocks' fused qkv + MLP input. Their output
# projection (single_transformer_blocks.N.attn.to_out) shares the name "to_out" with the double
# blocks' ModuleList, which peft cannot wrap: name each one in lora.target_modules to add it.
FLUX2_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "to_qkv_mlp_proj",
)  # fmt: skip

# the text model's hidden states the pipeline stacks (index 0 = the embeddings)
TEXT_LAYERS = (9, 18, 27)


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """Flux2KleinPipeline's shift mu: fitted per resolution at 10 and 200 steps, interpolated
    linearly in the step count (above 4300 image tokens, the 200-step line alone)."""
    at_200 = 1.6927e-4 * image_seq_len + 0.45666666
    if image_seq_len > 4300:
        return float(at_200)
    at_10 = 8.73809524e-05 * image_seq_len + 1.89833333
    slope = (at_200 - at_10) / 190.0
    return float(at_200 + slope * (num_steps - 200))


def positions(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """RoPE positions (0, row, col, 0) of the rows x cols latent tokens, row-major: (rows * cols, 4)."""
    ids = torch.zeros(rows, cols, 4, device=device)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, device=device)[None, :]
    return ids.reshape(rows * cols, 4)


def text_positions(length: int, device: torch.device) -> torch.Tensor:
    """RoPE positions (0, 0, 0, l) of the text tokens: (length, 4)."""
    ids = torch.zeros(length, 4, device=device)
    ids[:, 3] = torch.arange(length, device=device)
    return ids


class Flux2(FlowFamily):
    name = "flux2"
    pipeline_class = "Flux2KleinPipeline"
    lora_targets = FLUX2_LORA_TARGETS
    default_max_sequence_length = 512
    text_encoder_names = ("text_encoder",)

    def __init__(self, components: dict[str, Any], distilled: bool = False):
        super().__init__(components)
        # a step-distilled klein (FLUX.2-klein-4B / -9B): the pipeline never applies CFG
        self.is_distilled = distilled

    @classmethod
    def from_pipeline(cls, pipe: Any, spec=None):
        family = cls(dict(pipe.components), bool(pipe.config.get("is_distilled", False)))
        family.spec = spec if spec is not None else family.spec
        return family

    def cfg_scale(self, guidance_scale: float, true_cfg_scale: float) -> float:  # type: ignore[override]
        """neg + g (pos - neg) when g > 1 on a base model; 1 (no CFG call) otherwise."""
        if self.is_distilled or guidance_scale <= 1.0:
            return 1.0
        return guidance_scale

    def _encode(self, prompts: list[str]) -> Cond:
        encoder, tokenizer = self.components["text_encoder"], self.components["tokenizer"]
        tokens = qwen_chat_tokens(tokenizer, prompts, self.max_sequence_length, thinking=False)
        out = encoder(
            input_ids=tokens.input_ids.to(encoder.device),
            attention_mask=tokens.attention_mask.to(encoder.device),
            output_hidden_states=True,
            use_cache=False,
        )
        if len(out.hidden_states) <= max(TEXT_LAYERS):
            raise ValueError(
                f"FLUX.2 [klein] stacks hidden states {TEXT_LAYERS} of its text encoder, which has "
                f"only {len(out.hidden_states) - 1} layers: pretrained.model is not a klein pipeline"
            )
        hidden = torch.cat([out.hidden_states[k] for k in TEXT_LAYERS], dim=-1)  # (B, L, 3H)
        return Cond({"encoder_hidden_states": hidden}).to(self.device)

    def denoise(self, model, x, t, cond):
        b, c, h, w = x.shape
        hidden = cond["encoder_hidden_states"]
        out = model(
            hidden_states=x.reshape(b, c, h * w).transpose(1, 2),  # (B, h w, 4C)
            encoder_hidden_states=hidden,
            timestep=t.to(x.dtype) / 1000,  # the transformer takes sigma
            img_ids=positions(h, w, x.device),
            txt_ids=text_positions(hidden.shape[1], x.device),
            guidance=None,
            return_dict=False,
        )[0]
        return out.transpose(1, 2).reshape(b, c, h, w)

    def solver_kwargs(self, num_steps: int, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        seq = latent_shape[-2] * latent_shape[-1]
        return {
            "sigmas": np.linspace(1.0, 1 / num_steps, num_steps),
            "mu": empirical_mu(seq, num_steps),
        }

    @property
    def latent_multiple(self) -> int:
        return self.vae_factor * 2

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        self.check_size(height, width)
        f = self.latent_multiple
        return (4 * self.vae.config.latent_channels, height // f, width // f)

    def vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The solver's (B, 4C, h, w) latent as the VAE decodes it (and as Flux2KleinPipeline
        returns it with output_type="latent"): BatchNorm statistics undone, unpatchified to
        (B, C, 2h, 2w)."""
        vae = self.vae
        z = latents.to(next(vae.parameters()).dtype)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        z = z * std.to(z.dtype) + mean
        b, c4, h, w = z.shape
        z = z.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return z.reshape(b, c4 // 4, 2 * h, 2 * w)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(self.vae_latents(latents)).sample
        return images.to(torch.promote_types(images.dtype, torch.float32))

    def native_size(self) -> tuple[int, int]:
        # Flux2KleinPipeline's default: 128 x 16 = 1024 px (the tiny kit's VAE says 64)
        side = self.vae.config.get("sample_size", 1024)
        return side, side
