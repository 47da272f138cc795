"""DDPO: step log-probabilities, the PPO loss, a tiny run (reward up, exact resume, loadable LoRA), the efficiency benchmark."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "config"))
import align_prop  # noqa: E402

from alignprop import checks, ddpo, rewards, solvers  # noqa: E402
from alignprop.errors import ConfigError  # noqa: E402

TRAIN = [
    sys.executable,
    str(ROOT / "scripts" / "train.py"),
    "--config",
    str(ROOT / "config" / "align_prop.py") + ":tiny_ddpo",
]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


# ---------------------------------------------------------------- the math


def test_step_log_prob_is_the_gaussian_density_of_the_next_latent():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        set_alpha_to_one=False,
        steps_offset=1,
    )  # SD 1.5: the last step is stochastic too
    solver = solvers.DDIM(sched, 10, 1.0, "epsilon")
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    for i in (0, 5, 9):
        x_next = solver.step(i, x, out, g)
        mean, sigma = solver.mean(i, x, out), solver.sigma(i)
        assert sigma > 0
        direct = torch.distributions.Normal(mean, sigma).log_prob(x_next).mean(dim=(1, 2, 3))
        torch.testing.assert_close(solver.log_prob(i, x, out, x_next), direct)
        # the sample is likelier under its own step's mean than under a shifted one
        assert (solver.log_prob(i, x, out + 0.5, x_next) < direct).all()


def test_ppo_clipping_engages_outside_the_clip_range():
    eps = 0.1
    ratio = torch.tensor([0.5, 0.95, 1.0, 1.05, 1.5, 0.5, 1.5])
    adv = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, -1.0, -1.0])
    logp = ratio.log().requires_grad_(True)
    loss, info = ddpo.ppo_loss(adv, logp, torch.zeros(7), eps)
    loss.backward()
    # d loss / d logp = -A r / n where the unclipped term is the max, 0 where the clip holds it
    expected = -adv * ratio / 7
    moves = torch.tensor([True, True, True, True, False, False, True])
    torch.testing.assert_close(logp.grad, torch.where(moves, expected, torch.zeros(7)))
    clipped = -adv * ratio.clamp(1 - eps, 1 + eps)
    torch.testing.assert_close(loss, torch.maximum(-adv * ratio, clipped).mean())
    assert info["clipfrac"].item() == pytest.approx(4 / 7)
    # advantages are clipped before the ratio multiplies them
    big, _ = ddpo.ppo_loss(torch.tensor([50.0]), torch.zeros(1), torch.zeros(1), eps, 5.0)
    assert big.item() == pytest.approx(-5.0)


def test_per_prompt_stats_use_the_batch_until_min_count():
    tracker = ddpo.PerPromptStatTracker(buffer_size=4, min_count=3)
    r = torch.tensor([1.0, 2.0, 3.0, 10.0])
    adv = tracker(["a", "a", "b", "b"], r)
    torch.testing.assert_close(adv, (r - r.mean()) / (r.std(unbiased=False) + 1e-6))
    adv = tracker(["a", "a", "b", "b"], torch.tensor([5.0, 5.0, 0.0, 0.0]))
    # "a" now has 4 rewards [1, 2, 5, 5]: its own statistics
    hist = torch.tensor([1.0, 2.0, 5.0, 5.0])
    want = (5.0 - hist.mean()) / (hist.std(unbiased=False) + 1e-6)
    torch.testing.assert_close(adv[:2], torch.full((2,), want.item()))
    state = tracker.state_dict()
    other = ddpo.PerPromptStatTracker(buffer_size=4, min_count=3)
    other.load_state_dict(json.loads(json.dumps(state)))
    assert other.state_dict() == state


# ---------------------------------------------------------------- config rules


def test_config_switch_and_its_errors():
    c = align_prop.get_config("aesthetic")
    c.train.algorithm = "reinforce"
    with pytest.raises(
        ConfigError,
        match=r"train\.algorithm='reinforce' .*valid: \['alignprop', 'ddpo', 'draft_lv', 'refl', "
        r"'drtune', 'direct_align', 'flow_grpo', 'diffusion_nft'\]",
    ):
        checks.validate_config(c)
    c = align_prop.get_config("aesthetic")
    c.reward = "jpeg"
    assert not rewards.is_differentiable("jpeg") and rewards.is_differentiable("aesthetic,hps")
    with pytest.raises(ConfigError, match="not differentiable.*use train.algorithm=ddpo"):
        checks.validate_config(c)
    c.eval_rewards = "jpeg"
    c.reward = "aesthetic"
    checks.validate_config(c)  # as an eval reward it is fine
    c = align_prop.get_config("aesthetic_ddpo")
    assert checks.validate_config(c, processes=8).total == 256
    c.sample.eta = 0.0
    with pytest.raises(ConfigError, match=r"sample\.eta"):
        checks.validate_config(c)
    c = align_prop.get_config("aesthetic_ddpo")
    c.train.ddpo.minibatches = 3
    with pytest.raises(ConfigError, match=r"train\.ddpo\.minibatches"):
        checks.validate_config(c)


# ---------------------------------------------------------------- a tiny run


@pytest.fixture(scope="module")
def ddpo_runs(tmp_path_factory, tiny_overrides):
    """One 8-update DDPO run on JPEG compressibility (checkpoints at 6, 7, 8), and a run resumed from its checkpoint 6."""
    logdir = tmp_path_factory.mktemp("ddpo")
    prompts = logdir / "one_prompt.txt"
    prompts.write_text("a photo of a cat\n")
    common = [f"--config.logdir={logdir}", f"--config.prompts.train={prompts}",
              "--config.eval_freq=0", "--config.save_freq=1", "--config.prompts.num_eval=2"]  # fmt: skip
    straight = subprocess.run([*TRAIN, *common, "--config.run_name=straight"], capture_output=True,
                              text=True, timeout=300, cwd=ROOT, env=ENV)  # fmt: skip
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    # the interrupted run: the state saved at update 6, in a run folder of its own
    ckpt = logdir / "resumed" / "checkpoints" / "checkpoint_6"
    shutil.copytree(logdir / "straight" / "checkpoints" / "checkpoint_6", ckpt)
    resumed = subprocess.run([*TRAIN, *common, "--config.run_name=resumed",
                              "--config.resume_from=latest"], capture_output=True, text=True,
                             timeout=300, cwd=ROOT, env=ENV)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return logdir, straight.stdout + straight.stderr


def rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "reward_mean" in r]


def test_tiny_ddpo_raises_jpeg_compressibility(ddpo_runs):
    logdir, out = ddpo_runs
    assert "DDPO: 32 images sampled and scored per update" in out
    train = rows(logdir / "straight")
    assert [r["step"] for r in train] == list(range(1, 9))
    assert train[-1]["samples_seen"] == 8 * 32
    for key in ("reward_mean", "reward_std", "loss", "grad_norm", "lr", "skipped_nonfinite",
                "sec_per_step", "peak_mem_gib", "approx_kl", "clipfrac", "ratio_mean"):  # fmt: skip
        assert key in train[-1], key
    # one pass, one optimizer step: every ratio is taken before the policy moves
    for r in train:
        assert r["logprob_mismatch"] < 1e-5 and abs(r["ratio_max"] - 1) < 1e-4, r
        assert r["clipfrac"] == 0.0
    first = sum(r["reward_mean"] for r in train[:3]) / 3
    last = sum(r["reward_mean"] for r in train[-3:]) / 3
    assert last > first + 0.01, [r["reward_mean"] for r in train]


def test_ddpo_resume_is_exact(ddpo_runs):
    from safetensors.torch import load_file

    logdir, _ = ddpo_runs
    a = load_file(str(logdir / "straight" / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(logdir / "resumed" / "final" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # stat tracker, RNG, optimizer and LoRA restored: bitwise equal on one CPU
        assert torch.equal(a[k], b[k]), k
    assert [r["reward_mean"] for r in rows(logdir / "resumed")] == [
        r["reward_mean"] for r in rows(logdir / "straight")
    ][-2:]


def test_ddpo_lora_loads_in_the_diffusers_pipeline(ddpo_runs, tiny_overrides):
    from diffusers import StableDiffusionPipeline

    logdir, _ = ddpo_runs
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_overrides["pretrained.model"], safety_checker=None
    )
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(num_inference_steps=4, latents=latents, output_type="pt", guidance_scale=7.5)
    before = pipe("a photo of a cat", **kw).images
    pipe.load_lora_weights(str(logdir / "straight" / "final"))
    after = pipe("a photo of a cat", **kw).images
    assert (after - before).abs().max() > 1e-4


def test_ppo_ratio_moves_after_the_first_step(tiny_overrides, one_thread, tmp_path):
    """Two passes over one batch: the first is at ratio 1, the second sees the updated policy."""
    from accelerate import Accelerator

    config = align_prop.get_config("tiny_ddpo")
    config.sample.num_steps, config.sample.batch_size = 4, 4
    config.train.total_batch_size = config.train.samples_per_epoch = 4
    config.train.ddpo.inner_epochs = 2
    checks.apply_tiny(config)
    run = ddpo.DDPO(config, Accelerator(cpu=True), checks.validate_config(config), tmp_path)
    m = run.update()
    assert m["optimizer_steps"] == 2 and m["logprob_mismatch"] < 1e-5
    assert m["ratio_max"] - m["ratio_min"] > 1e-4 and m["approx_kl"] > 0


def old_sample_trajectories(run, texts):
    """DDPO's own chain loop before it moved onto solvers.sample (kept here as the reference)."""
    cond = run.family.encode(texts)
    fn = solvers.guided(run.family, run.model, run.opts.guidance_scale, run.uncond, cond, run.dtype)
    x = torch.randn((len(texts), *run.family.latent_shape(run.opts.height, run.opts.width)))
    latents, log_probs = [x], []
    for i in range(run.opts.num_steps):
        out = fn(x, run.t_dev[i : i + 1])
        x_next = run.solver.step(i, x, out, None)
        sigma = run.solver.sigma(i)
        log_probs.append(
            run.solver.log_prob(i, x, out, x_next) if sigma > 0 else torch.zeros(len(x))
        )
        latents.append(x_next)
        x = x_next
    reward, _ = run.reward_fn(run.family.decode(x), texts)
    return torch.stack(latents, dim=1), torch.stack(log_probs, dim=1), reward


