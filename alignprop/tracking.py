"""Metrics to metrics.jsonl (always) and optionally wandb or tensorboard; captioned image grids."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any

import torch

from alignprop.errors import RunStopped, writing
from alignprop.inference import to_pil
from alignprop.run_dir import RESUME_HINT

TRACKERS = ("wandb", "tensorboard", "none")


# frames per second of a video grid (Wan's 16 fps)
VIDEO_FPS = 16


def save_grid(images: torch.Tensor, captions: list[str], stem: Path) -> Path:
    """A captioned grid at stem.png, or for clips (N, 3, F, H, W) an animated stem.webp (one grid
    per frame, looping at VIDEO_FPS); returns the path written."""
    if images.ndim != 5:
        path = stem.with_suffix(".png")
        image_grid(images, captions).save(path)
        return path
    path = stem.with_suffix(".webp")
    frames = [image_grid(images[:, :, i], captions) for i in range(images.shape[2])]
    frames[0].save(
        path, save_all=True, append_images=frames[1:], duration=round(1000 / VIDEO_FPS),
        loop=0, lossless=True,
    )  # fmt: skip
    return path


def image_grid(images: torch.Tensor, captions: list[str], cols: int = 4):
    """A PIL grid of images in [-1, 1] with a caption strip under each."""
    from PIL import Image, ImageDraw

    n, _, h, w = images.shape
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    cap_h = 14 * 2
    cell_w = max(w, 128)
    grid = Image.new("RGB", (cols * cell_w, rows * (h + cap_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        r, c = divmod(i, cols)
        x, y = c * cell_w, r * (h + cap_h)
        grid.paste(to_pil(images[i]), (x, y))
        text = captions[i] if i < len(captions) else ""
        chars = max(8, cell_w // 6)
        for j, line in enumerate([text[:chars], text[chars : 2 * chars]]):
            draw.text((x + 2, y + h + 1 + 13 * j), line, fill="black")
    return grid


class Tracker:
    """Writes one JSON object per logged step to metrics.jsonl; mirrors scalars and images to wandb/tensorboard."""

    def __init__(
        self,
        run_dir: Path,
        kind: str,
        config: dict,
        project: str,
        run_name: str,
        enabled: bool = True,
    ):
        if kind not in TRACKERS:
            raise ValueError(f"log_with={kind!r} is not known; valid: {list(TRACKERS)}")
        self.run_dir, self.kind, self.enabled = Path(run_dir), kind, enabled
        self.backend: Any = None
        if not enabled:
            return
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if kind == "wandb":
            import wandb  # lazily: not every machine has it

            id_file = self.run_dir / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            self.backend = wandb.init(
                project=project,
                name=run_name,
                id=run_id,
                resume="allow",
                config=config,
                dir=str(self.run_dir),
            )
        elif kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("log_with=tensorboard needs `pip install tensorboard`") from err
            self.backend = SummaryWriter(str(self.run_dir / "tensorboard"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Append a metrics row (step included) and mirror it to the tracker."""
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with (
            writing(self.metrics_path, self.run_dir, RESUME_HINT),
            open(self.metrics_path, "a") as f,
        ):
            f.write(json.dumps(row) + "\n")  # a torn line is dropped on resume
        if self.kind == "wandb":
            self.backend.log(row, step=step)
        elif self.kind == "tensorboard":
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.backend.add_scalar(k, v, step)

    def log_images(
        self, name: str, images: torch.Tensor, captions: list[str], step: int
    ) -> Path | None:
        """Save a captioned grid to images/<name>_<step>.png (clips: an animated .webp, see
        save_grid) and send it to the tracker (a clip's middle frame)."""
        if not self.enabled:
            return None
        stem = self.run_dir / "images" / f"{name}_{step:06d}"
        path = stem.with_suffix(".webp" if images.ndim == 5 else ".png")
        try:
            with writing(path, self.run_dir, RESUME_HINT):
                path.parent.mkdir(parents=True, exist_ok=True)
                save_grid(images, captions, stem)
        except RunStopped:
            path.unlink(missing_ok=True)  # no half-written grid
            raise
        if images.ndim == 5:
            images = images[:, :, images.shape[2] // 2]
        grid = image_grid(images, captions)
        if self.kind == "wandb":
            import wandb

            panel = [
                wandb.Image(to_pil(img), caption=cap)
                for img, cap in zip(images, captions, strict=False)
            ]
            self.backend.log({name: panel}, step=step)
        elif self.kind == "tensorboard":
            import numpy as np

            self.backend.add_image(name, np.asarray(grid), step, dataformats="HWC")
        return path

    def finish(self) -> None:
        if self.backend is not None:
            (self.backend.finish if self.kind == "wandb" else self.backend.close)()


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v
