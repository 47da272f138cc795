"""The RL objectives of the flow families. Flow-GRPO (alignprop.objectives.flow_grpo) and the flow
SDE it samples (solvers.Flow at eta > 0): the step density against an independent float64
computation, the SDE's marginals on a Gaussian whose exact velocity is known, eta 0 as diffusers'
Euler step, its policy gradient against the true one on that Gaussian, the objective's gradient
against float64 central differences of its loss. DiffusionNFT (objectives.diffusion_nft): its
gradient at the old policy as the signed flow-matching one, and against central differences
away from it. Tiny runs of both through scripts/train.py on SD3 (and FLUX for Flow-GRPO)."""

from __future__ import annotations

import importlib.util
import json
import types
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch.distributions import Normal, kl_divergence

from alignprop import cli, families, solvers, tiny
from alignprop.errors import ConfigError
from alignprop.families import Pretrained
from alignprop.objectives.diffusion_nft import DiffusionNFT
from alignprop.objectives.flow_grpo import FlowGRPO, group_advantages

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a cat", "an oil painting of two dogs"]


def flow(num_steps: int, eta: float, shift: float = 3.0) -> solvers.Flow:
    return solvers.Flow(FlowMatchEulerDiscreteScheduler(shift=shift), num_steps, eta, "flow")


def independent_step(solver, i: int, eta: float, x, v) -> tuple[torch.Tensor, float]:
    """The reverse-time SDE step written from the score, not from solvers.Flow's coefficients:
    x_t = (1 - t) x0 + t eps, v = eps - x0, so E[eps | x] = x + (1 - t) v and the score is
    -(x + (1 - t) v) / t; g = eta sqrt(t / (1 - t)) (1 - t -> 1 - s_1 at t = 1, Flow-GRPO's);
    mean = x + (v - g^2 / 2 score) dt, std = g sqrt(-dt)."""
    t, t_next = solver.sigmas[i], solver.sigmas[i + 1]
    dt = t_next - t
    g = eta * (t / (1 - (solver.sigmas[1] if t == 1.0 else t))) ** 0.5
    score = -(x + (1 - t) * v) / t
    return x + (v - g**2 / 2 * score) * dt, g * (-dt) ** 0.5


def test_sde_log_prob_equals_an_independent_gaussian_density_in_float64():
    eta, steps = 0.7, 6
    solver = flow(steps, eta)
    gen = torch.Generator().manual_seed(0)
    for i in range(steps):
        x, v = (torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64) for _ in range(2))
        mean, std = independent_step(solver, i, eta, x, v)
        assert solver.sigma(i) == pytest.approx(std, rel=1e-6)  # float32 sigmas inside
        x_next = solver.step(i, x, v, torch.Generator().manual_seed(i))
        noise = torch.randn(
            x.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float32
        )
        # the step draws x_next = mean + std * noise from the generator it is given
        torch.testing.assert_close(
            x_next, mean + solver.sigma(i) * noise.double(), rtol=0, atol=1e-6
        )
        want = Normal(mean, solver.sigma(i)).log_prob(x_next).flatten(1).mean(1)
        got = solver.log_prob(i, x, v, x_next)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_sde_at_noise_zero_is_diffusers_euler_step():
    """eta 0: sigma 0, no log-probability, and each step is FlowMatchEulerDiscreteScheduler.step."""
    steps = 5
    solver, sched = flow(steps, 0.0), FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(x.shape, generator=torch.Generator().manual_seed(10 + i))
        assert solver.sigma(i) == 0.0
        want = sched.step(v, t, x).prev_sample
        got = solver.step(i, x, v, torch.Generator().manual_seed(0))
        assert torch.equal(got, want), i
        with pytest.raises(ValueError, match="deterministic"):
            solver.log_prob(i, x, v, got)
        x = want


