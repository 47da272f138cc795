"""Rewards, chosen by name from one registry; all differentiable but `jpeg` (its factory says
`differentiable = False`: train.algorithm=ddpo trains on it, AlignProp refuses it; AlignProp
trains on `compressibility`, its differentiable proxy).

A reward is `reward_fn(images, prompts) -> (rewards, info)`: images (B, 3, H, W) in [-1, 1]
(a video family's (B, 3, F, H, W) clips: `get_reward` scores each frame and averages per clip)
at any size, rewards a float32 Tensor[B] differentiable w.r.t. the images, and info with
  info["loss"]   Tensor[B], differentiable: the per-sample loss to minimise
                 (aesthetic: |r - target| or -r; hps: 1 - r; pickscore, clipscore: -r),
  info["parts"]  {name: Tensor[B] detached}: each component's reward.
A combined spec "aesthetic=1.0,hps=0.5" gives rewards = sum w_i r_i and loss = sum w_i loss_i.

Every built-in reward also has `reward_fn.embed(images) -> Tensor[B, D]`: float32 L2-normalised
image embeddings from the reward's own vision tower (same preprocessing, no graph), e.g. for
diversity metrics. A combined reward exposes the embed of its first part that has one; a custom
factory's callable may set `.embed` too, and `getattr(reward_fn, "embed", None)` tells.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence

import ml_collections
import torch

from alignprop.errors import ConfigError, MissingWeightsError

from . import (
    aesthetic,
    clipscore,
    compressibility,
    hps,
    hpsv3,
    imagereward,
    jpeg,
    mps,
    object_count,
    pickscore,
)

RewardFn = Callable[[torch.Tensor, Sequence[str]], tuple[torch.Tensor, dict]]
RewardFactory = Callable[[ml_collections.ConfigDict, torch.device, torch.dtype], RewardFn]

REWARDS: dict[str, RewardFactory] = {
    "aesthetic": aesthetic.make_reward,
    "hps": hps.make_reward,
    "pickscore": pickscore.make_reward,
    "clipscore": clipscore.make_reward,
    "jpeg": jpeg.make_reward,  # not differentiable: train.algorithm=ddpo only
    "compressibility": compressibility.make_reward,  # a differentiable JPEG size proxy
    "incompressibility": compressibility.make_incompressibility,
    "object_count": object_count.make_reward,  # the count its prompt names, by OWLv2
    "imagereward": imagereward.make_reward,  # ImageReward v1.0 (BLIP), a judge that can train
    "mps": mps.make_reward,  # MPS overall preference (CLIP-H + cross model)
    "hpsv3": hpsv3.make_reward,  # HPSv3 (Qwen2-VL-7B): a judge first, 16.6 GB
}

__all__ = [
    "REWARDS",
    "MissingWeightsError",
    "RewardFn",
    "JUDGES",
    "default_config",
    "expand_judges",
    "get_reward",
    "is_differentiable",
    "parse_spec",
    "validate_spec",
]


def default_config() -> ml_collections.ConfigDict:
    """The `reward_models` config section: where each reward's weights live and its loss form."""
    c = ml_collections.ConfigDict()
    # Every hub id below takes "org/name@REVISION" (a commit, tag or branch) to pin its weights.

    # reward "aesthetic": the LAION aesthetic predictor on CLIP ViT-L/14 image embeddings.
    c.aesthetic = a = ml_collections.ConfigDict()
    # CLIP whose image embedding the head reads (ViT-L/14, 768-d): hub id or local dir.
    a.clip = "openai/clip-vit-large-patch14"
    # LAION aesthetic MLP .pth: a local path, or "" to download head_filename from head_repo.
    a.head = ""
    # Public hub repo holding the LAION improved-aesthetic-predictor file.
    a.head_repo = "camenduru/improved-aesthetic-predictor"
    # File name of the head in head_repo.
    a.head_filename = "sac+logos+ava1-l14-linearMSE.pth"
    # "target": loss |r - target| (AlignProp); "neg": loss -r.
    a.loss = "target"
    # Score the "target" loss pulls toward (the LAION scale tops out near 10).
    a.target = 10.0

    # reward "hps": Human Preference Score v2, an open_clip ViT-H/14.
    c.hps = h = ml_collections.ConfigDict()
    # HPS release: "v2.0" or "v2.1" (picks the checkpoint file fetched from repo).
    h.version = "v2.1"
    # HPS checkpoint ({"state_dict": ...}): a local path, or "" to download it from repo.
    h.checkpoint = ""
    # Hub repo holding HPS_v2_compressed.pt and HPS_v2.1_compressed.pt.
    h.repo = "xswu/HPSv2"
    # open_clip architecture name the checkpoint was trained on.
    h.model = "ViT-H-14"
    # Optional open_clip model config json to register first (named after its stem); "" for none.
    h.model_config = ""

    # reward "pickscore": PickScore, a transformers CLIP ViT-H/14.
    c.pickscore = p = ml_collections.ConfigDict()
    # PickScore CLIPModel: hub id or local dir.
    p.model = "yuvalkirstain/PickScore_v1"
    # Repo or dir with the tokenizer and preprocessor_config.json PickScore was trained with.
    p.processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    # reward "clipscore": text-image alignment under CLIP ViT-L/14.
    c.clipscore = s = ml_collections.ConfigDict()
    # CLIP for text-image alignment: hub id or local dir (with tokenizer and preprocessor config).
    s.clip = "openai/clip-vit-large-patch14"
    # Multiplier on the cosine (100 as in torchmetrics' CLIPScore).
    s.scale = 100.0

    _add_new_reward_configs(c)
    return c


