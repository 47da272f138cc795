"""Export a trained LoRA for other tools: diffusers format, or kohya-style keys for ComfyUI / A1111.

    python scripts/export_lora.py logs/aesthetic_2024 --format comfyui --out aesthetic_lora.safetensors
    python scripts/export_lora.py logs/run/checkpoints/checkpoint_100 --format diffusers --out lora.safetensors

RUN_OR_CKPT is a run folder (its final/ LoRA, else the newest checkpoint), a checkpoint folder
or a .safetensors file written by this project.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from alignprop import families, lora_io

FORMATS = ("comfyui", "diffusers")


def family_of(lora_file: Path) -> type[families.Family]:
    """The model family of the run a LoRA file came from (its config.json), SD when there is none."""
    for folder in list(lora_file.parents)[:3]:  # final/, checkpoints/checkpoint_N/, the run
        if (folder / "config.json").is_file():
            pretrained = json.loads((folder / "config.json").read_text()).get("pretrained", {})
            name, model = pretrained.get("family", "auto"), pretrained.get("model", "")
            if name == "auto":
                name = families.detect(model) if model else "sd"
            return families.get_family(name)
    return families.SD


def export(src: str, fmt: str, out: str | os.PathLike) -> Path:
    """Write the LoRA found at src to out in the given format; return the file written."""
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid: {list(FORMATS)}")
    file = lora_io.resolve_lora_file(src)
    out = Path(out)
    if out.suffix != ".safetensors":  # a folder: use the name diffusers looks for
        out = out / lora_io.LORA_WEIGHT_NAME
    if fmt == "diffusers":
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, out)  # a byte copy keeps the adapter metadata (lora_alpha)
    else:
        kohya = lora_io.kohya_state_dict(file, family_of(file))  # raises for families without keys
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(kohya, str(out))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument(
        "src", metavar="RUN_OR_CKPT", help="run folder, checkpoint folder or .safetensors file"
    )
    parser.add_argument("--format", choices=FORMATS, default="comfyui")
    parser.add_argument("--out", required=True, help="output .safetensors file (or a folder)")
    args = parser.parse_args(argv)
    print(export(args.src, args.format, args.out))


if __name__ == "__main__":
    from alignprop.errors import user_errors_exit

    user_errors_exit(main)()
