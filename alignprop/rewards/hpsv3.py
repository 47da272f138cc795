"""HPSv3 (Ma et al., ICCV 2025), a Qwen2-VL-7B reward model, on transformers 5; judge-first (16.6 GB).

The public code (github.com/MizzenAI/HPSv3: hpsv3/model/qwen2vl_trainer.py, hpsv3/inference.py,
hpsv3/dataset/data_collator_qwen.py) fine-tunes Qwen2-VL-7B-Instruct with one added special token
`<|Reward|>` and a head on the last hidden state (after the final norm) at that token:
`rm_head` = Linear(3584, 1024), ReLU, Dropout, Linear(1024, 16), ReLU, Linear(16, 2), in float32;
its outputs are (mu, sigma) and the score is mu. The message is the stock Qwen2-VL chat template
(with its default system turn) around one user turn: the image (resized to 256 x 28 x 28 =
200,704 pixels, `smart_resize`), then INSTRUCTION with the prompt, then PROMPT_TAIL with the
reward token. The text model runs with plain positions 0..L-1 for every rotary section: HPSv3's
forward builds the input embeddings itself and never hands the image grid to the text model, so
Qwen2-VL's 3-D positions are not used (this module calls `language_model` directly, as it must to
match the checkpoint).

Here the network is transformers' `Qwen2VLModel` (no LM head: the reward never needs it) plus
that head; `HPSv3.safetensors` is loaded unchanged, its transformers-4.x key layout (`visual.*`,
`model.*`, `lm_head`, `rm_head.*`) renamed (`rename_key`) and checked strictly; its sha256 is
checked when `reward_models.hpsv3.sha256` is set (the value a third party recorded; "" skips it).
Images reach the vision tower differentiably: bicubic antialiased resize to the smart_resize size,
the CLIP normalisation, and the processor's own patchify (reshape / permute, no copy of its math).

reward `hpsv3` = mu (higher is better), loss -mu. Weights: Apache-2.0 (model card), code MIT.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from alignprop.errors import ConfigError
from alignprop.models import split_revision

from .clip_models import check_prompts
from .imagereward import CLIP_MEAN, CLIP_STD, _sha256
from .loading import check_local, freeze, missing_pretrained, resolve_file

REWARD_TOKEN = "<|Reward|>"
PIXELS = 256 * 28 * 28  # min_pixels = max_pixels in the public inference
# hpsv3/dataset/data_collator_qwen.py, verbatim (trailing spaces included)
INSTRUCTION = (
    "\nYou are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. \n\n"
    "**Visual Quality:**  \nEvaluate the overall visual quality of the image. The following sub-dimensions should be considered:\n"
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.\n"
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. \n\n"
    "**Text Alignment:**  \nAssess how well the image matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.\n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.\n"
    "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.\n"
    "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.\n"
    "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.\n"
    "Textual prompt - {text_prompt}\n\n\n"
)  # fmt: skip
PROMPT_TAIL = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"


def chat_text(prompt: str, image_tokens: int) -> str:
    """The stock Qwen2-VL chat template's text for HPSv3's one user turn (image, then text), with
    the image placeholder expanded to its tokens as the processor does, and the generation prompt."""
    user = INSTRUCTION.format(text_prompt=prompt) + PROMPT_TAIL
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|>" + "<|image_pad|>" * image_tokens + "<|vision_end|>"
        + user + "<|im_end|>\n<|im_start|>assistant\n"
    )  # fmt: skip


def smart_resize(
    height: int, width: int, factor: int = 28, pixels: int = PIXELS
) -> tuple[int, int]:
    """hpsv3's fetch_image sizes: multiples of `factor`, about `pixels` in area, the aspect kept."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > pixels:
        beta = math.sqrt(height * width / pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < pixels:
        beta = math.sqrt(pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def rename_key(key: str) -> str | None:
    """A HPSv3.safetensors key (transformers 4.x layout) -> ours; None for the unused LM head."""
    if key == "lm_head.weight":
        return None
    if key.startswith("rm_head."):
        return "head." + key.removeprefix("rm_head.")
    if key.startswith("visual."):
        return "backbone." + key
    if key.startswith("model."):
        return "backbone.language_model." + key.removeprefix("model.")
    raise ConfigError(f"reward_models.hpsv3: unexpected key {key!r} in the checkpoint")


class HPSv3Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        from transformers import Qwen2VLModel

        self.backbone = Qwen2VLModel(config)
        width = config.text_config.hidden_size
        self.head = nn.Sequential(
            nn.Linear(width, 1024),
            nn.ReLU(),
            nn.Dropout(0.0),
            nn.Linear(1024, 16),
            nn.ReLU(),
            nn.Linear(16, 2),
        )

    def forward(
        self, pixel_values, grid_thw, input_ids, attention_mask, image_token_id, reward_token_id
    ):
        image = self.backbone.get_image_features(
            pixel_values, image_grid_thw=grid_thw
        ).pooler_output
        image = torch.cat(image, dim=0)  # (sum of merged image tokens, width)
        embeds = self.backbone.language_model.embed_tokens(input_ids)
        slots = (input_ids == image_token_id)[..., None].expand_as(embeds)
        if int(slots[..., 0].sum()) != image.shape[0]:
            raise ValueError(
                f"{int(slots[..., 0].sum())} image slots for {image.shape[0]} image tokens"
            )
        embeds = embeds.masked_scatter(slots, image.to(embeds.dtype))
        hidden = self.backbone.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state  # positions 0..L-1 (position_ids=None), as HPSv3 ran
        at = hidden[input_ids == reward_token_id]  # (B, width): one reward token per sequence
        if at.shape[0] != input_ids.shape[0]:
            raise ValueError("each sequence needs exactly one reward token")
        with torch.autocast(device_type=at.device.type, enabled=False):
            out = self.head.float()(at.float())
        return out[:, 0]  # mu; out[:, 1] is the model's uncertainty


def pixel_patches(images: torch.Tensor, processor, dtype: torch.dtype):
    """Images in [-1, 1] (B, 3, H, W) -> (pixel_values (B * gh * gw, 1176), grid_thw (B, 3)), differentiably."""
    x = (images.float() / 2 + 0.5).clamp(0, 1)
    h, w = smart_resize(*x.shape[-2:])
    if (h, w) != tuple(x.shape[-2:]):
        x = F.interpolate(
            x, size=(h, w), mode="bicubic", antialias=True, align_corners=False
        ).clamp(0, 1)
    x = (x - x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)) / x.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    patches, gh, gw = processor.patchify(
        x, processor.patch_size, processor.merge_size, processor.temporal_patch_size
    )
    grid = torch.tensor([[1, gh, gw]] * x.shape[0], device=x.device)
    return patches.reshape(-1, patches.shape[-1]).to(dtype), grid


@functools.cache
def _load(path: str, sha256: str, base: str, device, dtype):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer, Qwen2VLImageProcessor

    if sha256:
        import os

        st = os.stat(path)
        if _sha256(path, st.st_size, st.st_mtime) != sha256:
            raise ConfigError(
                f"reward_models.hpsv3.checkpoint: {path} does not have the recorded sha256 {sha256}: "
                "download it again, or set --config.reward_models.hpsv3.sha256='' for your own file"
            )
    repo, revision = split_revision(base)
    tokenizer = AutoTokenizer.from_pretrained(repo, revision=revision)
    tokenizer.padding_side = "right"  # as HPSv3's processor pads
    if REWARD_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    config = AutoConfig.from_pretrained(repo, revision=revision)
    config.text_config.vocab_size = len(tokenizer)  # the embeddings were resized for the token
    # built where it runs and in its dtype (16 GB in bf16, not 33 in float32), random weights that
    # the checkpoint replaces; the rotary buffers (not in the file) are computed as constructed
    default = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.set_default_dtype(dtype)
        try:
            model = HPSv3Model(config)
        finally:
            torch.set_default_dtype(default)
    state = {}
    try:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                new = rename_key(key)
                if new is not None:
                    state[new] = f.get_tensor(key)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - not a safetensors file
        raise ConfigError(
            f"reward_models.hpsv3.checkpoint: {path} is not a safetensors file ({str(e)[:200]})"
        ) from e
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    bad = [k for k in set(ours) & set(state) if tuple(ours[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or bad:
        raise ConfigError(
            f"reward_models.hpsv3.checkpoint: {path} does not fit {base}'s architecture ({len(missing)} "
            f"missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}; "
            f"{len(bad)} of another shape, e.g. {bad[:3]})"
        )
    model.load_state_dict(state, strict=True)
    del state
    processor = Qwen2VLImageProcessor.from_pretrained(repo, revision=revision)
    model = freeze(model, device, dtype)
    model.head.float()  # the head runs in float32, as HPSv3 keeps it
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", REWARD_TOKEN)}
    return model, tokenizer, processor, ids


def load(cfg, device: torch.device | str, dtype: torch.dtype):
    """(frozen HPSv3Model, tokenizer, image processor, token ids) for cfg = config.reward_models.hpsv3."""
    path = resolve_file("hpsv3.checkpoint", cfg.checkpoint, cfg.repo, cfg.filename)
    check_local("hpsv3.base", cfg.base)
    try:
        return _load(
            path, cfg.sha256 if not cfg.checkpoint else "", cfg.base, torch.device(device), dtype
        )
    except OSError as e:  # the base model's config, tokenizer or processor: missing or offline
        raise missing_pretrained("hpsv3.base", cfg.base, e) from e


def make_reward(cfg, device: torch.device | str, dtype: torch.dtype):
    """HPSv3: r = mu of (image, own prompt); loss -r."""
    model, tokenizer, processor, ids = load(cfg.hpsv3, device, dtype)
    device = next(model.parameters()).device

    def reward_fn(images: torch.Tensor, prompts) -> tuple[torch.Tensor, dict]:
        check_prompts(images, prompts)
        pixel_values, grid = pixel_patches(images.to(device), processor, dtype)
        per_image = int(grid[0].prod()) // processor.merge_size**2
        batch = tokenizer(
            [chat_text(p, per_image) for p in prompts], padding=True, return_tensors="pt",
        ).to(device)  # fmt: skip
        rewards = model(pixel_values, grid, batch.input_ids, batch.attention_mask,
                        ids["<|image_pad|>"], ids[REWARD_TOKEN]).float()  # fmt: skip
        return rewards, {"loss": -rewards}

    reward_fn.modules = (model.backbone.visual,)  # what train.compile_unet compiles
    return reward_fn
