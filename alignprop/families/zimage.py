"""Z-Image (Tongyi-MAI/Z-Image-Turbo, Tongyi-MAI/Z-Image): a single-stream DiT on 2x2-patched
16-channel latents (the FLUX.1 VAE), conditioned on one Qwen3 text encoder, as ZImagePipeline
samples it.

What the pipeline does, and so do we:
- the prompt goes through the tokenizer's chat template (one user message, a generation prompt,
  thinking on), padded to max_sequence_length; the conditioning is the second-to-last hidden
  state, and only the unpadded tokens reach the transformer (we keep the padded tensor plus its
  mask, so that conditionings concatenate along the batch, and cut per image in `denoise`);
- the transformer takes a list of (C, 1, h, w) latents, the time 1 - sigma, and predicts minus
  the flow velocity;
- sigmas linspace(1, 1/n, n), shifted as the scheduler config says (Turbo: a static shift 3);
- CFG is pos + g (pos - neg), on whenever guidance_scale > 0 (Turbo is distilled: 0), i.e. our
  out_u + s (out_c - out_u) with s = g + 1 (`cfg_scale`).
"""

from __future__ import annotations

from typing import Any

import torch

from alignprop.families.base import Cond
from alignprop.families.flowbase import FlowFamily, calculate_shift, qwen_chat_tokens

# The attention projections of every Z-Image block (noise refiner, context refiner, main layers)
ZIMAGE_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class ZImage(FlowFamily):
    name = "zimage"
    pipeline_class = "ZImagePipeline"
    lora_targets = ZIMAGE_LORA_TARGETS
    default_max_sequence_length = 512
    text_encoder_names = ("text_encoder",)

    # ZImagePipeline: pos + g (pos - neg) = neg + (g + 1)(pos - neg); g = 0 is no CFG
    guidance_offset = 1.0

    def _encode(self, prompts: list[str]) -> Cond:
        encoder, tokenizer = self.components["text_encoder"], self.components["tokenizer"]
        tokens = qwen_chat_tokens(tokenizer, prompts, self.max_sequence_length, thinking=True)
        ids = tokens.input_ids.to(encoder.device)
        mask = tokens.attention_mask.to(encoder.device).bool()
        hidden = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        return Cond({"cap_feats": hidden.hidden_states[-2], "cap_mask": mask}).to(self.device)

    def denoise(self, model, x, t, cond):
        feats, mask = cond["cap_feats"], cond["cap_mask"]
        caps = [feats[i][mask[i]] for i in range(len(feats))]  # each prompt's own tokens
        out = model(
            list(x.unsqueeze(2).unbind(0)),  # B x (C, 1, h, w)
            (1000 - t.to(x.dtype)) / 1000,  # the pipeline's time: 1 - sigma
            caps,
            return_dict=False,
        )[0]
        return -torch.stack(out).squeeze(2)  # the transformer predicts minus the velocity

    def solver_kwargs(self, num_steps: int, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        seq = (latent_shape[-2] // 2) * (latent_shape[-1] // 2)
        return {
            # ZImagePipeline builds them with torch.linspace (float32), FluxPipeline with numpy
            "sigmas": torch.linspace(1.0, 1 / num_steps, num_steps).tolist(),
            "mu": calculate_shift(seq, self.scheduler.config),
        }

    def native_size(self) -> tuple[int, int]:
        # ZImagePipeline's default is 1024; the FLUX.1 VAE it ships says so too (the tiny kit: 64)
        side = self.vae.config.get("sample_size", 1024)
        return side, side
