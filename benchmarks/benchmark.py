"""Speed and memory of one AlignProp training step, against the published recipe.

Each grid point (batch B, K steps with gradient out of --num-steps DDIM steps, checkpoint mode)
times whole training steps (sampling, decode, reward, backward, optimizer step) of each recipe,
after --warmup untimed steps. By default every recipe runs in its own fresh process (its peak
memory is then its own); --no-isolate runs them in one process, alternating step by step.
  reference           the published recipe (benchmarks/reference.py): fp16 autocast, uncond and
                      cond as two checkpointed UNet calls, autograd on at every step with the
                      early noise predictions detached, no decoder checkpointing
  alignprop           the project's step: AlignProp.update(), the code scripts/train.py runs
  reference_one_call  the reference with one UNet call on [uncond, cond]   (--recipes adds these,
  reference_nograd    the reference without autograd before the cut         one switch each)
The models are SD-1.5-sized (UNet 860M, VAE, CLIP ViT-L/14 text; CLIP ViT-L/14 vision + the
LAION aesthetic MLP for the reward) with random weights built on the device from their configs,
wrapped in the project's own families.SD and rewards.aesthetic: speed does not depend on the
weights, and nothing is downloaded. --tiny loads alignprop.tiny's models through the same
loaders as a real run. Random full-size weights can give a non-finite loss; such steps still
cost the same time and are counted in `nonfinite_steps`.

Output: one JSON line per recipe and grid point on stdout (and in --out) as soon as it is
measured, one summary line per point, and a table on stderr.
  s_per_step, s_per_sample   mean over the --steps timed steps (s_per_step_min: the fastest)
  first_step_s, warmup_s     the first step at the point, all its --warmup steps: with --compile
                 (and --cuda-graphs) the one-off warm-up; warmup_extra_s = first_step_s minus
                 the fastest timed step (compilation, graph capture, lazy initialisation)
  peak_mem_gib   GPU: CUDA max allocated during the step, less the other recipes' resident
                 weights and optimizer state when they share the process (--no-isolate;
                 cuda_max_allocated_gib is the raw figure); CPU: the process's peak RSS during
                 the step (VmHWM, reset before each step), which holds the runtime too
  step_mem_gib   the step's peak above what was allocated (GPU) or resident (CPU) when it began
  cuda_max_reserved_gib  GPU: the caching allocator's peak reservation; with the CUDA context
                 (~0.5-1 GiB) what a card must hold for the step to fit
  tflop_per_step FLOPs of one step, counted by torch.utils.flop_counter's FlopCounterMode
                 (matmuls, convolutions, attention: forward, checkpoint recomputation and
                 backward, as executed) on extra steps with chains of K and K+1 DDIM steps,
                 extrapolated linearly to --num-steps (each step before the cut costs the
                 same); tflops = tflop_per_step / s_per_step. Not counted with --compile or
                 --cuda-graphs (the same FLOPs as without them).

The switches of the fast path, one flag each, so each one's share can be measured by two runs:
--precision (bf16 | fp16 | no), --compile (denoiser, VAE decoder, reward), --cuda-graphs,
--tf32 (global: all recipes), --checkpoint (none | step | block | step+block, a comma list is
a grid dimension), --grad-checkpoint, --decoder-checkpoint (none | block | layer), --decode-chunk,
--merge-lora, --channels-last (the last four default to the config's values: without flags it
measures what train.py runs); the reference stays as published (--ref-precision aside).

Examples:
  python benchmarks/benchmark.py --tiny                                     # CPU, under a minute
  python benchmarks/benchmark.py --batch-sizes 4,8 --ks 1,10,50 --compile   # a GPU

A GPU machine with torch, transformers, accelerate and peft but without diffusers,
ml_collections and open_clip_torch gets them as wheels:
  where pip can reach PyPI:  bash shared/tools/gpu-wheels.sh (development checkout)  # into ./.whl (git-excluded)
  on the GPU machine, first: python3 -m pip install -q --no-index --no-deps --no-compile \\
      --no-cache-dir --target .site .whl/*.whl && export PYTHONPATH=$PWD:$PWD/.site
(benchmarks/gpu_bench.sh does all of this and the measurements owed, in parts of 4-6 minutes).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import reference  # benchmarks/reference.py: Python puts this script's folder first on sys.path
import torch

from alignprop import checks, cli, families, models, rewards, solvers, tiny, trainer
from alignprop.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {  # name -> Reference options (None: the project's AlignProp)
    "reference": {"cfg_calls": 2, "grad_before_cut": True},
    "reference_one_call": {"cfg_calls": 1, "grad_before_cut": True},
    "reference_nograd": {"cfg_calls": 2, "grad_before_cut": False},
    "alignprop": None,
}
GIB = 2**30
# --family: the guidance of each family's pipeline (FLUX.1-dev's is its distilled input)
FAMILY_GUIDANCE = {"sdxl": 5.0, "sd3": 4.5, "flux": 3.5, "zimage": 0.0, "flux2": 1.0,
                   "qwenimage": 1.0, "wan": 5.0}  # fmt: skip
# the shipped config whose sampling and memory switches each family's benchmark takes
SHIPPED = {"sdxl": "sdxl_aesthetic", "sd3": "sd3_aesthetic", "flux": "flux_aesthetic",
           "zimage": "zimage_hps", "flux2": "flux2_klein_hps", "qwenimage": "qwenimage_hps",
           "wan": "wan_hps"}  # fmt: skip

# stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json and vae/config.json.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)  # fmt: skip
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512), scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)  # fmt: skip
# openai/clip-vit-large-patch14: the text tower (SD 1.5's text encoder) and the vision tower.
CLIP_L_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)  # fmt: skip
CLIP_L_VISION = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
)  # fmt: skip
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------- models


def sd15_family(dtype: torch.dtype, device: torch.device, seed: int, tok_dir: Path) -> families.SD:
    """SD-1.5-sized tokenizer, text encoder, VAE, UNet and DDIM scheduler with random weights, as families.SD."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)  # the same weights for every recipe
    with torch.device(device):  # fill the random weights where they will live (fast on a GPU)
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
    components = {
        "unet": unet.to(dtype), "vae": vae.to(dtype), "text_encoder": text_encoder.to(dtype),
        "tokenizer": CLIPTokenizer.from_pretrained(tok_dir),
        "scheduler": DDIMScheduler(**tiny.SD15_SCHEDULER),
    }  # fmt: skip
    return families.SD(components).freeze(device)