@pytest.mark.parametrize("eta", [0.0, 0.7, 1.0])
def test_sde_keeps_the_marginals_of_a_gaussian(eta):
    """Data x0 ~ N(0, s^2): the exact velocity is v(x, t) = (t - (1 - t) s^2) / V_t x with
    V_t = (1 - t)^2 s^2 + t^2. Sampled from N(0, 1) with it, the SDE must end at variance s^2 for
    any eta (same marginals as the ODE); 40,000 samples, 400 steps: the sampling error of the
    variance is 0.7%, and the measured ratios to s^2 are 1.0035 (eta 0), 1.0053 (0.7) and 1.0045
    (1.0). The noise without the drift's score correction ends at 5.0x (0.7) and 9.2x (1.0), with
    the correction's sign flipped at 95x and 4,200x (measured)."""
    s2, steps = 0.25, 400
    solver = flow(steps, eta, shift=1.0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40_000, 1, generator=gen, dtype=torch.float64)
    for i in range(steps):
        t = solver.sigmas[i]
        v = (t - (1 - t) * s2) / ((1 - t) ** 2 * s2 + t**2) * x
        x = solver.step(i, x, v, gen)
    assert x.var().item() == pytest.approx(s2, rel=0.03)


def test_group_advantages_normalise_within_each_prompt():
    texts = ["a", "a", "b", "b", "a", "b"]
    r = torch.tensor([1.0, 3.0, 5.0, 5.0, 2.0, 5.0])
    adv, stats = group_advantages(texts, r)
    a = torch.tensor([1.0, 3.0, 2.0])
    torch.testing.assert_close(
        adv[[0, 1, 4]], ((a - a.mean()) / (a.std(unbiased=False) + 1e-4)).float()
    )
    assert torch.equal(adv[[2, 3, 5]], torch.zeros(3))  # a group that scored alike: no signal
    assert stats["zero_std_groups"] == 0.5 and stats["groups"] == 2
    assert stats["reward_std_in_group"] == pytest.approx(a.std(unbiased=False).item() / 2)


def test_group_policy_gradient_points_uphill():
    """The estimator the objective builds (SDE steps, their log-probabilities, group advantages,
    PPO's loss at ratio 1), on a 1-d Gaussian whose policy is the exact velocity plus theta_0 +
    theta_1 x and whose reward is -(x_0 - 1)^2: its ascent direction over 600 groups of 8
    against dE[R]/dtheta by common-random-number differences over 100,000 chains. Measured:
    cosine 0.998; a flipped sign (or advantages of the wrong images) gives about -1."""
    from alignprop.objectives.ddpo import ppo_loss

    s2, steps = 0.25, 6
    solver = flow(steps, 0.7)

    def vel(x, i, th):
        t = solver.sigmas[i]
        return (t - (1 - t) * s2) / ((1 - t) ** 2 * s2 + t**2) * x + th[0] + th[1] * x

    def chain(th, n, gen):
        xs = [torch.randn(n, 1, generator=gen, dtype=torch.float64)]
        for i in range(steps):
            xs.append(solver.step(i, xs[-1], vel(xs[-1], i, th), gen))
        return xs

    def reward(x0):
        return -(x0 - 1.0).pow(2).squeeze(1)

    theta = torch.zeros(2, dtype=torch.float64)
    true = torch.zeros(2, dtype=torch.float64)
    for k in range(2):
        e = torch.zeros(2, dtype=torch.float64)
        e[k] = 1e-3
        up = reward(chain(theta + e, 100_000, torch.Generator().manual_seed(1))[-1])
        down = reward(chain(theta - e, 100_000, torch.Generator().manual_seed(1))[-1])
        true[k] = ((up - down) / 2e-3).mean()
    th = theta.clone().requires_grad_()
    gen, est = torch.Generator().manual_seed(2), torch.zeros(2, dtype=torch.float64)
    for _ in range(600):
        with torch.no_grad():
            xs = chain(theta, 8, gen)
        adv, _ = group_advantages(["p"] * 8, reward(xs[-1]))
        loss = 0.0
        for i in range(steps):
            lp = solver.log_prob(i, xs[i], vel(xs[i], i, th), xs[i + 1])
            loss = loss + ppo_loss(adv.double(), lp, lp.detach(), 1e-4)[0]
        est -= torch.autograd.grad(loss, th)[0]
    cos = torch.nn.functional.cosine_similarity(est, true, dim=0).item()
    print(f"policy gradient: estimated {est.tolist()}, true {true.tolist()}, cosine {cos:.4f}")
    assert cos > 0.95, (est, true)


