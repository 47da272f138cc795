"""How well the differentiable JPEG proxy (`compressibility`) ranks images by their real JPEG size.

Builds a few hundred images: random crops, at random sizes and scales, of the photos in
`--photos` (a folder of images, or a .whl / .zip holding some, e.g. scikit-image's wheel, whose
skimage/data/ has 20-odd photographs: `pip download --no-deps scikit-image -d DIR`), and
synthetic images (blurred noise at random scales and contrasts, gratings, flat shapes, gradients
with grain). Each is quantised to 8 bits, encoded by PIL at `--quality`, and scored by the proxy
on the same 8-bit pixels. Images are split in two by source (a photo's crops all land on one
side): `--fit` fits the proxy's four constants by least squares on one half and prints them;
the rank correlation (Spearman) and the linear one (Pearson) of proxy and real size are reported
on the other half, with the shipped constants (or the fitted ones with --fit).

  python benchmarks/jpeg_proxy.py --photos DIR_OR_WHEEL [--count 300] [--fit] [--out DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import zipfile
from pathlib import Path

import torch

from alignprop import cli

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def read_photos(source: str) -> list:
    """PIL RGB images from a folder or an archive (.whl / .zip); [] for ""."""
    from PIL import Image

    from alignprop.errors import ConfigError

    if not source:
        return []
    path = Path(source).expanduser()
    blobs = []
    if path.is_dir():
        blobs = [
            (p.name, p.read_bytes())
            for p in sorted(path.rglob("*"))
            if p.suffix.lower() in SUFFIXES
        ]
    elif path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            blobs = [
                (n, z.read(n)) for n in sorted(z.namelist()) if Path(n).suffix.lower() in SUFFIXES
            ]
    else:
        raise ConfigError(f"--photos {source}: not a folder or a .whl/.zip archive")
    photos = []
    for _name, data in blobs:
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except Exception:  # noqa: BLE001 - a file that is not an image is skipped
            continue
        if min(img.size) >= 64:
            photos.append(img.convert("RGB"))
    if not photos:
        raise ConfigError(f"--photos {source}: no image of at least 64 px found")
    return photos


def photo_crop(img, g: torch.Generator):
    """A random crop of a random size (48..256 px a side) at a random downscale (1..4)."""
    from PIL import Image

    scale = 1 + 3 * torch.rand((), generator=g).item()
    w, h = img.size
    small = img.resize((max(64, int(w / scale)), max(64, int(h / scale))), Image.BICUBIC)
    cw = int(torch.randint(48, min(256, small.size[0]) + 1, (), generator=g))
    ch = int(torch.randint(48, min(256, small.size[1]) + 1, (), generator=g))
    x0 = int(torch.randint(0, small.size[0] - cw + 1, (), generator=g))
    y0 = int(torch.randint(0, small.size[1] - ch + 1, (), generator=g))
    arr = torch.frombuffer(
        bytearray(small.crop((x0, y0, x0 + cw, y0 + ch)).tobytes()), dtype=torch.uint8
    )
    return arr.view(ch, cw, 3).permute(2, 0, 1).clone()


def synthetic(g: torch.Generator) -> torch.Tensor:
    """(3, H, W) uint8: one of four kinds of image, at a random size."""
    import torch.nn.functional as F

    h, w = (int(torch.randint(32, 257, (), generator=g)) for _ in range(2))
    kind = int(torch.randint(0, 4, (), generator=g))
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    if kind == 0:  # noise blurred at a random scale, random contrast
        sigma = 0.3 + 8 * u(()).item()
        x = torch.randn(1, 3, h, w, generator=g)
        k = int(2 * round(3 * sigma) + 1)
        t = torch.arange(k, dtype=torch.float32) - k // 2
        kern = torch.exp(-(t**2) / (2 * sigma**2))
        kern = kern / kern.sum()
        x = F.conv2d(
            F.pad(x, (k // 2,) * 4, mode="reflect"),
            kern.view(1, 1, 1, k).expand(3, 1, 1, k),
            groups=3,
        )
        x = F.conv2d(x, kern.view(1, 1, k, 1).expand(3, 1, k, 1), groups=3)[0]
        x = x / x.std().clamp_min(1e-6) * (0.05 + 0.4 * u(()).item()) + u(3, 1, 1)
    elif kind == 1:  # gratings
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        x = torch.zeros(3, h, w)
        for _ in range(int(torch.randint(1, 4, (), generator=g))):
            f, a = 0.5 * u(2), 2 * torch.pi * u(()).item()
            x += 0.3 * u(3, 1, 1) * torch.sin(f[0] * xx + f[1] * yy + a)
        x += 0.5
    elif kind == 2:  # flat shapes on a flat ground
        x = u(3, 1, 1).expand(3, h, w).clone()
        for _ in range(int(torch.randint(1, 12, (), generator=g))):
            x0, y0 = int(u(()) * w), int(u(()) * h)
            x[:, y0 : y0 + int(u(()) * h / 2) + 1, x0 : x0 + int(u(()) * w / 2) + 1] = u(3, 1, 1)
    else:  # gradient with grain
        ramp = torch.linspace(0, 1, w).view(1, 1, w) * u(3, 1, 1) + torch.linspace(0, 1, h).view(
            1, h, 1
        ) * u(3, 1, 1)
        x = ramp / 2 + 0.1 * u(()).item() * torch.randn(3, h, w, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def real_bytes(img: torch.Tensor, quality: int) -> int:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img.permute(1, 2, 0).contiguous().numpy()).save(
        buf, format="JPEG", quality=quality
    )
    return buf.tell()


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean rank), float64."""
    order = torch.argsort(x)
    r = torch.empty_like(x, dtype=torch.float64)
    r[order] = torch.arange(len(x), dtype=torch.float64)
    for v in torch.unique(x):
        m = x == v
        if m.sum() > 1:
            r[m] = r[m].mean()
    return r


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return pearson(ranks(a), ranks(b))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--photos", default="", help="folder or .whl/.zip of photos ('' = synthetic only)"
    )
    p.add_argument(
        "--count", type=int, default=300, help="images in all (half from photos when given)"
    )
    p.add_argument("--quality", type=int, default=95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--fit", action="store_true", help="fit the constants on the fit half and print them"
    )
    p.add_argument("--out", default="", help="folder for jpeg_proxy.json ('' = print only)")
    args = p.parse_args(argv)
    from alignprop.errors import ConfigError
    from alignprop.rewards import compressibility as proxy

    if args.count < 8:
        raise ConfigError(f"--count must be >= 8, got {args.count}")
    if not 1 <= args.quality <= 100:
        raise ConfigError(f"--quality must be in 1..100, got {args.quality}")
    g = torch.Generator().manual_seed(args.seed)
    photos = read_photos(args.photos)
    items = []  # (uint8 image, source id, kind)
    n_photo = args.count // 2 if photos else 0
    for i in range(n_photo):
        src = i % len(photos)
        items.append((photo_crop(photos[src], g), src, "photo"))
    for i in range(args.count - n_photo):
        items.append((synthetic(g), 10_000 + i, "synthetic"))
    real = torch.tensor([real_bytes(img, args.quality) for img, _, _ in items], dtype=torch.float64)
    feats = torch.stack(
        [
            proxy.features(img[None].double() / 127.5 - 1, args.quality)[0].detach()
            for img, _, _ in items
        ]
    )
    held = torch.tensor([src % 2 == 1 for _, src, _ in items])
    design = torch.cat([torch.ones(len(items), 1, dtype=torch.float64), feats], dim=1)
    if args.fit:
        sol = torch.linalg.lstsq(design[~held], real[~held, None]).solution[:, 0]
        coefs = dict(
            zip(
                ("header", "block", "nonzero", "bit"),
                (round(float(v), 4) for v in sol),
                strict=True,
            )
        )
    else:
        coefs = dict(proxy.COEFS)
    pred = design @ design.new_tensor(
        [coefs["header"], coefs["block"], coefs["nonzero"], coefs["bit"]]
    )
    kinds = [k for _, _, k in items]
    result = {
        "quality": args.quality,
        "images": len(items),
        "held_out": int(held.sum()),
        "coefs": coefs,
    }
    for subset in ("all", "photo", "synthetic"):
        m = held & torch.tensor([subset in ("all", k) for k in kinds])
        if m.sum() >= 4:
            result[subset] = {
                "n": int(m.sum()),
                "spearman": round(spearman(pred[m], real[m]), 4),
                "pearson": round(pearson(pred[m], real[m]), 4),
                "median_abs_rel_err": round(
                    float(((pred[m] - real[m]).abs() / real[m]).median()), 4
                ),
            }
    print(json.dumps(result, indent=1))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "jpeg_proxy.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, sys.argv[1:]))