def sd15_aesthetic(config: Any, dtype: torch.dtype, device: torch.device, seed: int):
    """The project's aesthetic reward (rewards.aesthetic) on a random CLIP ViT-L/14 vision tower + LAION MLP."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from alignprop.rewards import aesthetic
    from alignprop.rewards.preprocess import ImageInput

    torch.manual_seed(seed + 1)
    with torch.device(device):
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_L_VISION))
        head = aesthetic.AestheticHead(768)
    clip, head = models.freeze(clip, device, dtype), models.freeze(head, device, dtype)
    image_input = ImageInput((224, 224), 224, CLIP_MEAN, CLIP_STD, "bicubic")
    fn = aesthetic.aesthetic_reward(clip, image_input, head, config.reward_models.aesthetic, dtype)
    return rewards.get_reward(
        "aesthetic", config.reward_models, device, dtype, built={"aesthetic": fn}
    )


def random_flow_family(
    name: str, dtype: torch.dtype, device: torch.device, seed: int, tok_dir, spec=None
):
    """SD3.5-medium- or FLUX.1-dev-sized components with random weights, built on the device;
    `spec` (families.Pretrained) carries the text-encoder options (offload_text_encoders)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
    )

    from alignprop.families.flux import Flux, flux_dev_configs
    from alignprop.families.sd3 import SD3, sd35_medium_configs

    cfg = flux_dev_configs() if name == "flux" else sd35_medium_configs()
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # 12B weights built in fp32 first would need 48 GB more
    with torch.device(device):
        if name == "flux":
            comps = {
                "transformer": FluxTransformer2DModel(**cfg["transformer"]),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
                "text_encoder_2": T5EncoderModel(T5Config(**cfg["text_encoder_2"])),
            }
        else:
            comps = {
                "transformer": SD3Transformer2DModel(**cfg["transformer"]),
                "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder"])),
                "text_encoder_2": CLIPTextModelWithProjection(
                    CLIPTextConfig(**cfg["text_encoder_2"])
                ),
                "text_encoder_3": T5EncoderModel(T5Config(**cfg["text_encoder_3"])),
            }
        comps["vae"] = AutoencoderKL(**cfg["vae"])
    torch.set_default_dtype(default)
    comps = {k: m.to(dtype) for k, m in comps.items()}
    clip_tok = CLIPTokenizer.from_pretrained(tok_dir)
    t5_tok = tiny.train_t5_tokenizer()  # ids < its size: any T5 embedding table takes them
    if name == "flux":
        comps.update(tokenizer=clip_tok, tokenizer_2=t5_tok)
    else:
        comps.update(tokenizer=clip_tok, tokenizer_2=clip_tok, tokenizer_3=t5_tok)
    comps["scheduler"] = FlowMatchEulerDiscreteScheduler(**cfg["scheduler"])
    family = (Flux if name == "flux" else SD3)(comps)
    if spec is not None:
        family.spec = spec
    return family.freeze(device)


def build_models(
    args: argparse.Namespace, config: Any, dtype: torch.dtype, device: torch.device, tok_dir
):
    """(family, reward_fn): full-size random weights, or the tiny models through the real loaders."""
    frames = (config.sample.get("num_frames", 0), config.sample.get("reward_frames", ""))
    if args.tiny:
        family = families.load_family(config.pretrained, dtype, device)
        family.set_frames(*frames)
        return family, rewards.get_reward(config.reward, config.reward_models, device, dtype)
    spec = families.Pretrained.from_config(config.pretrained)
    family = random_family(args.family, dtype, device, args.seed, tok_dir, spec)
    family.set_frames(*frames)
    return family, sd15_aesthetic(config, dtype, device, args.seed)


