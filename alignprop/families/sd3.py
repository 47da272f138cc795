"""Stable Diffusion 3 / 3.5: an MMDiT transformer predicting a flow velocity, conditioned on
CLIP-L + CLIP-G + T5-XXL as `StableDiffusion3Pipeline.encode_prompt` builds it, with true CFG."""

from __future__ import annotations

from typing import Any

import torch

from alignprop.families.base import Cond, Pretrained
from alignprop.families.flowbase import FlowFamily, calculate_shift, t5_ids
from alignprop.families.sd import clip_ids


class SD3(FlowFamily):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    default_max_sequence_length = 256
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")

    @classmethod
    def load_kwargs(cls, spec: Pretrained) -> dict[str, Any]:
        # without T5 the pipeline (and encode below) uses zeros for its tokens
        return {"text_encoder_3": None, "tokenizer_3": None} if spec.drop_t5 else {}

    def _clip(self, index: int, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate hidden states (B, 77, D), projected pooled embedding (B, P)) of CLIP `index`."""
        suffix = "" if index == 1 else f"_{index}"
        tok, enc = self.components[f"tokenizer{suffix}"], self.components[f"text_encoder{suffix}"]
        out = enc(clip_ids(tok, prompts, enc.device), output_hidden_states=True)
        return out.hidden_states[-2], out[0]

    def _encode(self, prompts: list[str]) -> Cond:
        h1, pooled1 = self._clip(1, prompts)
        h2, pooled2 = self._clip(2, prompts)
        clip = torch.cat([h1, h2], dim=-1)  # (B, 77, D1 + D2)
        enc3, length = self.components.get("text_encoder_3"), self.max_sequence_length
        if enc3 is None:
            width = self.transformer.config.joint_attention_dim
            t5 = torch.zeros(len(prompts), length, width, dtype=clip.dtype, device=clip.device)
        else:
            t5 = enc3(t5_ids(self.components["tokenizer_3"], prompts, length, enc3.device))[0]
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        hidden = torch.cat([clip, t5.to(clip.device, clip.dtype)], dim=-2)  # (B, 77 + L, D_t5)
        pooled = torch.cat([pooled1, pooled2], dim=-1)  # (B, P1 + P2)
        return Cond({"encoder_hidden_states": hidden, "pooled_projections": pooled}).to(self.device)

    def denoise(self, model, x, t, cond):
        return model(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
            return_dict=False,
        )[0]

    def solver_kwargs(self, num_steps: int, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        cfg = self.scheduler.config
        if not cfg.get("use_dynamic_shifting"):
            return {}  # SD3 / SD3.5: the scheduler's static shift
        p = self.transformer.config.patch_size
        seq = (latent_shape[-2] // p) * (latent_shape[-1] // p)
        return {"mu": calculate_shift(seq, cfg, max_shift=1.16)}  # the SD3 pipeline's default

    def native_size(self) -> tuple[int, int]:
        side = self.transformer.config.sample_size * self.vae_factor
        return side, side


def sd35_medium_configs() -> dict[str, dict]:
    """Real-size component configs of stabilityai/stable-diffusion-3.5-medium (for random-weight benchmarks).

    Keys: transformer (SD3Transformer2DModel), vae (AutoencoderKL), text_encoder / text_encoder_2
    (CLIPTextConfig of CLIPTextModelWithProjection), text_encoder_3 (T5Config of T5EncoderModel),
    scheduler (FlowMatchEulerDiscreteScheduler).
    """
    return {
        "transformer": dict(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
            attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
            caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
            dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
        ),
        "vae": vae16_config(scaling_factor=1.5305, shift_factor=0.0609),
        "text_encoder": clip_l_config(),
        "text_encoder_2": dict(
            vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
            num_attention_heads=20, max_position_embeddings=77, projection_dim=1280,
            hidden_act="gelu",
        ),
        "text_encoder_3": t5_xxl_config(),
        "scheduler": {"num_train_timesteps": 1000, "shift": 3.0},
    }  # fmt: skip


def vae16_config(scaling_factor: float, shift_factor: float) -> dict:
    """The 16-channel AutoencoderKL of SD3 and FLUX.1."""
    return dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
        layers_per_block=2, latent_channels=16, norm_num_groups=32, sample_size=1024,
        scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=False,
        use_post_quant_conv=False, force_upcast=True,
    )  # fmt: skip


def clip_l_config() -> dict:
    """OpenAI CLIP ViT-L/14's text tower."""
    return dict(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
        hidden_act="quick_gelu",
    )  # fmt: skip


def t5_xxl_config() -> dict:
    """T5 v1.1 XXL's encoder (google/t5-v1_1-xxl)."""
    return dict(
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, is_encoder_decoder=False,
        use_cache=False,
    )  # fmt: skip
