"""The pathwise objectives (alignprop.objectives): each one's LoRA gradient against float64
central differences of its own loss, and its sampler against an independent chain.

Each objective's gradient leaves out, by design, part of the loss's dependence on the LoRA:
the chain before the differentiable part (ReFL, DRaFT-LV, Direct-Align) or the denoiser's
Jacobian in its input (DRTune). "Its own loss" is then the loss with those parts held at their
values under the unperturbed LoRA, and that is what the finite differences below see: each
test runs its own chain (a plain loop over solvers' update rules, not solvers.sample), keeps
what the objective holds fixed, and differentiates the rest numerically. A gradient that took
one part too many or too few would differ by far more than float64 round-off.
"""

from __future__ import annotations

import pytest
import torch

from alignprop import families, solvers, tiny
from alignprop.families import Pretrained

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a photo of a cat", "an oil painting of two dogs"]
STEPS = 4
# kit: (family, guidance); eta 0, so that the generator's first draw after x_T is the
# objective's own (the re-noising eps, DRTune's offset)
KITS = {"sd": ("sd", 3.0), "sd3": ("sd3", 4.5)}
# float64 relative error of the autograd entry against the central difference, measured on a
# Xeon with AVX-512/AMX: sd 1.4e-9 (inject) to 2.0e-8 (x0); sd3 1.7e-8 (x0) to 4.6e-6 (spread).
# sd3 needs eps 1e-3 because diffusers computes its q/k RMSNorm variance in fp32 even in a
# float64 model (tests/test_kl.py). A DRTune gradient without its stop-gradient (the AlignProp
# gradient through the same steps) is 1.9e-4 (sd) and 2.2e-3 (sd3) off this loss.
RTOL = {"sd": 2e-7, "sd3": 3e-5}
EPS = {"sd": 1e-5, "sd3": 1e-3}


@pytest.fixture(scope="module")
def fams(tiny_overrides, random_lora) -> dict:
    out = {}
    for kit, (name, _) in KITS.items():
        folder = tiny.ensure_tiny_model(kit)
        fam = families.get_family(name).load(Pretrained(folder), torch.float64).freeze("cpu")
        out[kit] = (fam, random_lora(fam, torch.float64))
    return out


def reward(images: torch.Tensor) -> torch.Tensor:
    """A smooth stand-in reward of the decoded images (fixed weights), one value per image."""
    w = torch.randn(images.shape[1:], generator=torch.Generator().manual_seed(11)).double()
    return (images.tanh() * w).flatten(1).mean(1)


def setting(fam, kit: str):
    opts = solvers.Sampling(STEPS, KITS[kit][1], eta=0.0, height=64, width=64)
    x_t = torch.randn(
        (len(PROMPTS), *fam.latent_shape(64, 64)), generator=torch.Generator().manual_seed(3)
    ).double()
    cond, uncond = fam.encode(PROMPTS), fam.encode([""])
    return opts, x_t, cond, uncond