# `eval_rewards=judges`: the panel of held-out judges papers report beside the training reward
# (about 7.4 GiB of weights in bf16 together; CLIP-L is shared by aesthetic and clipscore).
# HPSv3 is not in it (README: Rewards).
JUDGES = ("hps", "pickscore", "imagereward", "mps", "clipscore", "aesthetic")


def expand_judges(eval_rewards: str, reward: str) -> str:
    """Replace a `judges` entry of eval_rewards by JUDGES, leaving out the training reward's parts
    (a judge is held out) and entries already named; other entries keep their place."""
    entries = [s.strip() for s in eval_rewards.split(",") if s.strip()]
    if "judges" not in entries:
        return eval_rewards
    trained = {name for name, _ in parse_spec(reward)} if reward else set()
    out: list[str] = []
    for entry in entries:
        names = [j for j in JUDGES if j not in trained] if entry == "judges" else [entry]
        out += [n for n in names if n not in out]
    return ",".join(out)


def _add_new_reward_configs(c: ml_collections.ConfigDict) -> None:
    """The sections of the rewards added with issue #25 (default_config stays readable)."""
    # rewards "compressibility" / "incompressibility" (a differentiable JPEG size proxy) and "jpeg"
    # (PIL's real size): no weights.
    c.compressibility = j = ml_collections.ConfigDict()
    # JPEG quality (1..100) both the proxy and `jpeg` encode at (DDPO's 95; the proxy's
    # constants were fitted there, its rank correlation stays >= 0.98 down to 50).
    j.quality = 95

    # reward "object_count": the count a prompt names ("three foxes"), by OWLv2 (open vocabulary).
    c.object_count = o = ml_collections.ConfigDict()
    # Owlv2ForObjectDetection with its processor and tokenizer: hub id or local dir.
    o.model = "google/owlv2-base-patch16-ensemble"
    # The text query per image; {object} is the prompt's noun phrase, singular.
    o.query = "a photo of a {object}"
    # A patch counts fully well above this probability (OWLv2's post-processing threshold).
    o.threshold = 0.1
    # "abs": loss |count - n|; "square": (count - n)^2.
    o.loss = "abs"

    # reward "imagereward": ImageReward v1.0 (BLIP ViT-L + BERT, Apache-2.0), loaded unchanged.
    c.imagereward = w = ml_collections.ConfigDict()
    # ImageReward.pt (a tensor-only state dict): a local path, or "" to download filename from repo.
    w.checkpoint = ""
    # Hub repo holding ImageReward.pt (THUDM/ImageReward before the 2025 rename; it redirects).
    w.repo = "zai-org/ImageReward"
    # File name of the checkpoint in repo (its sha256 is checked when a local file has this name).
    w.filename = "ImageReward.pt"
    # The published file's sha256, checked on load ("" skips: a checkpoint of your own).
    w.sha256 = imagereward.SHA256
    # The bert-base-uncased tokenizer the public code uses: hub id or local dir.
    w.tokenizer = "google-bert/bert-base-uncased"
    # A json of the network's sizes ("" = ImageReward v1.0's; the tiny test model has its own).
    w.architecture = ""

    # reward "mps": MPS overall preference (Kwai-Kolors, CLIP ViT-H/14 + a cross model; MIT).
    c.mps = m = ml_collections.ConfigDict()
    # A safetensors file of its weights, or "" to download filename from repo (never the pickle:
    # convert it once with `python scripts/convert_mps.py PTH OUT.safetensors`).
    m.checkpoint = ""
    # imscore's safetensors conversion (unofficial; the official file is on Google Drive only).
    m.repo = "RE-N-Y/mpsv1"
    # File name of the checkpoint in repo.
    m.filename = "model.safetensors"
    # The CLIP whose architecture, tokenizer and processor MPS uses: hub id or local dir.
    m.clip = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    # A json of the cross model's sizes ("" = MPS's: dim 1024, 4 layers, 16 heads of 64, ff x4).
    m.cross = ""
    # Prompt tokens whose condition similarity (scaled to max 1) is at or below this are masked.
    m.threshold = 0.3

    # reward "hpsv3": HPSv3 (MizzenAI; Qwen2-VL-7B + a reward head; weights Apache-2.0, 16.6 GB).
    c.hpsv3 = v = ml_collections.ConfigDict()
    # HPSv3.safetensors: a local path, or "" to download filename from repo.
    v.checkpoint = ""
    # Hub repo holding the checkpoint.
    v.repo = "MizzenAI/HPSv3"
    # File name of the checkpoint in repo.
    v.filename = "HPSv3.safetensors"
    # sha256 of the download as a third party recorded it (revision 4f81e3e); "" skips the check.
    v.sha256 = "a13d7ff5a07b7ffa0f7824e60d62e6ae144541ceefd5224b4c08fda7ab39f353"
    # The base model whose config, tokenizer and image processor HPSv3 uses: hub id or local dir.
    v.base = "Qwen/Qwen2-VL-7B-Instruct"


