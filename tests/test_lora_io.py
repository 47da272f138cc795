"""LoRA save/load, scales, delta soups and the kohya export, on the tiny SD UNet (CPU, offline)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignprop import checkpoints, lora_io, soups
from alignprop.models import add_lora
from alignprop.tiny import write_tiny_sd

ROOT = Path(__file__).resolve().parents[1]
RANK, ALPHA = 4, 8.0  # alpha != rank, so a lost lora_alpha shows up as a factor-2 error


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    return write_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd")


def fresh_unet(sd_dir: Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(sd_dir, subfolder="unet")


def random_lora_unet(sd_dir: Path, seed: int):
    """A UNet with a LoRA whose B is random (non-zero delta), as if trained."""
    unet = fresh_unet(sd_dir)
    add_lora(unet, rank=RANK, alpha=ALPHA)
    gen = torch.Generator().manual_seed(seed)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.1
    return unet


@pytest.fixture(scope="module")
def loras(sd_dir, tmp_path_factory):
    """Two saved LoRAs with their weight deltas {weight key: dW} relative to the base UNet."""
    base = soups.merged_state_dict(fresh_unet(sd_dir))
    out = {"base": base}
    for name, seed in (("a", 1), ("b", 2)):
        unet = random_lora_unet(sd_dir, seed)
        path = lora_io.save_lora(unet, tmp_path_factory.mktemp(f"lora_{name}"))
        merged = soups.merged_state_dict(unet)
        out[name] = (path, {k: merged[k] - base[k] for k in base})
    return out


def assert_delta(unet, base, expected, atol=1e-6):
    merged = soups.merged_state_dict(unet)
    assert merged.keys() == base.keys()
    worst = max((merged[k] - base[k] - expected[k]).abs().max().item() for k in base)
    assert worst <= atol, worst


def test_saved_lora_loads_in_diffusers_pipeline(sd_dir, loras):
    from diffusers import StableDiffusionPipeline

    path, delta = loras["a"]
    assert path.name == "pytorch_lora_weights.safetensors" and path.is_file()
    assert max(d.abs().max().item() for d in delta.values()) > 0.1  # the LoRA does something
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None)
    pipe.load_lora_weights(path.parent)
    assert_delta(pipe.unet, loras["base"], delta)


def test_save_lora_unwraps_compiled_unet(sd_dir, tmp_path):
    from safetensors.torch import load_file

    unet = random_lora_unet(sd_dir, seed=3)
    plain = load_file(lora_io.save_lora(unet, tmp_path / "plain"))
    compiled = load_file(lora_io.save_lora(torch.compile(unet), tmp_path / "compiled"))
    assert plain.keys() == compiled.keys() and len(plain) > 0
    assert all(torch.equal(plain[k], compiled[k]) for k in plain)


def test_soup_of_one_lora_scales_its_delta(sd_dir, loras, tmp_path):
    path, delta = loras["a"]
    c = 0.3  # mixing factors instead of deltas would give c**2 = 0.09
    soup = soups.write_soup(fresh_unet(sd_dir), [path], [c], tmp_path / "soup")
    unet = fresh_unet(sd_dir)
    lora_io.load_lora(unet, soup, "soup")
    assert_delta(unet, loras["base"], {k: c * d for k, d in delta.items()})


def test_half_half_soup_is_mean_delta(sd_dir, loras, tmp_path):
    (pa, da), (pb, db) = loras["a"], loras["b"]
    mean = {k: 0.5 * (da[k] + db[k]) for k in da}
    soup = soups.write_soup(fresh_unet(sd_dir), [pa, pb], [0.5, 0.5], tmp_path / "soup")
    unet = fresh_unet(sd_dir)
    lora_io.load_lora(unet, soup, "soup")
    assert_delta(unet, loras["base"], mean)
    # the same mix at run time: two adapters with per-adapter scales
    unet = fresh_unet(sd_dir)
    lora_io.load_loras(unet, [(pa, 0.5), (pb, 0.5)])
    assert_delta(unet, loras["base"], mean)


def test_load_scale_zero_is_base(sd_dir, loras):
    path, delta = loras["a"]
    unet = fresh_unet(sd_dir)
    lora_io.load_loras(unet, [(path, 0.0)])
    assert_delta(unet, loras["base"], {k: torch.zeros_like(d) for k, d in delta.items()}, atol=0)


def run_export(src: Path, fmt: str, out: Path) -> Path:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "scripts/export_lora.py", str(src), "--format", fmt, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(proc.stdout.strip().splitlines()[-1])


def test_comfyui_export_round_trips(sd_dir, loras, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    path, delta = loras["a"]
    run = tmp_path / "run"  # a run folder: the export must find final/
    (run / "final").mkdir(parents=True)
    (run / "final" / path.name).write_bytes(path.read_bytes())
    kohya_file = run_export(run, "comfyui", tmp_path / "comfy.safetensors")
    sd = load_file(kohya_file)
    assert all(k.startswith("lora_unet_") for k in sd)
    alphas = [k for k in sd if k.endswith(".alpha")]
    assert alphas and len(alphas) == len([k for k in sd if k.endswith("lora_down.weight")])
    assert {float(sd[k]) for k in alphas} == {ALPHA}
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None)
    pipe.load_lora_weights(str(kohya_file.parent), weight_name=kohya_file.name)
    assert_delta(pipe.unet, loras["base"], delta, atol=1e-5)

    diffusers_file = run_export(path, "diffusers", tmp_path / "d.safetensors")
    assert diffusers_file.read_bytes() == path.read_bytes()


def test_resolve_lora_file_picks_final_then_newest_checkpoint(tmp_path):
    run = tmp_path / "run"
    for step in (9, 10, 11):
        (run / "checkpoints" / f"checkpoint_{step}").mkdir(parents=True)
        (run / "checkpoints" / f"checkpoint_{step}" / lora_io.LORA_WEIGHT_NAME).write_bytes(b"x")
        if step < 11:  # checkpoint_11's save was interrupted: no completeness marker
            (run / "checkpoints" / f"checkpoint_{step}" / checkpoints.COMPLETE_MARKER).write_text(
                "{}"
            )
    assert lora_io.resolve_lora_file(run).parent.name == "checkpoint_10"
    (run / "final").mkdir()
    (run / "final" / lora_io.LORA_WEIGHT_NAME).write_bytes(b"x")
    assert lora_io.resolve_lora_file(run).parent.name == "final"
    with pytest.raises(ValueError, match="no such file"):
        lora_io.resolve_lora_file(tmp_path / "missing")


def test_parse_lora_arg():
    assert lora_io.parse_lora_arg("runs/a:0.5") == ("runs/a", 0.5)
    assert lora_io.parse_lora_arg("runs/a") == ("runs/a", 1.0)
    assert lora_io.parse_lora_arg("C:/x/a.safetensors") == ("C:/x/a.safetensors", 1.0)


def test_a_whole_checkpoint_from_before_the_marker_still_resumes(loras, tmp_path):
    # Checkpoints written before checkpoint_complete.json existed: whole ones count, torn ones not.
    run = tmp_path / "run"
    for step, torn in ((10, False), (20, True)):
        ckpt = checkpoints.checkpoint_dir(run, step)
        ckpt.mkdir(parents=True)
        data = Path(loras["a"][0]).read_bytes()
        (ckpt / lora_io.LORA_WEIGHT_NAME).write_bytes(data[: len(data) // 2] if torn else data)
        for name in checkpoints.LEGACY_FILES[1:]:
            (ckpt / name).write_bytes(b"x")
    assert [p.name for p in checkpoints.list_checkpoints(run)] == ["checkpoint_10"]
    assert checkpoints.latest_checkpoint(run, warn=lambda msg: None).name == "checkpoint_10"
    assert checkpoints.checkpoint_info(run / "checkpoints" / "checkpoint_10")["update"] == 10
    with pytest.raises(lora_io.ConfigError, match="incomplete"):
        checkpoints.checkpoint_info(run / "checkpoints" / "checkpoint_20")
