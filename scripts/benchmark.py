"""Speed and memory of one AlignProp training step, against the published recipe.

Each grid point (batch B, K steps with gradient out of --num-steps DDIM steps) times whole
training steps (sampling, decode, reward, backward, optimizer step) of several recipes in
one process, alternating step by step, after --warmup untimed steps each:
  reference           the published recipe (alignprop/reference.py): fp16 autocast, uncond and
                      cond as two checkpointed UNet calls, autograd on at every step with the
                      early noise predictions detached, no decoder checkpointing
  alignprop           the project's step: AlignProp.update(), the code scripts/train.py runs
  reference_one_call  the reference with one UNet call on [uncond, cond]   (--recipes adds these,
  reference_nograd    the reference without autograd before the cut         one switch each)
The models are SD-1.5-sized (UNet 860M, VAE, CLIP ViT-L/14 text; CLIP ViT-L/14 vision + the
LAION aesthetic MLP for the reward) with random weights built from their configs: speed does
not depend on the weights, and nothing is downloaded. --tiny uses alignprop.tiny's models.
Random full-size weights can give a non-finite loss; such steps still cost the same time and
are counted in `nonfinite_steps`.

Output: one JSON line per recipe and grid point on stdout (and in --out), one summary line
per point, and a table on stderr.
  s_per_step, s_per_sample   mean over the --steps timed steps (s_per_step_min: the fastest)
  peak_mem_gib   GPU: CUDA max allocated during the step, less the other recipes' resident
                 weights and optimizer state (they share the process, so this is the recipe's
                 peak as if alone; cuda_max_allocated_gib is the raw figure);
                 CPU: the process's peak RSS during the step (VmHWM, reset before each step),
                 which holds every recipe's weights and the runtime
  step_mem_gib   the step's peak above what was allocated (GPU) or resident (CPU) when it began
  tflop_per_step FLOPs of one step, counted by torch.utils.flop_counter's FlopCounterMode
                 (matmuls, convolutions, attention: forward, checkpoint recomputation and
                 backward, as executed) on extra steps with chains of K and K+1 DDIM steps,
                 extrapolated linearly to --num-steps (each step before the cut costs the
                 same); tflops = tflop_per_step / s_per_step

The switches of the fast path, one flag each, so each one's share can be measured by two runs:
--precision (bf16 | fp16 | no), --compile, --tf32 (global: both recipes), --decoder-checkpoint,
--grad-checkpoint, --channels-last; the reference stays as published (--ref-precision aside).

Examples:
  python scripts/benchmark.py --tiny                                     # CPU, under a minute
  python scripts/benchmark.py --batch-sizes 1,4,8 --ks 1,10,50 --compile   # a GPU

A GPU machine with torch, transformers, accelerate and peft but without diffusers,
ml_collections and open_clip_torch gets them as wheels:
  where pip can reach PyPI:  bash ../shared/tools/gpu-wheels.sh   # into ./.whl (git-excluded)
  on the GPU machine, first: python3 -m pip install -q --no-index --no-deps --no-compile \\
      --no-cache-dir --target .site .whl/*.whl && export PYTHONPATH=$PWD:$PWD/.site
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignprop import models, reference, rewards, tiny, trainer  # noqa: E402

RECIPES = {  # name -> Reference options (None: the project's AlignProp)
    "reference": {"cfg_calls": 2, "grad_before_cut": True},
    "reference_one_call": {"cfg_calls": 1, "grad_before_cut": True},
    "reference_nograd": {"cfg_calls": 2, "grad_before_cut": False},
    "alignprop": None,
}
GIB = 2**30

# runwayml/stable-diffusion-v1-5 unet/config.json and vae/config.json.
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


def sd15_parts(
    dtype: torch.dtype, device: torch.device, seed: int, tok_dir: Path
) -> models.SDParts:
    """SD-1.5-sized tokenizer, text encoder, VAE, UNet and DDIM scheduler with random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)  # the same weights for every recipe
    with torch.device(device):  # fill the random weights where they will live (fast on a GPU)
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
    parts = models.SDParts(
        CLIPTokenizer.from_pretrained(tok_dir), text_encoder.to(dtype), vae.to(dtype),
        unet.to(dtype), DDIMScheduler(**tiny.SD15_SCHEDULER),
    )  # fmt: skip
    models.freeze(parts, device)
    return parts


