"""Reward-hacking guards in training: eval diversity, early stopping and best/, KL to the base,
the pretraining loss, the LoRA scale sweep and the model cards of a real tiny run."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from alignprop import checkpoints, checks, early_stop, lora_io, pretrain, solvers
from alignprop import trainer as T
from alignprop.errors import ConfigError, RunStopped

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "config" / "align_prop.py")
# An eval judge whose value follows a script, one entry per evaluation (2 batches per evaluation
# with 2 eval prompts x 2 seeds and sample.batch_size 2): the early-stopping decision is known.
SCRIPT = [0.0, 1.0, 3.0, 2.0, 2.5, 5.0, 6.0, 7.0, 8.0]
JUDGE = "tests.test_hacking_train:scripted_judge"
JUDGE_KEY = f"eval/{JUDGE}_mean"


FAST = ["--config.sample.num_steps=8"]


def scripted_judge(cfg, device, dtype):
    calls = {"n": 0}

    def judge(images, prompts):
        value = SCRIPT[calls["n"] // 2]
        calls["n"] += 1
        return torch.full((images.shape[0],), value, device=images.device), {}

    return judge


def load_named_config(name: str):
    spec = importlib.util.spec_from_file_location("align_prop_cfg", CONFIG)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(name)


def run_train(logdir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", f"{CONFIG}:tiny"]
    cmd += [f"--config.logdir={logdir}", "--config.prompts.num_eval=2", *FAST, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def lora(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / lora_io.LORA_WEIGHT_NAME))


def assert_same_lora(a: Path, b: Path) -> None:
    ta, tb = lora(a), lora(b)
    assert ta.keys() == tb.keys() and ta
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


# ---------------------------------------------------------------- a real tiny run


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, tiny_overrides) -> Path:
    """8 updates planned, eval every update with 2 seeds, early stop on the scripted judge."""
    logdir = tmp_path_factory.mktemp("hack_runs")
    run_train(
        logdir, "--config.run_name=stop", "--config.train.num_epochs=8", "--config.eval_freq=1",
        "--config.save_freq=1", "--config.keep_checkpoints=0", "--config.eval_repeats=2",
        f"--config.eval_rewards=hps,{JUDGE}", f"--config.train.early_stop.metric={JUDGE_KEY}",
        "--config.train.early_stop.patience=2",
    )  # fmt: skip
    return logdir / "stop"


def test_early_stop_keeps_the_best_lora_and_logs_diversity_and_judges(stopped_run):
    log = rows(stopped_run)
    evals = [r for r in log if JUDGE_KEY in r]
    # script 0, 1, 3 (best, update 2), 2, 2.5: two evaluations without a new best -> stop at 4
    assert [r["step"] for r in evals] == [0, 1, 2, 3, 4]
    assert [r for r in log if "reward_mean" in r][-1]["step"] == 4
    assert evals[-1]["early_stop/best_step"] == 2 and evals[-1]["early_stop/bad_evals"] == 2
    assert_same_lora(stopped_run / "best", stopped_run / "checkpoints" / "checkpoint_2")
    assert_same_lora(stopped_run / "final", stopped_run / "checkpoints" / "checkpoint_4")
    assert not any(stopped_run.glob("best.*"))  # the temporary folders of the swap are gone
    for r in evals:  # two seeds per prompt: diversity, from the training reward's CLIP tower
        assert 0 < r["eval/diversity_min"] <= r["eval/diversity"] < 2
        assert "eval/hps_mean" in r
    assert (stopped_run / "report" / "reward_vs_judges.png").is_file()
    assert (stopped_run / "report" / "reward_vs_diversity.png").is_file()


def front_matter(readme: Path) -> tuple[dict, str]:
    text = readme.read_text()
    assert text.startswith("---\n")
    meta, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(meta), body


def test_model_cards_parse_and_load_with_diffusers(stopped_run, tiny_overrides):
    from diffusers import StableDiffusionPipeline

    for name, step in (("final", 4), ("best", 2)):
        meta, body = front_matter(stopped_run / name / "README.md")
        assert meta["library_name"] == "diffusers" and "alignprop" in meta["tags"]
        assert "reward-aesthetic" in meta["tags"] and meta["pipeline_tag"] == "text-to-image"
        assert "## Evaluation" in body and "`eval/diversity`" in body
        assert f"| `evaluated at update` | {step} |" in body
        assert (stopped_run / name / "samples.png").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_overrides["pretrained.model"], safety_checker=None
    )
    for name in ("final", "best"):
        pipe.load_lora_weights(str(stopped_run / name), adapter_name=name)
    assert set(pipe.get_list_adapters()["unet"]) == {"final", "best"}


def test_lora_scale_sweep_writes_the_tradeoff(stopped_run, tmp_path):
    out = tmp_path / "sweep"
    cmd = [
        sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--config", f"{CONFIG}:tiny",
        "--checkpoints", str(stopped_run), "--lora-scales", "0,1", "--config.eval_repeats=2",
        "--config.prompts.num_eval=2", "--config.eval_rewards=", "--out", str(out), *FAST,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (out / "tradeoff.md").read_text().splitlines()
    assert table[0] == "| scale | aesthetic_mean | diversity |" and len(table) == 4
    assert (out / "tradeoff.png").stat().st_size > 0
    # scale 0 is the base model, scale 1 the final LoRA: the training eval measured both
    final = [r for r in rows(stopped_run) if "eval/diversity" in r]
    base_div, lora_div = (float(line.split("|")[3]) for line in table[2:])
    assert base_div == pytest.approx(final[0]["eval/diversity"], rel=1e-3)
    assert lora_div == pytest.approx(final[-1]["eval/diversity"], rel=1e-3)


def test_resume_is_exact_with_eval_diversity_and_early_stop(tmp_path, tiny_overrides):
    common = [
        "--config.train.num_epochs=3", "--config.eval_freq=1", "--config.save_freq=1",
        "--config.keep_checkpoints=0", "--config.eval_repeats=2", "--config.eval_rewards=",
        "--config.train.early_stop.metric=eval/diversity", "--config.train.early_stop.patience=9",
    ]  # fmt: skip
    run_train(tmp_path, "--config.run_name=straight", *common)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    shutil.copytree(straight, resumed)  # the run cut after update 1, then resumed
    for p in ("final", "best", "checkpoints/checkpoint_2", "checkpoints/checkpoint_3"):
        shutil.rmtree(resumed / p)
    run_train(tmp_path, *common, f"--config.resume_from={resumed}/checkpoints/checkpoint_1")
    assert_same_lora(straight / "final", resumed / "final")
    keys = ("reward_mean", "eval/diversity", "eval/reward_mean", "early_stop/best_step")
    a, b = rows(straight), rows(resumed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3, 3]  # 3: final eval
    assert [[r.get(k) for k in keys] for r in a] == [[r.get(k) for k in keys] for r in b]


# ---------------------------------------------------------------- config checks


@pytest.mark.parametrize(
    "field,value",
    [
        ("train.kl_coeff", -1.0),
        ("train.pretrain_coeff", -0.5),
        ("train.pretrain_data", "/no/such/folder"),
        ("train.early_stop.metric", "eval/nope_mean"),
        ("eval_repeats", 0),
        ("train.early_stop.metric", "eval/diversity"),  # needs eval_repeats >= 2
        ("push_to_hub", "me/my-lora"),  # tests are offline: fails before anything loads
    ],
)
def test_bad_guard_settings_name_the_field(field, value):
    config = load_named_config("aesthetic")
    config.eval_repeats = 1  # the shipped config's 2 would make eval/diversity valid
    node = config
    *parents, name = field.split(".")
    for p in parents:
        node = node[p]
    node[name] = value
    with pytest.raises(ConfigError, match=re.escape(field)):
        checks.validate_config(config, processes=8)


def test_published_run_lengths():
    for name, epochs, updates in (("aesthetic", 7, 14), ("aesthetic_k1", 7, 14), ("hps", 200, 400)):
        config = load_named_config(name)
        assert config.train.num_epochs == epochs
        assert checks.validate_config(config, processes=8).num_updates == updates
    assert load_named_config("hps_k1").train.num_epochs == 200


# ---------------------------------------------------------------- KL and pretraining loss, in process


def make_run(tmp_path: Path, **train):
    from accelerate import Accelerator

    config = load_named_config("tiny")
    checks.apply_tiny(config)
    config.sample.num_steps = 8
    for k, v in train.items():
        config.train[k] = v
    return T.AlignProp(config, Accelerator(cpu=True), checks.validate_config(config), tmp_path)


def lora_grads(run) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in run.params]
    run.optimizer.zero_grad(set_to_none=True)
    return grads


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, tiny_overrides, one_thread):
    return make_run(tmp_path_factory.mktemp("plain"))


def test_eval_diversity_leaves_the_training_stream_alone(plain_run):
    plain_run.config.eval_repeats = 2
    plain_run.config.prompts.num_eval = 2
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    metrics, images, _ = plain_run.evaluate()
    assert torch.equal(rng, torch.get_rng_state())
    assert images.shape[0] == 4 and 0 < metrics["eval/diversity"] < 2


def test_kl_off_is_bitwise_the_plain_step(plain_run):
    run = plain_run
    texts = ["a cat", "a dog"]
    torch.manual_seed(3)
    loss, _, info = run.loss_on(texts)
    loss.backward()
    got = lora_grads(run)
    assert "kl" not in info and "pretrain_loss" not in info
    torch.manual_seed(3)  # the step as it was before the regularisers: sample, reward, loss
    images, _ = solvers.sample(
        run.family, run.family.encode(texts), run.uncond, run.opts, model=run.model,
        truncation=run.truncation, dtype=run.dtype,
    )  # fmt: skip
    _, rinfo = run.reward_fn(images, texts)
    (run.config.train.loss_coeff * rinfo["loss"].mean()).backward()
    want = lora_grads(run)
    assert any(g.abs().sum() > 0 for g in want)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def held_out_drift(run) -> float:
    """Mean squared difference of LoRA and base predictions at unseen latents, steps and prompts."""
    fam = run.family
    gen = torch.Generator().manual_seed(99)
    cond = fam.encode(["a red car", "a small house", "an owl", "a boat"])
    x = torch.randn((4, *fam.latent_shape(*run.opts.size(fam))), generator=gen)
    t = torch.tensor([999, 700, 400, 100])
    with torch.no_grad():
        out = fam.denoise(fam.denoiser, x, t, cond)
        with lora_io.adapters_disabled(fam.denoiser):
            base = fam.denoise(fam.denoiser, x, t, cond)
    return (out - base).pow(2).mean().item()


def test_kl_keeps_the_lora_closer_to_the_base(tmp_path, tiny_overrides, one_thread):
    drift = {}
    for coeff in (0.0, 200.0):
        run = make_run(tmp_path / str(coeff), kl_coeff=coeff)
        torch.manual_seed(0)
        for _ in range(4):
            m = run.update()
        assert ("kl" in m) == (coeff > 0)
        drift[coeff] = held_out_drift(run)
        assert all(p.requires_grad for p in run.params)  # the base calls left the LoRA trainable
    assert 0 < drift[200.0] < 0.5 * drift[0.0], drift


def test_pretrain_loss_on_base_samples_and_on_a_folder(tmp_path, tiny_overrides, one_thread):
    from diffusers import DDIMScheduler
    from PIL import Image

    run = make_run(tmp_path, pretrain_coeff=1.0)
    torch.manual_seed(0)
    m = run.update()
    assert m["pretrain_loss"] > 0 and torch.isfinite(torch.tensor(m["pretrain_loss"]))
    cached = dict(run.pretrain.cache)
    assert cached and all(v.ndim == 3 for v in cached.values())
    run.pretrain.cache.clear()  # a base sample depends on its prompt alone
    for text, latent in cached.items():
        assert torch.equal(run.pretrain._base_latent(text), latent)

    data = tmp_path / "data"
    data.mkdir()
    for i, color in enumerate(("red", "blue")):
        Image.new("RGB", (80, 64), color).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a {color} square")
    Image.new("RGB", (8, 8)).save(data / "no_caption.png")
    fam = run.family
    folder = pretrain.PretrainLoss(fam, run.opts, run.uncond, seed=0, data=str(data))
    assert len(folder.items) == 2
    loss = folder(["ignored"] * 2, run.model, run.dtype)
    loss.backward()
    assert torch.isfinite(loss) and any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in run.params
    )

    x0_model = type(fam)(
        dict(
            fam.components,
            scheduler=DDIMScheduler.from_config(fam.scheduler.config, prediction_type="sample"),
        )
    )
    with pytest.raises(ConfigError, match="not available for family 'sd'"):
        pretrain.check_family(x0_model)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="train.pretrain_data"):
        pretrain.read_folder(empty)


def test_replace_folder_swaps_whole_folders(tmp_path):
    out = tmp_path / "best"
    early_stop.replace_folder(out, lambda d: (d / "a.txt").write_text("1"))
    early_stop.replace_folder(out, lambda d: (d / "b.txt").write_text("2"))
    assert sorted(p.name for p in out.iterdir()) == ["b.txt", "files.json"]  # + its manifest
    os.replace(out, tmp_path / "best.old")  # a swap cut short between its two renames

    def fail(d):
        raise RuntimeError("disk full")

    with pytest.raises(RunStopped, match="could not write .*best .*disk full"):
        early_stop.replace_folder(out, fail)
    assert sorted(p.name for p in out.iterdir()) == ["b.txt", "files.json"]  # the old one is back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # the temporary one removed


# ---------------------------------------------------------------- resuming with the guards switched


def test_checkpoint_custom_states_are_matched_by_content(tmp_path):
    # A checkpoint saved with early stopping on, resumed by a run without it, and the other way
    # round: accelerate alone refuses both (it loads custom states by position and count).
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    state, stop = T.TrainState(update=7, samples_seen=56), early_stop.EarlyStop("eval/x", "max")
    stop.update(3, {"eval/x": 0.5})
    acc._custom_objects = [state, stop]
    acc.save_state(str(tmp_path / "both"))
    acc._custom_objects = [state]
    acc.save_state(str(tmp_path / "counters"))
    try:
        fresh_state = T.TrainState()
        acc._custom_objects = [fresh_state]
        assert (
            checkpoints.load_checkpoint(acc, tmp_path / "both") == []
        )  # the stop state is ignored
        assert (fresh_state.update, fresh_state.samples_seen) == (7, 56)
        fresh_state, fresh_stop = T.TrainState(), early_stop.EarlyStop("eval/x", "max")
        acc._custom_objects = [fresh_state, fresh_stop]
        assert checkpoints.load_checkpoint(acc, tmp_path / "counters") == [fresh_stop]
        assert fresh_state.update == 7 and fresh_stop.best_step is None
        assert acc._custom_objects == [fresh_state, fresh_stop]  # the run's own list is back
        acc._custom_objects = [T.TrainState(), early_stop.EarlyStop("eval/x", "max")]
        checkpoints.load_checkpoint(acc, tmp_path / "both")
        assert acc._custom_objects[1].best_step == 3
    finally:
        acc._custom_objects = []


def test_resume_a_run_saved_without_early_stop_with_it_on(tmp_path, tiny_overrides):
    common = ["--config.save_freq=1", "--config.keep_checkpoints=0", "--config.eval_rewards="]
    run_train(
        tmp_path, "--config.run_name=plain", "--config.eval_freq=0", "--config.train.num_epochs=1",
        *common,
    )  # fmt: skip
    proc = run_train(  # one more update, now with early stopping
        tmp_path, *common, "--config.train.num_epochs=2", "--config.eval_freq=1",
        "--config.eval_repeats=2", "--config.train.early_stop.metric=eval/diversity",
        "--config.train.early_stop.patience=9",
        f"--config.resume_from={tmp_path}/plain/checkpoints/checkpoint_1",
    )  # fmt: skip
    assert "holds no EarlyStop state: it starts afresh" in proc.stdout + proc.stderr
    after = [r for r in rows(tmp_path / "plain") if r["step"] >= 1 and "early_stop/best_step" in r]
    assert after and (tmp_path / "plain" / "best").is_dir()
