"""The one place images go from [-1, 1] to a reward model's input.

A reward model's own preprocessing works on PIL images: the CLIP image processors
(transformers `CLIPImageProcessor`, open_clip's eval transform) resize the shortest side to
the input size (224 for CLIP ViT-L/14 and ViT-H/14) with bicubic resampling, center-crop a
224 x 224 square, scale to [0, 1] and normalise with the CLIP mean and std. `to_model_input`
does the same steps on tensors so that gradients reach the pixels: `F.interpolate` with
`mode="bicubic", antialias=True`, which matches PIL's bicubic filter when downsampling (PIL
widens its filter support by the scale factor; `antialias=True` does the same), the same
center crop, then the mean/std normalisation. Images are normalised here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# PIL resampling codes used in preprocessor_config.json ("resample") -> interpolate modes.
_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class ImageInput:
    """What a reward model expects: resize rule, input size, and normalisation."""

    crop: tuple[int, int]  # (h, w) of the model input
    shortest_edge: (
        int | None
    )  # resize the shortest side to this, then center-crop; None: squash to `crop`
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mode: str = "bicubic"  # F.interpolate mode

    @classmethod
    def from_hf_processor(cls, processor) -> ImageInput:
        """Read a transformers CLIP-style image processor (size, crop_size, resample, mean, std)."""
        size, crop = processor.size, processor.crop_size
        mode = _PIL_RESAMPLE.get(int(processor.resample), None)
        if mode is None:
            raise ValueError(
                f"unsupported resample {processor.resample!r} in {type(processor).__name__}"
            )
        if size.shortest_edge:
            if not processor.do_center_crop:
                raise ValueError(
                    "a shortest-edge resize without center crop has no fixed input size"
                )
            return cls(
                (crop.height, crop.width),
                size.shortest_edge,
                _rgb(processor.image_mean),
                _rgb(processor.image_std),
                mode,
            )
        return cls(
            (size.height, size.width),
            None,
            _rgb(processor.image_mean),
            _rgb(processor.image_std),
            mode,
        )

    @classmethod
    def from_open_clip(cls, preprocess_cfg: dict) -> ImageInput:
        """Read an open_clip model's `visual.preprocess_cfg` (size, resize_mode, interpolation, mean, std)."""
        size = preprocess_cfg["size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        resize_mode = preprocess_cfg.get("resize_mode", "shortest")
        mean, std = _rgb(preprocess_cfg["mean"]), _rgb(preprocess_cfg["std"])
        mode = preprocess_cfg.get("interpolation", "bicubic")
        if resize_mode == "squash":
            return cls((h, w), None, mean, std, mode)
        if resize_mode != "shortest" or h != w:
            raise ValueError(
                f"unsupported open_clip preprocessing: resize_mode={resize_mode!r}, size={size!r}"
            )
        return cls((h, w), h, mean, std, mode)


def _rgb(values) -> tuple[float, float, float]:
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ValueError(f"expected 3 channel values, got {values}")
    return values


def to_model_input(images: torch.Tensor, spec: ImageInput, dtype: torch.dtype) -> torch.Tensor:
    """Map images in [-1, 1], (B, 3, H, W) at any size, to normalised model input (B, 3, h, w) in `dtype`."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    # Resampling runs in float32: bf16 bicubic antialias is not implemented everywhere.
    x = (images.float() / 2 + 0.5).clamp(0, 1)
    height, width = x.shape[-2:]
    if spec.shortest_edge is None:
        target = spec.crop
    else:
        # Same rounding as the processors: the long side is truncated, the short side is exact.
        scale = spec.shortest_edge / min(height, width)
        target = (
            (spec.shortest_edge, int(width * scale))
            if height <= width
            else (int(height * scale), spec.shortest_edge)
        )
    if target != (height, width):
        x = F.interpolate(x, size=target, mode=spec.mode, antialias=True, align_corners=False)
        # PIL's output is 8-bit and so clipped to [0, 1]; bicubic can overshoot.
        x = x.clamp(0, 1)
    top = (x.shape[-2] - spec.crop[0]) // 2
    left = (x.shape[-1] - spec.crop[1]) // 2
    x = x[..., top : top + spec.crop[0], left : left + spec.crop[1]]  # (B, 3, h, w)
    mean = x.new_tensor(spec.mean).view(1, 3, 1, 1)
    std = x.new_tensor(spec.std).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype)
