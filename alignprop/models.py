"""Load Stable Diffusion parts (hub id, local folder or single file, offline-first) and attach LoRA."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignprop.errors import OFFLINE_HINT, ConfigError, MissingWeightsError

DTYPES = {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LORA_INITS = ("gaussian", "default")


@dataclass
class SDParts:
    """The pieces of a Stable Diffusion pipeline that training and sampling use."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    scheduler: Any


def resolve_dtype(name: str) -> torch.dtype:
    """Map a precision name (fp32/no/fp16/bf16) to a torch dtype."""
    if name not in DTYPES:
        raise ConfigError(f"unknown precision {name!r}; valid: {sorted(DTYPES)}")
    return DTYPES[name]


def _looks_like_single_file(path: str) -> bool:
    return path.endswith((".safetensors", ".ckpt", ".pt", ".bin"))


def _is_path(name: str) -> bool:
    """A hub id is `org/name`; anything else (absolute, relative, deeper, with a suffix) is a path."""
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or bool(Path(name).suffix)
        or Path(name).exists()
    )


def _missing(field: str, tried: str, err: BaseException) -> MissingWeightsError:
    if _is_path(tried):
        how = f"No such folder or file here. Point {field} at a diffusers folder, a single .safetensors/.ckpt file or a hub id."
    else:
        how = OFFLINE_HINT.format(repo=tried, field=field)
    return MissingWeightsError(field, tried, how, cause=err)


def load_sd(
    model: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    single_file_config: str | None = None,
    dtype: torch.dtype | None = None,
    field: str = "pretrained.model",
) -> SDParts:
    """Load tokenizer, text encoder, VAE, UNet and a DDIM scheduler from a hub id, folder or single file."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    if not model:
        raise ConfigError(
            f"{field} is empty: give a hub id (e.g. runwayml/stable-diffusion-v1-5) or a local path"
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        if _looks_like_single_file(model):
            if not Path(model).is_file():
                raise FileNotFoundError(model)
            kwargs = {"config": single_file_config} if single_file_config else {}
            pipe = StableDiffusionPipeline.from_single_file(
                model, safety_checker=None, local_files_only=offline, torch_dtype=dtype, **kwargs
            )
            scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
            return SDParts(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, scheduler)
        common = dict(revision=revision, local_files_only=offline)
        weights = dict(common, variant=variant, torch_dtype=dtype)
        if _is_path(model) and not Path(model).exists():
            raise FileNotFoundError(model)
        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", **common)
        text_encoder = CLIPTextModel.from_pretrained(
            model,
            subfolder="text_encoder",
            revision=revision,
            local_files_only=offline,
            dtype=dtype,
        )
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", **weights)
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", **weights)
        scheduler = DDIMScheduler.from_pretrained(model, subfolder="scheduler", **common)
    except (OSError, ValueError) as err:  # hub errors subclass OSError / ValueError
        if isinstance(err, ConfigError):
            raise
        raise _missing(field, model, err) from err
    return SDParts(tokenizer, text_encoder, vae, unet, scheduler)


def freeze(parts: SDParts, device: torch.device | str) -> None:
    """Freeze every SD part (eval, no grad) and move it to the device (load_sd set the dtype)."""
    for m in (parts.text_encoder, parts.vae, parts.unet):
        m.requires_grad_(False)
        m.eval()
        m.to(device=device)


def add_lora(
    unet: torch.nn.Module,
    rank: int = 4,
    alpha: float = 4.0,
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
    init: str = "gaussian",
) -> list[torch.nn.Parameter]:
    """Attach a peft LoRA adapter to the UNet; its parameters are fp32 and the only trainable ones."""
    from peft import LoraConfig

    if init not in LORA_INITS:
        raise ConfigError(f"lora.init={init!r} is not known; valid: {list(LORA_INITS)}")
    if rank < 1:
        raise ConfigError(f"lora.rank must be >= 1, got {rank}")
    # Both start as a no-op (B = 0): "gaussian" draws A ~ N(0, 1/r), "default" is peft's kaiming A.
    init_arg = {"gaussian": "gaussian", "default": True}[init]
    cfg = LoraConfig(
        r=rank, lora_alpha=alpha, init_lora_weights=init_arg, target_modules=list(target_modules)
    )
    no_match = ConfigError(f"lora.target_modules={list(target_modules)} matched no UNet module")
    try:
        unet.add_adapter(cfg)
    except ValueError as err:  # peft raises NoMatchingPeftModuleError (a ValueError) itself
        if "not found in the base model" in str(err):
            raise no_match from err
        raise
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise no_match
    for p in params:
        # Keep the adapter in fp32 while the frozen base runs in fp16/bf16: updates of
        # size lr*grad would round away in half precision.
        p.data = p.data.float()
    return params


def trainable_unet(unet: torch.nn.Module, lora_cfg: Any) -> list[torch.nn.Parameter]:
    """Make the UNet trainable as the config says (LoRA adapter or the full UNet in fp32)."""
    if lora_cfg.enabled:
        return add_lora(
            unet, lora_cfg.rank, lora_cfg.alpha, tuple(lora_cfg.target_modules), lora_cfg.init
        )
    unet.to(torch.float32)
    unet.requires_grad_(True)
    return list(unet.parameters())


@torch.no_grad()
def encode_prompts(
    tokenizer: Any, text_encoder: torch.nn.Module, prompts: list[str], device: torch.device | str
) -> torch.Tensor:
    """Tokenize to the model's context length and return the text encoder's last hidden state."""
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)  # (B, 77)
    return text_encoder(ids)[0]  # (B, 77, D)
