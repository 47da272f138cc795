"""Differentiable JPEG compressibility: a bit-rate proxy of baseline JPEG that has a pixel gradient.

`jpeg` scores the real encoded size (PIL, no gradient: RL only). This reward follows what a
baseline JPEG encoder does, with every step differentiable, so AlignProp can train on it:

  RGB in [0, 255] -> YCbCr (JFIF) -> chroma 2x2 box-averaged (4:2:0, PIL's default) -> planes
  padded by edge replication to whole 8x8 blocks (16x16 for luma: the 4:2:0 MCU) -> level
  shift -128 -> orthonormal 8x8 DCT-II (JPEG's FDCT) -> divided by the quality-scaled Annex K
  tables (libjpeg's scaling) -> smooth rounding  q + 4 (y - q)^3, q = round(y)  (Shin & Song's
  2017 cubic pass-through, scaled by 4 so that it is continuous at half-integers: each
  rounding bin maps onto itself, slope 0 at integers, 3 at the bin edges) -> DC coded as the difference to the previous
  block of its plane, as JPEG's DPCM does.

The size estimate counts what the entropy coder pays for: each nonzero quantised coefficient
costs a Huffman code for its (run, size) symbol, about constant, plus `size` raw bits, where
size = floor(log2 |v|) + 1 is log2(1 + |v|) at every |v| = 2^k - 1 and close between. So

  bytes ~ c_block * blocks + c_nonzero * sum min(|v|, 1) + c_bit * sum log2(1 + |v|) + c_header

over all coefficients v of all planes; min(|v|, 1) is a soft nonzero count (a coefficient that
rounds to 0 counts 4|y|^3 <= 0.5, 0.125 on average). The four constants were fitted by least squares to
PIL's real sizes at quality 95 by `python benchmarks/jpeg_proxy.py --fit` (photo crops and
synthetic images; the README gives the rank correlation on held-out images). The nonzero count
and the bits are nearly collinear, so the split between c_nonzero and c_bit is loose; their sum
per coefficient is what the fit pins.

reward `compressibility` = -kB (loss kB: gradients make the image cheaper to encode);
reward `incompressibility` = +kB (loss -kB).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from alignprop.errors import ConfigError

# JPEG Annex K.1 / K.2: the example luminance and chrominance quantisation tables (quality 50)
LUMA_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
CHROMA_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
) + ((99,) * 8,) * 4

# bytes = c_header + c_block*blocks + c_nonzero*nonzero + c_bit*bits, fitted at quality 95 by
# `python benchmarks/jpeg_proxy.py --fit` (see the module docstring)
COEFS = {"header": 692.5565, "block": 1.0847, "nonzero": 0.1945, "bit": 0.236}
FIT_QUALITY = 95


def quant_table(base: tuple, quality: int) -> torch.Tensor:
    """libjpeg's jpeg_quality_scaling of an Annex K table: (8, 8) float64 steps in [1, 255]."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    table = (torch.tensor(base, dtype=torch.int64) * scale + 50) // 100
    return table.clamp(1, 255).double()


@functools.cache
def dct_matrix(n: int = 8) -> torch.Tensor:
    """(n, n) orthonormal DCT-II in float64: row k is a_k cos(pi (2i + 1) k / 2n)."""
    i = torch.arange(n, dtype=torch.float64)
    m = torch.cos(torch.pi * (2 * i[None, :] + 1) * i[:, None] / (2 * n)) * (2 / n) ** 0.5
    m[0] /= 2**0.5
    return m


def smooth_round(y: torch.Tensor) -> torch.Tensor:
    """q + 4 (y - q)^3 with q = round(y): equal to round(y) at integers, continuous and increasing
    everywhere, slope 12 (y - q)^2 (0 at integers, 3 at half-integers)."""
    q = torch.round(y).detach()
    return q + 4 * (y - q) ** 3


def to_ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 255] -> JFIF YCbCr, same shape."""
    m = rgb.new_tensor(
        [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]
    )
    ycc = torch.einsum("ij,bjhw->bihw", m, rgb)
    return ycc + rgb.new_tensor([0.0, 128.0, 128.0]).view(1, 3, 1, 1)


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad (B, C, H, W) on the bottom and right to multiples of `multiple`."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


def _coefficients(plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) level-shifted plane, H and W multiples of 8 -> (B, blocks, 8, 8) quantised DCT."""
    b, _, h, w = plane.shape
    blocks = plane.reshape(b, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)
    blocks = blocks.reshape(b, -1, 8, 8)  # raster block order, as the scan visits them
    c = dct_matrix().to(plane)
    return smooth_round(c @ blocks @ c.T / table.to(plane))


def features(images: torch.Tensor, quality: int) -> torch.Tensor:
    """(B, 3) per image: [blocks, soft nonzero count, magnitude bits], differentiable w.r.t. images."""
    rgb = (images.clamp(-1, 1) + 1) * 127.5
    ycc = to_ycbcr(rgb)
    luma = _pad_to(ycc[:, :1], 16)
    chroma = F.avg_pool2d(_pad_to(ycc[:, 1:], 2), 2)
    chroma = _pad_to(chroma, 8)
    tables = (quant_table(LUMA_TABLE, quality), quant_table(CHROMA_TABLE, quality))
    planes = [(luma, tables[0]), (chroma[:, :1], tables[1]), (chroma[:, 1:], tables[1])]
    blocks = nonzero = bits = 0
    for plane, table in planes:
        v = _coefficients(plane - 128.0, table)  # (B, N, 8, 8)
        dc = v[:, :, 0, 0]
        dc_diff = torch.diff(dc, dim=1, prepend=torch.zeros_like(dc[:, :1]))
        ac = v.flatten(2)[:, :, 1:]
        coded = torch.cat([dc_diff, ac.flatten(1)], dim=1).abs()  # (B, N * 64)
        blocks = blocks + v.shape[1]
        nonzero = nonzero + coded.clamp(max=1.0).sum(1)
        bits = bits + torch.log2(1 + coded).sum(1)
    return torch.stack([torch.full_like(bits, float(blocks)), nonzero, bits], dim=1)


def jpeg_bytes(images: torch.Tensor, quality: int = FIT_QUALITY) -> torch.Tensor:
    """(B,) the proxy's JPEG size in bytes of images (B, 3, H, W) in [-1, 1]; float64 where images are."""
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    f = features(images.to(dtype), quality)
    c = COEFS
    return c["header"] + f @ f.new_tensor([c["block"], c["nonzero"], c["bit"]])


def _quality(cfg) -> int:
    q = cfg.compressibility.quality
    if isinstance(q, bool) or not isinstance(q, int) or not 1 <= q <= 100:
        raise ConfigError(
            f"reward_models.compressibility.quality={q!r}: give the JPEG quality, an integer in 1..100"
        )
    return q


def _make(cfg, sign: float):
    quality = _quality(cfg)

    def reward_fn(images: torch.Tensor, prompts) -> tuple[torch.Tensor, dict]:
        kb = jpeg_bytes(images, quality) / 1000
        rewards = (sign * kb).float()
        return rewards, {"loss": -rewards}

    return reward_fn


def make_reward(cfg, device: torch.device | str, dtype: torch.dtype):
    """Compressibility: reward -kB of the proxy's JPEG size, loss kB."""
    return _make(cfg, -1.0)


def make_incompressibility(cfg, device: torch.device | str, dtype: torch.dtype):
    """Incompressibility: reward +kB of the proxy's JPEG size, loss -kB."""
    return _make(cfg, 1.0)
