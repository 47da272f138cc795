"""Export a trained LoRA for other tools: diffusers format, or kohya-style keys for ComfyUI / A1111.

    python scripts/export_lora.py logs/aesthetic_2024 --format comfyui --out aesthetic_lora.safetensors
    python scripts/export_lora.py logs/run/checkpoints/checkpoint_100 --format diffusers --out lora.safetensors

RUN_OR_CKPT is a run folder (its final/ LoRA, else the newest checkpoint), a checkpoint folder
or a .safetensors file written by this project. The model family (sd, sdxl, ...) comes from
--family, else the run's config.json (pretrained.family, or detected from pretrained.model), else
sd (SD and SDXL UNet LoRAs convert alike). ComfyUI keys are `lora_unet_<diffusers module>` with
`.alpha`, which ComfyUI maps for SD 1.x/2.x and SDXL alike; for the transformer families
`transformer.<diffusers module>.lora_A/B.weight` with `.alpha` (SD3, FLUX.1, FLUX.2, Z-Image,
Qwen-Image) and Wan's own checkpoint names under `diffusion_model.` (alignprop.soups).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from alignprop import checks, families, lora_io, soups
from alignprop.cli import ArgumentParser
from alignprop.errors import ConfigError

FORMATS = ("comfyui", "diffusers")


def run_family(file: Path) -> str | None:
    """The family of the run a LoRA file belongs to, from the nearest config.json above it (None: no run)."""
    for folder in list(file.parents)[:4]:  # final/, checkpoints/checkpoint_N/, the run folder
        if (folder / "config.json").is_file():
            pretrained = json.loads((folder / "config.json").read_text()).get("pretrained", {})
            family = pretrained.get("family", "auto")
            if family != "auto":
                return family
            try:
                return families.detect(pretrained.get("model", ""))
            except ConfigError:
                return None
    return None


def export(src: str, fmt: str, out: str | os.PathLike, family: str = "auto") -> Path:
    """Write the LoRA found at src to out in the given format; return the file written."""
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise ConfigError(f"--format={fmt!r} is not known; valid: {list(FORMATS)}")
    file = lora_io.check_lora_file(src, "RUN_OR_CKPT")
    if family == "auto":
        # a LoRA outside a run folder: the UNet key layout, which SD and SDXL share
        family = run_family(file) or "sd"
    fam = families.get_family(family)
    out = Path(out)
    if out.suffix != ".safetensors":  # a folder: use the name diffusers looks for
        out = out / lora_io.LORA_WEIGHT_NAME
    if out.is_dir():
        raise ConfigError(f"--out={str(out)!r} is a folder; give a .safetensors file name")
    if out.resolve() == file.resolve():
        raise ConfigError(f"--out={str(out)!r} is the source file itself; write elsewhere")
    if fmt == "diffusers":
        checks.check_writable(out.parent, "--out")
        tmp = out.with_name(f".{out.name}.tmp")  # written beside it, renamed into place
        shutil.copyfile(file, tmp)  # a byte copy keeps the adapter metadata (lora_alpha)
    else:
        try:  # raises for families without kohya keys before anything is written
            state = soups.kohya_state_dict(file, family=fam)
        except (ValueError, KeyError) as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(f"RUN_OR_CKPT {str(file)!r}: cannot convert it ({err})") from None
        checks.check_writable(out.parent, "--out")
        tmp = out.with_name(f".{out.name}.tmp")
        save_file(state, str(tmp))
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="export_lora.py", description=__doc__.strip().splitlines()[0])
    parser.add_argument(
        "src", metavar="RUN_OR_CKPT", help="run folder, checkpoint folder or .safetensors file"
    )
    parser.add_argument("--format", choices=FORMATS, default="comfyui")
    parser.add_argument("--out", required=True, help="output .safetensors file (or a folder)")
    parser.add_argument(
        "--family", default="auto", help="model family (auto = from the run's config.json)"
    )
    args = parser.parse_args(argv)
    print(export(args.src, args.format, args.out, args.family))
    return 0


if __name__ == "__main__":
    from alignprop.cli import run

    sys.exit(run(main))