def test_ddpo_trajectories_on_the_one_chain_loop_are_unchanged(
    tiny_overrides, one_thread, tmp_path
):
    from accelerate import Accelerator

    config = align_prop.get_config("tiny_ddpo")
    config.sample.num_steps, config.sample.batch_size = 4, 2
    config.train.total_batch_size = config.train.samples_per_epoch = 2
    checks.apply_tiny(config)
    run = ddpo.DDPO(config, Accelerator(cpu=True), checks.validate_config(config), tmp_path)
    with torch.no_grad():  # a LoRA that changes the outputs, so that merged weights would show
        for n, p in run.family.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    texts = ["a cat", "a dog"]
    torch.manual_seed(7)
    got = run.sample_trajectories(texts)
    torch.manual_seed(7)
    with torch.no_grad():
        latents, log_probs, reward = old_sample_trajectories(run, texts)
    assert got["latents"].shape == (2, 5, *latents.shape[2:])
    # the same operations on the same stream: bitwise equal
    assert torch.equal(got["latents"], latents)
    assert torch.equal(got["log_probs"], log_probs)
    assert torch.equal(got["rewards"], reward.float())
    # and each recorded log-probability is the Gaussian density of the recorded next latent
    x, out = got["latents"][:, 1], None
    i = 1
    with torch.no_grad():
        cond = run.family.encode(texts)
        fn = solvers.guided(
            run.family, run.model, run.opts.guidance_scale, run.uncond, cond, run.dtype
        )
        out = fn(x, run.t_dev[i : i + 1])
    mean, sigma = run.solver.mean(i, x, out), run.solver.sigma(i)
    direct = (
        torch.distributions.Normal(mean, sigma).log_prob(got["latents"][:, 2]).mean(dim=(1, 2, 3))
    )
    torch.testing.assert_close(got["log_probs"][:, i], direct)


