"""Generate images from a base model plus zero or more LoRAs, each at its own scale.

    python scripts/sample.py "a photo of a cat" "a dog" --lora logs/aesthetic_2024:0.8 --out samples/
    python scripts/sample.py --prompt-file prompts.txt --model path/to/sd15.safetensors --lora a.safetensors:0.5 --lora b:0.5
    python scripts/sample.py --tiny "a cat" --steps 4 --device cpu        # tiny random models, CPU
    python scripts/sample.py "a cat" --model stabilityai/stable-diffusion-xl-base-1.0 --height 768 --width 1344 --guidance 5

Each image gets seed = --seed + its index (prompt-major, then --num-per-prompt), drawn from its
own generator, so it does not depend on the batch size (with --eta 0). Writes one PNG per
image (prompt and seed in the file name and in the PNG text chunks) and a captioned grid.png.
A LoRA is PATH[:SCALE]: a .safetensors file, a checkpoint folder or a run folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

from alignprop.cli import ArgumentParser

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def parse_args(argv: list[str] | None = None):
    """Parse and check every flag (ConfigError naming the flag) before anything loads."""
    p = ArgumentParser(prog="sample.py", description=__doc__.strip().splitlines()[0])
    p.add_argument("prompts", nargs="*", help="prompts (or use --prompt-file)")
    p.add_argument(
        "--prompt-file", default="", help="one prompt a line, or a built-in prompt set name"
    )
    p.add_argument(
        "--model", default="", help=f"hub id, diffusers folder or single file ({DEFAULT_MODEL})"
    )
    p.add_argument("--revision", default="", help="hub revision of --model (commit, tag or branch)")
    p.add_argument("--tiny", action="store_true", help="use the tiny random models (CPU tests)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--negative-prompt", default="")
    p.add_argument(
        "--true-cfg-scale", type=float, default=1.0,
        help="FLUX.1 only: true CFG against --negative-prompt (1 = off), as FluxPipeline",
    )  # fmt: skip
    p.add_argument(
        "--num-frames", type=int, default=0,
        help="video models (Wan): frames per clip, 4 k + 1 (0 = the card's 81); clips are "
        "written as animated WebP",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-per-prompt", type=int, default=1, help="images per prompt")
    p.add_argument("--resolution", type=int, default=0, help="image side in pixels (0 = native)")
    p.add_argument(
        "--height", type=int, default=0, help="image height in pixels (0 = --resolution)"
    )
    p.add_argument("--width", type=int, default=0, help="image width in pixels (0 = --resolution)")
    p.add_argument(
        "--precision", default="", help='fp16 | bf16 | fp32 ("" = fp16 on a GPU, fp32 on a CPU)'
    )
    p.add_argument("--device", default="", help='"" = cuda if available, else cpu')
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--grid-cols", type=int, default=4)
    args = p.parse_args(argv)
    if args.tiny and args.model:
        p.error("--tiny and --model exclude each other")
    if bool(args.prompts) == bool(args.prompt_file):
        p.error("give prompts on the command line or --prompt-file (one of them)")
    for flag in ("num_per_prompt", "batch_size", "steps", "grid_cols"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not 0 <= args.seed < 2**32:
        p.error(f"--seed={args.seed} must be in [0, 2**32 - 1]")
    if not args.true_cfg_scale >= 1.0:
        p.error(f"--true-cfg-scale={args.true_cfg_scale} must be >= 1 (1 = off)")
    if not 0.0 <= args.eta <= 1.0:
        p.error(f"--eta={args.eta} must be in [0, 1]")
    if args.resolution < 0 or args.resolution % 8:
        p.error(
            f"--resolution={args.resolution} must be a multiple of 8 (0 = the model's native size)"
        )
    if any(not t.strip() for t in args.prompts):
        p.error("a prompt on the command line is empty")
    return args


def main(argv: list[str] | None = None) -> int:
    from alignprop import checks, families, lora_io, models
    from alignprop.errors import ConfigError
    from alignprop.prompts import load_prompts

    # ---- every check that needs no model: flags, prompts, device, LoRA files, the output folder
    args = parse_args(argv)
    if args.guidance < 0:  # wrong for every family; 0 waits for the family (Z-Image: no CFG)
        checks.check_guidance(args.guidance, "--guidance")
    texts = args.prompts or load_prompts(args.prompt_file, field="--prompt-file")
    device = models.resolve_device(args.device, field="--device")
    precision = args.precision or ("fp16" if device.type == "cuda" else "fp32")
    dtype = models.resolve_dtype(precision, device, field="--precision")
    loras = [lora_io.parse_lora_arg(a) for a in args.lora]
    for path, _ in loras:
        lora_io.check_lora_file(path, "--lora")
    if args.tiny:
        from alignprop.tiny import ensure_tiny

        model = ensure_tiny()["pretrained.model"]
    else:
        model = models.current_hub_id(args.model or DEFAULT_MODEL, "--model")
    if models.is_path(model) and not Path(model).expanduser().exists():
        raise ConfigError(f"--model={model!r}: no such file or folder")
    checks.check_num_steps(model, args.steps, "--steps")
    out = checks.check_writable(args.out, "--out")

    from alignprop import inference, solvers
    from alignprop.tracking import image_grid, save_grid

    spec = families.Pretrained(model, revision=args.revision, field="--model")
    family_cls = families.get_family(families.detect(model, args.revision))
    checks.check_guidance(args.guidance, "--guidance", family_cls.guidance_offset)
    family = family_cls.load(spec, dtype)
    family = family.freeze(device)
    if args.num_frames < 0:
        raise ConfigError(f"--num-frames={args.num_frames} must be >= 0 (0 = the card's)")
    try:
        family.set_frames(args.num_frames)
    except ConfigError as err:
        raise ConfigError(str(err).replace("sample.num_frames", "--num-frames")) from None
    checks.warn_long_prompts(family, texts, "prompts")
    checks.note_ignored_guidance(family, args.guidance, "--guidance", "--true-cfg-scale")
    lora_io.load_loras(family.denoiser, loras, family=family)

    jobs = [
        (t, args.seed + i * args.num_per_prompt + j)
        for i, t in enumerate(texts)
        for j in range(args.num_per_prompt)
    ]
    opts = solvers.Sampling(
        args.steps, args.guidance, args.eta, height=args.height or args.resolution,
        width=args.width or args.resolution, negative_prompt=args.negative_prompt,
        true_cfg_scale=args.true_cfg_scale,
    )  # fmt: skip
    size = opts.size(family)
    family.check_size(*size, field="--height/--width/--resolution")
    noise = inference.per_image_noise(family, [s for _, s in jobs], size)
    images = inference.generate(
        family, [t for t, _ in jobs], noise, opts, batch_size=args.batch_size, dtype=dtype,
        eta_seed=args.seed,
    )  # fmt: skip

    settings = {
        "model": model,
        "loras": [{"path": str(p), "scale": s} for p, s in loras],
        "steps": args.steps,
        "guidance": args.guidance,
        "eta": args.eta,
        "negative_prompt": args.negative_prompt,
        "true_cfg_scale": args.true_cfg_scale,
        "height": size[0],
        "width": size[1],
        **({"num_frames": family.num_frames} if family.is_video else {}),
    }
    from alignprop.errors import writing

    with writing(
        f"the images in {out}", out, "free space, then run it again (same seeds, same images)"
    ):
        for k, ((text, seed), image) in enumerate(zip(jobs, images, strict=True)):
            stem = f"{k:04d}_{inference.slug(text)}_seed{seed}"
            meta = {"prompt": text, "seed": str(seed), "alignprop": settings}
            if image.ndim == 4:  # a clip (3, F, H, W)
                inference.save_webp_clip(image, out / f"{stem}.webp", meta)
            else:
                inference.save_png(image, out / f"{stem}.png", meta)
        captions = [f"{t} (seed {s})" for t, s in jobs]
        if images.ndim == 5:
            grid = save_grid(images, captions, out / "grid").name
        else:
            image_grid(images, captions, cols=args.grid_cols).save(out / "grid.png")
            grid = "grid.png"
    kind = "clips" if images.ndim == 5 else "images"
    print(f"wrote {len(jobs)} {kind} and {grid} to {out}")
    return 0


if __name__ == "__main__":
    from alignprop.cli import run

    sys.exit(run(main))