# ---------------------------------------------------------------- the objective's gradient

# sd3's q/k RMSNorm computes its variance in fp32 even in a float64 model (tests/test_kl.py):
# eps 1e-3 and the tolerance of tests/test_objectives.py's sd3 checks (measured here: see the test)
EPS, RTOL = 1e-3, 3e-5


@pytest.fixture(scope="module")
def sd3(tiny_overrides, random_lora):
    folder = tiny.ensure_tiny_model("sd3")
    fam = families.get_family("sd3").load(Pretrained(folder), torch.float64).freeze("cpu")
    return fam, random_lora(fam, torch.float64)


def central_difference(params, loss_of) -> tuple[float, float, float]:
    """(loss, its central difference, the autograd gradient) on the LoRA entry with the largest
    gradient (each param's .grad holds the objective's)."""
    g = [p.grad.clone() for p in params]
    k = max(range(len(params)), key=lambda j: g[j].abs().max())
    idx = int(g[k].abs().argmax())
    p = params[k].data.view(-1)
    with torch.no_grad():
        centre = loss_of()
        p[idx] += EPS
        up = loss_of()
        p[idx] -= 2 * EPS
        down = loss_of()
        p[idx] += EPS
    return centre, (up - down) / (2 * EPS), g[k].view(-1)[idx].item()


def fake_run(fam, clip_range: float, beta: float):
    """The run fields FlowGRPO reads, over the real tiny model and a real CPU Accelerator."""
    from accelerate import Accelerator
    from ml_collections import ConfigDict

    fg = ConfigDict(dict(
        noise_level=0.7, group_size=2, num_steps=0, beta=beta, inner_epochs=1, minibatches=1,
        clip_range=clip_range, adv_clip_max=5.0, timestep_fraction=1.0,
    ))  # fmt: skip
    config = ConfigDict({"train": {"flow_grpo": fg}})
    opts = solvers.Sampling(4, 4.5, eta=0.0, height=64, width=64)
    return types.SimpleNamespace(
        config=config, opts=opts, family=fam, model=fam.denoiser, uncond=fam.encode([""]),
        dtype=torch.float64, device=torch.device("cpu"), acc=Accelerator(cpu=True),
    )  # fmt: skip


