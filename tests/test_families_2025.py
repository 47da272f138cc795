"""The 2025-26 families (issue #24: Z-Image, FLUX.2 [klein], Qwen-Image, Wan): sampling parity with the family's diffusers
pipeline in float64, the LoRA gradient against finite differences, a tiny training run whose
final/ loads in the pipeline, guidance rules and configs (CPU, offline, tiny kits)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignprop import checks, families, inference, lora_io, solvers, tiny
from alignprop.errors import ConfigError
from alignprop.families import Pretrained
from alignprop.families.flux import pack

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "config"))
import align_prop  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a photo of a cat", "an oil painting of two dogs in the snow"]
NEW = ("zimage", "flux2", "qwenimage", "wan")
# each tiny config's guidance (Z-Image's 0 and klein's 1 are both "no CFG"; Qwen-Image guides
# only through true_cfg_scale, 4 as its card)
TINY_GUIDANCE = {"zimage": 0.0, "flux2": 1.0, "qwenimage": 4.0, "wan": 5.0}
FRAMES = 5  # Wan clips here: 2 latent frames (1 + 4)


@pytest.fixture(scope="module")
def kits(tiny_overrides) -> dict[str, str]:
    return {f: tiny.ensure_tiny_model(f) for f in NEW}


def load(kits, name: str, dtype=torch.float32) -> families.Family:
    family = families.get_family(name).load(Pretrained(kits[name]), dtype).freeze("cpu")
    if family.is_video:
        family.set_frames(FRAMES)
    return family


def pipeline_of(family: families.Family):
    import diffusers

    return getattr(diffusers, family.pipeline_class)(**family.components)


def sampling(name: str, steps: int, g: float, size: tuple[int, int]) -> solvers.Sampling:
    """Our settings for guidance g: Qwen-Image's is true CFG against its card's " "."""
    if name == "qwenimage":
        return solvers.Sampling(steps, 1.0, height=size[0], width=size[1],
                                true_cfg_scale=g, negative_prompt=" ")  # fmt: skip
    return solvers.Sampling(steps, g, height=size[0], width=size[1])


def pipeline_kwargs(name: str, g: float, noise: torch.Tensor) -> dict:
    """The same settings and x_T for the family's pipeline (Qwen-Image takes packed latents)."""
    if name == "qwenimage":
        return dict(true_cfg_scale=g, negative_prompt=" ", latents=pack(noise))
    if name == "wan":
        return dict(guidance_scale=g, latents=noise, num_frames=FRAMES)
    return dict(guidance_scale=g, latents=noise)


def pipeline_latents(out) -> torch.Tensor:
    """What a pipeline returned with output_type "latent" (video pipelines: .frames)."""
    return out.frames if hasattr(out, "frames") else out.images


def sample_latents(family, noise, opts) -> torch.Tensor:
    """Our chain's final latent, in the space the family's pipeline returns with output_type
    "latent" (FLUX.2: the VAE's, after the BatchNorm statistics and the patchify are undone;
    Qwen-Image: its 2x2-packed tokens)."""
    cond, uncond = family.encode(PROMPTS[: len(noise)]), family.encode([opts.negative_prompt])
    _, info = solvers.sample(family, cond, uncond, opts, latents=noise)
    z = info["latents"]
    if family.name == "flux2":
        return family.vae_latents(z)
    return pack(z) if family.name == "qwenimage" else z


def test_detected_from_model_index(kits):
    for name in NEW:
        assert families.detect(kits[name]) == name


# ---------------------------------------------------------------- sampling = diffusers

CASES = [
    ("zimage", (64, 64), 0.0), ("zimage", (64, 96), 3.0),
    ("flux2", (64, 64), 1.0), ("flux2", (64, 96), 4.0),
    ("qwenimage", (64, 64), 1.0), ("qwenimage", (64, 96), 4.0),
    ("wan", (64, 64), 1.0), ("wan", (64, 96), 5.0),
]  # fmt: skip


