"""scripts/sample.py, scripts/evaluate.py and scripts/report.py, run as scripts on the tiny models (CPU, offline)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from alignprop import lora_io
from alignprop.models import add_lora
from alignprop.tiny import write_tiny

ROOT = Path(__file__).resolve().parents[1]
TINY_EVAL = [  # the evaluate config, shrunk to the tiny models: 2 prompts, 2 DDIM steps
    "--config",
    "config/align_prop.py:evaluate",
    "--config.tiny=True",
    "--config.device=cpu",
    "--config.mixed_precision=no",
    "--config.sample.resolution=0",
    "--config.sample.num_steps=2",
    "--config.sample.batch_size=2",
    "--config.prompts.num_eval=2",
    "--config.reward=aesthetic",
    "--config.eval_rewards=hps",
    "--config.eval_repeats=1",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    write_tiny(out)
    return out


@pytest.fixture(scope="module")
def env(tiny_dir) -> dict:
    # ensure_tiny() reuses the folder that holds overrides.json; one OpenMP thread because
    # spin-waiting threads on two shared cores make the tiny convolutions ~100x slower.
    return dict(
        os.environ, ALIGNPROP_TINY_DIR=str(tiny_dir), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"
    )


def run(script: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, f"scripts/{script}", *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    """Two 'trained' LoRAs (random non-zero B) laid out as a run folder and as a checkpoint folder."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("runs")
    where = {
        "run": root / "run_a" / "final",
        "ckpt": root / "run_b" / "checkpoints" / "checkpoint_5",
    }
    for seed, folder in enumerate(where.values()):
        unet = UNet2DConditionModel.from_pretrained(tiny_dir / "sd", subfolder="unet")
        add_lora(unet, rank=4, alpha=4.0)
        gen = torch.Generator().manual_seed(seed)
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.data = torch.randn(p.shape, generator=gen) * 0.2
        lora_io.save_lora(unet, folder)
    return {"run": root / "run_a", "ckpt": where["ckpt"]}