def random_family(
    name: str, dtype: torch.dtype, device: torch.device, seed: int, tok_dir, spec=None
) -> families.Family:
    """The --family's full-size components with random weights, built on the device."""
    if name == "sdxl":
        from alignprop.tiny import random_sdxl

        return random_sdxl(dtype, device, seed, tok_dir).freeze(device)
    if name in ("sd3", "flux"):
        return random_flow_family(name, dtype, device, seed, tok_dir, spec)
    if name in REAL_2025:
        return random_2025_family(name, dtype, device, seed, spec)
    return sd15_family(dtype, device, seed, tok_dir)


# Real-size configs of the 2025-26 families, read from their hub config.json files (as other
# public code mirrors them): Tongyi-MAI/Z-Image-Turbo, black-forest-labs/FLUX.2-klein-4B,
# Qwen/Qwen-Image, Wan-AI/Wan2.1-T2V-1.3B-Diffusers; the VAEs' class defaults are their
# checkpoints' (AutoencoderKL: the FLUX.1 one).
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                max_position_embeddings=40960, rope_theta=1e6, tie_word_embeddings=True)  # fmt: skip
REAL_2025 = {
    "zimage": dict(
        transformer=dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840,
                         n_layers=30, n_refiner_layers=2, n_heads=30, n_kv_heads=30,
                         norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0,
                         t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512]),
        text_encoder=QWEN3_4B,
    ),
    "flux2": dict(
        transformer=dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20,
                         attention_head_dim=128, num_attention_heads=24, joint_attention_dim=7680,
                         timestep_guidance_channels=256, mlp_ratio=3.0,
                         axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6,
                         guidance_embeds=False),
        text_encoder=QWEN3_4B,
    ),
    "qwenimage": dict(
        transformer=dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60,
                         attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
                         axes_dims_rope=(16, 56, 56), guidance_embeds=False),
        text_encoder=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                          num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                          max_position_embeddings=128000, rope_theta=1e6,
                          rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                           "mrope_section": [16, 24, 24]}),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                    out_hidden_size=3584, patch_size=14, spatial_merge_size=2,
                    temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
        vae=dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                 temperal_downsample=[False, True, True]),
    ),
    "wan": dict(
        transformer=dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                         in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                         ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                         qk_norm="rms_norm_across_heads", eps=1e-6),
        text_encoder=dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                          num_heads=64, relative_attention_num_buckets=32,
                          relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                          tie_word_embeddings=False, is_encoder_decoder=False),
        vae=dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                 temperal_downsample=[False, True, True]),
    ),
}  # fmt: skip


def random_2025_family(name: str, dtype: torch.dtype, device: torch.device, seed: int, spec=None):
    """Z-Image-Turbo, FLUX.2 [klein] 4B, Qwen-Image or Wan 2.1 1.3B at full size with random
    weights on the device (the meta device for counts); the tiny kits' offline tokenizers."""
    import diffusers
    import transformers

    from alignprop import tiny
    from alignprop.families.qwenimage import PROMPT_TEMPLATE
    from alignprop.families.sd3 import vae16_config
    from alignprop.families.wan import euler_scheduler

    cfg = REAL_2025[name]
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        if name in ("zimage", "flux2"):
            text = (transformers.Qwen3Model if name == "zimage" else transformers.Qwen3ForCausalLM)(
                transformers.Qwen3Config(**cfg["text_encoder"])
            )
            tokenizer = tiny.tiny_qwen3_tokenizer()
        elif name == "qwenimage":
            text = transformers.Qwen2_5_VLForConditionalGeneration(
                transformers.Qwen2_5_VLConfig(
                    text_config=cfg["text_encoder"], vision_config=cfg["vision"]
                )
            )
            tokenizer = tiny.qwen_tokenizer([*tiny._t5_tokenizer_corpus(), PROMPT_TEMPLATE])
        else:
            text = transformers.UMT5EncoderModel(transformers.UMT5Config(**cfg["text_encoder"]))
            tokenizer = tiny.train_t5_tokenizer()
        transformer_cls = {"zimage": "ZImageTransformer2DModel", "flux2": "Flux2Transformer2DModel",
                           "qwenimage": "QwenImageTransformer2DModel",
                           "wan": "WanTransformer3DModel"}[name]  # fmt: skip
        transformer = getattr(diffusers, transformer_cls)(**cfg["transformer"])
        if name == "zimage":
            vae = diffusers.AutoencoderKL(
                **vae16_config(scaling_factor=0.3611, shift_factor=0.1159)
            )
        elif name == "flux2":
            vae = diffusers.AutoencoderKLFlux2()
        elif name == "qwenimage":
            vae = diffusers.AutoencoderKLQwenImage(**cfg["vae"])
        else:
            vae = diffusers.AutoencoderKLWan(**cfg["vae"])
    torch.set_default_dtype(default)
    comps = {"transformer": transformer.to(dtype), "text_encoder": text.to(dtype),
             "vae": vae.to(dtype), "tokenizer": tokenizer}  # fmt: skip
    if name == "wan":
        comps["scheduler"] = euler_scheduler(
            diffusers.UniPCMultistepScheduler(**tiny.WAN_SCHEDULER)
        )
    elif name == "zimage":
        comps["scheduler"] = diffusers.FlowMatchEulerDiscreteScheduler(**tiny.ZIMAGE_SCHEDULER)
    else:
        comps["scheduler"] = diffusers.FlowMatchEulerDiscreteScheduler(**tiny.FLUX_SCHEDULER)
    family = families.get_family(name)(comps)
    if spec is not None:
        family.spec = spec
    return family.freeze(device)


