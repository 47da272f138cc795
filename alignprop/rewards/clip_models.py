"""transformers CLIP models shared by the aesthetic, PickScore and CLIPScore rewards."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from alignprop.models import split_revision

from .loading import check_local, freeze, missing_pretrained
from .preprocess import ImageInput, to_model_input


@functools.cache
def _load_model(model_id: str, device: torch.device, dtype: torch.dtype):
    from transformers import CLIPModel

    repo, revision = split_revision(model_id)
    return freeze(CLIPModel.from_pretrained(repo, revision=revision), device, dtype)


@functools.cache
def _load_processor(processor_id: str):
    from transformers import AutoImageProcessor, AutoTokenizer

    repo, revision = split_revision(processor_id)
    processor = AutoImageProcessor.from_pretrained(repo, revision=revision)
    return ImageInput.from_hf_processor(processor), AutoTokenizer.from_pretrained(
        repo, revision=revision
    )


def load_model(field: str, model_id: str, device: torch.device | str, dtype: torch.dtype):
    """A frozen transformers CLIPModel from a hub id or local dir (`field` names it in errors)."""
    check_local(field, model_id)
    try:
        return _load_model(model_id, torch.device(device), dtype)
    except OSError as e:  # transformers reports a missing or unreachable model as OSError
        raise missing_pretrained(field, model_id, e) from e


def load_processor(field: str, processor_id: str):
    """(ImageInput, tokenizer) from the preprocessor_config.json and tokenizer files of a CLIP repo or dir."""
    check_local(field, processor_id)
    try:
        return _load_processor(processor_id)
    except OSError as e:
        raise missing_pretrained(field, processor_id, e) from e


def image_embeds(model, pixels: torch.Tensor) -> torch.Tensor:
    """L2-normalised projected image embeddings (B, D); differentiable w.r.t. `pixels`."""
    pooled = model.vision_model(pixel_values=pixels).pooler_output
    return F.normalize(model.visual_projection(pooled), dim=-1)


def image_embedder(model, image_input: ImageInput, dtype: torch.dtype):
    """`embed(images) -> (B, D)` float32 unit vectors from this CLIP's vision tower, without a graph."""

    @torch.no_grad()
    def embed(images: torch.Tensor) -> torch.Tensor:
        pixels = to_model_input(images.detach().to(model.device), image_input, dtype)
        return F.normalize(image_embeds(model, pixels).float(), dim=-1)

    return embed


@torch.no_grad()
def text_embeds(model, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """L2-normalised projected text embeddings (B, D); constants, so computed without a graph."""
    tokens = tokenizer(
        list(prompts),
        padding=True,
        truncation=True,
        max_length=min(
            tokenizer.model_max_length, model.config.text_config.max_position_embeddings
        ),
        return_tensors="pt",
    ).to(model.device)
    pooled = model.text_model(
        input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
    ).pooler_output
    return F.normalize(model.text_projection(pooled), dim=-1)


def check_prompts(images: torch.Tensor, prompts: Sequence[str]) -> None:
    """Each image is scored against its own prompt, so the counts must match."""
    if isinstance(prompts, str) or len(prompts) != images.shape[0]:
        n = "a string" if isinstance(prompts, str) else len(prompts)
        raise ValueError(f"need one prompt per image: {images.shape[0]} images, {n} prompts")


def similarity_reward(model, image_input: ImageInput, tokenizer, scale: float, dtype: torch.dtype):
    """reward_fn with r = scale * cosine(image, own prompt) and loss `-r`."""

    def reward_fn(images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict]:
        check_prompts(images, prompts)
        pixels = to_model_input(images.to(model.device), image_input, dtype)
        image = image_embeds(model, pixels)  # (B, D)
        text = text_embeds(model, tokenizer, prompts)  # (B, D)
        rewards = scale * (image * text).sum(-1).float()  # (B,)
        return rewards, {"loss": -rewards}

    reward_fn.embed = image_embedder(model, image_input, dtype)
    reward_fn.modules = (model.vision_model,)  # what train.compile_unet compiles
    return reward_fn