def objective_loss(fam, kit: str, how: str, k: int, copies: int = 1):
    """(loss, info) of solvers.sample with gradient where `how` says, K = k."""
    opts, x_t, cond, uncond = setting(fam, kit)
    trunc = solvers.Truncation("fixed", k=k, k_min=1, k_max=1, cut_mean=42.0, cut_std=5.0)
    images, info = solvers.sample(
        fam, cond, uncond, opts, truncation=trunc, latents=x_t, how=how, copies=copies,
        generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    return -reward(images).mean(), info


class Chain:
    """The test's own chain: every step's input and output under the current LoRA, no grad."""

    def __init__(self, fam, kit: str):
        self.fam, self.kit = fam, kit
        self.opts, x, self.cond, self.uncond = setting(fam, kit)
        self.solver = solvers.make_solver(fam, STEPS, 0.0, tuple(x.shape))
        self.t = [torch.tensor([self.solver.model_time(i)]) for i in range(STEPS)]
        self.inputs, self.outputs = [], []
        with torch.no_grad():
            for i in range(STEPS):
                out = self.fn()(x, self.t[i])
                self.inputs.append(x)
                self.outputs.append(out)
                x = self.solver.step(i, x, out, None)
        self.x0 = x

    def fn(self, cond=None):
        return solvers.guided(
            self.fam, self.fam.denoiser, self.opts.guidance_scale, self.uncond,
            self.cond if cond is None else cond, torch.float64,
        )  # fmt: skip


def check_gradient(fam, params, kit: str, how: str, k: int, surrogate, copies: int = 1):
    """Autograd of objective_loss on the largest LoRA gradient entry vs the central difference
    of surrogate(chain) (chain: the test's Chain under the unperturbed LoRA)."""
    for p in params:
        p.grad = None
    loss, info = objective_loss(fam, kit, how, k, copies)
    loss.backward()
    g = [p.grad.clone() for p in params]
    i = max(range(len(params)), key=lambda j: g[j].abs().max())
    idx = int(g[i].abs().argmax())
    chain = Chain(fam, kit)
    # the objective's sampler against the test's chain: the prefix it holds fixed is the same
    p, eps = params[i].data.view(-1), EPS[kit]
    with torch.no_grad():
        p[idx] += eps
        up = surrogate(chain, info).item()
        p[idx] -= 2 * eps
        down = surrogate(chain, info).item()
        p[idx] += eps
        centre = surrogate(chain, info).item()
    torch.testing.assert_close(centre, loss.item(), rtol=1e-10, atol=1e-12)  # the same loss
    fd, ad = (up - down) / (2 * eps), g[i].view(-1)[idx].item()
    err = abs(fd - ad) / abs(ad)
    print(
        f"{how} on {kit}: autograd {ad:.6e}, central difference {fd:.6e}, relative error {err:.1e}"
    )
    assert abs(ad) > 1e-8
    assert err <= RTOL[kit], (kit, how, fd, ad, err)
    return info, err


@pytest.mark.parametrize("kit", ["sd", "sd3"])
def test_refl_gradient_matches_finite_difference_in_float64(fams, kit):
    """ReFL: x at step T - K held fixed, one call predicts x0 from it."""
    fam, params = fams[kit]
    k = 2
    s = STEPS - k

    def surrogate(chain, info):
        x = chain.inputs[s]  # the chain's x_s under the unperturbed LoRA
        x0 = chain.solver.predict_x0(s, x, chain.fn()(x, chain.t[s]))
        return -reward(fam.decode(x0)).mean()

    info, _ = check_gradient(fam, params, kit, "x0", k, surrogate)
    assert info["K"] == k and info["grad_steps"] == []


@pytest.mark.parametrize("kit", ["sd", "sd3"])
def test_draft_lv_gradient_matches_finite_difference_in_float64(fams, kit):
    """DRaFT-LV: x0 held fixed; n = 2 copies re-noised with the generator's first draw, each
    denoised by the last K = 2 steps with gradient (through x as well)."""
    fam, params = fams[kit]
    k, n = 2, 2

    def surrogate(chain, info):
        x0 = chain.x0.repeat(n, 1, 1, 1)
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7)).double()
        s = STEPS - k
        x = chain.solver.add_noise(s, x0, eps)
        fn = chain.fn(type(chain.cond).cat([chain.cond] * n))
        for i in range(s, STEPS):
            x = chain.solver.step(i, x, fn(x, chain.t[i]), None)
        return -reward(fam.decode(x)).mean()

    check_gradient(fam, params, kit, "renoise", k, surrogate, copies=n)


@pytest.mark.parametrize("kit", ["sd", "sd3"])
def test_drtune_gradient_matches_finite_difference_in_float64(fams, kit):
    """DRTune: K = 2 steps, one per stride of 2; at them the denoiser sees the unperturbed
    chain's input (stop-gradient), elsewhere its output is the unperturbed one; the latent
    itself moves through every solver step."""
    fam, params = fams[kit]
    k = 2

    def surrogate(chain, info):
        x = chain.inputs[0]
        for i in range(STEPS):
            if i in info["grad_steps"]:
                out = chain.fn()(chain.inputs[i], chain.t[i])
            else:
                out = chain.outputs[i]
            x = chain.solver.step(i, x, out, None)
        return -reward(fam.decode(x)).mean()

    info, _ = check_gradient(fam, params, kit, "spread", k, surrogate)
    steps = info["grad_steps"]
    assert len(steps) == k and steps[1] - steps[0] == STEPS // k, steps


@pytest.mark.parametrize("kit", ["sd", "sd3"])
def test_direct_align_gradient_matches_finite_difference_in_float64(fams, kit):
    """Direct-Align: x0 held fixed, noised with known eps to step T - K's level, one
    differentiable step, x0 recovered with eps; K = 3 (a noisy level)."""
    fam, params = fams[kit]
    k = 3
    s = STEPS - k

    def surrogate(chain, info):
        eps = torch.randn(chain.x0.shape, generator=torch.Generator().manual_seed(7)).double()
        x = chain.solver.add_noise(s, chain.x0, eps)
        x_next = chain.solver.step(s, x, chain.fn()(x, chain.t[s]), None)
        return -reward(fam.decode(chain.solver.recover_x0(s + 1, x_next, eps))).mean()

    check_gradient(fam, params, kit, "inject", k, surrogate)


@pytest.mark.parametrize("kit", ["sd", "sd3"])
def test_recover_x0_inverts_add_noise_at_every_level(fams, kit):
    """Direct-Align's closed form: the noise level of every step input and of the chain's end."""
    fam, _ = fams[kit]
    solver = solvers.make_solver(fam, STEPS, 0.0, (1, *fam.latent_shape(64, 64)))
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn((2, *fam.latent_shape(64, 64)), generator=gen).double()
    eps = torch.randn(x0.shape, generator=gen).double()
    for i in range(1, STEPS):
        x = solver.add_noise(i, x0, eps)
        assert not torch.allclose(x, x0)
        torch.testing.assert_close(solver.recover_x0(i, x, eps), x0, rtol=0, atol=1e-12)
    # after the last step: the chain's end (sigma 0 for flows; DDIM's final alpha)
    end = solver.recover_x0(STEPS, x0, eps)
    if kit == "sd3":
        torch.testing.assert_close(end, x0, rtol=0, atol=0)
    else:
        a = solver.a_prev[-1]
        torch.testing.assert_close(end, (x0 - (1 - a) ** 0.5 * eps) / a**0.5)


