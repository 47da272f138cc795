"""Export a trained LoRA for other tools: diffusers format, or kohya-style keys for ComfyUI / A1111.

    python scripts/export_lora.py logs/aesthetic_2024 --format comfyui --out aesthetic_lora.safetensors
    python scripts/export_lora.py logs/run/checkpoints/checkpoint_100 --format diffusers --out lora.safetensors

RUN_OR_CKPT is a run folder (its final/ LoRA, else the newest checkpoint), a checkpoint folder
or a .safetensors file written by this project.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from alignprop import checks, lora_io
from alignprop.cli import ArgumentParser
from alignprop.errors import ConfigError

FORMATS = ("comfyui", "diffusers")


def export(src: str, fmt: str, out: str | os.PathLike) -> Path:
    """Write the LoRA found at src to out in the given format; return the file written."""
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise ConfigError(f"--format={fmt!r} is not known; valid: {list(FORMATS)}")
    file = lora_io.check_lora_file(src, "RUN_OR_CKPT")
    out = Path(out)
    if out.suffix != ".safetensors":  # a folder: use the name diffusers looks for
        out = out / lora_io.LORA_WEIGHT_NAME
    if out.is_dir():
        raise ConfigError(f"--out={str(out)!r} is a folder; give a .safetensors file name")
    checks.check_writable(out.parent, "--out")
    if out.resolve() == file.resolve():
        raise ConfigError(f"--out={str(out)!r} is the source file itself; write elsewhere")
    tmp = out.with_name(f".{out.name}.tmp")  # written beside it, renamed into place
    if fmt == "diffusers":
        shutil.copyfile(file, tmp)  # a byte copy keeps the adapter metadata (lora_alpha)
    else:
        try:
            state = lora_io.kohya_state_dict(file)
        except (ValueError, KeyError) as err:
            raise ConfigError(f"RUN_OR_CKPT {str(file)!r}: cannot convert it ({err})") from None
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
    args = parser.parse_args(argv)
    print(export(args.src, args.format, args.out))
    return 0


if __name__ == "__main__":
    from alignprop.cli import run

    sys.exit(run(main))