def test_flow_grpo_gradient_matches_finite_difference_in_float64(sd3):
    """The objective's backward (PPO's clipped ratio + beta KL to the base, one step) on a LoRA
    entry against the central difference of the same loss written with torch.distributions
    (Normal densities, kl_divergence) and the score-form step. Measured on the 2-core Xeon with
    AVX-512/AMX: relative error 4.6e-6 (sd3's fp32 RMSNorm, as in tests/test_objectives.py); the
    objective with beta = 0 (its KL dropped) fails the loss check, 0.5% off."""
    fam, params = sd3
    run = fake_run(fam, clip_range=0.5, beta=0.3)
    obj = FlowGRPO(run)
    opts = obj.sample_opts(run)
    cond = fam.encode(PROMPTS)
    torch.manual_seed(0)
    with torch.no_grad():
        _, info = solvers.sample(fam, cond, run.uncond, opts, record=True, dtype=torch.float64)
    latents, logp = info["trajectory"], info["log_probs"]
    assert latents.dtype == torch.float64 and logp.shape == (2, 4)
    i = 2
    adv = torch.tensor([1.0, -0.5], dtype=torch.float64)
    old = logp - torch.tensor([[0.1], [-0.05]], dtype=torch.float64)  # ratios 1.105 and 0.951
    batch = {"cond": cond, "latents": latents, "old_logp": old, "advantages": adv}
    obj.trainable_steps, obj.steps_per_sample = [i], 1
    log = {"loss": [], "ratio": [], "approx_kl": [], "clipfrac": [], "norms": [], "kl": [], "mismatch": None}  # fmt: skip
    for p in params:
        p.grad = None
    obj._ppo_backward(run, batch, torch.arange(2), 1, True, log)
    # the recomputed density is the recorded one (ratio 1 against it, up to float64 round-off):
    # its distance to the shifted old_logp is the shift
    assert abs(log["mismatch"].item() - 0.1) < 1e-10

    def loss_of() -> float:
        from alignprop.lora_io import adapters_disabled

        fn = solvers.guided(fam, fam.denoiser, 4.5, run.uncond, cond, torch.float64)
        x, x_next, t = latents[:, i], latents[:, i + 1], torch.tensor([obj.solver.model_time(i)])
        mean, std = independent_step(obj.solver, i, 0.7, x, fn(x, t))
        with adapters_disabled(fam.denoiser):
            base, _ = independent_step(obj.solver, i, 0.7, x, fn(x, t))
        new = Normal(mean, std).log_prob(x_next).flatten(1).mean(1)
        r = torch.exp(new - old[:, i])
        ppo = torch.maximum(-adv * r, -adv * r.clamp(0.5, 1.5)).mean()
        kl = kl_divergence(Normal(mean, std), Normal(base, std)).flatten(1).mean(1).mean()
        return (ppo + 0.3 * kl).item()

    centre, fd, ad = central_difference(params, loss_of)
    # the objective's loss (PPO + beta KL) is the independent one; measured 1.8e-9 apart: the
    # solver takes dt as a float32 difference, the independent step in float64
    torch.testing.assert_close(log["loss"][0].item(), centre, rtol=1e-7, atol=1e-12)
    err = abs(fd - ad) / abs(ad)
    print(
        f"flow_grpo on sd3: autograd {ad:.6e}, central difference {fd:.6e}, relative error {err:.1e}"
    )
    assert abs(ad) > 1e-8 and err <= RTOL, (fd, ad, err)


def nft_setting(sd3, beta: float = 1.0):
    """The NFT objective over the tiny float64 SD3 model, one micro-batch of two images with
    their draws (x_t, target, v_old under the current LoRA) at optimalities 0.9 and 0.2."""
    from ml_collections import ConfigDict

    fam, params = sd3
    run = fake_run(fam, clip_range=0.2, beta=0.0)
    run.config.train.diffusion_nft = ConfigDict(dict(
        group_size=2, beta=beta, timesteps=2, inner_epochs=1, minibatches=1, adv_clip_max=5.0,
        sample_cfg=False,
    ))  # fmt: skip
    obj = DiffusionNFT(run)
    x0 = torch.randn(2, *fam.latent_shape(64, 64), generator=torch.Generator().manual_seed(4))
    item = {"cond": fam.encode(PROMPTS), "x0": x0.double()}
    r = torch.tensor([0.9, 0.2], dtype=torch.float64)
    torch.manual_seed(1)
    return run, obj, params, obj.draws(run, item, r), r


def test_nft_gradient_at_the_old_policy_is_the_signed_flow_matching_gradient(sd3):
    """At v_theta = v_old the NFT loss's gradient is beta (2 r - 1) times the flow-matching
    loss's |v_theta - (eps - x0)|^2 per image: r > 1/2 pulls towards the image, r < 1/2 pushes
    away (measured: equal to 1e-12; beta 0.5 here)."""
    run, obj, params, draws, r = nft_setting(sd3, beta=0.5)
    for p in params:
        p.grad = None
    obj._backward(run, [draws])
    nft = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    fn = solvers.guided(run.family, run.model, 4.5, None, draws[0]["cond"], torch.float64)
    loss = 0.0
    for dr in draws:
        v = fn(dr["x_t"], obj.t_dev[dr["i"] : dr["i"] + 1])
        fm = (v - dr["target"]).pow(2).flatten(1).mean(1)
        loss = loss + (0.5 * (2 * r - 1) * fm).mean() / len(draws)
    loss.backward()
    for a, b in zip(nft, [p.grad for p in params], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-14)
    assert max(g.abs().max() for g in nft) > 1e-6


