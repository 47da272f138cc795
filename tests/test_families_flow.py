"""Flow-matching transformer families (SD3, FLUX.1): sampling parity with diffusers, gradients,
training, resume, LoRA files, launcher and size configs (CPU, offline, tiny kits)."""

from __future__ import annotations

import json
import os
import shutil
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
# flux_schnell: the FLUX kit without a guidance embedding; its guidance_scale is ignored
GUIDANCE = {"sd3": 4.5, "flux": 3.5, "flux_schnell": 3.5}
FAMILY = {"sd3": "sd3", "flux": "flux", "flux_schnell": "flux"}


@pytest.fixture(scope="module")
def kits(tiny_overrides) -> dict[str, str]:
    return {f: tiny.ensure_tiny_model(f) for f in ("sd3", "flux", "flux_schnell")}


def load(kits, name: str, dtype=torch.float32, **spec) -> families.Family:
    family = families.get_family(FAMILY[name])
    return family.load(Pretrained(kits[name], **spec), dtype).freeze("cpu")


def pipeline_of(family: families.Family):
    """The family's diffusers pipeline over the very same component objects."""
    import diffusers

    return getattr(diffusers, family.pipeline_class)(**family.components)


def sample_latents(family, noise, opts, model=None, **kw) -> torch.Tensor:
    cond, uncond = family.encode(PROMPTS[: len(noise)]), family.encode([opts.negative_prompt])
    _, info = solvers.sample(family, cond, uncond, opts, latents=noise, model=model, **kw)
    return info["latents"]


# ---------------------------------------------------------------- sampling = diffusers


CASES = [
    ("sd3", (64, 64), {}),
    ("sd3", (64, 96), {"drop_t5": True}),
    ("flux", (64, 64), {}),
    ("flux", (96, 64), {}),
    ("flux", (64, 64), {"true_cfg_scale": 2.0}),
    ("flux_schnell", (64, 64), {}),
    ("flux_schnell", (64, 64), {"true_cfg_scale": 2.0}),
]


@pytest.mark.parametrize("name,size,extra", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
@torch.no_grad()
def test_no_grad_sampling_matches_diffusers_pipeline(kits, name, size, extra):
    """Our flow solver + family conditioning reproduce the family's own pipeline (same x_T).

    In float64; diffusers still computes the RMSNorm variance (SD3.5's q/k norm) and FLUX's RoPE
    in fp32 even for float64 inputs, so the chains carry fp32 rounding there. Measured on a Xeon
    with AVX-512/AMX: max abs <= 3.5e-7 for every case (schnell before it was sampled as
    FluxPipeline: 0.52 at guidance 3.5, 0.31 with true CFG 2); atol 1e-5, 30x that rounding."""
    spec = {"drop_t5": True} if extra.get("drop_t5") else {}
    family = load(kits, name, torch.float64, **spec)
    true_cfg = extra.get("true_cfg_scale", 1.0)
    opts = solvers.Sampling(
        4, GUIDANCE[name], height=size[0], width=size[1], true_cfg_scale=true_cfg
    )
    noise = inference.fixed_noise(family, 2, size, seed=3).double()  # (2, 16, h, w)
    ours = sample_latents(family, noise, opts)
    flux = FAMILY[name] == "flux"
    kw = {"true_cfg_scale": true_cfg, "negative_prompt": ""} if flux else {}
    ref = pipeline_of(family)(
        PROMPTS, height=size[0], width=size[1], num_inference_steps=4, output_type="latent",
        guidance_scale=GUIDANCE[name], latents=pack(noise) if flux else noise, **kw,
    ).images  # fmt: skip
    ours = pack(ours) if flux else ours
    assert ours.shape == ref.shape and ref.dtype == torch.float64
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert ref.abs().max() > 1.0  # not a trivially small output


def test_offloaded_text_encoders_give_the_same_conditioning(kits):
    plain, offloaded = load(kits, "flux"), load(kits, "flux", offload_text_encoders=True)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]  # a repeat comes from the cache
    a, b = plain.encode(prompts), offloaded.encode(prompts)
    for key in a.tensors:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-6)
    c = offloaded.encode([PROMPTS[1]])
    assert torch.equal(c["encoder_hidden_states"], b["encoder_hidden_states"][1:2])


