"""The differentiable JPEG proxy (`compressibility`): its parts against JPEG's, its gradient against
float64 finite differences, its ranking against PIL's real sizes, and a tiny run that shrinks them."""

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from alignprop import rewards
from alignprop.errors import ConfigError
from alignprop.rewards import compressibility as proxy
from alignprop.rewards import jpeg

ROOT = Path(__file__).resolve().parents[1]


def bench():
    spec = importlib.util.spec_from_file_location(
        "jpeg_proxy", ROOT / "benchmarks" / "jpeg_proxy.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("quality", [95, 75, 50, 10])
def test_quant_tables_are_the_ones_pil_writes(quality):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 30, 200)).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    written = Image.open(buf).quantization  # natural (row-major) order
    assert proxy.quant_table(proxy.LUMA_TABLE, quality).flatten().tolist() == list(written[0])
    assert proxy.quant_table(proxy.CHROMA_TABLE, quality).flatten().tolist() == list(written[1])


def test_block_dct_is_jpegs_fdct():
    """c @ block @ c.T against the FDCT's double sum, written out (JPEG spec A.3.3)."""
    g = torch.Generator().manual_seed(0)
    block = torch.rand(8, 8, generator=g, dtype=torch.float64) * 255 - 128
    c = proxy.dct_matrix()
    ours = c @ block @ c.T
    x = torch.arange(8, dtype=torch.float64)
    ref = torch.empty(8, 8, dtype=torch.float64)
    for u in range(8):
        for v in range(8):
            cu, cv = (2**-0.5 if u == 0 else 1.0), (2**-0.5 if v == 0 else 1.0)
            basis = torch.cos((2 * x[:, None] + 1) * u * torch.pi / 16) * torch.cos(
                (2 * x[None, :] + 1) * v * torch.pi / 16
            )
            ref[u, v] = 0.25 * cu * cv * (block * basis).sum()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)


def test_smooth_round_is_continuous_and_rounds_integers():
    y = torch.linspace(-3, 3, 6001, dtype=torch.float64)
    r = proxy.smooth_round(y)
    assert torch.equal(proxy.smooth_round(torch.arange(-3.0, 4.0)), torch.arange(-3.0, 4.0))
    assert (r.diff() >= 0).all()  # increasing
    assert r.diff().abs().max() < 4 * 1e-3  # no jump, at half-integers either (slope <= 3)
    assert ((r - torch.round(y)).abs() <= 0.5 + 1e-12).all()


def test_gradient_matches_float64_finite_differences():
    """gradcheck in float64 on non-square images that need padding (luma to 16, chroma to 8)."""
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(2, 3, 13, 21, generator=g, dtype=torch.float64) * 1.6 - 0.8).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: proxy.jpeg_bytes(t, 95), (x,), eps=1e-6, atol=1e-5)


def test_proxy_ranks_images_by_their_real_jpeg_size():
    """On 40 synthetic images of random size and content: Spearman with PIL's sizes. The benchmark's
    held-out figure on 300 photo crops and synthetic images is 0.996 (README); 0.97 leaves room for
    the small sample."""
    b = bench()
    g = torch.Generator().manual_seed(5)
    imgs = [b.synthetic(g) for _ in range(40)]
    real = torch.tensor([b.real_bytes(img, 95) for img in imgs], dtype=torch.float64)
    ours = torch.cat([proxy.jpeg_bytes(img[None].double() / 127.5 - 1) for img in imgs])
    assert b.spearman(ours, real) > 0.97, b.spearman(ours, real)
    assert ((ours - real).abs() / real).median() < 0.15  # and it is a size, not only a rank


def test_rewards_are_signed_sizes_with_a_gradient_that_shrinks_the_file():
    cfg = rewards.default_config()
    comp = rewards.get_reward("compressibility", cfg, "cpu", torch.float32)
    incomp = rewards.get_reward("incompressibility", cfg, "cpu", torch.float32)
    assert rewards.is_differentiable("compressibility") and not rewards.is_differentiable("jpeg")
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(2, 3, 64, 48, generator=g) * 2 - 1).requires_grad_()
    r, info = comp(x, ["a", "b"])
    r2, _ = incomp(x, ["a", "b"])
    assert r.shape == (2,) and r.dtype == torch.float32 and (r < 0).all()
    torch.testing.assert_close(r2, -r)
    info["loss"].sum().backward()
    before = [jpeg.jpeg_kb(img) for img in x.detach()]
    assert x.grad.abs().sum() > 0
    y = x.detach().clone()
    for _ in range(10):  # a few normalised steps down the proxy's gradient
        y.requires_grad_()
        (grad,) = torch.autograd.grad(comp(y, ["a", "b"])[1]["loss"].sum(), y)
        y = (y - grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).clamp(-1, 1).detach()
    after = [jpeg.jpeg_kb(img) for img in y.detach()]
    assert all(a < b for a, b in zip(after, before, strict=True)), (before, after)


def test_quality_is_checked_and_reaches_jpeg():
    cfg = rewards.default_config()
    cfg.compressibility.quality = 0
    with pytest.raises(ConfigError, match="compressibility.quality"):
        rewards.get_reward("compressibility", cfg, "cpu", torch.float32)
    cfg.compressibility.quality = 40
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    low = rewards.get_reward("jpeg", cfg, "cpu", torch.float32)(x, ["a"])[0]
    cfg.compressibility.quality = 95
    high = rewards.get_reward("jpeg", cfg, "cpu", torch.float32)(x, ["a"])[0]
    assert low > high  # a lower quality writes a smaller file


def test_benchmark_cli(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "jpeg_proxy.py"), "--count", "16", "--fit"]
    proc = subprocess.run(
        [*cmd, "--out", str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "jpeg_proxy.json").read_text())
    assert result["images"] == 16 and set(result["coefs"]) == {"header", "block", "nonzero", "bit"}
    bad = subprocess.run(
        [*cmd, "--photos", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert bad.returncode != 0 and "--photos" in bad.stderr and "Traceback" not in bad.stderr


def test_tiny_run_raises_real_jpeg_compressibility(tmp_path, tiny_overrides):
    """AlignProp on the proxy for 40 updates makes the real PIL files smaller at fixed eval noise
    (seeds 0, 1, 2 saved 0.06, 0.07, 0.14 kB per image)."""
    cmd = [
        sys.executable, str(ROOT / "scripts" / "train.py"),
        "--config", str(ROOT / "config" / "align_prop.py") + ":tiny_compressibility",
        f"--config.logdir={tmp_path}", "--config.run_name=c",
        "--config.eval_freq=40", "--config.save_freq=40",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [
        json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()
    ]
    evals = [r["eval/jpeg_mean"] for r in rows if "eval/jpeg_mean" in r]
    assert len(evals) == 2 and evals[-1] > evals[0] + 0.02, evals  # kB saved per image