@pytest.mark.parametrize("name,size,guidance", CASES, ids=[f"{c[0]}-{c[1]}-g{c[2]}" for c in CASES])
@torch.no_grad()
def test_no_grad_sampling_matches_diffusers_pipeline(kits, name, size, guidance):
    """Our flow solver + the family's conditioning reproduce its pipeline from the same x_T.

    Our chain runs in float64. ZImagePipeline keeps its latents in float32 (it asserts so: the
    scheduler step upcasts to fp32) and applies RoPE in complex64; Flux2KleinPipeline runs in
    float64 but builds its RoPE tables in fp32; so the references carry fp32 rounding. Measured
    (AMD EPYC with AVX-512): max abs 3.9e-7 (Z-Image g 0, 64x64), 5.3e-7 (g 3, 64x96); FLUX.2
    3.2e-7 (g 1, 64x64), 4.5e-7 (g 4, 64x96); Qwen-Image (complex64 RoPE) 2.9e-7 (true CFG 1,
    64x64), 2.8e-7 (true CFG 4, 64x96); on latents of magnitude ~4-5; atol 1e-5. Z-Image's CFG as s = g instead of
    g + 1 is off by 0.26 / 0.40; FLUX.2 with FLUX.1's mu instead of its
    empirical one by 0.18 / 0.33; Qwen-Image's CFG without the per-token renormalisation by 0.011."""
    family = load(kits, name, torch.float64)
    opts = sampling(name, 4, guidance, size)
    noise = inference.fixed_noise(family, 2, size, seed=3).double()  # (2, C, h, w)
    ours = sample_latents(family, noise, opts)
    ref = pipeline_latents(pipeline_of(family)(
        prompt=PROMPTS, height=size[0], width=size[1], num_inference_steps=4,
        output_type="latent", **pipeline_kwargs(name, guidance, noise),
    ))  # fmt: skip
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref.double(), atol=1e-5, rtol=0)
    assert ref.abs().max() > 1.0


def test_zimage_guidance_is_pos_plus_g_times_the_difference(kits):
    """g = 0 is no CFG (no unconditional call); g > 0 is s = g + 1 in out_u + s (out_c - out_u)."""
    family = load(kits, "zimage")
    assert family.cfg_scale(0.0, 1.0) == 1.0 and family.cfg_scale(3.0, 1.0) == 4.0
    config = align_prop.get_config("tiny_zimage")
    assert config.sample.guidance_scale == 0.0
    checks.validate_config(config)
    config.sample.guidance_scale = -1.0
    with pytest.raises(ConfigError, match=r"sample\.guidance_scale=-1.0 must be >= 0"):
        checks.validate_config(config)
    sd = align_prop.get_config("tiny")
    sd.sample.guidance_scale = 0.0  # SD's 0 still ignores the prompt: an error
    with pytest.raises(ConfigError, match="guidance <= 0 ignores the prompt"):
        checks.validate_config(sd)


