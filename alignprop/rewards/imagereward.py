"""ImageReward v1.0 (Xu et al. 2023), a BLIP model fine-tuned on human rankings, on transformers 5.

The public code (github.com/THUDM/ImageReward, now zai-org) builds BLIP's ViT-L/16 at 224 px
and BLIP's BERT ("med", 12 layers, cross-attention to the image tokens, no pooler), feeds
`[CLS] prompt [SEP]` (bert-base-uncased, padded to 35 tokens) with every image token as the
cross-attention memory, reads the [CLS] output and maps it through five Linear layers
(768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations; the dropouts are off in eval), then
standardises: r = (mlp - 0.16717362830052426) / 1.0333394966054072. Its package no longer runs
beside transformers 5, so this module rebuilds the same network from transformers' own BLIP
classes (`BlipVisionModel`, `BlipTextModel` without pooler) and loads `ImageReward.pt`
unchanged: `torch.load(weights_only=True)`, the public key names renamed onto those classes
(`rename_key`), strict. The file's sha256 is checked against the published one
(`reward_models.imagereward.sha256`; "" skips it). Differences to the public forward that do
not change the score: transformers masks with the dtype's minimum instead of -10000.

reward `imagereward` = r (higher is better), loss -r.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

import torch
from torch import nn

from alignprop.errors import ConfigError, MissingWeightsError
from alignprop.models import split_revision

from .clip_models import check_prompts
from .loading import check_local, freeze, missing_pretrained, resolve_file
from .preprocess import ImageInput, to_model_input

MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_LENGTH = 35  # the public code's tokenizer call: padding="max_length", max_length=35
SHA256 = "d71dc8d4912bc633c06ab8ef1ef6a81e8199d4369f14b47b29baf1d19de561f6"  # ImageReward.pt
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# ImageReward v1.0's network (blip.py create_vit('large'), med_config.json with encoder_width
# set to the ViT's width, ImageReward.py's MLP); `reward_models.imagereward.architecture` may
# name a json with the same keys (the tiny test model's)
ARCHITECTURE = {
    "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                   num_attention_heads=16, image_size=224, patch_size=16, layer_norm_eps=1e-6),
    "text": dict(vocab_size=30524, hidden_size=768, encoder_hidden_size=1024,
                 intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=512, layer_norm_eps=1e-12),
    "mlp": [768, 1024, 128, 64, 16, 1],
}  # fmt: skip

# public name (after blip.visual_encoder.) -> transformers BlipVisionModel name
_VISION = (
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.", "embeddings.patch_embedding."),
    ("norm.", "post_layernorm."),
)
_BLOCK = (
    ("norm1.", "layer_norm1."),
    ("norm2.", "layer_norm2."),
    ("attn.qkv.", "self_attn.qkv."),
    ("attn.proj.", "self_attn.projection."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
)
# in the file, unused by the score (BLIP's contrastive projections) or buffers
_DROPPED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")


def rename_key(key: str) -> str | None:
    """An ImageReward.pt key -> our module's key; None for keys the score does not use."""
    key = key.removeprefix("module.")
    if key.startswith(_DROPPED):
        return None
    if key.startswith("blip.text_encoder."):
        return "text." + key.removeprefix("blip.text_encoder.")
    if key.startswith("mlp.layers."):
        return key
    if key.startswith("blip.visual_encoder."):
        rest = key.removeprefix("blip.visual_encoder.")
        if rest.startswith("blocks."):
            _, index, tail = rest.split(".", 2)
            for old, new in _BLOCK:
                if tail.startswith(old):
                    return f"vision.encoder.layers.{index}.{new}{tail.removeprefix(old)}"
        for old, new in _VISION:
            if rest == old or (old.endswith(".") and rest.startswith(old)):
                return "vision." + new + rest.removeprefix(old)
    raise ConfigError(f"reward_models.imagereward: unexpected key {key!r} in the checkpoint")