def sd15_aesthetic(config: Any, dtype: torch.dtype, device: torch.device, seed: int):
    """The aesthetic reward on a random CLIP ViT-L/14 vision tower + LAION MLP; (reward_fn, modules)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from alignprop.rewards.aesthetic import AestheticHead
    from alignprop.rewards.clip_models import image_embeds
    from alignprop.rewards.loading import freeze
    from alignprop.rewards.preprocess import ImageInput, to_model_input

    torch.manual_seed(seed + 1)
    with torch.device(device):
        clip = freeze(
            CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_L_VISION)), device, dtype
        )
        head = freeze(AestheticHead(768), device, dtype)
    spec = ImageInput((224, 224), 224, CLIP_MEAN, CLIP_STD, "bicubic")
    c = config.reward_models.aesthetic

    def reward_fn(images: torch.Tensor, prompts) -> tuple[torch.Tensor, dict]:
        # As rewards/aesthetic.py's reward_fn, with get_reward's info layout.
        pixels = to_model_input(images.to(device), spec, dtype)
        r = head(image_embeds(clip, pixels)).squeeze(-1).float()  # (B,)
        loss = (r - c.target).abs() if c.loss == "target" else -r
        return r, {"loss": loss, "parts": {"aesthetic": r.detach()}}

    return reward_fn, [clip, head]


def load_config(name: str):
    """config/align_prop.py:NAME, imported from its file as `--config` does."""
    spec = importlib.util.spec_from_file_location("_align_prop", ROOT / "config" / "align_prop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(name)


# ---------------------------------------------------------------- recipes


class Recipe:
    """One recipe's training state and how to point it at a grid point."""

    def __init__(self, name: str, state: Any, config: Any, modules: list[torch.nn.Module]):
        self.name, self.state, self.config, self.modules = name, state, config, modules
        self.resident = 0  # bytes of weights + optimizer state on the GPU (set after warm-up)

    def set_point(self, batch: int, k: int) -> None:
        c = self.config
        c.sample.batch_size = c.train.total_batch_size = c.train.samples_per_epoch = batch
        c.truncation.k = k
        if isinstance(self.state, trainer.AlignProp):  # re-derive its state as the trainer does
            self.state.batch = trainer.validate_config(c, 1)
            self.state.truncation = trainer.truncation_of(c)

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
    """The run config both recipes start from; fixed K, one micro-batch per update."""
    config = load_config("tiny" if args.tiny else "aesthetic_k1")
    if args.tiny:
        trainer.apply_tiny(config)
    config.log_with = "none"
    config.truncation.strategy = "fixed"
    config.sample.num_steps = args.num_steps
    config.sample.eta = 0.0
    if args.resolution is not None:
        config.sample.resolution = args.resolution
    config.train.max_nonfinite = 10**9  # random weights may overflow; the step costs the same
    config.allow_tf32 = args.tf32
    return config


def build_recipes(args: argparse.Namespace, device: torch.device, accelerator: Any) -> list[Recipe]:
    base = base_config(args)
    tok_dir = None
    if not args.tiny:
        tok_dir = tiny.write_clip_tokenizer(Path(tempfile.mkdtemp(prefix="bench_tok_")))
    out = []
    for name in args.recipes:
        config = copy.deepcopy(base)
        if RECIPES[name] is None:  # the project's step, configured as train.py would be
            config.mixed_precision = args.precision
            config.train.compile_unet = args.compile
            config.sample.grad_checkpoint = args.grad_checkpoint
            config.sample.decoder_checkpoint = args.decoder_checkpoint
            dtype = models.resolve_dtype(args.precision)
            parts, reward_fn, extra = None, None, []
            if not args.tiny:
                parts = sd15_parts(dtype, device, args.seed, tok_dir)
                reward_fn, extra = sd15_aesthetic(config, dtype, device, args.seed)
            run = trainer.AlignProp(
                config, accelerator, trainer.validate_config(config, 1),
                Path(tempfile.mkdtemp(prefix="bench_run_")), parts=parts, reward_fn=reward_fn,
            )  # fmt: skip
            if args.channels_last:
                run.parts.unet.to(memory_format=torch.channels_last)
                run.parts.vae.to(memory_format=torch.channels_last)
            p = run.parts
            out.append(Recipe(name, run, config, [p.unet, p.vae, p.text_encoder, *extra]))
        else:  # the published recipe (or it with one switch moved)
            config.mixed_precision = args.ref_precision
            config.sample.grad_checkpoint = True
            dtype = models.resolve_dtype(args.ref_precision)
            if args.tiny:
                parts = models.load_sd(config.pretrained.model, dtype=dtype)
                reward_fn = rewards.get_reward(config.reward, config.reward_models, device, dtype)
                extra = []
            else:
                parts = sd15_parts(dtype, device, args.seed, tok_dir)
                reward_fn, extra = sd15_aesthetic(config, dtype, device, args.seed)
            ref = reference.Reference(config, parts, reward_fn, device, dtype, **RECIPES[name])
            out.append(
                Recipe(name, ref, config, [parts.unet, parts.vae, parts.text_encoder, *extra])
            )
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