# ---------------------------------------------------------------- recipes


class Recipe:
    """One recipe's training state and how to point it at a grid point."""

    def __init__(self, name: str, state: Any, config: Any, modules: list[torch.nn.Module]):
        self.name, self.state, self.config, self.modules = name, state, config, modules
        self.resident = 0  # bytes of weights + optimizer state on the GPU (set after warm-up)
        self.is_alignprop = isinstance(state, trainer.AlignProp)

    def set_point(self, batch: int, k: int, checkpoint: str, num_steps: int | None = None) -> None:
        c = self.config
        c.sample.batch_size = c.train.total_batch_size = c.train.samples_per_epoch = batch
        c.truncation.k = k
        if num_steps is not None:
            c.sample.num_steps = num_steps
        if self.is_alignprop:  # re-derive its state as the trainer does
            c.sample.checkpoint = checkpoint
            run = self.state
            run.batch = checks.batching(c, 1)
            run.truncation = solvers.Truncation.from_config(c.truncation)
            run.opts = dataclasses.replace(
                run.opts, num_steps=c.sample.num_steps, checkpoint=checkpoint
            )

    def step(self) -> dict:
        return self.state.update()

    def optimizer(self) -> torch.optim.Optimizer:
        return self.state.optimizer

    def resident_bytes(self, device: torch.device) -> int:
        """Weights, buffers and optimizer state of this recipe that live on `device`."""
        seen, total = set(), 0
        tensors = [t for m in self.modules for t in [*m.parameters(), *m.buffers()]]
        tensors += [
            v for s in self.optimizer().state.values() for v in s.values() if torch.is_tensor(v)
        ]
        for t in tensors:
            if t.device.type == device.type and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total


def base_config(args: argparse.Namespace):
    """The run config every recipe starts from; fixed K, one micro-batch per update."""
    config = checks.load_config(
        ROOT / "config" / f"align_prop.py:{'tiny' if args.tiny else 'aesthetic_k1'}"
    )
    if args.family != "sd":  # the family's own chain and guidance, at its native size
        config.pretrained.family = args.family
        config.sample.resolution = 0
        config.sample.guidance_scale = FAMILY_GUIDANCE[args.family]
        if args.tiny:
            config.tiny_kit = args.family
        # the family's own memory switches, as its shipped config sets them (FLUX: T5-XXL off
        # the GPU between encodes, no merged LoRA copy)
        shipped = checks.load_config(ROOT / "config" / f"align_prop.py:{SHIPPED[args.family]}")
        if args.family in REAL_2025:  # their cards' sizes, clips, CFG and decoder switches
            for field in ("resolution", "height", "width", "num_frames", "reward_frames",
                          "true_cfg_scale", "negative_prompt", "decoder_checkpoint",
                          "decode_chunk"):  # fmt: skip
                config.sample[field] = shipped.sample[field]
        config.mixed_precision = shipped.mixed_precision
        config.pretrained.offload_text_encoders = shipped.pretrained.offload_text_encoders
        if args.offload_text_encoders is not None:
            config.pretrained.offload_text_encoders = args.offload_text_encoders
        config.sample.merge_lora = shipped.sample.merge_lora
    checks.apply_tiny(config)
    config.log_with = "none"
    config.truncation.strategy = "fixed"
    config.sample.num_steps = args.num_steps
    config.sample.eta = 0.0
    if args.resolution is not None:
        config.sample.resolution = args.resolution
    config.train.max_nonfinite = 10**9  # random weights may overflow; the step costs the same
    config.allow_tf32 = args.tf32
    return config


def alignprop_config(args: argparse.Namespace, base: Any) -> Any:
    """A copy of the base config with the alignprop recipe's switches as the flags set them."""
    config = copy.deepcopy(base)
    config.mixed_precision = args.precision
    config.train.compile_unet = args.compile
    config.train.cuda_graphs = args.cuda_graphs
    config.sample.grad_checkpoint = args.grad_checkpoint
    config.sample.checkpoint = args.checkpoint[0]
    for section, field in (("sample", "decoder_checkpoint"), ("sample", "decode_chunk"),
                           ("sample", "merge_lora"), ("train", "channels_last")):  # fmt: skip
        if getattr(args, field) is not None:  # None: the config's default
            config[section][field] = getattr(args, field)
    return config