@torch.no_grad()
def test_flux2_guides_only_base_models_above_1(kits, capsys):
    """Flux2KleinPipeline: CFG neg + g (pos - neg) when g > 1 and the model is not distilled;
    a distilled klein (model_index.json is_distilled) samples at g 4 as at g 1, as the pipeline."""
    import diffusers

    base = load(kits, "flux2", torch.float64)
    assert not base.is_distilled
    assert (base.cfg_scale(1.0, 1.0), base.cfg_scale(0.5, 1.0), base.cfg_scale(4.0, 1.0)) == (
        1,
        1,
        4,
    )
    pipe = diffusers.Flux2KleinPipeline(**base.components, is_distilled=True)
    distilled = families.Flux2.from_pipeline(pipe)
    assert distilled.is_distilled and distilled.cfg_scale(4.0, 1.0) == 1.0
    noise = inference.fixed_noise(base, 1, (64, 64), seed=1).double()
    at = {g: sample_latents(distilled, noise, solvers.Sampling(2, g, height=64, width=64))
          for g in (1.0, 4.0)}  # fmt: skip
    ref = pipe(prompt=PROMPTS[0], height=64, width=64, num_inference_steps=2,
               output_type="latent", guidance_scale=4.0, latents=noise).images  # fmt: skip
    torch.testing.assert_close(at[4.0], at[1.0], atol=0, rtol=0)
    torch.testing.assert_close(at[4.0], ref, atol=1e-5, rtol=0)  # the parity test's floor
    guided = sample_latents(base, noise, solvers.Sampling(2, 4.0, height=64, width=64))
    assert (guided - at[4.0]).abs().max() > 1e-2  # the base model does guide at 4
    families.note_ignored_guidance(distilled, 4.0, "sample.guidance_scale", "-")
    assert "sample.guidance_scale=4.0 is ignored" in capsys.readouterr().err


@torch.no_grad()
def test_wan_decodes_only_the_latent_frames_its_reward_frames_need(kits):
    """The causal VAE: the first n latent frames decode to the first 1 + 4 (n - 1) frames of the
    full decode, exactly; decode() returns sample.reward_frames of the clip and decodes no more
    latent frames than the last of them needs; a video reward is the mean of its frames'."""
    from alignprop import rewards

    family = load(kits, "wan", torch.float64)
    family.set_frames(9)  # 3 latent frames
    z = torch.randn((2, *family.latent_shape(64, 64)), generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)  # fmt: skip
    full = family.decode_video(z)
    assert full.shape == (2, 3, 9, 64, 64)
    for spec, index, latent in (("0", [0], 1), ("0,4", [0, 4], 2), ("2,-1", [2, 8], 3)):
        family.set_frames(9, spec)
        assert family.latent_frames_for(family.reward_frames) == latent
        torch.testing.assert_close(family.decode(z), full[:, :, index], atol=0, rtol=0)
    family.set_frames(9, "")
    torch.testing.assert_close(family.decode(z), full, atol=0, rtol=0)
    fn = rewards.get_reward("compressibility", rewards.default_config(), "cpu", torch.float32)
    clip = full[:, :, [0, 4, 8]].float()
    r, info = fn(clip, PROMPTS)
    per_frame = torch.stack([fn(clip[:, :, i], PROMPTS)[0] for i in range(3)], 1)
    torch.testing.assert_close(r, per_frame.mean(1))
    assert r.shape == (2,) and info["loss"].shape == (2,) and per_frame.std() > 0