def count_flops(recipe: Recipe) -> float:
    """FLOPs of one training step of the recipe, as executed, counted on short chains.

    Every step before the cut costs the same (one guided UNet forward, no backward), so the
    count is linear in num_steps: count chains of K and K+1 steps and extrapolate, which
    FlopCounterMode's per-op overhead makes far cheaper than counting a 50-step chain.
    """
    from torch.utils.flop_counter import FlopCounterMode

    sample, k = recipe.config.sample, recipe.config.truncation.k
    full, counts = sample.num_steps, []
    try:
        for n in sorted({k, min(k + 1, full)}):
            sample.num_steps = n
            with FlopCounterMode(display=False) as counter:
                recipe.step()
            counts.append(float(counter.get_total_flops()))
    finally:
        sample.num_steps = full
    per_step = counts[1] - counts[0] if len(counts) == 2 else 0.0
    return counts[0] + (full - k) * per_step


def measure_point(
    recipes: list[Recipe], batch: int, k: int, args: argparse.Namespace, device: torch.device
) -> list[dict]:
    """Warm up, then time --steps alternating steps of every recipe at (batch, k); one row each."""
    for r in recipes:
        r.set_point(batch, k)
    mem = Memory(device)
    times = {r.name: [] for r in recipes}
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
    for r in recipes:
        r.resident = r.resident_bytes(device)
    flops = {r.name: count_flops(r) if args.flops else None for r in recipes}
    rows = []
    for r in recipes:
        ts = times[r.name]
        peak, step_mem = max(peaks[r.name], key=lambda x: x[0]) if peaks[r.name] else (0, 0)
        s = sum(ts) / len(ts) if ts else float("nan")
        row = {
            "recipe": r.name, "batch": batch, "K": k, "num_steps": args.num_steps,
            "s_per_step": s, "s_per_step_min": min(ts) if ts else float("nan"),
            "s_per_sample": s / batch, "timed_steps": len(ts), "nonfinite_steps": nonfinite[r.name],
        }  # fmt: skip
        if device.type == "cuda":
            others = sum(o.resident for o in recipes if o is not r)
            row["peak_mem_gib"] = (peak - others) / GIB
            row["cuda_max_allocated_gib"] = peak / GIB
        else:
            row["peak_mem_gib"] = peak / GIB
        row["step_mem_gib"] = max(step_mem, 0) / GIB  # RSS can shrink during a step
        row["mem_kind"] = mem.kind
        if flops[r.name] is not None:
            row["tflop_per_step"] = flops[r.name] / 1e12
            row["tflops"] = flops[r.name] / 1e12 / s if ts else float("nan")
        rows.append(row)
    return rows