# ---------------------------------------------------------------- the benchmark


def test_efficiency_benchmark_tiny(tmp_path, tiny_overrides):
    """One invocation, two families: the objectives that apply to each (ddpo on SD, flow_grpo on
    SD3, alignprop as the reference on both), each for its budget, the same start, the judges and
    diversity at the end, the table and a plot per family."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "efficiency.py"), "--tiny", "--budget", "32",
           "--rl-factor", "1", "--eval-every", "32", "--steps", "4", "--num-eval", "2",
           "--eval-repeats", "2", "--algorithms", "ddpo,flow_grpo", "--out", str(tmp_path)]  # fmt: skip
    env = dict(ENV, ALIGNPROP_TINY_DIR=os.environ["ALIGNPROP_TINY_DIR"])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "curves.jsonl").read_text().splitlines()]
    curves = [r for r in lines if "end" not in r]
    plan = {"sd": ("alignprop", "ddpo"), "sd3": ("alignprop", "flow_grpo")}
    for family, algos in plan.items():
        by = {
            a: [r for r in curves if r["family"] == family and r["algorithm"] == a] for a in algos
        }
        assert set(by) == {r["algorithm"] for r in curves if r["family"] == family}
        for a in algos:  # alignprop: 16 updates of 2 images; ddpo 1 of 32; flow_grpo 2 of 16
            assert [r["queries"] for r in by[a]] == [0, 32], (family, a)
        assert by[algos[0]][0]["eval_reward"] == by[algos[1]][0]["eval_reward"]  # same start
    assert all(math.isfinite(r["eval_reward"]) for r in curves)
    ends = [r["end"] for r in lines if "end" in r]
    assert [(e["family"], e["algorithm"]) for e in ends] == [
        (f, a) for f, al in plan.items() for a in al
    ]
    for e in ends:  # the judge and the diversity across the two draws, from the same noise
        assert math.isfinite(e["eval/hps_mean"]) and e["eval/diversity"] > 0, e
    summary = json.loads((tmp_path / "summary.json").read_text())
    for family, algos in plan.items():
        table = summary["families"][family]["table"]
        assert [r["fraction"] for r in table] == [0.25, 0.5, 1.0]
        assert set(table[-1]["objectives"]) == set(algos)
        assert (tmp_path / f"efficiency_{family}.png").stat().st_size > 1000
        assert f"{family}: queries (x AlignProp's)" in proc.stdout