def build_recipes(args: argparse.Namespace, device: torch.device, accelerator: Any) -> list[Recipe]:
    base = base_config(args)
    tok_dir = None
    if not args.tiny:
        tok_dir = tiny.write_clip_tokenizer(Path(tempfile.mkdtemp(prefix="bench_tok_")))
    out = []
    for name in args.recipes:
        if RECIPES[name] is None:  # the project's step, configured as train.py would be
            config = alignprop_config(args, base)
            dtype = models.resolve_dtype(args.precision)
            family, reward_fn = build_models(args, config, dtype, device, tok_dir)
            run = trainer.AlignProp(
                config, accelerator, checks.validate_config(config, 1),
                Path(tempfile.mkdtemp(prefix="bench_run_")), family=family, reward_fn=reward_fn,
            )  # fmt: skip
            modules = [*family.modules(), *getattr(reward_fn, "modules", ())]
            out.append(Recipe(name, run, config, modules))
        else:  # the published recipe (or it with one switch moved)
            config = copy.deepcopy(base)
            config.mixed_precision = args.ref_precision
            config.sample.grad_checkpoint = True
            dtype = models.resolve_dtype(args.ref_precision)
            family, reward_fn = build_models(args, config, dtype, device, tok_dir)
            ref = reference.Reference(config, family, reward_fn, device, dtype, **RECIPES[name])
            modules = [*family.modules(), *getattr(reward_fn, "modules", ())]
            out.append(Recipe(name, ref, config, modules))
    return out


