"""Object count: the number of objects a prompt asks for ("three foxes"), counted by OWLv2.

OWLv2 (transformers `Owlv2ForObjectDetection`, open-vocabulary) scores every image patch
against a text query: `logits` (B, patches, queries) are pre-sigmoid class logits, and the
processor's post-processing keeps a patch as a detection when sigmoid(logit) > threshold (0.1 in
transformers' OWLv2 examples). Here each image gets one query, "a photo of a {object}", with the
count and the object parsed from its own prompt (alignprop.prompts.parse_count), and the count
is soft, so that it has a pixel gradient:

  count = sum_patches p * sigmoid(z - logit(threshold)),   p = sigmoid(z)

a detection well above the threshold counts about p, a patch far below it about 0, and one at
the threshold half of p. reward = -|count - n| (`loss: abs`) or -(count - n)^2 (`loss: square`),
loss = -reward. OWLv2 has no non-maximum suppression in this count: two patches firing on one
object both count (the processor's post-processing has none either), which a run may learn to
exploit; judge it with the real detector's thresholded count (info["parts"] logs the soft one).

Images reach the detector as its processor prepares them: padded at the bottom and right to a
square with 0 (after scaling to [0, 1]), Gaussian-blurred with sigma (factor - 1) / 2 when
shrunk (the processor's anti-aliasing), resized bilinearly to its input size, normalised.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from alignprop.errors import ConfigError
from alignprop.models import split_revision
from alignprop.prompts import parse_count

from .clip_models import check_prompts
from .loading import check_local, freeze, missing_pretrained

LOSSES = ("abs", "square")


@functools.cache
def _load(model_id: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoTokenizer, Owlv2ForObjectDetection, Owlv2ImageProcessor

    repo, revision = split_revision(model_id)
    model = Owlv2ForObjectDetection.from_pretrained(repo, revision=revision)
    processor = Owlv2ImageProcessor.from_pretrained(repo, revision=revision)
    tokenizer = AutoTokenizer.from_pretrained(repo, revision=revision)
    return freeze(model, device, dtype), processor, tokenizer


def load(cfg, device: torch.device | str, dtype: torch.dtype):
    """(frozen Owlv2ForObjectDetection, Owlv2ImageProcessor, tokenizer) for config.reward_models.object_count."""
    check_local("object_count.model", cfg.model)
    try:
        return _load(cfg.model, torch.device(device), dtype)
    except OSError as e:  # transformers reports a missing or unreachable model as OSError
        raise missing_pretrained("object_count.model", cfg.model, e) from e


def check(cfg) -> None:
    if cfg.loss not in LOSSES:
        raise ConfigError(f"reward_models.object_count.loss={cfg.loss!r}; choose one of {LOSSES}")
    if not 0 < cfg.threshold < 1:
        raise ConfigError(
            f"reward_models.object_count.threshold={cfg.threshold!r}; give a probability in (0, 1)"
        )
    if "{object}" not in cfg.query:
        raise ConfigError(
            f"reward_models.object_count.query={cfg.query!r} has no {{object}} slot for the noun"
        )


def detector_input(images: torch.Tensor, processor, dtype: torch.dtype) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> OWLv2's normalised square input, differentiably."""
    x = (images.float() / 2 + 0.5).clamp(0, 1)
    h, w = x.shape[-2:]
    side = max(h, w)
    x = F.pad(x, (0, side - w, 0, side - h), value=0.0)
    size = (processor.size["height"], processor.size["width"])
    factor = side / size[0]
    if factor > 1:  # the processor's anti-aliasing: a Gaussian of sigma (factor - 1) / 2
        from torchvision.transforms.v2 import functional as tvF

        sigma = (factor - 1) / 2
        k = 2 * math.ceil(3 * sigma) + 1
        x = tvF.gaussian_blur(x, [k, k], [sigma, sigma])
    if (side, side) != size:
        x = F.interpolate(x, size=size, mode="bilinear", antialias=False, align_corners=False)
    mean = x.new_tensor(processor.image_mean).view(1, 3, 1, 1)
    std = x.new_tensor(processor.image_std).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype)


def soft_count(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, patches) class logits of one query -> (B,) soft count: sum p * sigmoid(z - logit(thr))."""
    z = logits.float()
    return (torch.sigmoid(z) * torch.sigmoid(z - math.log(threshold / (1 - threshold)))).sum(-1)


def make_reward(cfg, device: torch.device | str, dtype: torch.dtype):
    """Object count: reward -|soft count - n| for the n and object its prompt names."""
    c = cfg.object_count
    check(c)
    model, processor, tokenizer = load(c, device, dtype)
    device = next(model.parameters()).device
    max_len = model.config.text_config.max_position_embeddings

    def reward_fn(images: torch.Tensor, prompts) -> tuple[torch.Tensor, dict]:
        check_prompts(images, prompts)
        targets, queries = zip(*(parse_count(p) for p in prompts), strict=True)
        tokens = tokenizer(
            [c.query.format(object=o) for o in queries],
            padding="max_length",
            truncation=True,
            max_length=max_len,
            return_tensors="pt",
        ).to(device)
        out = model(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            pixel_values=detector_input(images.to(device), processor, dtype),
        )
        count = soft_count(out.logits[..., 0], c.threshold)  # (B,): one query per image
        error = count - count.new_tensor(targets)
        loss = error.abs() if c.loss == "abs" else error.square()
        return -loss, {"loss": loss, "count": count.detach()}

    reward_fn.modules = (model.owlv2.vision_model,)  # what train.compile_unet compiles
    return reward_fn