def test_every_how_without_autograd_is_the_plain_chain(fams):
    """Evaluation and sample.py run each objective's chain without autograd: the same images."""
    fam, _ = fams["sd"]
    opts, x_t, cond, uncond = setting(fam, "sd")
    trunc = solvers.Truncation("fixed", k=2, k_min=1, k_max=1, cut_mean=42.0, cut_std=5.0)
    outs = []
    with torch.no_grad():
        for how in solvers.HOWS:
            images, info = solvers.sample(
                fam, cond, uncond, opts, truncation=trunc, latents=x_t, how=how, copies=2
            )
            assert info["K"] == 0
            outs.append(images)
    for images in outs[1:]:
        torch.testing.assert_close(images, outs[0], rtol=0, atol=0)


# ---------------------------------------------------------------- each objective learns (the CLI)

LEARN_UPDATES = 20


@pytest.fixture(scope="module")
def learned(tiny_overrides, tmp_path_factory) -> dict:
    """`scripts/train.py --config config/align_prop.py:tiny --config.train.algorithm=NAME` for
    each new objective, 20 updates of a 10-step chain (half the tiny config's, half the cost;
    the reward rises more on it) with the eval at 0 and 20: {name: (metrics rows, config)}."""
    import importlib.util
    import json
    from pathlib import Path

    from alignprop import cli

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("script_train", root / "scripts" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    out = {}
    for name in ("draft_lv", "refl", "drtune", "direct_align"):
        logdir = tmp_path_factory.mktemp(name)
        argv = [
            "--config", f"{root}/config/align_prop.py:tiny", f"--config.train.algorithm={name}",
            f"--config.logdir={logdir}", f"--config.train.num_epochs={LEARN_UPDATES}",
            f"--config.eval_freq={LEARN_UPDATES}", f"--config.save_freq={LEARN_UPDATES}",
            "--config.log_images=0", "--config.run_name=run", "--config.sample.num_steps=10",
        ]  # fmt: skip
        _reset_accelerate()
        assert cli.run(train.main, argv) == 0, name
        rows = [json.loads(line) for line in (logdir / "run" / "metrics.jsonl").open()]
        out[name] = rows, json.loads((logdir / "run" / "config.json").read_text())
    _reset_accelerate()
    return out


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.mark.parametrize("name", ["draft_lv", "refl", "drtune", "direct_align"])
def test_each_objective_learns_on_the_tiny_config(learned, name):
    """The fixed-noise eval reward after 20 updates is above the untrained model's (on the
    2-core Xeon with AVX-512/AMX, from 0.367: 0.451 draft_lv, 0.499 refl, 0.437 drtune, 0.439
    direct_align), the run is recorded as that objective, and each update logs K."""
    rows, config = learned[name]
    evals = [r for r in rows if "eval/reward_mean" in r]
    assert [r["step"] for r in evals] == [0, LEARN_UPDATES]
    start, end = evals[0]["eval/reward_mean"], evals[-1]["eval/reward_mean"]
    assert end > start, (name, start, end)
    assert config["train"]["algorithm"] == name
    train = [r for r in rows if "K_mean" in r]
    assert len(train) == LEARN_UPDATES and all(1 <= r["K_mean"] <= 3 for r in train)


def test_objective_cost_benchmark_runs_and_refuses_bad_names(tiny_overrides, tmp_path, capsys):
    """benchmarks/objective_cost.py (the README's cost line): rows per objective, ratios to
    alignprop's; an unknown objective is one line and status 2."""
    import importlib.util
    import json
    from pathlib import Path

    from alignprop import cli

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "objective_cost.py"
    spec = importlib.util.spec_from_file_location("objective_cost", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    code = cli.run(bench.main, ["--tiny", "--objectives", "alignprop,reinforce"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: --objectives: ['reinforce']"), err
    # an RL objective beside a pathwise one, the same images per update (--batch)
    argv = ["--tiny", "--updates", "1", "--k", "1", "--objectives", "alignprop,refl,ddpo",
            "--batch", "2", "--steps", "6"]  # fmt: skip
    assert cli.run(bench.main, [*argv, "--out", str(tmp_path)]) == 0
    _reset_accelerate()
    rows = json.loads((tmp_path / "objective_cost.json").read_text())["rows"]
    assert [r["objective"] for r in rows] == ["alignprop", "refl", "ddpo"]
    assert rows[0]["time_vs_alignprop"] == 1.0 and rows[1]["sec_per_update"] > 0
    assert [r["images_per_update"] for r in rows] == [2, 2, 2]