# ---------------------------------------------------------------- measuring


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class Memory:
    """Peak memory of one step: CUDA max allocated, or peak RSS (VmHWM reset per step) on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind, self.can_reset = "cuda_max_allocated", False
        if device.type != "cuda":
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.kind, self.can_reset = "rss", True
            except OSError:  # not Linux, or not allowed: the peak is then the run's so far
                self.kind = "rss_max_so_far"

    def begin(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        if self.can_reset:
            Path("/proc/self/clear_refs").write_text("5")
            return _proc_status_kib("VmRSS") * 1024
        return 0

    def end(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        if self.can_reset:
            return _proc_status_kib("VmHWM") * 1024
        return trainer.peak_mem_gib(self.device) * GIB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(recipe: Recipe, k: int, checkpoint: str, num_steps: int) -> float:
    """FLOPs of one training step of the recipe, as executed, counted on short chains.

    Every step before the cut costs the same (one guided UNet forward, no backward), so the
    count is linear in num_steps: count chains of K and K+1 steps and extrapolate, which
    FlopCounterMode's per-op overhead makes far cheaper than counting a 50-step chain.
    """
    from torch.utils.flop_counter import FlopCounterMode

    batch, counts = recipe.config.sample.batch_size, []
    try:
        for n in sorted({k, min(k + 1, num_steps)}):
            recipe.set_point(batch, k, checkpoint, num_steps=n)
            with FlopCounterMode(display=False) as counter:
                recipe.step()
            counts.append(float(counter.get_total_flops()))
    finally:
        recipe.set_point(batch, k, checkpoint, num_steps=num_steps)
    per_step = counts[1] - counts[0] if len(counts) == 2 else 0.0
    return counts[0] + (num_steps - k) * per_step


def counts_flops(r: Recipe, args: argparse.Namespace) -> bool:
    """FlopCounterMode sees neither a compiled graph's kernels nor a CUDA graph's replays."""
    return args.flops and not (r.is_alignprop and (args.compile or args.cuda_graphs))


def measure_point(
    recipes: list[Recipe], batch: int, k: int, checkpoint: str, args: argparse.Namespace,
    device: torch.device,
) -> list[dict]:  # fmt: skip
    """Warm up, then time --steps alternating steps of every recipe at (batch, k); one row each."""
    for r in recipes:
        r.set_point(batch, k, checkpoint)
    mem = Memory(device)
    times = {r.name: [] for r in recipes}
    warm = {r.name: [] for r in recipes}
    peaks = {r.name: [] for r in recipes}
    nonfinite = dict.fromkeys(times, 0)
    for i in range(args.warmup + args.steps):
        order = recipes if i % 2 == 0 else recipes[::-1]  # alternate who goes first
        for r in order:
            start = mem.begin()
            t0 = time.perf_counter()
            metrics = r.step()
            _sync(device)
            seconds = time.perf_counter() - t0
            peak = mem.end()
            if not math.isfinite(metrics["loss"]) or not math.isfinite(metrics["grad_norm"]):
                nonfinite[r.name] += 1
            if i >= args.warmup:
                times[r.name].append(seconds)
                peaks[r.name].append((peak, peak - start))
            else:
                warm[r.name].append(seconds)
    for r in recipes:
        r.resident = r.resident_bytes(device)
    flops = {
        r.name: count_flops(r, k, checkpoint, args.num_steps) if counts_flops(r, args) else None
        for r in recipes
    }
    rows = []
    nan = float("nan")
    for r in recipes:
        ts, ws = times[r.name], warm[r.name]
        peak, step_mem = max(peaks[r.name], key=lambda x: x[0]) if peaks[r.name] else (0, 0)
        s = sum(ts) / len(ts) if ts else nan
        first = (ws or ts or [nan])[0]
        row = {
            "recipe": r.name, "batch": batch, "K": k, "num_steps": args.num_steps,
            "s_per_step": s, "s_per_step_min": min(ts) if ts else nan,
            "s_per_sample": s / batch, "timed_steps": len(ts), "nonfinite_steps": nonfinite[r.name],
            "first_step_s": first, "warmup_s": sum(ws),
            "warmup_extra_s": first - min(ts) if ts else nan,
        }  # fmt: skip
        if device.type == "cuda":
            others = sum(o.resident for o in recipes if o is not r)
            row["peak_mem_gib"] = (peak - others) / GIB if peaks[r.name] else nan
            row["cuda_max_allocated_gib"] = peak / GIB
            # what the caching allocator held at its most (the process's whole run): with the
            # CUDA context (~0.5-1 GiB) this is what a card must have for the run to fit
            row["cuda_max_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
        else:
            row["peak_mem_gib"] = peak / GIB if peaks[r.name] else nan
        row["step_mem_gib"] = max(step_mem, 0) / GIB  # RSS can shrink during a step
        row["mem_kind"] = mem.kind
        if flops[r.name] is not None:
            row["tflop_per_step"] = flops[r.name] / 1e12
            row["tflops"] = flops[r.name] / 1e12 / s if ts else nan
        rows.append(row)
    return rows


def describe(r: Recipe, args: argparse.Namespace) -> dict:
    """The switches a recipe ran with."""
    c = r.config
    if r.is_alignprop:
        unet = r.state.family.denoiser
        return {
            "precision": c.mixed_precision, "compile": c.train.compile_unet,
            "cuda_graphs": c.train.cuda_graphs,
            "checkpoint": r.state.opts.checkpoint_mode,
            "decoder_checkpoint": c.sample.decoder_checkpoint, "decode_chunk": c.sample.decode_chunk,
            "merge_lora": c.sample.merge_lora, "channels_last": c.train.channels_last,
            "offload_text_encoders": c.pretrained.get("offload_text_encoders", False),
            "batched_cfg": True, "grad_before_cut": False, "family": args.family,
            "attn_processors": sorted({type(p).__name__ for p in unet.attn_processors.values()}),
        }  # fmt: skip
    return {"precision": c.mixed_precision, "checkpoint": "step", "decoder_checkpoint": "none",
            "batched_cfg": RECIPES[r.name]["cfg_calls"] == 1, **RECIPES[r.name]}  # fmt: skip


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def fmt_cell(x: Any, spec: str, width: int) -> str:
    return f"{x:>{width}{spec}}" if isinstance(x, int | float) else f"{'-':>{width}}"


def print_table(rows: list[dict], summaries: list[dict], file=sys.stderr) -> None:
    print(
        f"{'recipe':<20}{'ckpt':>11}{'B':>3}{'K':>4}{'s/step':>9}{'s/sample':>10}{'warm-up s':>10}"
        f"{'peak GiB':>10}{'step GiB':>10}{'TFLOP/step':>12}{'TFLOP/s':>10}",
        file=file,
    )
    cuda = bool(rows) and rows[0].get("device") == "cuda"
    for r in rows:
        if "error" in r:
            print(f"{r['recipe']:<20} failed: {r['error']}", file=file)
            continue
        print(
            f"{r['recipe']:<20}{r.get('checkpoint', ''):>11}{r['batch']:>3}{r['K']:>4}"
            + fmt_cell(r["s_per_step"], ".3f", 9) + fmt_cell(r["s_per_sample"], ".3f", 10)
            + fmt_cell(r["warmup_extra_s"], ".1f", 10) + fmt_cell(r["peak_mem_gib"], ".2f", 10)
            + fmt_cell(r["step_mem_gib"], ".3f", 10) + fmt_cell(r.get("tflop_per_step"), ".4g", 12)
            + fmt_cell(r.get("tflops"), ".4g", 10),
            file=file,
        )  # fmt: skip
    for s in summaries:
        step = s["step_mem_ratio"]
        step = (
            f"{step:.2f}x"
            if cuda and step is not None and math.isfinite(step)
            else "n/a (CPU: RSS)"
        )
        print(
            f"  B={s['batch']} K={s['K']} {s['recipe']}: {s['speedup_per_sample']:.2f}x faster per "
            f"sample than reference, peak memory {s['peak_mem_ratio']:.2f}x of reference's, "
            f"step memory {step}",
            file=file,
        )


def summarise(rows: list[dict]) -> list[dict]:
    """Per grid point: each recipe against the reference."""
    out = []
    refs = {
        (r["batch"], r["K"]): r for r in rows if r["recipe"] == "reference" and "error" not in r
    }
    for row in rows:
        ref = refs.get((row.get("batch"), row.get("K")))
        if ref is None or row is ref or "error" in row:
            continue
        ratio = lambda a, b: a / b if a is not None and b else float("nan")  # noqa: E731
        out.append({
            "summary": True, "recipe": row["recipe"], "batch": row["batch"], "K": row["K"],
            "checkpoint": row.get("checkpoint"),
            "speedup_per_sample": ratio(ref["s_per_sample"], row["s_per_sample"]),
            "peak_mem_ratio": ratio(row["peak_mem_gib"], ref["peak_mem_gib"]),
            "step_mem_ratio": ratio(row["step_mem_gib"], ref["step_mem_gib"]),
        })  # fmt: skip
    return out


def ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma list of positive integers, e.g. 1,4")
    return values


def modes(text: str) -> list[str]:
    names = [x for x in text.split(",") if x]
    bad = [x for x in names if x not in solvers.CHECKPOINTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: comma list of {list(solvers.CHECKPOINTS)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    on_gpu = torch.cuda.is_available()
    _grid_args(p)
    _switch_args(p, on_gpu)
    _run_args(p, on_gpu)
    return _check_args(p, p.parse_args(argv))


def _grid_args(p: argparse.ArgumentParser) -> None:
    """Models, the grid of points (batch sizes x K) and the recipes timed at each."""
    onoff = argparse.BooleanOptionalAction
    p.add_argument(
        "--tiny", action="store_true", help="tiny models (CPU-sized) instead of SD 1.5 sizes"
    )
    p.add_argument(
        "--family",
        choices=["sd", *FAMILY_GUIDANCE],
        default="sd",
        help="model sizes: sd (SD 1.5), sdxl (base, 1024 px), sd3 (3.5 medium), flux (FLUX.1-dev), "
        "zimage (Z-Image-Turbo), flux2 (FLUX.2 [klein] 4B), qwenimage (Qwen-Image, 1328 px), "
        "wan (Wan 2.1 1.3B, 81 frames at 480 x 832)",
    )
    p.add_argument("--batch-sizes", type=ints, default=[1, 4], help="comma list (default 1,4)")
    p.add_argument("--ks", type=ints, default=[1], help="comma list of K (default 1)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per recipe and point")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per recipe and point first")
    p.add_argument("--num-steps", type=int, default=50, help="DDIM steps per sample")
    p.add_argument(
        "--resolution", type=int, default=None, help="pixels (default: the config's; 512, tiny 64)"
    )
    p.add_argument(
        "--recipes",
        type=lambda s: s.split(","),
        default=["reference", "alignprop"],
        help=f"comma list of {list(RECIPES)} (default reference,alignprop)",
    )
    p.add_argument(
        "--isolate",
        action=onoff,
        default=True,
        help="each recipe in its own fresh process (default); --no-isolate alternates them in one",
    )


def _switch_args(p: argparse.ArgumentParser, on_gpu: bool) -> None:
    """Precision and the speed/memory switches of the alignprop recipe."""
    onoff = argparse.BooleanOptionalAction
    p.add_argument(
        "--precision",
        choices=["bf16", "fp16", "no"],
        default=None,
        help="alignprop: bf16 | fp16 | no (default: the config's on a GPU, as train.py runs it "
        "(fp16 for SD 1.5, SDXL; bf16 for SD3, FLUX); no on CPU)",
    )
    p.add_argument(
        "--ref-precision",
        choices=["bf16", "fp16", "no"],
        default="fp16" if on_gpu else "no",
        help="reference: fp16 as published on a GPU; no (fp32) on CPU",
    )
    p.add_argument(
        "--compile",
        action=onoff,
        default=False,
        help="alignprop: train.compile_unet (denoiser, VAE decoder, reward; cached on disk)",
    )
    p.add_argument(
        "--cuda-graphs", action=onoff, default=False, help="alignprop: train.cuda_graphs"
    )
    p.add_argument(
        "--tf32", action=onoff, default=True, help="allow_tf32 (process-wide: all recipes)"
    )
    p.add_argument(
        "--checkpoint",
        type=modes,
        default=None,
        help=f"alignprop: sample.checkpoint, comma list of {list(solvers.CHECKPOINTS)} "
        "(a grid dimension; default: the config's)",
    )
    p.add_argument(
        "--grad-checkpoint",
        action=onoff,
        default=True,
        help="alignprop: sample.grad_checkpoint (--no-grad-checkpoint = --checkpoint none)",
    )
    p.add_argument(
        "--decoder-checkpoint",
        choices=solvers.DECODER_CHECKPOINTS,
        default=None,
        help="alignprop: sample.decoder_checkpoint (default: the config's)",
    )
    p.add_argument(
        "--decode-chunk",
        type=int,
        default=None,
        help="alignprop: sample.decode_chunk (0 = all at once; default: the config's)",
    )
    p.add_argument(
        "--offload-text-encoders",
        action=onoff,
        default=None,
        help="--family sd3|flux: pretrained.offload_text_encoders (default: the family's config's)",
    )
    p.add_argument(
        "--merge-lora",
        action=onoff,
        default=None,
        help="alignprop: sample.merge_lora, the no-grad steps on merged weights (default: the config's)",
    )
    p.add_argument(
        "--channels-last",
        action=onoff,
        default=None,
        help="alignprop: train.channels_last, UNet and VAE in channels_last (default: the config's)",
    )
    p.add_argument(
        "--flops",
        action=onoff,
        default=True,
        help="count FLOPs (two short extra steps per recipe and point)",
    )


def _run_args(p: argparse.ArgumentParser, on_gpu: bool) -> None:
    """Device, threads, seed and output."""
    onoff = argparse.BooleanOptionalAction
    p.add_argument("--device", default="cuda" if on_gpu else "cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: 1 with --tiny on CPU, where OpenMP spin-waiting on a "
        "shared machine makes tiny ops many times slower; else torch's default)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=str, default="", help="also write the JSON lines here")
    p.add_argument("--table", action=onoff, default=True, help=argparse.SUPPRESS)  # off in children


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Defaults that depend on other flags, the values checked, and the recipe list ordered."""
    models.resolve_device(args.device, "--device")  # cuda without a GPU would time the CPU
    for flag, low in (("steps", 0), ("warmup", 0), ("num_steps", 1), ("threads", 0)):
        value = getattr(args, flag)
        if value is not None and value < low:
            p.error(f"--{flag.replace('_', '-')} must be >= {low}, got {value}")
    if args.steps + args.warmup == 0:
        p.error("--steps 0 --warmup 0 measures nothing: time at least one step")
    if args.steps == 0:
        print("# --steps 0: only the warm-up is timed (first_step_s); s_per_step is null",
              file=sys.stderr)  # fmt: skip
    if max(args.ks) > args.num_steps:
        p.error(f"--ks {max(args.ks)} is more than --num-steps {args.num_steps}")
    if args.threads is None:
        args.threads = 1 if args.tiny and args.device == "cpu" else 0
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown or len(set(args.recipes)) != len(args.recipes):
        p.error(f"--recipes: distinct names from {list(RECIPES)}")
    if args.family != "sd" and any(RECIPES[r] is not None for r in args.recipes):
        p.error("--family: the published recipe is SD 1.5's; use --recipes alignprop")
    if "reference" in args.recipes:  # the baseline of every ratio goes first
        args.recipes.remove("reference")
        args.recipes.insert(0, "reference")
    base = base_config(args)  # the config's values for the flags left unset
    if args.checkpoint is None:
        args.checkpoint = [base.sample.checkpoint]
    if args.precision is None:
        args.precision = base.mixed_precision if args.device != "cpu" else "no"
    try:
        models.resolve_dtype(args.precision, args.device, "--precision")
        models.resolve_dtype(args.ref_precision, args.device, "--ref-precision")
    except ConfigError as err:
        p.error(str(err))
    return args