def test_flow_solver_rejects_eta(kits):
    """The flow SDE's noise level is in [0, 1]; sample.eta stays 0 on the flow families (only
    flow_grpo samples the SDE, at train.flow_grpo.noise_level)."""
    family = load(kits, "sd3")
    with pytest.raises(ConfigError, match=r"noise level eta=1.5"):
        solvers.make_solver(family, 4, 1.5, (1, 16, 8, 8))
    assert solvers.make_solver(family, 4, 0.5, (1, 16, 8, 8)).sigma(0) > 0
    config = align_prop.get_config("tiny_flux")
    config.sample.eta = 1.0
    with pytest.raises(ConfigError, match=r"sample\.eta"):
        checks.validate_config(config)


# ---------------------------------------------------------------- gradients


def image_loss(family, opts, trunc, dtype=None) -> torch.Tensor:
    noise = inference.fixed_noise(family, 2, (opts.height, opts.width), seed=5)
    cond, uncond = family.encode(PROMPTS), family.encode([""])
    images, _ = solvers.sample(
        family, cond, uncond, opts, truncation=trunc, latents=noise, dtype=dtype
    )
    w = torch.linspace(-1, 1, images[0].numel(), dtype=images.dtype).reshape(images.shape[1:])
    return (images * w).mean()


def grads(family, params, opts, trunc) -> list[torch.Tensor]:
    for p in params:
        p.grad = None
    image_loss(family, opts, trunc).backward()
    return [p.grad.clone() for p in params]


