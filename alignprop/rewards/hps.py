"""Human Preference Score v2 (HPSv2): an open_clip ViT-H/14 fine-tuned on human preferences.

The score is the cosine between an image and its own prompt (HPSv2's `diag(image @ text.T)`
on normalised features), about 0.2 to 0.35 for real images.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F

from alignprop.errors import ConfigError

from .clip_models import check_prompts
from .loading import freeze, resolve_file
from .preprocess import ImageInput, to_model_input

CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


@functools.cache
def _register_config(path: str) -> None:
    import open_clip

    open_clip.add_model_config(path)


class _RandomInitNote(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded" line: the checkpoint is loaded right after."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@functools.cache
def _load(model_name: str, checkpoint: str, device: torch.device, dtype: torch.dtype):
    import open_clip

    # The random init is overwritten by the checkpoint; fork_rng keeps it from advancing the
    # caller's RNG (a reward loaded mid-run must not change the training stream).
    note = _RandomInitNote()
    logging.getLogger().addFilter(note)  # open_clip logs it on the root logger
    try:
        with torch.random.fork_rng(devices=[]):
            model = open_clip.create_model(model_name, pretrained=None)
    finally:
        logging.getLogger().removeFilter(note)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ConfigError(
            f"reward_models.hps.checkpoint: {checkpoint} is not an HPS checkpoint "
            "(expected a dict with a 'state_dict' key)"
        )
    model.load_state_dict(state["state_dict"])
    image_input = ImageInput.from_open_clip(model.visual.preprocess_cfg)
    return freeze(model, device, dtype), open_clip.get_tokenizer(model_name), image_input


def load(cfg, device: torch.device | str, dtype: torch.dtype):
    """(frozen open_clip model, tokenizer, ImageInput) for `cfg` = config.reward_models.hps."""
    import open_clip

    if cfg.version not in CHECKPOINTS:
        raise ConfigError(
            f"reward_models.hps.version={cfg.version!r}; choose one of {sorted(CHECKPOINTS)}"
        )
    if cfg.model_config:
        if not os.path.isfile(cfg.model_config):
            raise ConfigError(
                f"reward_models.hps.model_config: no open_clip config json at {cfg.model_config!r}"
            )
        _register_config(os.path.abspath(cfg.model_config))
    if cfg.model not in open_clip.list_models():
        raise ConfigError(
            f"reward_models.hps.model={cfg.model!r} is not an open_clip architecture "
            "(a config registered from hps.model_config is named after the file's stem)"
        )
    path = resolve_file("hps.checkpoint", cfg.checkpoint, cfg.repo, CHECKPOINTS[cfg.version])
    return _load(cfg.model, path, torch.device(device), dtype)


def make_reward(cfg, device: torch.device | str, dtype: torch.dtype):
    """HPSv2 reward: r = cosine(image, own prompt); loss `1 - r` (as in AlignProp)."""
    model, tokenizer, image_input = load(cfg.hps, device, dtype)
    device = next(model.parameters()).device

    def reward_fn(images: torch.Tensor, prompts) -> tuple[torch.Tensor, dict]:
        check_prompts(images, prompts)
        pixels = to_model_input(images.to(device), image_input, dtype)
        image = model.encode_image(pixels, normalize=True)  # (B, D)
        with torch.no_grad():
            text = model.encode_text(tokenizer(list(prompts)).to(device), normalize=True)
        rewards = (image * text).sum(-1).float()  # (B,) each image with its own prompt
        return rewards, {"loss": 1.0 - rewards}

    @torch.no_grad()
    def embed(images: torch.Tensor) -> torch.Tensor:
        """(B, D) float32 unit vectors from the HPS vision tower, without a graph."""
        pixels = to_model_input(images.detach().to(device), image_input, dtype)
        return F.normalize(model.encode_image(pixels).float(), dim=-1)

    reward_fn.embed = embed
    reward_fn.modules = (model.visual,)  # what train.compile_unet compiles
    return reward_fn
