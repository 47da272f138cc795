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
    (out / "vocab.json").write_text(
        json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False)
    )
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


def tiny_unet_config() -> dict:
    """SD 1.5's UNet block layout (3 cross-attention down blocks, 1 plain; mirrored up), narrow."""
    return dict(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=(
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=4,
    )


def tiny_vae_config() -> dict:
    """SD 1.5's AutoencoderKL layout (4 levels, 8x downsampling, 4 latent channels), narrow."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=TINY_RESOLUTION,
        scaling_factor=0.18215,
    )


def tiny_text_config() -> dict:
    """CLIP text transformer with the real vocabulary and context length, narrow."""
    return dict(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def write_tiny_sd(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random SD-1.5-architecture pipeline that `StableDiffusionPipeline.from_pretrained` loads."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(out_dir)
    with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's RNG
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**tiny_unet_config())
        vae = AutoencoderKL(**tiny_vae_config())
        text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_text_config()))
    tok_dir = write_clip_tokenizer(out / "tokenizer")
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
        unet=unet,
        scheduler=DDIMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    return out


def write_tiny(out_dir: str | os.PathLike, seed: int = 0) -> dict:
    """Write every tiny model under out_dir; return the config overrides that point a run at them."""
    out = Path(out_dir)
    overrides = {"pretrained.model": str(write_tiny_sd(out / "sd", seed=seed))}
    overrides.update(
        {f"reward_models.{k}": v for k, v in write_tiny_rewards(out / "rewards").items()}
    )
    (out / "overrides.json").write_text(json.dumps(overrides, indent=1))
    return overrides


def ensure_tiny(cache_dir: str | os.PathLike | None = None) -> dict:
    """Return the tiny models' config overrides, writing them on first use to a cache folder."""
    root = Path(cache_dir or os.environ.get("ALIGNPROP_TINY_DIR") or default_cache_dir() / "tiny")
    marker = root / "overrides.json"
    if marker.exists():
        return json.loads(marker.read_text())
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    write_tiny(tmp)
    overrides = json.loads((tmp / "overrides.json").read_text())
    # Paths were written for tmp/; rewrite them for the final folder, then move in one rename.
    overrides = {
        k: v.replace(str(tmp), str(root)) if isinstance(v, str) else v for k, v in overrides.items()
    }
    (tmp / "overrides.json").write_text(json.dumps(overrides, indent=1))
    try:
        os.replace(tmp, root)
    except OSError:  # another process won the race: use its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return json.loads(marker.read_text())


def default_cache_dir() -> Path:
    """Where first-use artefacts (tiny models) are cached: $XDG_CACHE_HOME/alignprop."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "alignprop"


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
        head = AestheticHead(768)
        # A default-initialised 5-layer head scores every image within ~0.003 of the same value,
        # too flat for the tiny run to climb: widen its range ~300x (it stays a linear map).
        with torch.no_grad():
            head.layers[0].weight.mul_(300.0)
        torch.save(head.state_dict(), head_path)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("out_dir", help="folder to write the tiny models into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    overrides = write_tiny(args.out_dir, seed=args.seed)
    print(json.dumps(overrides, indent=1))


if __name__ == "__main__":
    main()
