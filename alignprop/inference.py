"""No-grad generation from fixed noise (training's eval, scripts/evaluate.py, scripts/sample.py) and image files."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from alignprop import solvers


def fixed_noise(family, n: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    """n initial latents from one generator seeded with `seed` (the trainer's eval noise for the same seed)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, *family.latent_shape(*size)), generator=gen)  # (n, C, H/f, W/f)


def per_image_noise(family, seeds: Sequence[int], size: tuple[int, int]) -> torch.Tensor:
    """One initial latent per seed, each from its own generator: an image does not depend on its batch."""
    return torch.cat([fixed_noise(family, 1, size, s) for s in seeds])  # (n, C, H/f, W/f)


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to the run's half dtype (the fp32 LoRA factors then run in it too); off in fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


@torch.no_grad()
def generate(
    family,
    prompts: Sequence[str],
    noise: torch.Tensor,
    opts: solvers.Sampling,
    *,
    batch_size: int,
    dtype: torch.dtype,
    eta_seed: int = 0,
    model: torch.nn.Module | None = None,
    on_batch=None,
) -> torch.Tensor:
    """Images in [-1, 1] (N, 3, H, W) on CPU for N prompts from the given initial latents.

    The eta noise of batch b comes from a generator seeded with eta_seed + its first index.
    `on_batch(images, texts)` (optional) sees each batch on the device, e.g. to score it.
    """
    if len(prompts) != noise.shape[0]:
        raise ValueError(f"{len(prompts)} prompts but {noise.shape[0]} noise tensors")
    uncond = family.encode_negative(opts.negative_prompt)
    out = []
    for start in range(0, len(prompts), batch_size):
        texts = list(prompts[start : start + batch_size])
        gen = torch.Generator().manual_seed(eta_seed + start)
        with autocast(family.device, dtype):
            images, _ = solvers.sample(
                family, family.encode(texts), uncond, opts, model=model, generator=gen,
                latents=noise[start : start + batch_size], dtype=dtype,
            )  # fmt: skip
            if on_batch is not None:
                on_batch(images, texts)
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


def save_webp_clip(
    clip: torch.Tensor, path: str | Path, metadata: dict[str, object], fps: int = 16
) -> Path:
    """Save a clip (3, F, H, W) in [-1, 1] as a looping lossless animated WebP at fps, and its
    metadata beside it as <name>.json (WebP has no PNG-style text chunks)."""
    path = Path(path)
    frames = [to_pil(clip[:, i]) for i in range(clip.shape[1])]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps),
                   loop=0, lossless=True)  # fmt: skip
    path.with_suffix(".json").write_text(json.dumps(metadata, indent=1, ensure_ascii=False))
    return path


def save_png(image: torch.Tensor, path: str | Path, metadata: dict[str, object]) -> Path:
    """Save an image with text chunks (str values as is, others as JSON) in the PNG."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in metadata.items():
        info.add_text(k, v if isinstance(v, str) else json.dumps(v))
    path = Path(path)
    to_pil(image).save(path, pnginfo=info)
    return path
