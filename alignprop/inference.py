"""Image generation outside training (scripts/sample.py, scripts/evaluate.py): fixed noise, batched, no grad."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from alignprop import models, sampler


def resolve_device(name: str = "") -> torch.device:
    """ "" picks CUDA when present, else CPU; anything else is passed to torch.device."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The weights' dtype for a precision name; fp16 falls back to fp32 on CPU (half matmuls are slow or missing there)."""
    dtype = models.resolve_dtype(precision)
    if device.type == "cpu" and dtype == torch.float16:
        return torch.float32
    return dtype


def load_parts(
    model: str, device: torch.device, dtype: torch.dtype, field: str = "pretrained.model", **kw
) -> models.SDParts:
    """Load and freeze the SD parts for inference."""
    parts = models.load_sd(model, dtype=dtype, field=field, **kw)
    models.freeze(parts, device)
    return parts


def native_resolution(parts: models.SDParts) -> int:
    """The image side the UNet was built for (sample_size latents times the VAE's downsampling)."""
    return parts.unet.config.sample_size * vae_factor(parts)


def vae_factor(parts: models.SDParts) -> int:
    return 2 ** (len(parts.vae.config.block_out_channels) - 1)


def fixed_noise(parts: models.SDParts, n: int, resolution: int, seed: int) -> torch.Tensor:
    """n initial latents from one generator seeded with `seed` (the trainer's eval noise for the same seed)."""
    gen = torch.Generator().manual_seed(seed)
    h = resolution // vae_factor(parts)
    return torch.randn((n, parts.unet.config.in_channels, h, h), generator=gen)  # (n, 4, H/8, W/8)


def per_image_noise(parts: models.SDParts, seeds: Sequence[int], resolution: int) -> torch.Tensor:
    """One initial latent per seed, each from its own generator: an image does not depend on its batch."""
    return torch.cat([fixed_noise(parts, 1, resolution, s) for s in seeds])  # (n, 4, H/8, W/8)


@torch.no_grad()
def generate(
    parts: models.SDParts,
    prompts: Sequence[str],
    noise: torch.Tensor,
    *,
    num_steps: int,
    guidance_scale: float,
    eta: float = 0.0,
    negative_prompt: str = "",
    batch_size: int = 4,
    device: torch.device,
    dtype: torch.dtype,
    eta_seed: int = 0,
) -> torch.Tensor:
    """Images in [-1, 1] (N, 3, H, W) on CPU for N prompts from the given initial latents (eta noise seeded by eta_seed)."""
    if len(prompts) != noise.shape[0]:
        raise ValueError(f"{len(prompts)} prompts but {noise.shape[0]} noise tensors")
    uncond = models.encode_prompts(parts.tokenizer, parts.text_encoder, [negative_prompt], device)
    out = []
    for start in range(0, len(prompts), batch_size):
        texts = list(prompts[start : start + batch_size])
        cond = models.encode_prompts(parts.tokenizer, parts.text_encoder, texts, device)
        gen = torch.Generator().manual_seed(eta_seed + start)
        images, _ = sampler.sample(
            parts.unet,
            parts.vae,
            parts.scheduler,
            cond,
            uncond,
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            eta=eta,
            generator=gen,
            latents=noise[start : start + batch_size],
            dtype=dtype,
        )
        out.append(images.float().cpu())
    return torch.cat(out)  # (N, 3, H, W)


def to_pil(image: torch.Tensor):
    """One image in [-1, 1] (3, H, W) as an 8-bit PIL image."""
    from PIL import Image

    arr = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return Image.fromarray(arr.permute(1, 2, 0).numpy())


def slug(text: str, max_len: int = 60) -> str:
    """A file-name-safe short form of a prompt."""
    s = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()
    return s[:max_len] or "prompt"


def save_png(image: torch.Tensor, path: str | Path, metadata: dict[str, object]) -> Path:
    """Save an image with text chunks (str values as is, others as JSON) in the PNG."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in metadata.items():
        info.add_text(k, v if isinstance(v, str) else json.dumps(v))
    path = Path(path)
    to_pil(image).save(path, pnginfo=info)
    return path