def test_wan_frames_are_checked_before_loading_and_at_load(kits):
    """sample.num_frames must be 4 k + 1 and reward_frames inside the clip; on an image family
    either is an error (nothing would read them); a UniPC checkpoint samples with Euler at its
    shift; Wan 2.2's two experts are refused with the ids that load."""
    import diffusers

    c = align_prop.get_config("tiny_wan")
    checks.validate_config(c)
    for field, value, match in (
        ("num_frames", 6, r"sample\.num_frames=6 must be 4 k \+ 1"),
        ("reward_frames", "0,5", r"\[5\] outside a clip of 5 frames"),
        ("reward_frames", "0,last", r"'last' is not a frame index"),
    ):
        bad = align_prop.get_config("tiny_wan")
        bad.sample[field] = value
        with pytest.raises(ConfigError, match=match):
            checks.validate_config(bad)
    sd = align_prop.get_config("tiny")
    sd.pretrained.family, sd.sample.num_frames = "sd", 5  # (auto: checked when loaded)
    with pytest.raises(ConfigError, match="apply to video families"):
        checks.validate_config(sd)
    family = load(kits, "wan")
    with pytest.raises(ConfigError, match="must be 4 k"):
        family.set_frames(8)
    assert type(family.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert family.scheduler.config.shift == tiny.WAN_SCHEDULER["flow_shift"]
    assert (
        json.loads((Path(kits["wan"]) / "scheduler" / "scheduler_config.json").read_text())[
            "_class_name"
        ]
        == "UniPCMultistepScheduler"
    )  # what the checkpoints ship, replaced at load
    two = diffusers.WanPipeline(**family.components, transformer_2=family.transformer,
                                boundary_ratio=0.875)  # fmt: skip
    with pytest.raises(ConfigError, match="two experts.*Wan2.2-TI2V-5B"):
        families.Wan.from_pipeline(two)


# ---------------------------------------------------------------- gradients


def image_loss(family, opts, trunc) -> torch.Tensor:
    noise = inference.fixed_noise(family, 2, (opts.height, opts.width), seed=5)
    cond, uncond = family.encode(PROMPTS), family.encode([""])
    images, _ = solvers.sample(family, cond, uncond, opts, truncation=trunc, latents=noise)
    w = torch.linspace(-1, 1, images[0].numel(), dtype=images.dtype).reshape(images.shape[1:])
    return (images * w).mean()


TRUNC = dict(k_min=1, k_max=1, cut_mean=42.0, cut_std=5.0)


@pytest.mark.parametrize("name", NEW)
def test_lora_gradient_matches_finite_difference_in_float64(
    kits, random_lora, central_difference, name
):
    """The whole 3-step guided chain carries gradient into the LoRA only; the largest gradient
    entry against a central difference of the same loss. Z-Image computes RoPE in complex64,
    so a larger step keeps that rounding out of the difference. Measured relative error (Xeon
    with AVX-512, no AMX): 1.5e-5 at eps 1e-3; rtol 1e-4 (a dropped term is off by a percent or more).
    Qwen-Image's RoPE runs in complex64 too, and its fp32 noise sets the floor below eps 1e-2
    (AMD EPYC, AVX-512: relative error 1.1e-5 / 9.5e-7 / 6.6e-5 / 2.8e-4 at eps 3e-2 / 1e-2 /
    3e-3 / 1e-3): eps 1e-2 for it. Wan's blocks keep their residual stream in fp32 whatever the
    model's dtype (`.float()` in WanTransformerBlock): 4.7e-6 / 6.1e-5 / 2.7e-5 / 6.4e-4 at the
    same eps: 3e-2 for it."""
    family = load(kits, name, torch.float64)
    params = random_lora(family, torch.float64)
    opts = sampling(name, 3, 3.0, (64, 64))
    trunc = solvers.Truncation("full", k=1, **TRUNC)
    image_loss(family, opts, trunc).backward()
    named = dict(family.denoiser.named_parameters())
    assert {n for n, p in named.items() if p.grad is not None} == {n for n in named if "lora_" in n}
    assert all(
        p.grad is None for m in (family.vae, *family._text_encoders()) for p in m.parameters()
    )
    i = max(range(len(params)), key=lambda j: params[j].grad.abs().max())
    idx = int(params[i].grad.abs().argmax())
    ad = params[i].grad.view(-1)[idx].item()
    eps, rtol = {"qwenimage": 1e-2, "wan": 3e-2}.get(name, 1e-3), 1e-4
    fd = central_difference(lambda: image_loss(family, opts, None), params[i], idx, eps)
    assert abs(ad) > 1e-6
    assert abs(fd - ad) <= rtol * abs(ad), (fd, ad, abs(fd - ad) / abs(ad))


# ---------------------------------------------------------------- training through scripts/train.py


@pytest.fixture(scope="module")
def runs(kits, tmp_path_factory) -> Path:
    logdir = tmp_path_factory.mktemp("runs_2025")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "scripts" / "train.py"),
                "--config",
                f"{ROOT / 'config' / 'align_prop.py'}:tiny_{n}",
                f"--config.logdir={logdir}",
                f"--config.run_name={n}",
                "--config.train.num_epochs=8",
                "--config.eval_freq=0",
                "--config.save_freq=0",
                "--config.prompts.num_eval=2",
                "--config.eval_rewards=",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for n in NEW
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out.decode()[-4000:]
    return logdir