def pixels(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


SAMPLE = ["--tiny", "--device", "cpu", "--steps", "2", "--num-per-prompt", "2", "--batch-size", "3"]
PROMPTS = ["a cat", "a red dog"]


def test_sample_writes_images_with_metadata_and_lora_scale(env, trained, tmp_path):
    from PIL import Image

    base, zero, one = tmp_path / "base", tmp_path / "zero", tmp_path / "one"
    run("sample.py", [*PROMPTS, *SAMPLE, "--seed", "7", "--out", base], env)
    names = sorted(p.name for p in base.glob("*.png"))
    assert names == [
        "0000_a_cat_seed7.png",
        "0001_a_cat_seed8.png",
        "0002_a_red_dog_seed9.png",
        "0003_a_red_dog_seed10.png",
        "grid.png",
    ]
    info = Image.open(base / "0002_a_red_dog_seed9.png").text
    assert info["prompt"] == "a red dog" and info["seed"] == "9"
    assert json.loads(info["alignprop"])["steps"] == 2
    assert Image.open(base / "grid.png").size[1] > 64  # images plus caption strips

    lora = trained["run"]
    run("sample.py", [*PROMPTS, *SAMPLE, "--seed", "7", "--lora", f"{lora}:0", "--out", zero], env)
    run("sample.py", [*PROMPTS, *SAMPLE, "--seed", "7", "--lora", f"{lora}:1", "--out", one], env)
    for name in names[:-1]:
        assert np.array_equal(pixels(base / name), pixels(zero / name)), name
        assert np.abs(pixels(base / name) - pixels(one / name)).mean() > 1.0, name
    assert json.loads(Image.open(one / names[0]).text["alignprop"])["loras"][0]["scale"] == 1.0


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_evaluate_two_checkpoints_two_rewards_is_deterministic(env, trained, tmp_path):
    outs = [tmp_path / "e1", tmp_path / "e2"]
    for out in outs:
        args = ["--checkpoints", trained["run"], trained["ckpt"], "--no-base", "--out", out]
        run("evaluate.py", [*args, *TINY_EVAL], env)
    rows = read_csv(outs[0] / "results.csv")
    assert [r["checkpoint"] for r in rows] == ["run_a", "run_b/checkpoint_5"]
    assert {k for k in rows[0] if k.endswith("_mean")} == {"aesthetic_mean", "hps_mean"}
    assert rows[0]["hps_mean"] != rows[1]["hps_mean"]  # the LoRAs were applied
    table = [
        line for line in (outs[0] / "results.md").read_text().splitlines() if line.startswith("|")
    ]
    assert table[0] == "| checkpoint | aesthetic | hps |"
    assert len(table) == 2 + 2 and all(line.count("±") == 2 for line in table[2:])
    for name in ("results.csv", "results.md", "scores.csv"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    grids = sorted(p.name for p in outs[0].glob("grid_*.png"))
    assert grids == ["grid_run_a.png", "grid_run_b_checkpoint_5.png"]
    assert np.array_equal(pixels(outs[0] / grids[0]), pixels(outs[1] / grids[0]))


def test_evaluate_mix_endpoints_match_base_and_checkpoint(env, trained, tmp_path):
    out = tmp_path / "mix"
    args = ["--checkpoints", trained["run"], "--mix", trained["run"], "--coefs", "0,1"]
    run("evaluate.py", [*args, "--out", out, *TINY_EVAL], env)
    rows = {r["checkpoint"]: r for r in read_csv(out / "results.csv")}
    assert list(rows) == ["base", "run_a", "run_a x0", "run_a x1"]

    def scores(label: str) -> dict:
        return {k: v for k, v in rows[label].items() if k not in ("checkpoint", "loras")}

    assert scores("run_a x0") == scores("base") and scores("run_a x1") == scores("run_a")
    assert scores("base") != scores("run_a")


def test_evaluate_two_lora_soup_writes_the_two_reward_tradeoff(env, trained, tmp_path):
    """The paper's soup of two runs: (1 - c) A + c B along c, rewards[0] against rewards[1]."""
    out = tmp_path / "soup"
    args = ["--no-base", "--checkpoints", trained["run"], "--mix", trained["run"], trained["ckpt"]]
    tiny_eval = [a for a in TINY_EVAL if not a.startswith("--config.eval_rewards")]
    proc = run("evaluate.py", [*args, "--coefs", "0,0.5,1", "--out", out, *tiny_eval,
                               "--config.eval_rewards=jpeg"], env)  # fmt: skip
    table = (out / "mix_tradeoff.md").read_text().splitlines()
    assert table[0] == "| c (weight of B) | aesthetic | jpeg |" and len(table) == 5
    assert table[2].startswith("| 0 |") and table[4].startswith("| 1 |")
    assert "| c (weight of B) |" in proc.stdout
    rows = {r["checkpoint"]: r for r in read_csv(out / "results.csv")}
    c0 = [float(v) for v in table[2].strip("|").split("|")[1:]]
    assert c0 == pytest.approx(
        [float(rows["run_a"]["aesthetic_mean"]), float(rows["run_a"]["jpeg_mean"])], rel=1e-3
    )
    assert (out / "mix_tradeoff.png").stat().st_size > 1000


def test_report_writes_html_and_plots(env, tmp_path):
    from PIL import Image

    run_dir = tmp_path / "run"
    (run_dir / "images").mkdir(parents=True)
    rows = []
    for step in range(1, 7):
        row = {
            "step": step,
            "samples_seen": 4 * step,
            "reward_mean": 0.1 * step,
            "reward_std": 0.01,
            "loss": -0.1 * step,
            "K_mean": 1 + step % 3,
            "grad_norm": 1.0,
            "lr": 1e-3,
            "sec_per_step": 0.5,
            "peak_mem_gib": 1.0,
            "reward/aesthetic_mean": 0.1 * step,
        }
        if step % 3 == 0:
            row.update({"eval/reward_mean": 0.2 * step, "eval/hps_mean": "nan"})
            Image.new("RGB", (64, 80), "gray").save(run_dir / "images" / f"eval_{step:06d}.png")
        rows.append(json.dumps(row))
    (run_dir / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 7, "rew')  # torn line
    (run_dir / "config.json").write_text(json.dumps({"name": "tiny", "reward": "aesthetic"}))
    proc = run("report.py", [run_dir], env)
    html = run_dir / "report.html"
    assert proc.stdout.strip().endswith("report.html") and html.is_file()
    plots = {p.name for p in (run_dir / "report").glob("*.png")}
    expected = {"reward.png", "eval_rewards.png", "reward_parts.png", "k_hist.png", "speed.png"}
    assert expected <= plots
    text = html.read_text()
    for name in expected:
        assert f"src='report/{name}'" in text
    assert "src='images/eval_000003.png'" in text and "src='images/eval_000006.png'" in text
    assert text.index("eval_000003") < text.index("eval_000006")
    assert all(Image.open(run_dir / "report" / p).size[0] > 100 for p in plots)
