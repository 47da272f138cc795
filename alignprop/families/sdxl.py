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
from pathlib import Path
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


# ---- SDXL-sized random-weight models (benchmarks): the real configs, no download


def sdxl_base_configs() -> dict[str, dict]:
    """stabilityai/stable-diffusion-xl-base-1.0's unet, vae, text_encoder(_2) and scheduler configs."""
    clip = dict(
        vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=0,
        eos_token_id=2, pad_token_id=1,
    )  # fmt: skip
    return {
        "unet": dict(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), cross_attention_dim=2048, norm_num_groups=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            use_linear_projection=True, addition_embed_type="text_time",
            addition_embed_type_num_heads=64, addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
        "vae": dict(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=1024,
            scaling_factor=0.13025, force_upcast=True,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        ),
        # CLIP ViT-L/14 text tower
        "text_encoder": dict(
            clip, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu",
        ),
        # OpenCLIP ViT-bigG/14 text tower (CLIPTextModelWithProjection)
        "text_encoder_2": dict(
            clip, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
            num_attention_heads=20, projection_dim=1280, hidden_act="gelu",
        ),
        "scheduler": dict(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            num_train_timesteps=1000, prediction_type="epsilon", steps_offset=1,
            timestep_spacing="leading", clip_sample=False, set_alpha_to_one=False,
        ),
    }  # fmt: skip


def random_sdxl(
    dtype: torch.dtype,
    device: torch.device | str,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    configs: dict[str, dict] | None = None,
) -> SDXL:
    """An SDXL family with random weights built on the device from `configs` (default: the real sizes).

    The tokenizers are the tiny kit's CLIP BPE (the real 49408-token vocabulary size), written to
    tokenizer_dir (a temporary folder if None). The VAE follows the dtype rule of `SDXL` (fp32 when
    the run is fp16 and its config says force_upcast).
    """
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    from alignprop import tiny

    cfg = configs or sdxl_base_configs()
    tok_dir = Path(tokenizer_dir or tempfile.mkdtemp(prefix="sdxl_tok_"))
    bpe = tiny.write_clip_tokenizer(tok_dir)

    def tokenizer(pad: str):
        return CLIPTokenizer(
            str(bpe / "vocab.json"), str(bpe / "merges.txt"), pad_token=pad, model_max_length=77
        )

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)  # the same weights for every recipe
        components = {
            "unet": UNet2DConditionModel(**cfg["unet"]),
            "vae": AutoencoderKL(**cfg["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])),
        }
    components = {k: m.to(dtype).eval().requires_grad_(False) for k, m in components.items()}
    components.update(
        tokenizer=tokenizer("<|endoftext|>"),
        tokenizer_2=tokenizer("!"),
        scheduler=DDIMScheduler(**cfg["scheduler"]),
    )
    return SDXL(components)