def parse_spec(spec: str | Mapping[str, float]) -> list[tuple[str, float]]:
    """Parse "aesthetic", "aesthetic=1.0,hps=0.5", "pkg.mod:factory" or {name: w} into [(name, w)]."""
    if isinstance(spec, str):
        items = []
        for item in filter(None, (s.strip() for s in spec.split(","))):
            name, sep, weight = item.partition("=")
            items.append((name.strip(), weight.strip() if sep else 1.0))
    elif isinstance(spec, Mapping | ml_collections.ConfigDict):
        items = list(spec.items())
    else:
        raise TypeError(f"reward spec must be a string or a mapping, got {type(spec).__name__}")
    parts = []
    for name, weight in items:
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise ConfigError(
                f"reward {name!r}: weight {weight!r} is not a number (in {spec!r})"
            ) from None
        if not math.isfinite(weight):
            raise ConfigError(f"reward {name!r}: weight {weight} is not finite (in {spec!r})")
        parts.append((name, weight))
    names = [n for n, _ in parts]
    if not parts or "" in names:
        raise ConfigError(f"empty reward name in {spec!r}; registered rewards: {sorted(REWARDS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"reward named twice in {spec!r}")
    return parts


def validate_spec(spec: str | Mapping[str, float]) -> list[tuple[str, float]]:
    """Parse a spec and check every name resolves (registered, or an importable factory) without loading weights."""
    parts = parse_spec(spec)
    for name, _ in parts:
        _factory(name)
    return parts


def is_differentiable(spec: str | Mapping[str, float]) -> bool:
    """True if every part of the spec has a pixel gradient (a factory marks itself `differentiable = False`)."""
    return all(getattr(_factory(name), "differentiable", True) for name, _ in parse_spec(spec))


def _factory(name: str) -> RewardFactory:
    if name in REWARDS:
        return REWARDS[name]
    if ":" not in name:
        raise ConfigError(
            f"unknown reward {name!r}; registered rewards: {sorted(REWARDS)}, "
            "or give a factory as 'package.module:function'"
        )
    module_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(
            f"reward {name!r}: cannot import {attr!r} from {module_name!r} ({e})"
        ) from e
    if not callable(factory):
        raise ConfigError(f"reward {name!r} is not callable; expected factory(cfg, device, dtype)")
    return factory


def _check_signature(name: str, fn: object) -> None:
    """A reward must accept exactly the call `fn(images, prompts)`."""
    if not callable(fn):
        raise TypeError(
            f"reward {name!r}: the factory returned {type(fn).__name__}, not a callable"
        )
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature; trust them
        return
    kinds = inspect.Parameter
    positional = [
        p for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)
    ]
    required = [
        p
        for p in params
        if p.default is p.empty and p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)
    ]
    takes_two = len(positional) >= 2 or any(p.kind == kinds.VAR_POSITIONAL for p in params)
    if not takes_two or len(required) > 2 or any(p.kind == kinds.KEYWORD_ONLY for p in required):
        raise TypeError(
            f"reward {name!r}: the factory's callable has signature {inspect.signature(fn)}; "
            "expected reward_fn(images, prompts) -> (rewards, info)"
        )