def run_isolated(args: argparse.Namespace, argv: list[str], out) -> list[dict]:
    """Each recipe in a fresh process of this script (so its peak memory is its own); collect its rows."""
    rows = []
    for name in args.recipes:
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
        cmd += ["--recipes", name, "--no-isolate", "--out", "", "--no-table"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)  # stderr passes through
        for line in proc.stdout:
            if line.startswith("{"):
                row = json.loads(line)
                if not row.get("summary"):
                    rows.append(row)
                    _emit(row, out)
        if proc.wait() != 0:
            row = {"recipe": name, "error": f"its process exited with {proc.returncode}"}
            print(
                f"error: recipe {name}: its process exited with {proc.returncode}", file=sys.stderr
            )
            rows.append(row)
            _emit(row, out)
    return rows


def run_here(args: argparse.Namespace, out) -> list[dict]:
    """Every recipe in this process, alternating step by step at each grid point."""
    if args.threads:
        torch.set_num_threads(args.threads)
    from accelerate import Accelerator

    device = torch.device(args.device)
    acc = Accelerator(mixed_precision=args.precision, cpu=device.type == "cpu")
    recipes = build_recipes(args, acc.device, acc)
    device = acc.device
    common = {
        "device": device.type, "device_name": device_name(device), "tiny": args.tiny,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "tf32": args.tf32,
        "resolution": list(solvers.Sampling.from_config(recipes[0].config.sample).size(
            recipes[0].state.family)),
        "isolated": len(recipes) == 1,
    }  # fmt: skip
    print(
        f"# {common['device_name']}, torch {torch.__version__}, {common['threads']} threads",
        file=sys.stderr,
    )
    rows = []
    for mode in args.checkpoint:
        for k in args.ks:
            for b in args.batch_sizes:
                for r, row in zip(
                    recipes, measure_point(recipes, b, k, mode, args, device), strict=True
                ):
                    row = {**row, **describe(r, args), **common}
                    rows.append(row)
                    _emit(row, out)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    """The rows and summaries (tests call this); errors raise ConfigError (`cli_main`: status 2)."""
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the network
    os.environ.setdefault("WANDB_MODE", "disabled")
    args = parse_args(argv)
    out = None
    if args.out:  # before any model loads: a bad path is an error now, not after the timings
        try:
            out = open(args.out, "w")  # noqa: SIM115
        except OSError as err:
            raise ConfigError(f"--out {args.out}: cannot write it ({err.strerror})") from None
    if args.isolate and len(args.recipes) > 1:
        rows = run_isolated(args, argv, out)
    else:
        rows = run_here(args, out)
    summaries = summarise(rows)
    for s in summaries:
        _emit(s, out)
    if out:
        out.close()
    if args.table:
        print_table(rows, summaries)
    return rows + summaries


def _emit(row: dict, out) -> None:
    line = json.dumps(
        {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in row.items()}
    )
    print(line, flush=True)
    if out:
        out.write(line + "\n")
        out.flush()


def cli_main(argv: list[str] | None = None) -> int:
    """Status 0; 2 for a bad flag or config (one line on stderr); 1 when a recipe's process failed."""

    def body(a: list[str]) -> int:
        rows = main(a)
        return 1 if any("error" in r for r in rows) else 0

    return cli.run(body, argv)


if __name__ == "__main__":
    sys.exit(cli_main())
