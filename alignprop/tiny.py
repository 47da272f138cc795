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