def get_reward(
    spec: str | Mapping[str, float],
    cfg: ml_collections.ConfigDict,
    device: torch.device | str,
    dtype: torch.dtype,
    built: Mapping[str, RewardFn] | None = None,
) -> RewardFn:
    """Build the reward for `spec` (see parse_spec); `cfg` is config.reward_models.

    `built` gives reward functions by name that are used instead of loading them (the
    benchmark's random-weight models, e.g. from aesthetic.aesthetic_reward).
    """
    weights = parse_spec(spec)
    fns = {}
    for name, _ in weights:
        if built and name in built:
            fns[name] = built[name]
        else:
            fns[name] = _factory(name)(cfg, torch.device(device), dtype)
        _check_signature(name, fns[name])

    def reward_fn(images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict]:
        if images.ndim == 5:  # video (B, 3, F, H, W): each frame scored, averaged per clip
            return _over_frames(images, prompts)
        total, loss, parts = 0.0, 0.0, {}
        for name, weight in weights:
            rewards, info = fns[name](images, prompts)
            if rewards.shape != images.shape[:1]:
                raise ValueError(
                    f"reward {name!r} returned shape {tuple(rewards.shape)} for {images.shape[0]} images"
                )
            # A reward without its own loss is maximised.
            total = total + weight * rewards
            loss = loss + weight * info.get("loss", -rewards)
            parts[name] = rewards.detach()
        return total, {"loss": loss, "parts": parts}

    def _over_frames(video: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict]:
        b, c, f, h, w = video.shape
        frames = video.transpose(1, 2).reshape(b * f, c, h, w)  # clip-major: clip i's frames
        total, info = reward_fn(frames, [p for p in prompts for _ in range(f)])
        mean = lambda v: v.view(b, f).mean(1)  # noqa: E731
        parts = {k: mean(v) for k, v in info["parts"].items()}
        return mean(total), {"loss": mean(info["loss"]), "parts": parts}

    embeds = [fns[name].embed for name, _ in weights if callable(getattr(fns[name], "embed", None))]
    if embeds:
        reward_fn.embed = embeds[0]
    # the image models each part calls (train.compile_unet compiles them in place)
    reward_fn.modules = tuple(m for f in fns.values() for m in getattr(f, "modules", ()))
    return reward_fn