@pytest.mark.parametrize("name", NEW)
@torch.no_grad()
def test_tiny_run_learns_and_its_lora_loads_in_the_pipeline(kits, runs, name):
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    rows = [json.loads(x) for x in (runs / name / "metrics.jsonl").read_text().splitlines()]
    r = [row["reward_mean"] for row in rows if "reward_mean" in row]
    assert len(r) == 8 and sum(r[-3:]) / 3 > sum(r[:3]) / 3 + 0.02, r
    final = runs / name / "final"
    family = load(kits, name)
    pipe = pipeline_of(family)
    noise = inference.fixed_noise(family, 1, (64, 64), seed=0)
    g = TINY_GUIDANCE[name]
    kw = dict(num_inference_steps=4, output_type="latent", height=64, width=64)
    kw.update(pipeline_kwargs(name, g, noise))
    before = pipeline_latents(pipe(prompt=PROMPTS[0], **kw))
    pipe.load_lora_weights(str(final))
    after = pipeline_latents(pipe(prompt=PROMPTS[0], **kw))
    assert (after - before).abs().max() > 1e-3
    saved = {k.split(".lora_")[0].removeprefix("transformer.")
             for k in load_file(str(final / lora_io.LORA_WEIGHT_NAME))}  # fmt: skip
    loaded = {n for n, m in pipe.transformer.named_modules() if isinstance(m, LoraLayer)}
    assert saved == loaded and saved
    # our sampler with the same adapter is the pipeline's sampler, in fp32: measured max abs
    # 4.8e-7 on latents of magnitude 4.1 (AMD EPYC with AVX-512); fp32 chains differ by ~1e-4
    # between CPUs, so atol 1e-4 (a wrong CFG scale or time is off by > 0.1)
    ours = sample_latents(family, noise, sampling(name, 4, g, (64, 64)))
    torch.testing.assert_close(ours, after, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- configs


@torch.no_grad()
def test_tiny_wan_run_writes_a_video_grid_and_the_report_shows_it(runs):
    from PIL import Image

    clips = sorted((runs / "wan" / "images").glob("eval_*.webp"))
    assert clips, list((runs / "wan").rglob("*"))
    with Image.open(clips[-1]) as im:
        assert im.is_animated and im.n_frames == FRAMES
    html = (runs / "wan" / "report.html").read_text()
    assert f"images/{clips[-1].name}" in html


def test_sample_py_writes_wan_clips_and_refuses_a_bad_frame_count(kits, tmp_path):
    from PIL import Image

    base = [sys.executable, str(ROOT / "scripts" / "sample.py"), "--model", kits["wan"],
            "--steps", "2", "--guidance", "5", "--resolution", "64"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ok = subprocess.run(base + ["--num-frames", "5", "--out", str(tmp_path), "a cat"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=180)  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-3000:]
    clip = tmp_path / "0000_a_cat_seed0.webp"
    with Image.open(clip) as im:
        assert im.is_animated and im.n_frames == 5 and im.size == (64, 64)
    meta = json.loads(clip.with_suffix(".json").read_text())
    assert meta["prompt"] == "a cat" and meta["alignprop"]["num_frames"] == 5
    assert (tmp_path / "grid.webp").exists()
    bad = subprocess.run(base + ["--num-frames", "6", "--out", str(tmp_path / "b"), "a cat"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)  # fmt: skip
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "error: --num-frames=6 must be 4 k + 1" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("name", NEW)
def test_comfyui_export_uses_comfyuis_key_names_and_keeps_each_delta(kits, name, tmp_path):
    """--format comfyui: the keys ComfyUI's loader reads (comfy/lora.py model_lora_keys_unet:
    "transformer.<diffusers module>" for FLUX.1/FLUX.2/Z-Image/Qwen-Image/SD3; Wan in its own
    checkpoint names under "diffusion_model.", checked by diffusers' own Wan conversion mapping
    them back; FLUX.2's fused single-block projection as its checkpoint's linear1), and
    alpha / rank x B @ A equal to peft's (lora_alpha / r) B @ A for every module (alpha 8, r 4)."""
    import importlib.util

    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    from safetensors.torch import load_file

    from alignprop import models

    family = load(kits, name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        models.add_lora(family.denoiser, 4, 8.0, family.lora_targets,
                        exclude_modules=family.lora_exclude)  # fmt: skip
        with torch.no_grad():
            for n, p in family.denoiser.named_parameters():
                if "lora_B" in n:
                    p.normal_()
    src = lora_io.save_lora(family.denoiser, tmp_path / "lora", family=family)
    spec = importlib.util.spec_from_file_location(
        "export_lora", ROOT / "scripts" / "export_lora.py"
    )
    export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export)
    out = load_file(str(export.export(str(src), "comfyui", tmp_path / "c.safetensors", name)))
    peft = {n: m for n, m in family.denoiser.named_modules() if hasattr(m, "lora_A")}
    assert len(out) == 3 * len(peft) and peft

    def expected(module: str) -> str:
        if name == "wan":  # our native name must be what diffusers converts from
            natives = [
                k.removesuffix(".lora_A.weight") for k in out if k.endswith(".lora_A.weight")
            ]
            for native in natives:
                (back,) = convert_wan_transformer_to_diffusers(
                    {native.removeprefix("diffusion_model.") + ".weight": 0}
                )
                if back == f"{module}.weight":
                    return native
            raise AssertionError(f"no exported key converts back to {module}")
        if name == "flux2" and module.endswith(".attn.to_qkv_mlp_proj"):
            i = module.split(".")[1]
            return f"diffusion_model.single_blocks.{i}.linear1"
        return f"transformer.{module}"

    for module, m in peft.items():
        key = expected(module)
        a, b = out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"]
        alpha = out[f"{key}.alpha"].item()
        want = m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
        torch.testing.assert_close(alpha / a.shape[0] * b @ a, want.detach())
        assert m.scaling["default"] == 2.0 and alpha == 8.0


def test_real_configs():
    c = align_prop.get_config("zimage_hps")
    checks.validate_config(c)
    assert (c.pretrained.family, c.pretrained.model) == ("zimage", "Tongyi-MAI/Z-Image-Turbo")
    assert (c.sample.num_steps, c.sample.guidance_scale, c.sample.resolution) == (9, 0.0, 1024)
    assert c.mixed_precision == "bf16" and c.pretrained.offload_text_encoders
    c = align_prop.get_config("flux2_klein_hps")
    checks.validate_config(c)
    assert (c.pretrained.family, c.pretrained.model) == (
        "flux2", "black-forest-labs/FLUX.2-klein-4B"
    )  # fmt: skip
    assert (c.sample.num_steps, c.sample.guidance_scale, c.sample.resolution) == (4, 1.0, 1024)
    c = align_prop.get_config("qwenimage_hps")
    checks.validate_config(c)
    assert (c.pretrained.family, c.pretrained.model) == ("qwenimage", "Qwen/Qwen-Image")
    assert (c.sample.num_steps, c.sample.true_cfg_scale, c.sample.resolution) == (50, 4.0, 1328)
    assert c.sample.negative_prompt == " " and c.truncation.k == 1
    c = align_prop.get_config("wan_hps")
    checks.validate_config(c)
    assert (c.pretrained.family, c.pretrained.model) == ("wan", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    assert (c.sample.num_steps, c.sample.guidance_scale) == (50, 5.0)
    assert (c.sample.height, c.sample.width, c.sample.num_frames) == (480, 832, 81)
    assert c.sample.reward_frames == "0,4,8" and c.sample.decoder_checkpoint == "none"