def test_nft_gradient_matches_finite_difference_in_float64(sd3):
    """Away from the old policy (the LoRA moved after v_old was taken): the objective's gradient
    against central differences of r |beta (v_theta - v_old) + v_old - v|^2 + (1 - r) |-beta
    (v_theta - v_old) + v_old - v|^2. Measured relative error 2.9e-6 (sd3's fp32 RMSNorm)."""
    run, obj, params, draws, r = nft_setting(sd3)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(9)
        for p in params:
            p += 0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
    for p in params:
        p.grad = None
    losses = obj._backward(run, [draws])
    fn = solvers.guided(run.family, run.model, 4.5, None, draws[0]["cond"], torch.float64)

    def loss_of() -> float:
        total = 0.0
        for dr in draws:
            v = fn(dr["x_t"], obj.t_dev[dr["i"] : dr["i"] + 1])
            d_old, step = dr["v_old"] - dr["target"], v - dr["v_old"]
            pos = (step + d_old).pow(2).flatten(1).mean(1)
            neg = (-step + d_old).pow(2).flatten(1).mean(1)
            total += (r * pos + (1 - r) * neg).mean().item() / len(draws)
        return total

    centre, fd, ad = central_difference(params, loss_of)
    torch.testing.assert_close(
        sum(x.item() for x in losses) / len(losses), centre, rtol=1e-9, atol=1e-12
    )
    err = abs(fd - ad) / abs(ad)
    print(
        f"diffusion_nft on sd3: autograd {ad:.6e}, central difference {fd:.6e}, relative error {err:.1e}"
    )
    assert abs(ad) > 1e-8 and err <= RTOL, (fd, ad, err)


# ---------------------------------------------------------------- tiny runs through train.py


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


RUNS = [("sd3", "flow_grpo"), ("flux", "flow_grpo"), ("sd3", "diffusion_nft")]


