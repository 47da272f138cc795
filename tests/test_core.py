"""Core: the SD family (loading, encoding), LoRA, and the differentiable DDIM solver with truncation (CPU, offline, tiny)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from alignprop import models, solvers, tiny  # noqa: E402
from alignprop.errors import ConfigError, MissingWeightsError  # noqa: E402
from alignprop.families import SD, Pretrained  # noqa: E402
from alignprop.solvers import Sampling  # noqa: E402

TRUNC = dict(k=1, k_min=1, k_max=50, cut_mean=42.0, cut_std=5.0)


def Truncation(strategy: str, **kw) -> solvers.Truncation:  # noqa: N802
    """A truncation with test defaults for the fields a strategy does not read."""
    return solvers.Truncation(strategy, **{**TRUNC, **kw})


def run_sample(p, cond, uncond, *, num_steps, model=None, guidance_scale=7.5, eta=0.0,
               grad_checkpoint=True, **kw):  # fmt: skip
    """solvers.sample with the settings as keywords."""
    opts = Sampling(num_steps, guidance_scale, eta, grad_checkpoint)
    return solvers.sample(p, cond, uncond, opts, model=model, **kw)


PROMPTS = ["a photo of a cat", "an oil painting of two dogs"]
EOT = 49407


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    return tiny.write_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd")


def load(sd_dir: Path, dtype: torch.dtype | None = None) -> SD:
    return SD.load(Pretrained(str(sd_dir)), dtype=dtype).freeze("cpu")


def randomise_lora_b(unet: torch.nn.Module, seed: int = 0) -> None:
    """B starts at zero (so A's grad is zero); make it random so every LoRA weight gets a gradient."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.fixture(scope="module")
def parts(sd_dir) -> SD:
    """Read-only base parts (no LoRA)."""
    return load(sd_dir)


@pytest.fixture(scope="module")
def lora_parts(sd_dir) -> SD:
    """Parts with a LoRA whose B is random; tests zero the grads they use."""
    p = load(sd_dir)
    models.add_lora(p.unet)
    randomise_lora_b(p.unet)
    return p


def embeddings(p: SD, prompts=PROMPTS):
    return p.encode(list(prompts)), p.encode([""])


def latents_for(p: SD, bsz: int = len(PROMPTS), seed: int = 0) -> torch.Tensor:
    cfg = p.unet.config
    shape = (bsz, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def lora_grads(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in unet.named_parameters() if "lora_" in n}


def zero_grads(unet: torch.nn.Module) -> None:
    for prm in unet.parameters():
        prm.grad = None


class CountingUNet(torch.nn.Module):
    """Delegates to the UNet and records, per call, whether autograd was on (a graph is built)."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet
        self.grad_flags: list[bool] = []

    @property
    def config(self):
        return self.unet.config

    def forward(self, *args, **kwargs):
        self.grad_flags.append(torch.is_grad_enabled())
        return self.unet(*args, **kwargs)


# ---- gradients reach LoRA only ----


def test_gradients_reach_lora_only(lora_parts):
    p = lora_parts
    zero_grads(p.unet)
    cond, uncond = embeddings(p)
    images, info = run_sample(
        p,
        cond,
        uncond,
        num_steps=4,
        truncation=Truncation("fixed", k=2),
        latents=latents_for(p),
    )
    assert info["K"] == 2 and images.requires_grad
    images.square().mean().backward()

    lora = {n: prm for n, prm in p.unet.named_parameters() if "lora_" in n}
    assert lora and any("lora_A" in n for n in lora) and any("lora_B" in n for n in lora)
    for name, prm in lora.items():
        assert prm.requires_grad, name
        assert prm.grad is not None, f"no grad on {name}"
        assert torch.isfinite(prm.grad).all(), name
        # The tiny UNet's mid block sees 1x1 latents: self-attention over one token ignores q and
        # k (softmax of one score is 1), so their LoRA A gets exactly zero gradient there.
        if not (
            "mid_block" in name and ".attn1.to_" in name and name.split(".attn1.to_")[1][0] in "qk"
        ):
            assert prm.grad.abs().sum() > 0, f"zero grad on {name}"
    base = [(n, prm) for n, prm in p.unet.named_parameters() if "lora_" not in n]
    for module in (p.vae, p.text_encoder):
        base += list(module.named_parameters())
    assert len(base) > 100
    for name, prm in base:
        assert not prm.requires_grad, name
        assert prm.grad is None, f"frozen parameter {name} got a gradient"
    zero_grads(p.unet)


# ---- gradient checkpointing ----


@pytest.mark.parametrize(
    "trunc", [Truncation("fixed", k=1), Truncation("full")], ids=["K1", "full"]
)
def test_checkpointing_gives_same_lora_grads(lora_parts, trunc):
    # Recomputation runs the same fp32 ops on the same inputs, so the gradients agree to float
    # round-off (on CPU they are bitwise equal; a different accumulation order at most): rtol 1e-4
    # and atol 1e-6 of the largest gradient entry (the K=1 gradients of the tiny random UNet are
    # ~1e-7 in absolute terms, so a fixed atol would let anything pass), while any missed step,
    # detach or wrong recomputation changes them by O(1) relative.
    p = lora_parts
    steps = 5
    cond, uncond = embeddings(p)
    counter = CountingUNet(p.unet)
    grads, calls = {}, {}
    for ckpt in (False, True):
        zero_grads(p.unet)
        counter.grad_flags.clear()
        images, info = run_sample(
            p,
            cond,
            uncond,
            model=counter,
            num_steps=steps,
            truncation=trunc,
            latents=latents_for(p),
            grad_checkpoint=ckpt,
        )
        images.mean().backward()
        grads[ckpt], calls[ckpt] = lora_grads(p.unet), len(counter.grad_flags)
    k = trunc.k if trunc.strategy == "fixed" else steps
    assert info["K"] == k
    # Checkpointing really happened: each of the K graph steps reran its UNet call in backward.
    assert calls[False] == steps and calls[True] == steps + k
    assert grads[False].keys() == grads[True].keys()
    scale = float(max(g.abs().max() for g in grads[False].values()))
    assert scale > 0 and sum(g.abs().sum() > 0 for g in grads[False].values()) > 0.9 * len(
        grads[False]
    )
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-4, atol=1e-6 * scale, msg=name)
    zero_grads(p.unet)


# ---- truncation: which steps build a graph, and how K is drawn ----


def run_counted(p, trunc, steps, generator, monkeypatch):
    """One sample() call; return (grad flags per UNet call, info, number of Truncation.draw calls)."""
    draws = []
    original = solvers.Truncation.draw

    def spy(self, *args, **kwargs):
        k = original(self, *args, **kwargs)
        draws.append(k)
        return k

    monkeypatch.setattr(solvers.Truncation, "draw", spy)
    counter = CountingUNet(p.unet)
    cond, uncond = embeddings(p, PROMPTS[:1])
    run_sample(
        p,
        cond,
        uncond,
        model=counter,
        num_steps=steps,
        truncation=trunc,
        generator=generator,
        grad_checkpoint=True,
    )  # no backward: checkpoint recomputation would add calls
    monkeypatch.setattr(solvers.Truncation, "draw", original)
    return counter.grad_flags, draws


@pytest.mark.parametrize(
    "trunc, steps",
    [
        (Truncation("fixed", k=3), 6),
        (Truncation("uniform", k_min=1, k_max=6), 6),
        (Truncation("gaussian"), 10),
        (Truncation("full"), 4),
    ],
    ids=["fixed", "uniform", "gaussian", "full"],
)
def test_graph_steps_are_the_last_k(lora_parts, trunc, steps, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    seen_k = set()
    for _ in range(4 if trunc.strategy in ("uniform", "gaussian") else 1):
        flags, draws = run_counted(lora_parts, trunc, steps, gen, monkeypatch)
        assert len(draws) == 1, "K must be drawn once per trajectory"
        k = draws[0]
        assert len(flags) == steps
        assert sum(flags) == k >= 1
        # Exactly the last K calls build a graph: a contiguous tail.
        assert flags == [False] * (steps - k) + [True] * k
        seen_k.add(k)
    if trunc.strategy == "fixed":
        assert seen_k == {trunc.k}
    if trunc.strategy == "full":
        assert seen_k == {steps}
    if trunc.strategy == "uniform":
        assert len(seen_k) > 1, "uniform K never varied"


def test_info_k_matches_graph_steps(lora_parts):
    p = lora_parts
    counter = CountingUNet(p.unet)
    cond, uncond = embeddings(p, PROMPTS[:1])
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        counter.grad_flags.clear()
        _, info = run_sample(
            p,
            cond,
            uncond,
            model=counter,
            num_steps=5,
            truncation=Truncation("uniform", k_min=1, k_max=5),
            generator=gen,
        )
        assert sum(counter.grad_flags) == info["K"]
        assert counter.grad_flags[len(counter.grad_flags) - info["K"] :] == [True] * info["K"]
    # No graph at all under no_grad or without a truncation (the evaluation sampler).
    for ctx, trunc in ((torch.no_grad(), Truncation("full")), (torch.enable_grad(), None)):
        counter.grad_flags.clear()
        with ctx:
            images, info = run_sample(p, cond, uncond, model=counter, num_steps=3, truncation=trunc)
        assert info["K"] == 0 and not any(counter.grad_flags) and not images.requires_grad


def discretised_gaussian_mean_k(steps: int, mean: float, std: float, dx: float = 1e-3) -> float:
    """E[K], K = steps - round(N(mean, std)) rejected outside [0, steps): a Riemann sum of the density."""
    num = den = 0.0
    lo, hi = mean - 10 * std, mean + 10 * std
    for i in range(int((hi - lo) / dx)):
        x = lo + (i + 0.5) * dx
        cut = math.floor(x + 0.5)
        if 0 <= cut < steps:
            w = math.exp(-0.5 * ((x - mean) / std) ** 2)
            num += w * (steps - cut)
            den += w
    return num / den


def test_gaussian_draw_matches_expected_k():
    trunc = Truncation("gaussian")
    steps, n = 50, 20000
    expected = trunc.expected_k(steps)
    # expected_k against an independent numeric integration of the same definition.
    assert expected == pytest.approx(discretised_gaussian_mean_k(steps, 42.0, 5.0), abs=1e-3)
    # cut ~ N(42, 5) truncated below 49.5 (K >= 1): E[cut] ~ 42 - 5 phi(1.5)/Phi(1.5) ~ 41.31.
    assert expected == pytest.approx(50 - (42 - 5 * 0.12952 / 0.93319), abs=0.02)
    # A steeper truncation (mean near the end) must shift E[K] the right way.
    near_end = Truncation("gaussian", cut_mean=48.0, cut_std=2.0)
    assert near_end.expected_k(steps) == pytest.approx(
        discretised_gaussian_mean_k(steps, 48.0, 2.0), abs=1e-3
    )
    # Scaled to a 10-step chain: cut ~ N(8.4, 1).
    assert trunc.expected_k(10) == pytest.approx(
        discretised_gaussian_mean_k(10, 8.4, 1.0), abs=1e-3
    )

    gen = torch.Generator().manual_seed(0)
    ks = [trunc.draw(steps, gen) for _ in range(n)]
    assert all(1 <= k <= steps for k in ks)
    mean = sum(ks) / n
    std = math.sqrt(sum((k - mean) ** 2 for k in ks) / (n - 1))
    assert 4.0 < std < 6.0  # the cut's std is 5 steps
    assert abs(mean - expected) < 4 * std / math.sqrt(n), (mean, expected)


def test_uniform_draw_covers_range():
    trunc = Truncation("uniform", k_min=2, k_max=5)
    gen = torch.Generator().manual_seed(0)
    ks = [trunc.draw(10, gen) for _ in range(2000)]
    assert set(ks) == {2, 3, 4, 5}
    assert sum(ks) / len(ks) == pytest.approx(trunc.expected_k(10), abs=0.1)


@pytest.mark.parametrize(
    "trunc, steps",
    [
        (Truncation("fixed", k=0), 10),
        (Truncation("fixed", k=11), 10),
        (Truncation("uniform", k_min=3, k_max=2), 10),
        (Truncation("uniform", k_min=1, k_max=11), 10),
        (Truncation("uniform", k_min=0, k_max=5), 10),
        (Truncation("gaussian", cut_std=0.0), 10),
        (Truncation("full"), 0),
    ],
)
def test_impossible_k_raises(trunc, steps):
    with pytest.raises(ValueError):
        trunc.draw(steps, torch.Generator().manual_seed(0))


def test_unknown_strategy_lists_valid_names(lora_parts):
    with pytest.raises(ValueError) as exc:
        Truncation("bogus").validate(10)
    for name in ("fixed", "uniform", "gaussian", "full"):
        assert name in str(exc.value)
    p = lora_parts
    cond, uncond = embeddings(p, PROMPTS[:1])
    with pytest.raises(ValueError, match="bogus"):
        run_sample(p, cond, uncond, num_steps=3, truncation=Truncation("bogus"))


# ---- the sampler against diffusers ----


@pytest.mark.parametrize("steps", [10, 50])
def test_eta0_matches_diffusers_pipeline(sd_dir, steps):
    # float64: in float32 the chain amplifies round-off to ~1e-5 and differently on another CPU;
    # in float64 ours and diffusers agree bitwise here (AVX-512/AMX Xeon); atol 1e-12 for another CPU
    from diffusers import StableDiffusionPipeline

    f64 = torch.float64
    parts = load(sd_dir, f64)
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, dtype=f64)
    pipe.set_progress_bar_config(disable=True)
    latents = latents_for(parts).to(f64)
    with torch.no_grad():
        ref = pipe(
            PROMPTS,
            latents=latents.clone(),
            num_inference_steps=steps,
            guidance_scale=7.5,
            eta=0.0,
            output_type="pt",
        ).images
        cond, uncond = embeddings(parts)
        ours, info = run_sample(
            parts,
            cond,
            uncond,
            num_steps=steps,
            guidance_scale=7.5,
            eta=0.0,
            latents=latents.clone(),
        )
    assert info["K"] == 0
    ours = (ours / 2 + 0.5).clamp(0, 1)
    assert ours.shape == ref.shape == (len(PROMPTS), 3, 64, 64) and ours.dtype == ref.dtype == f64
    assert ref.std() > 1e-3  # not a constant image that anything would match
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_eta1_reproducible_and_differs_from_eta0(parts):
    cond, uncond = embeddings(parts)

    def run(eta, seed, latents=None):
        with torch.no_grad():
            return run_sample(
                parts,
                cond,
                uncond,
                num_steps=6,
                eta=eta,
                generator=torch.Generator().manual_seed(seed),
                latents=latents,
            )

    a, info_a = run(1.0, 7)
    b, info_b = run(1.0, 7)
    c, info_c = run(0.0, 7)  # same seed: same x_T, no per-step noise
    d, _ = run(1.0, 8)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(info_a["latents"], info_b["latents"], rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3
    assert (info_a["latents"] - info_c["latents"]).abs().max() > 1e-3
    assert (a - d).abs().max() > 1e-3
    # With x_T fixed, the generator only feeds the per-step noise: it matters at eta 1, not at 0.
    x_t = latents_for(parts)
    e1, _ = run(1.0, 1, x_t)
    e2, _ = run(1.0, 2, x_t)
    assert (e1 - e2).abs().max() > 1e-3
    z1, _ = run(0.0, 1, x_t)
    z2, _ = run(0.0, 2, x_t)
    torch.testing.assert_close(z1, z2, rtol=0, atol=0)


# ---- tokenizer ----


def test_tokenizer_matches_open_clip(parts):
    import open_clip

    tok = parts.tokenizer
    assert len(tok) == tiny.CLIP_VOCAB_SIZE == 49408
    assert tok.model_max_length == 77
    oc = open_clip.get_tokenizer("ViT-L-14")
    prompts = [
        "a photo of a cat",
        "An Oil Painting of Two Dogs, by Vincent van Gogh!",
        "hello   world 42 times",
        "a cyberpunk city at night, highly detailed, 8k, trending on artstation",
    ]
    ours = tok(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    ref = oc(prompts)
    for prompt, a, b in zip(prompts, ours, ref.tolist(), strict=True):
        assert len(a) == 77
        assert a[0] == 49406 and EOT in a
        end = a.index(EOT) + 1  # open_clip pads with 0, CLIP/SD with EOT: compare up to EOT
        assert end > 3, prompt
        assert a[:end] == b[:end], prompt
        assert all(t == EOT for t in a[end:])


# ---- loading errors ----


def test_missing_path_raises_missing_weights(tmp_path):
    path = str(tmp_path / "no_such_model")
    with pytest.raises(MissingWeightsError) as exc:
        SD.load(Pretrained(path))
    assert "pretrained.model" in str(exc.value) and path in str(exc.value)


def test_uncached_hub_id_raises_missing_weights_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = "alignprop-tests/definitely-not-cached-sd"
    start = time.perf_counter()
    with pytest.raises(MissingWeightsError) as exc:
        SD.load(Pretrained(repo))
    assert time.perf_counter() - start < 10  # no network retries
    msg = str(exc.value)
    assert "pretrained.model" in msg and repo in msg
    assert "HF_HUB_OFFLINE" in msg  # says how to provide it


# ---- precision ----


def test_bf16_base_fp32_lora_and_bf16_grad(sd_dir):
    p = load(sd_dir, dtype=torch.bfloat16)
    params = models.add_lora(p.unet)
    randomise_lora_b(p.unet)
    assert params and all(prm.dtype == torch.float32 for prm in params)
    lora_names = {n for n, _ in p.unet.named_parameters() if "lora_" in n}
    assert {n for n, prm in p.unet.named_parameters() if prm.requires_grad} == lora_names
    for module in (p.unet, p.vae, p.text_encoder):
        base = [prm for n, prm in module.named_parameters() if "lora_" not in n]
        assert base and all(prm.dtype == torch.bfloat16 for prm in base)

    cond, uncond = embeddings(p)
    assert cond["encoder_hidden_states"].dtype == torch.bfloat16
    images, info = run_sample(
        p,
        cond,
        uncond,
        num_steps=3,
        truncation=Truncation("fixed", k=1),
        latents=latents_for(p),
    )
    assert images.dtype == torch.float32 and info["K"] == 1
    images.square().mean().backward()
    for prm in params:
        assert prm.grad is not None and prm.grad.dtype == torch.float32
        assert torch.isfinite(prm.grad).all()
    assert sum(float(prm.grad.abs().sum()) for prm in params) > 0


# ---- add_lora config errors ----


def test_add_lora_unknown_init_raises(sd_dir):
    p = load(sd_dir)
    with pytest.raises(ConfigError, match="init"):
        models.add_lora(p.unet, init="bogus")


def test_add_lora_unmatched_targets_raise(sd_dir):
    p = load(sd_dir)
    with pytest.raises(ConfigError, match="target_modules"):
        models.add_lora(p.unet, target_modules=("no_such_module",))


def test_add_lora_is_a_no_op_at_init(sd_dir, parts):
    # B = 0 at init: the adapted UNet predicts exactly what the base does.
    p = load(sd_dir)
    models.add_lora(p.unet)
    x = latents_for(p, bsz=1)
    cond, _ = embeddings(parts, PROMPTS[:1])
    t = torch.tensor(500)
    with torch.no_grad():
        a = p.denoise(p.unet, x, t, cond)
        b = parts.denoise(parts.unet, x, t, cond)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------- x0 prediction and re-noising


def test_ddim_x0_and_noising_match_diffusers_in_float64():
    """predict_x0 is DDIMScheduler.step's pred_original_sample, add_noise its add_noise (eps and v)."""
    from diffusers import DDIMScheduler

    from alignprop import solvers

    g = torch.Generator().manual_seed(0)
    x, out, x0 = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for kind in ("epsilon", "v_prediction"):
        sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=kind,
                              clip_sample=False)  # fmt: skip
        solver = solvers.DDIM(sched, 10, 0.0, kind)
        for i in (0, 4, 9):
            t = sched.timesteps[i]
            want = sched.step(out, t, x, eta=0.0).pred_original_sample
            # the coefficients are float32 alphas (as diffusers keeps them): 1e-6 relative
            torch.testing.assert_close(solver.predict_x0(i, x, out), want, rtol=1e-6, atol=1e-6)
            noised = sched.add_noise(x0, out, torch.tensor([int(t)]))
            torch.testing.assert_close(solver.add_noise(i, x0, out), noised, rtol=1e-6, atol=1e-6)
            if kind == "epsilon":  # the exact noise recovers x0 from its noised latent
                back = solver.predict_x0(i, solver.add_noise(i, x0, out), out)
                torch.testing.assert_close(back, x0, rtol=1e-12, atol=1e-12)


def test_flow_x0_and_noising_match_diffusers_in_float64():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from alignprop import solvers

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    solver = solvers.Flow(sched, 8, 0.0, "flow")
    g = torch.Generator().manual_seed(1)
    x0, eps = (torch.randn(2, 16, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    for i in (0, 3, 7):
        t = sched.timesteps[i : i + 1]
        want = sched.scale_noise(x0, t, eps)
        torch.testing.assert_close(solver.add_noise(i, x0, eps), want, rtol=1e-6, atol=1e-6)
        x = solver.add_noise(i, x0, eps)
        back = solver.predict_x0(i, x, eps - x0)  # the exact velocity gives x0 back
        torch.testing.assert_close(back, x0, rtol=1e-12, atol=1e-12)
    assert solver.sigmas[-1] == 0.0 and len(solver.sigmas) == 9
