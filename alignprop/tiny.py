"""Tiny random models with the real architectures, saved as real checkpoints.

Nothing here is a mock: each model is the library class a user's real weights load into
(UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIP vision + aesthetic MLP, an open_clip
ViT in the HPS checkpoint format), only narrow and random. They are written to a folder laid out
like a hub snapshot, so tests and the `tiny` config load them through the same code path as
Stable Diffusion 1.5.

    python -m alignprop.tiny OUT_DIR     # writes OUT_DIR/sd, OUT_DIR/rewards/...
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
from pathlib import Path

import torch

# The SD 1.5 scheduler settings (runwayml/stable-diffusion-v1-5 scheduler_config.json).
SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}
TINY_RESOLUTION = 64  # pixels; latents are 8x8 with the tiny VAE's 8x downsampling
CLIP_VOCAB_SIZE = 49408


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable unicode table that CLIP's BPE (and open_clip's) is defined over."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_clip_tokenizer(out_dir: str | os.PathLike) -> Path:
    """Write a real CLIP BPE tokenizer (vocab.json + merges.txt, 49408 entries) built from open_clip's vocabulary."""
    import open_clip.tokenizer as oct
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(oct.default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    base = list(_bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == CLIP_VOCAB_SIZE, len(tokens)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    with open(out / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(" ".join(m) + "\n" for m in merges)
    tok = CLIPTokenizer(
        str(out / "vocab.json"),
        str(out / "merges.txt"),
        pad_token="<|endoftext|>",
        model_max_length=77,
    )
    tok.save_pretrained(out)
    return out


# ---- tiny reward models (owned by alignprop/rewards work; SD parts live above) ----

TINY_REWARD_RESOLUTION = 32  # pixels: the tiny reward models' input size (224 for the real ones)
TINY_HPS_MODEL = "alignprop-tiny-hps"  # open_clip architecture name, registered from its json


def tiny_open_clip_config() -> dict:
    """An open_clip ViT config shaped like ViT-H-14.json (HPSv2's architecture), narrow."""
    return {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": TINY_REWARD_RESOLUTION,
            "layers": 2,
            "width": 32,
            "head_width": 16,
            "patch_size": 8,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": CLIP_VOCAB_SIZE,
            "width": 32,
            "heads": 2,
            "layers": 2,
        },
    }


def write_tiny_rewards(out_dir: str | os.PathLike, seed: int = 0) -> dict:
    """Write tiny reward models under out_dir; return `reward_models` overrides pointing at them.

    out_dir/clip: a transformers CLIPModel (768-d projection, like ViT-L/14) with tokenizer and
    image processor, used for aesthetic, pickscore and clipscore; out_dir/aesthetic_head.pth:
    a random LAION-format MLP; out_dir/hps: an open_clip ViT config json and an HPS-format
    checkpoint ({"state_dict": ...}, stored in fp16 so loading exercises the dtype cast).
    """
    import open_clip
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from alignprop.rewards.aesthetic import AestheticHead

    out = Path(out_dir)
    clip_dir, hps_dir = out / "clip", out / "hps"
    hps_dir.mkdir(parents=True, exist_ok=True)
    tower = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=768,
    )
    config = CLIPConfig(
        text_config=dict(
            tower,
            vocab_size=CLIP_VOCAB_SIZE,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        ),
        vision_config=dict(tower, image_size=TINY_REWARD_RESOLUTION, patch_size=8),
        projection_dim=768,
    )
    # fork_rng: seeded weights without touching the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        CLIPModel(config).save_pretrained(clip_dir)
        head_path = out / "aesthetic_head.pth"
        torch.save(AestheticHead(768).state_dict(), head_path)
        hps_config = hps_dir / f"{TINY_HPS_MODEL}.json"
        hps_config.write_text(json.dumps(tiny_open_clip_config(), indent=1))
        hps = open_clip.CLIP(**tiny_open_clip_config())
        hps_path = hps_dir / "HPS_tiny_compressed.pt"
        torch.save({"state_dict": {k: v.half() for k, v in hps.state_dict().items()}}, hps_path)
    write_clip_tokenizer(clip_dir)
    crop = {"height": TINY_REWARD_RESOLUTION, "width": TINY_REWARD_RESOLUTION}
    CLIPImageProcessor(
        size={"shortest_edge": TINY_REWARD_RESOLUTION}, crop_size=crop
    ).save_pretrained(clip_dir)
    return {
        "aesthetic.clip": str(clip_dir),
        "aesthetic.head": str(head_path),
        "hps.checkpoint": str(hps_path),
        "hps.model": TINY_HPS_MODEL,
        "hps.model_config": str(hps_config),
        "pickscore.model": str(clip_dir),
        "pickscore.processor": str(clip_dir),
        "clipscore.clip": str(clip_dir),
    }


def apply_overrides(cfg, overrides: dict) -> None:
    """Set dotted `overrides` ({"hps.model": ..., ...}) on a ConfigDict in place; unknown keys raise."""
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = cfg
        for name in parents:
            node = node[name]
        if leaf not in node:
            raise KeyError(f"override {key!r}: no such config field")
        node[leaf] = value