class ImageRewardModel(nn.Module):
    """BLIP ViT + BLIP BERT with cross-attention + the five-layer head, on transformers' classes."""

    def __init__(self, arch: dict):
        super().__init__()
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        self.vision = BlipVisionModel(BlipVisionConfig(**arch["vision"], hidden_act="gelu"))
        # is_decoder=True only builds the cross-attention layers; forward runs bidirectionally
        # (the special-token ids are the tokenizer's business: none of them reaches the forward)
        text = BlipTextConfig(
            **arch["text"], hidden_act="gelu", is_decoder=True, use_cache=False,
            bos_token_id=None, eos_token_id=None, sep_token_id=None,
        )  # fmt: skip
        self.text = BlipTextModel(text, add_pooling_layer=False)
        dims = arch["mlp"]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < 3:  # the public head's dropouts (0.2, 0.2, 0.1) keep its layer indices
                layers.append(nn.Dropout(0.0))
        self.mlp = nn.Module()
        self.mlp.layers = nn.Sequential(*layers)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        image = self.vision(pixel_values=pixels).last_hidden_state  # (B, 1 + patches, D), normed
        memory_mask = torch.ones(image.shape[:2], dtype=torch.long, device=image.device)
        text = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image,
            encoder_attention_mask=memory_mask,
            is_decoder=False,
        ).last_hidden_state
        return (self.mlp.layers(text[:, 0]).squeeze(-1) - MEAN) / STD  # (B,) in the model's dtype


def read_architecture(path: str) -> dict:
    if not path:
        return ARCHITECTURE
    if not os.path.isfile(path):
        raise ConfigError(
            f"reward_models.imagereward.architecture: no json at {path!r} ('' = ImageReward v1.0's)"
        )
    return json.loads(open(path).read())


@functools.cache
def _sha256(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def load_state(path: str, sha256: str) -> dict:
    """The checkpoint's tensors under our module's names (sha256-checked when `sha256` is set)."""
    if sha256:
        st = os.stat(path)
        digest = _sha256(path, st.st_size, st.st_mtime)
        if digest != sha256:
            raise MissingWeightsError(
                "reward_models.imagereward.checkpoint",
                path,
                f"Its sha256 is {digest}, not the published {sha256}: the file is damaged or another "
                "one. Download it again, or set --config.reward_models.imagereward.sha256='' for a "
                "checkpoint of your own.",
            )
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a pickle with code, or not a checkpoint at all
        raise ConfigError(
            f"reward_models.imagereward.checkpoint: {path} is not a tensor-only ImageReward state "
            f"dict ({type(e).__name__}: {str(e)[:200]})"
        ) from e
    if isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise ConfigError(f"reward_models.imagereward.checkpoint: {path} holds no state dict")
    state = {}
    for key, value in raw.items():
        new = rename_key(key)
        if new is not None:
            state[new] = value
    return state


@functools.cache
def _load(path: str, sha256: str, arch_path: str, tokenizer_id: str, device, dtype):
    from transformers import AutoTokenizer

    arch = read_architecture(arch_path)
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; keep the caller's RNG
        model = ImageRewardModel(arch)
    state = load_state(path, sha256)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"reward_models.imagereward.checkpoint: {path} does not fit the architecture "
            f"({len(missing)} missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. "
            f"{unexpected[:3]}); reward_models.imagereward.architecture names the sizes"
        )
    repo, revision = split_revision(tokenizer_id)
    tokenizer = AutoTokenizer.from_pretrained(repo, revision=revision)
    size = arch["vision"]["image_size"]
    image_input = ImageInput((size, size), size, CLIP_MEAN, CLIP_STD, "bicubic")
    return freeze(model, device, dtype), tokenizer, image_input


def load(cfg, device: torch.device | str, dtype: torch.dtype):
    """(frozen ImageRewardModel, tokenizer, ImageInput) for cfg = config.reward_models.imagereward."""
    path = resolve_file("imagereward.checkpoint", cfg.checkpoint, cfg.repo, cfg.filename)
    check_local("imagereward.tokenizer", cfg.tokenizer)
    pinned = cfg.sha256 if not cfg.checkpoint or cfg.filename == os.path.basename(path) else ""
    try:
        return _load(path, pinned, cfg.architecture, cfg.tokenizer, torch.device(device), dtype)
    except OSError as e:  # the tokenizer: missing or offline
        raise missing_pretrained("imagereward.tokenizer", cfg.tokenizer, e) from e


def make_reward(cfg, device: torch.device | str, dtype: torch.dtype):
    """ImageReward: r = the standardised score of (image, own prompt); loss -r."""
    model, tokenizer, image_input = load(cfg.imagereward, device, dtype)
    device = next(model.parameters()).device

    def reward_fn(images: torch.Tensor, prompts) -> tuple[torch.Tensor, dict]:
        check_prompts(images, prompts)
        tokens = tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH,
            return_tensors="pt",
        ).to(device)  # fmt: skip
        pixels = to_model_input(images.to(device), image_input, dtype)
        rewards = model(pixels, tokens.input_ids, tokens.attention_mask).float()
        return rewards, {"loss": -rewards}

    reward_fn.modules = (model.vision,)  # what train.compile_unet compiles
    return reward_fn