def describe(r: Recipe, args: argparse.Namespace) -> dict:
    """The switches a recipe ran with."""
    c = r.config
    if RECIPES[r.name] is None:
        unet = r.state.parts.unet
        return {
            "precision": c.mixed_precision, "compile": c.train.compile_unet,
            "grad_checkpoint": c.sample.grad_checkpoint,
            "decoder_checkpoint": c.sample.decoder_checkpoint, "channels_last": args.channels_last,
            "batched_cfg": True, "grad_before_cut": False,
            "attn_processors": sorted({type(p).__name__ for p in unet.attn_processors.values()}),
        }  # fmt: skip
    return {"precision": c.mixed_precision, "grad_checkpoint": True, "decoder_checkpoint": False,
            "batched_cfg": RECIPES[r.name]["cfg_calls"] == 1, **RECIPES[r.name]}  # fmt: skip


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def print_table(rows: list[dict], summaries: list[dict], file=sys.stderr) -> None:
    head = f"{'recipe':<20}{'B':>3}{'K':>4}{'s/step':>9}{'s/sample':>10}{'peak GiB':>10}{'step GiB':>10}{'TFLOP/step':>12} {'TFLOP/s':>10}"
    print(head, file=file)
    cuda = bool(rows) and rows[0]["device"] == "cuda"
    by_point: dict[tuple, list[dict]] = {}
    for r in rows:
        by_point.setdefault((r["batch"], r["K"]), []).append(r)
    for (b, k), group in by_point.items():
        for r in group:
            tf = f"{r['tflop_per_step']:>12.4g} {r['tflops']:>10.4g}" if "tflops" in r else ""
            print(
                f"{r['recipe']:<20}{b:>3}{k:>4}{r['s_per_step']:>9.3f}{r['s_per_sample']:>10.3f}"
                f"{r['peak_mem_gib']:>10.2f}{r['step_mem_gib']:>10.3f}{tf}",
                file=file,
            )
        for s in summaries:
            if (s["batch"], s["K"]) == (b, k):
                step = s["step_mem_ratio"]
                step = f"{step:.2f}x" if cuda and math.isfinite(step) else "n/a (CPU: RSS)"
                print(
                    f"  {s['recipe']}: {s['speedup_per_sample']:.2f}x faster per sample than reference, "
                    f"peak memory {s['peak_mem_ratio']:.2f}x of reference's, step memory {step}",
                    file=file,
                )


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    on_gpu = torch.cuda.is_available()
    p.add_argument(
        "--tiny", action="store_true", help="tiny models (CPU-sized) instead of SD 1.5 sizes"
    )
    p.add_argument("--batch-sizes", type=ints, default=[1, 4], help="comma list (default 1,4)")
    p.add_argument("--ks", type=ints, default=[1], help="comma list of K (default 1)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per recipe and point")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per recipe and point first")
    p.add_argument("--num-steps", type=int, default=50, help="DDIM steps per sample")
    p.add_argument(
        "--resolution", type=int, default=None, help="pixels (default: the config's; 512, tiny 64)"
    )
    p.add_argument("--recipes", type=lambda s: s.split(","), default=["reference", "alignprop"],
                   help=f"comma list of {list(RECIPES)} (default reference,alignprop)")  # fmt: skip
    p.add_argument(
        "--precision",
        default="bf16" if on_gpu else "no",
        help="alignprop: bf16 | fp16 | no (default bf16 on a GPU, no on CPU)",
    )
    p.add_argument("--ref-precision", default="fp16" if on_gpu else "no",
                   help="reference: fp16 as published on a GPU; no (fp32) on CPU")  # fmt: skip
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="alignprop: train.compile_unet",
    )
    p.add_argument(
        "--tf32",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="allow_tf32 (process-wide: all recipes)",
    )
    p.add_argument(
        "--grad-checkpoint",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="alignprop: sample.grad_checkpoint",
    )
    p.add_argument(
        "--decoder-checkpoint",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="alignprop: sample.decoder_checkpoint",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="alignprop: UNet and VAE in channels_last",
    )
    p.add_argument(
        "--flops",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="count FLOPs (two short extra steps per recipe and point)",
    )
    p.add_argument("--device", default="cuda" if on_gpu else "cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: 1 with --tiny on CPU, where OpenMP spin-waiting on a "
                   "shared machine makes tiny ops many times slower; else torch's default)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON lines here")
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = 1 if args.tiny and args.device == "cpu" else 0
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown or len(set(args.recipes)) != len(args.recipes):
        p.error(f"--recipes: distinct names from {list(RECIPES)}")
    if "reference" in args.recipes:  # the baseline of every ratio goes first
        args.recipes.remove("reference")
        args.recipes.insert(0, "reference")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the network
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
        "resolution": recipes[0].state.resolution,
    }  # fmt: skip
    print(
        f"# {common['device_name']}, torch {torch.__version__}, {common['threads']} threads",
        file=sys.stderr,
    )
    out = open(args.out, "w") if args.out else None  # noqa: SIM115
    rows, summaries = [], []
    for k in args.ks:
        for b in args.batch_sizes:
            point = measure_point(recipes, b, k, args, device)
            for r, row in zip(recipes, point, strict=True):
                row = {**row, **describe(r, args), **common}
                rows.append(row)
                _emit(row, out)
            ref = point[0] if recipes[0].name == "reference" else None
            for row in point[1:] if ref else []:
                summary = {
                    "summary": True, "recipe": row["recipe"], "batch": b, "K": k,
                    "speedup_per_sample": ref["s_per_sample"] / row["s_per_sample"],
                    "peak_mem_ratio": row["peak_mem_gib"] / ref["peak_mem_gib"],
                    "step_mem_ratio": row["step_mem_gib"] / ref["step_mem_gib"]
                    if ref["step_mem_gib"] > 0 else float("nan"),
                }  # fmt: skip
                summaries.append(summary)
                _emit(summary, out)
    if out:
        out.close()
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


if __name__ == "__main__":
    main()
