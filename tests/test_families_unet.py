"""SDXL and SD 2.x (v-prediction) on the same training step, at any aspect ratio (tiny kits, CPU).

Parity with diffusers' own pipelines (DDIM, eta 0, same x_T and guidance), LoRA-only gradients,
checkpointing and truncation, the fp16 VAE rule, tiny training runs through scripts/train.py
(learn, resume bitwise, LoRA loads in the diffusers pipeline) and one-line errors.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from alignprop import checks, lora_io, models, solvers, soups, tiny
from alignprop.errors import ConfigError
from alignprop.families import SD, SDXL, Pretrained, check_family

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a cat", "an oil painting of two dogs"]
PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "sd2": "StableDiffusionPipeline"}
FAMILY = {"sdxl": SDXL, "sd2": SD}
CONFIG = {"sdxl": "tiny_sdxl", "sd2": "tiny_sd2"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def kits(tiny_overrides) -> dict[str, str]:
    """The tiny SDXL and SD2 folders in the session cache (the ones train.py's subprocesses use)."""
    return {k: tiny.ensure_tiny_model(k) for k in ("sdxl", "sd2")}


@pytest.fixture(scope="module")
def fams(kits):
    return {k: FAMILY[k].load(Pretrained(d)).freeze("cpu") for k, d in kits.items()}


def pipeline(kit: str, folder: str, dtype=torch.float32, **scheduler_overrides):
    import diffusers

    pipe = getattr(diffusers, PIPELINES[kit]).from_pretrained(folder, dtype=dtype)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(
        pipe.scheduler.config, **scheduler_overrides
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(h: int, w: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(
        (len(PROMPTS), 4, h // 8, w // 8), generator=torch.Generator().manual_seed(seed)
    ).to(dtype)


# ---------------------------------------------------------------- parity with diffusers


@pytest.mark.parametrize(
    "kit, h, w, sched",
    [
        ("sdxl", 64, 64, {}),
        ("sdxl", 64, 96, {}),
        ("sd2", 96, 64, {}),
        ("sd2", 64, 64, {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True}),
    ],
    ids=["sdxl-64x64", "sdxl-64x96", "sd2v-96x64", "sd2v-trailing-zero-snr"],
)
def test_no_grad_sampling_equals_diffusers_pipeline(kits, kit, h, w, sched):
    """Our DDIM + family conditioning reproduce the family's own pipeline (eta 0, CFG, same x_T).

    In float64: in float32 diffusers' pipeline differs from itself by up to 2.4e-4 between batch
    sizes 1 and 2 on an AVX-512/AMX CPU (these 8-step chains amplify round-off), so only float64
    tells a bug from rounding. Measured in float64: SDXL 3.6e-13 / 6.3e-13, SD2 ~1e-14 (atol 1e-10)."""
    from diffusers import DDIMScheduler

    f64 = torch.float64
    pipe = pipeline(kit, kits[kit], f64, **sched)
    fam = FAMILY[kit].load(Pretrained(kits[kit]), f64).freeze("cpu")
    fam.scheduler = DDIMScheduler.from_config(fam.scheduler.config, **sched)
    x_t, gs = latents(h, w, dtype=f64), 5.0
    with torch.no_grad():
        ref = pipe(
            PROMPTS, latents=x_t.clone(), num_inference_steps=8, guidance_scale=gs, eta=0.0,
            height=h, width=w, output_type="pt",
        ).images  # fmt: skip
        ours, info = solvers.sample(
            fam, fam.encode(PROMPTS), fam.encode_negative(""), solvers.Sampling(8, gs),
            latents=x_t.clone(),
        )  # fmt: skip
    ours = (ours / 2 + 0.5).clamp(0, 1)
    assert info["K"] == 0 and ours.shape == ref.shape == (2, 3, h, w)
    assert fam.prediction_type == ("v_prediction" if kit == "sd2" else "epsilon")
    assert ref.std() > 1e-3  # not a constant image that anything would match
    assert ours.dtype == ref.dtype == f64
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)


def test_sdxl_negative_prompt_as_the_pipeline_builds_it(kits, fams):
    """Empty negative prompt: zeros (force_zeros_for_empty_prompt); a real one: encoded like the pipeline."""
    fam, pipe = fams["sdxl"], pipeline("sdxl", kits["sdxl"])
    assert fam.force_zeros_for_empty_prompt
    empty = fam.encode_negative("")
    assert all(float(v.abs().max()) == 0 for v in empty.tensors.values())
    with torch.no_grad():
        _, neg, _, neg_pooled = pipe.encode_prompt(
            PROMPTS[:1], device="cpu", negative_prompt="blurry"
        )
    got = fam.encode_negative("blurry")
    torch.testing.assert_close(got["encoder_hidden_states"], neg, rtol=0, atol=0)
    torch.testing.assert_close(got["text_embeds"], neg_pooled, rtol=0, atol=0)


# ---------------------------------------------------------------- gradients


class Counting(torch.nn.Module):
    """Delegates to the UNet and records whether autograd was on at each call."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.flags = unet, []

    def forward(self, *args, **kwargs):
        self.flags.append(torch.is_grad_enabled())
        return self.unet(*args, **kwargs)


@pytest.mark.parametrize("kit", ["sdxl", "sd2"])
def test_lora_only_gradients_checkpointing_and_k_once(kits, kit, monkeypatch):
    # float64: the recomputed (checkpointed) gradient is the same arithmetic, so it must agree
    # to float64 round-off; fp32 would leave ~1e-5..1e-4 of CPU-dependent chain noise
    fam = FAMILY[kit].load(Pretrained(kits[kit]), torch.float64).freeze("cpu")
    params = models.add_lora(fam.unet)
    fam.unet.double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B starts at zero; random B lets every LoRA weight get a gradient
        for n, p in fam.unet.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    cond, uncond = fam.encode(PROMPTS), fam.encode_negative("")
    fixed = solvers.Truncation("fixed", 2, 1, 1, 42.0, 5.0)
    grads = {}
    for ckpt in (False, True):
        for p in fam.unet.parameters():
            p.grad = None
        counter = Counting(fam.unet)
        images, info = solvers.sample(
            fam, cond, uncond, solvers.Sampling(4, 5.0, grad_checkpoint=ckpt), model=counter,
            truncation=fixed, latents=latents(64, 96, dtype=torch.float64),
        )  # fmt: skip
        images.square().mean().backward()
        assert info["K"] == 2 and len(counter.flags) == 4 + (2 if ckpt else 0)
        assert counter.flags[:4] == [False, False, True, True] or ckpt
        grads[ckpt] = {n: p.grad.clone() for n, p in fam.unet.named_parameters() if "lora_" in n}
    # only LoRA parameters get gradients, and most of them a nonzero one
    for module in fam.modules():
        for n, p in module.named_parameters():
            assert ("lora_" in n) == (p.grad is not None), n
    assert sum(float(g.abs().sum()) > 0 for g in grads[False].values()) > 0.8 * len(params)
    scale = max(float(g.abs().max()) for g in grads[False].values())
    for n, g in grads[False].items():  # recomputation: the same LoRA gradient
        torch.testing.assert_close(
            grads[True][n], g, rtol=0, atol=1e-12 * scale, msg=n
        )  # measured: bitwise equal

    draws = []
    original = solvers.Truncation.draw
    monkeypatch.setattr(
        solvers.Truncation,
        "draw",
        lambda self, *a, **k: draws.append(original(self, *a, **k)) or draws[-1],
    )
    counter = Counting(fam.unet)
    uniform = solvers.Truncation("uniform", 1, 1, 5, 42.0, 5.0)
    solvers.sample(
        fam, cond, uncond, solvers.Sampling(5, 5.0), model=counter, truncation=uniform,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert len(draws) == 1, "K must be drawn once per trajectory"
    assert counter.flags == [False] * (5 - draws[0]) + [True] * draws[0]


# ---------------------------------------------------------------- fp16 VAE rule


def test_fp16_stock_sdxl_vae_decodes_in_fp32_and_fixed_vae_stays_fp16(kits, tmp_path):
    from diffusers import AutoencoderKL

    with pytest.warns(UserWarning, match="fp16-fix"):
        fam = SDXL.load(Pretrained(kits["sdxl"]), dtype=torch.float16).freeze("cpu")
    assert fam.vae.config.force_upcast and next(fam.vae.parameters()).dtype == torch.float32
    assert next(fam.unet.parameters()).dtype == torch.float16
    seen = []
    hook = fam.vae.decoder.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    z = (
        torch.randn(1, 4, 8, 12, dtype=torch.float16) * 30
    )  # large latents, as fp16 would overflow on
    with torch.autocast("cpu", dtype=torch.float16):
        images = fam.decode(z)
    hook.remove()
    assert seen == [torch.float32] and images.dtype == torch.float32
    assert torch.isfinite(images).all() and images.shape == (1, 3, 64, 96)

    fixed = AutoencoderKL.from_pretrained(Path(kits["sdxl"]) / "vae")
    fixed.register_to_config(force_upcast=False)  # what madebyollin/sdxl-vae-fp16-fix says
    fixed.save_pretrained(tmp_path / "vae_fix")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fam = SDXL.load(Pretrained(kits["sdxl"], vae=str(tmp_path / "vae_fix")), torch.float16)
    assert next(fam.vae.parameters()).dtype == torch.float16


# ---------------------------------------------------------------- training runs


def train(logdir: Path, config: str, *overrides: str) -> subprocess.Popen:
    cmd = [
        sys.executable, str(ROOT / "scripts" / "train.py"), "--config",
        f"{ROOT / 'config' / 'align_prop.py'}:{config}", f"--config.logdir={logdir}", *overrides,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(procs: dict[str, subprocess.Popen]) -> None:
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {out[-2000:]}{err[-3000:]}"


# 20 updates of 6 steps; SDXL draws one of three sizes per micro-batch (eval stays 64x64)
COMMON = (
    "--config.sample.num_steps=6", "--config.train.num_epochs=20", "--config.train.learning_rate=0.02",
    "--config.eval_freq=20", "--config.save_freq=10", "--config.prompts.num_eval=4",
    "--config.eval_rewards=",
)  # fmt: skip
EXTRA = {"sdxl": ("--config.sample.buckets=64x64,64x96,96x64",), "sd2": ()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, kits) -> dict[str, Path]:
    """Per kit: an uninterrupted 20-update run, and a copy resumed from its checkpoint_10 (both kits at once)."""
    logdir = tmp_path_factory.mktemp("runs")
    finish(
        {k: train(logdir, CONFIG[k], f"--config.run_name={k}", *COMMON, *EXTRA[k]) for k in kits}
    )
    procs = {}
    for k in kits:
        shutil.copytree(logdir / k, logdir / f"{k}_resumed")
        shutil.rmtree(logdir / f"{k}_resumed" / "final")
        for later in (logdir / f"{k}_resumed" / "checkpoints").glob("checkpoint_*"):
            if later.name != "checkpoint_10":  # as if killed right after checkpoint_10
                shutil.rmtree(later)
        ckpt = logdir / f"{k}_resumed" / "checkpoints" / "checkpoint_10"
        procs[k] = train(
            logdir, CONFIG[k], f"--config.run_name={k}_resumed", f"--config.resume_from={ckpt}",
            *COMMON, *EXTRA[k],
        )  # fmt: skip
    finish(procs)
    return {k: logdir / k for k in kits}


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kit", ["sdxl", "sd2"])
def test_tiny_run_learns_resumes_and_its_lora_loads_in_diffusers(runs, kits, kit):
    from safetensors.torch import load_file

    run = runs[kit]
    assert json.loads((run / "config.json").read_text())["pretrained"]["model"] == kits[kit]
    train_rows = [r for r in rows(run) if "reward_mean" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 21))
    # learns: the fixed-noise eval reward (same prompts, same x_T) after 20 updates beats step 0's
    evals = [r["eval/reward_mean"] for r in rows(run) if "eval/reward_mean" in r]
    assert len(evals) == 2 and evals[1] > evals[0], evals
    # resumes exactly: same ops, same RNG stream (buckets included) on one CPU
    a = load_file(str(run / "final" / lora_io.LORA_WEIGHT_NAME))
    b = load_file(str(run.with_name(f"{kit}_resumed") / "final" / lora_io.LORA_WEIGHT_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed = [
        r["reward_mean"] for r in rows(run.with_name(f"{kit}_resumed")) if "reward_mean" in r
    ]
    assert resumed == [r["reward_mean"] for r in train_rows]
    # the final LoRA loads in the family's own diffusers pipeline and changes its output
    pipe = pipeline(kit, kits[kit])
    kw = dict(num_inference_steps=4, latents=latents(64, 96)[:1], height=64, width=96,
              output_type="pt", guidance_scale=5.0)  # fmt: skip
    before = pipe("a cat", **kw).images
    pipe.load_lora_weights(str(run / "final"))
    after = pipe("a cat", **kw).images
    assert (after - before).abs().max() > 1e-4


def test_sdxl_lora_exports_for_comfyui_and_samples_non_square(runs, kits, tmp_path):
    """export_lora finds the family in the run's config.json; the kohya file loads back to the same UNet; sample.py takes SDXL, a LoRA, --height/--width."""
    from PIL import Image

    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "comfy.safetensors"
    cmd = [
        sys.executable,
        "scripts/export_lora.py",
        str(runs["sdxl"]),
        "--format",
        "comfyui",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipes = [pipeline("sdxl", kits["sdxl"]) for _ in range(2)]
    pipes[0].load_lora_weights(str(runs["sdxl"] / "final"))
    pipes[1].load_lora_weights(str(out.parent), weight_name=out.name)
    merged = [soups.merged_state_dict(p.unet) for p in pipes]
    for k, v in merged[0].items():
        torch.testing.assert_close(merged[1][k], v, rtol=0, atol=1e-6, msg=k)

    cmd = [
        sys.executable, "scripts/sample.py", "a cat", "--model", kits["sdxl"], "--lora",
        str(runs["sdxl"]), "--steps", "2", "--height", "64", "--width", "96", "--guidance", "5",
        "--out", str(tmp_path / "samples"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pngs = sorted((tmp_path / "samples").glob("0000_*.png"))
    assert len(pngs) == 1 and Image.open(pngs[0]).size == (96, 64)
    assert Image.open(runs["sdxl"] / "images" / "eval_000020.png").size[0] > 0  # eval grid written


# ---------------------------------------------------------------- errors


def config(name: str):
    sys.path.insert(0, str(ROOT / "config"))
    import align_prop

    return align_prop.get_config(name)


@pytest.mark.parametrize(
    "field, value",
    [
        ("sample.height", 100),
        ("sample.width", 4),
        ("sample.buckets", "64x100"),
        ("sample.buckets", "64*64"),
    ],
)
def test_bad_size_names_the_field(field, value):
    c = config("tiny_sdxl")
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        checks.validate_config(c)


def test_family_check_at_load_names_the_field(fams):
    with pytest.raises(ConfigError, match="sample.buckets.*multiple of 8 for the sdxl family"):
        fams["sdxl"].check_size(64, 100, field="sample.buckets")


def test_sdxl_folder_given_to_the_sd_family_is_one_clear_line(kits, tmp_path):
    with pytest.raises(ConfigError, match="StableDiffusionXLPipeline"):
        check_family("sd", kits["sdxl"])
    cmd = [
        sys.executable, str(ROOT / "scripts" / "train.py"), "--config",
        f"{ROOT / 'config' / 'align_prop.py'}:tiny", f"--config.logdir={tmp_path}",
        "--config.tiny_kit=sdxl", "--config.pretrained.family=sd",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "pretrained.family='sd' expects a StableDiffusionPipeline" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_lora_of_another_family_is_a_clear_error(runs, fams):
    for kit, other in (("sdxl", "sd2"), ("sd2", "sdxl")):
        with pytest.raises(ConfigError, match=f"does not fit this {fams[kit].name} model"):
            lora_io.load_lora(fams[kit].unet, runs[other], "wrong", family=fams[kit])