TRUNC = dict(k_min=1, k_max=1, cut_mean=42.0, cut_std=5.0)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_only_lora_gets_gradients_and_checkpointing_agrees(kits, random_lora, name):
    family = load(kits, name)
    params = random_lora(family, torch.float32)
    trunc = solvers.Truncation("fixed", k=2, **TRUNC)
    opts = solvers.Sampling(3, GUIDANCE[name], grad_checkpoint=False, height=64, width=64)
    plain = grads(family, params, opts, trunc)
    named = dict(family.denoiser.named_parameters())
    with_grad = {n for n, p in named.items() if p.grad is not None}
    assert with_grad == {n for n in named if "lora_" in n}
    lora_names = [n for n, p in named.items() if p.requires_grad]
    zero = {n for n, g in zip(lora_names, plain, strict=True) if torch.count_nonzero(g) == 0}
    # SD3's last block keeps no text output (context_pre_only): its text query feeds nothing
    last = f"transformer_blocks.{len(family.denoiser.transformer_blocks) - 1}.attn.add_q_proj"
    assert zero == (
        {f"{last}.lora_A.default.weight", f"{last}.lora_B.default.weight"}
        if name == "sd3"
        else set()
    )
    for m in (family.vae, *family._text_encoders()):
        assert all(p.grad is None for p in m.parameters())

    opts = solvers.Sampling(3, GUIDANCE[name], grad_checkpoint=True, height=64, width=64)
    whole_call = grads(family, params, opts, trunc)
    family.denoiser.enable_gradient_checkpointing()  # as the trainer does: per block
    try:
        blocks = grads(family, params, opts, trunc)
    finally:
        family.denoiser.disable_gradient_checkpointing()
    for a, b, c in zip(plain, whole_call, blocks, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(c, a, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_lora_gradient_matches_finite_difference_in_float64(
    kits, random_lora, central_difference, name
):
    family = load(kits, name, torch.float64)
    params = random_lora(family, torch.float64)
    trunc = solvers.Truncation("full", k=1, **TRUNC)  # the whole 3-step chain carries gradient
    opts = solvers.Sampling(3, GUIDANCE[name], height=64, width=64)
    g = grads(family, params, opts, trunc)
    i = max(range(len(params)), key=lambda j: g[j].abs().max())
    idx = int(g[i].abs().argmax())
    # diffusers applies FLUX's RoPE in fp32 (apply_rotary_emb casts q, k with .float()) and
    # computes SD3.5's q/k RMSNorm variance in fp32, so both chains (and their backward) are fp64
    # except there: a larger step keeps that rounding out of the difference. Measured relative
    # error (Xeon, AVX-512/AMX): sd3 5.6e-6 (5.6e-6 to 9.0e-6 for eps 1e-3..1e-2: the fp32 parts,
    # not the step), flux 2.2e-6; rtol 5e-5 (a dropped or wrong term is off by a percent or more)
    eps, rtol = 1e-3, 5e-5
    fd = central_difference(lambda: image_loss(family, opts, None), params[i], idx, eps)
    ad = g[i].view(-1)[idx].item()
    assert abs(ad) > 1e-6
    assert abs(fd - ad) <= rtol * abs(ad), (fd, ad, abs(fd - ad) / abs(ad))


# ---------------------------------------------------------------- training through scripts/train.py


def train_cmd(name: str, logdir: Path, run: str, *extra: str) -> list[str]:
    return [
        sys.executable, str(ROOT / "scripts" / "train.py"),
        "--config", f"{ROOT / 'config' / 'align_prop.py'}:tiny_{name}",
        f"--config.logdir={logdir}", f"--config.run_name={run}", "--config.train.num_epochs=8",
        "--config.eval_freq=0", "--config.save_freq=4", "--config.prompts.num_eval=2",
        "--config.eval_rewards=", *extra,
    ]  # fmt: skip


def run_all(cmds: list[list[str]]) -> None:
    """Run the commands side by side (one thread each) and require success."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for c in cmds
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out.decode()[-4000:]


@pytest.fixture(scope="module")
def runs(kits, tmp_path_factory) -> Path:
    """Per family: a straight 8-update run, and a fresh process resuming its update-4 checkpoint."""
    logdir = tmp_path_factory.mktemp("flow_runs")
    run_all([train_cmd(n, logdir, f"{n}_straight") for n in ("sd3", "flux")])
    for n in ("sd3", "flux"):
        src = logdir / f"{n}_straight" / "checkpoints" / "checkpoint_4"
        shutil.copytree(src, logdir / f"{n}_resumed" / "checkpoints" / "checkpoint_4")
    run_all(
        [
            train_cmd(n, logdir, f"{n}_resumed", "--config.resume_from=latest")
            for n in ("sd3", "flux")
        ]
    )
    return logdir


def rewards(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["reward_mean"] for r in rows if "reward_mean" in r]


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_tiny_run_learns_and_resumes_exactly(runs, name):
    straight, resumed = runs / f"{name}_straight", runs / f"{name}_resumed"
    r = rewards(straight)
    assert len(r) == 8
    assert sum(r[-3:]) / 3 > sum(r[:3]) / 3 + 0.02, r
    assert rewards(resumed) == r[4:]
    a = lora_tensors(straight / "final")
    b = lora_tensors(resumed / "final")
    assert a.keys() == b.keys() and a
    for k in a:  # same ops, same RNG stream, one thread: bitwise equal
        assert torch.equal(a[k], b[k]), k


def lora_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / lora_io.LORA_WEIGHT_NAME))


@pytest.mark.parametrize("name", ["sd3", "flux"])
@torch.no_grad()
def test_final_lora_loads_in_the_diffusers_pipeline(kits, runs, name):
    from peft.tuners.lora import LoraLayer

    final = runs / f"{name}_straight" / "final"
    family = load(kits, name)
    pipe = pipeline_of(family)
    noise = inference.fixed_noise(family, 1, (64, 64), seed=0)
    kw = dict(
        num_inference_steps=4, output_type="latent", guidance_scale=GUIDANCE[name], height=64,
        width=64, latents=pack(noise) if name == "flux" else noise,
    )  # fmt: skip
    before = pipe(PROMPTS[0], **kw).images
    pipe.load_lora_weights(str(final))
    after = pipe(PROMPTS[0], **kw).images
    assert (after - before).abs().max() > 1e-3
    # every trained layer arrived (SD3's loader drops layers of half-converted files)
    saved = {k.split(".lora_")[0].removeprefix("transformer.") for k in lora_tensors(final)}
    loaded = {n for n, m in pipe.transformer.named_modules() if isinstance(m, LoraLayer)}
    assert saved == loaded
    # our sampler with the same adapter is the pipeline's sampler
    ours = sample_latents(family, noise, solvers.Sampling(4, GUIDANCE[name], height=64, width=64))
    torch.testing.assert_close(pack(ours) if name == "flux" else ours, after, atol=1e-4, rtol=1e-4)


def test_comfyui_export_writes_the_transformer_keys_comfyui_loads(runs):
    """SD3's final/ through the CLI: ComfyUI's loader maps "transformer.<diffusers module>"
    (comfy/lora.py, mmdit_to_diffusers) with lora_A / lora_B and an alpha per module."""
    from safetensors.torch import load_file

    out = runs / "export.safetensors"
    cmd = [sys.executable, "scripts/export_lora.py", str(runs / "sd3_straight"), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    keys = set(load_file(str(out)))
    saved = load_file(str(runs / "sd3_straight" / "final" / lora_io.LORA_WEIGHT_NAME))
    modules = {k.removesuffix(".lora_A.weight") for k in saved if k.endswith(".lora_A.weight")}
    assert all(m.startswith("transformer.") for m in modules)
    assert keys == {
        f"{m}.{s}" for m in modules for s in ("lora_A.weight", "lora_B.weight", "alpha")
    }


# ---------------------------------------------------------------- configs, launcher, real sizes


@pytest.mark.parametrize(
    "name", ["sd3_aesthetic", "sd3_hps", "flux_aesthetic", "flux_hps", "flux_schnell_aesthetic"]
)
def test_real_configs(name):
    c = align_prop.get_config(name)
    checks.validate_config(c)
    family = "flux" if name.startswith("flux") else "sd3"
    assert (c.pretrained.family, c.mixed_precision, c.sample.resolution) == (family, "bf16", 1024)
    steps, guidance = {"sd3": (40, 4.5), "flux": (28, 3.5), "flux_schnell": (4, 1.0)}[
        name.rsplit("_", 1)[0]
    ]
    assert (c.sample.num_steps, c.sample.guidance_scale, c.sample.eta) == (steps, guidance, 0.0)
    c.sample.true_cfg_scale = 2.0  # FLUX.1 dev and schnell take true CFG; SD3.5 does not
    if family == "flux":
        checks.validate_config(c)
    else:
        with pytest.raises(ConfigError, match="true_cfg_scale=2.0 does nothing on the sd3"):
            checks.validate_config(c)


def test_sample_py_on_schnell_notes_the_ignored_guidance_once(kits, tmp_path):
    """sample.py on a FLUX model without a guidance embedding: --guidance is ignored (one line),
    --true-cfg-scale guides; the images are written."""
    cmd = [sys.executable, "scripts/sample.py", "a cat", "a dog", "--model", kits["flux_schnell"],
           "--steps", "2", "--guidance", "3.5", "--true-cfg-scale", "2", "--batch-size", "1",
           "--out", str(tmp_path)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    notes = [line for line in proc.stderr.splitlines() if "is ignored" in line]
    assert notes == [
        f"warning: --guidance=3.5 is ignored: {kits['flux_schnell']} has no guidance embedding "
        "(FLUX.1-schnell, Qwen-Image); as FluxPipeline it is guided only by --true-cfg-scale > 1 "
        "against the negative prompt"
    ]
    from PIL import Image

    pngs = sorted(tmp_path.glob("000*.png"))
    assert len(pngs) == 2 and (tmp_path / "grid.png").exists()
    assert json.loads(Image.open(pngs[0]).text["alignprop"])["true_cfg_scale"] == 2.0


def test_fsdp_yaml_parses_with_accelerate(monkeypatch):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    monkeypatch.chdir(ROOT)
    args = launch_command_parser().parse_args(
        ["--config_file", "config/accelerate/fsdp.yaml", "--num_machines", "2", "--machine_rank",
         "1", "--main_process_ip", "10.0.0.1", "--main_process_port", "29500", "--num_processes",
         "16", "scripts/train.py", "--config", "config/align_prop.py:flux_hps"]
    )  # fmt: skip
    args, _, _ = _validate_launch_command(args)
    assert (args.use_fsdp, args.num_processes, args.num_machines) == (True, 16, 2)
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    wrapped = set(env["FSDP_TRANSFORMER_CLS_TO_WRAP"].split(","))
    assert {
        "JointTransformerBlock",
        "FluxTransformerBlock",
        "FluxSingleTransformerBlock",
    } <= wrapped
    assert args.nproc_per_node == "8"


def test_real_size_configs_build_the_published_parameter_counts():
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from alignprop.families.flux import flux_dev_configs
    from alignprop.families.sd3 import sd35_medium_configs

    with torch.device("meta"):
        sd3 = SD3Transformer2DModel(**sd35_medium_configs()["transformer"])
        flux = FluxTransformer2DModel(**flux_dev_configs()["transformer"])
    # weights as stored (SD3's 384 x 384 position table is a buffer): 2.47B and 11.9B
    billions = [sum(t.numel() for t in m.state_dict().values()) / 1e9 for m in (sd3, flux)]
    assert 2.4 < billions[0] < 2.5 and 11.8 < billions[1] < 12.0, billions