@pytest.fixture(scope="module")
def grpo_runs(tiny_overrides, tmp_path_factory) -> dict:
    """`scripts/train.py --config config/align_prop.py:tiny_{sd3,flux} --config.train.algorithm=flow_grpo`
    (the issue's command) and diffusion_nft on SD3, 2 updates each, in-process:
    {(name, algorithm): (run folder, metrics rows)}."""
    spec = importlib.util.spec_from_file_location("script_train", ROOT / "scripts" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    out = {}
    for name, algorithm in RUNS:
        logdir = tmp_path_factory.mktemp(f"{algorithm}_{name}")
        argv = [
            "--config", f"{ROOT}/config/align_prop.py:tiny_{name}",
            f"--config.train.algorithm={algorithm}", f"--config.logdir={logdir}",
            "--config.train.num_epochs=2", "--config.eval_freq=2", "--config.save_freq=2",
            "--config.log_images=0", "--config.run_name=run",
        ]  # fmt: skip
        _reset_accelerate()
        assert cli.run(train.main, argv) == 0, (name, algorithm)
        run = logdir / "run"
        out[name, algorithm] = run, [json.loads(line) for line in (run / "metrics.jsonl").open()]
    _reset_accelerate()
    return out


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_flow_grpo_runs_on_the_tiny_flow_kits(grpo_runs, name):
    """Each update logs the group statistics and PPO's; with one pass and one optimizer step every
    ratio is taken before the policy moves (1 up to fp32 round-off: measured 0.0 on the Xeon)."""
    run, rows = grpo_runs[name, "flow_grpo"]
    train = [r for r in rows if "reward_std_in_group" in r]
    assert len(train) == 2
    for r in train:
        assert r["reward_std_in_group"] > 0 and r["zero_std_groups"] == 0 and r["groups"] == 1
        assert r["logprob_mismatch"] < 1e-5 and abs(r["ratio_max"] - 1) < 1e-4
        assert r["clipfrac"] == 0 and r["kl"] >= 0 and "approx_kl" in r
    assert r["kl"] > 0  # the LoRA has moved from the base by the second update
    assert json.loads((run / "config.json").read_text())["train"]["algorithm"] == "flow_grpo"
    assert "Flow-GRPO" in (run / "final" / "README.md").read_text()


def test_diffusion_nft_runs_on_the_tiny_sd3_kit(grpo_runs):
    run, rows = grpo_runs["sd3", "diffusion_nft"]
    train = [r for r in rows if "optimality_mean" in r]
    assert len(train) == 2
    for r in train:  # a group of two: one image at r = 1/2 + A/10, the other below 1/2
        assert 0 < r["optimality_mean"] < 1 and r["reward_std_in_group"] > 0, r
        assert r["optimizer_steps"] == 1 and r["loss"] > 0
    assert json.loads((run / "config.json").read_text())["train"]["algorithm"] == "diffusion_nft"
    assert "DiffusionNFT" in (run / "final" / "README.md").read_text()


@pytest.mark.parametrize("name,algorithm", RUNS)
@torch.no_grad()
def test_rl_lora_loads_in_the_diffusers_pipeline(grpo_runs, name, algorithm):
    import diffusers

    from alignprop import inference

    fam = families.get_family(name).load(Pretrained(tiny.ensure_tiny_model(name)), torch.float32)
    pipe = getattr(diffusers, fam.freeze("cpu").pipeline_class)(**fam.components)
    noise = inference.fixed_noise(fam, 1, (64, 64), seed=0)
    if name == "flux":
        from alignprop.families.flux import pack

        noise = pack(noise)
    kw = dict(num_inference_steps=3, output_type="latent", height=64, width=64, latents=noise)
    before = pipe(PROMPTS[0], **kw).images
    pipe.load_lora_weights(str(grpo_runs[name, algorithm][0] / "final"))
    assert (pipe(PROMPTS[0], **kw).images - before).abs().max() > 1e-4


@pytest.mark.parametrize(
    "override,match",
    [
        (
            "--config.train.flow_grpo.group_size=3",
            "group_size=3 must divide train.total_batch_size=2",
        ),
        ("--config.train.flow_grpo.group_size=1", "group_size must be >= 2"),
        ("--config.train.flow_grpo.noise_level=0", r"noise_level=0\S* must be in \(0, 1\]"),
        ("--config.train.kl_coeff=0.1", "train.flow_grpo.beta"),
        (
            "--config.truncation.k_max=2",
            "truncation.k_max is ignored under train.algorithm=flow_grpo",
        ),
        ("--config.sample.merge_lora=False", "sample.merge_lora is ignored"),
        ("--config.train.ddpo.clip_range=0.2", "only train.algorithm=ddpo reads it"),
    ],
)
def test_flow_grpo_bad_settings_are_one_line_errors(tiny_overrides, override, match, capsys):
    spec = importlib.util.spec_from_file_location("script_train", ROOT / "scripts" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    argv = ["--config", f"{ROOT}/config/align_prop.py:tiny_sd3", "--config.train.algorithm=flow_grpo", override]  # fmt: skip
    assert cli.run(train.main, argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    import re

    assert re.search(match, err), err


def test_rl_objectives_refuse_the_other_solver(tiny_overrides):
    from alignprop import checks

    sys_path = str(ROOT / "config")
    import sys

    sys.path.insert(0, sys_path)
    import align_prop

    config = align_prop.get_config("tiny")
    config.train.algorithm = "flow_grpo"
    with pytest.raises(ConfigError, match="use train.algorithm=ddpo"):
        checks.apply_tiny(config)
        checks.validate_config(config)
    config.train.algorithm = "diffusion_nft"
    with pytest.raises(ConfigError, match="diffusion_nft is for the 'flow' solver's families"):
        checks.validate_config(config)
    config = align_prop.get_config("tiny_sd3")
    config.train.algorithm, config.sample.eta = "ddpo", 1.0
    from alignprop.objectives.ddpo import check_family_solver

    with pytest.raises(ConfigError, match="use train.algorithm=flow_grpo"):
        check_family_solver(config)
