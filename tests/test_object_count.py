"""object_count: prompts parsed for their count, the detector's input as its own processor makes it,
the soft count against its formula, the pixel gradient, the offline error, and a tiny run that learns."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignprop import prompts, rewards, tiny
from alignprop.errors import ConfigError, MissingWeightsError
from alignprop.rewards import object_count as oc

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    c = rewards.default_config()
    c.object_count.model = str(tiny.write_tiny_owlv2(tmp_path_factory.mktemp("owl") / "owlv2"))
    return c


@pytest.mark.parametrize(
    "prompt, parsed",
    [("three foxes", (3, "fox")), ("2 red apples.", (2, "red apple")), ("a cat", (1, "cat")),
     ("five mice", (5, "mouse")), ("four geese", (4, "goose")), ("ten butterflies", (10, "butterfly")),
     ("One Sheep", (1, "sheep")), ("6 boxes", (6, "box"))],
)  # fmt: skip
def test_parse_count(prompt, parsed):
    assert prompts.parse_count(prompt) == parsed


def test_count_prompt_sets_parse_back_and_hold_out_their_animals():
    train, held = prompts.load_prompts("count_animals"), prompts.load_prompts("eval_count_animals")
    assert len(train) == 100 and len(held) == 25
    for p in train + held:
        n, noun = prompts.parse_count(p)
        assert prompts.count_prompt(n, noun) == p
    assert not {prompts.parse_count(p)[1] for p in train} & {
        prompts.parse_count(p)[1] for p in held
    }
    with pytest.raises(ConfigError, match="does not start with a count"):
        prompts.parse_count("a photo of many cats".replace("a photo", "photo"))


def test_soft_count_is_its_formula():
    z = torch.tensor([[3.0, -1.0, -9.0, 0.2]], dtype=torch.float64)
    thr = 0.1
    expected = sum(
        1 / (1 + math.exp(-v)) / (1 + math.exp(-(v - math.log(thr / (1 - thr)))))
        for v in z[0].tolist()
    )
    assert oc.soft_count(z, thr).item() == pytest.approx(expected, rel=1e-6)
    # a patch far below the threshold counts ~0, one far above ~1
    assert oc.soft_count(torch.tensor([[-20.0, 20.0]]), thr).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("size", [(64, 64), (40, 56), (16, 24)], ids=["shrink", "pad", "grow"])
def test_detector_input_is_the_processors(cfg, size):
    """Our tensor path against Owlv2ImageProcessor on the same 8-bit image (pad, blur, resize, normalise)."""
    from transformers import Owlv2ImageProcessor

    processor = Owlv2ImageProcessor.from_pretrained(cfg.object_count.model)
    g = torch.Generator().manual_seed(0)
    img8 = (torch.rand(3, *size, generator=g) * 255).round().to(torch.uint8)
    theirs = processor(images=img8, return_tensors="pt").pixel_values
    ours = oc.detector_input((img8[None].float() / 127.5 - 1), processor, torch.float32)
    assert ours.shape == theirs.shape
    # fp32 resampling in two implementations of the same filters: 1e-5 of a unit-std input
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_the_target_is_the_prompts_count(cfg):
    """(the pixel gradient and the frozen detector: test_rewards' shared test)"""
    fn = rewards.get_reward("object_count", cfg, "cpu", torch.float32)
    x = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    model = oc.load(cfg.object_count, "cpu", torch.float32)[0]
    # the target is the prompt's: the same image asked for one more object scores differently
    with torch.no_grad():
        r3 = fn(x[:1], ["three foxes"])[0]
        r4 = fn(x[:1], ["four foxes"])[0]
    count = oc.soft_count(
        model(
            **oc_inputs(cfg, model, x[:1].detach(), "fox"),
        ).logits[..., 0],
        cfg.object_count.threshold,
    )
    torch.testing.assert_close(r3, -(count - 3).abs())
    torch.testing.assert_close(r4, -(count - 4).abs())


def oc_inputs(cfg, model, images, noun):
    _, processor, tokenizer = oc.load(cfg.object_count, "cpu", torch.float32)
    tokens = tokenizer(
        [cfg.object_count.query.format(object=noun)],
        padding="max_length",
        max_length=16,
        return_tensors="pt",
    )
    return dict(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                pixel_values=oc.detector_input(images, processor, torch.float32))  # fmt: skip


def test_bad_settings_and_missing_weights_are_clear(cfg):
    for field, value, match in [("loss", "l1", "object_count.loss"), ("threshold", 1.5, "threshold"),
                                ("query", "a photo", "object")]:  # fmt: skip
        c = cfg.copy_and_resolve_references()
        c.object_count[field] = value
        with pytest.raises(ConfigError, match=match):
            rewards.get_reward("object_count", c, "cpu", torch.float32)
    c = cfg.copy_and_resolve_references()
    c.object_count.model = "google/owlv2-base-patch16-ensemble"  # not cached here; HF_HUB_OFFLINE=1
    with pytest.raises(MissingWeightsError, match="reward_models.object_count.model"):
        rewards.get_reward("object_count", c, "cpu", torch.float32)


def test_tiny_run_learns_the_count(tmp_path, tiny_overrides):
    """40 updates on count_animals bring the soft counts closer to the prompts' counts at fixed eval
    noise (seeds 0, 1, 2: the eval reward rose by 0.43, 0.27, 0.64 from -5.20)."""
    cmd = [
        sys.executable, str(ROOT / "scripts" / "train.py"),
        "--config", str(ROOT / "config" / "align_prop.py") + ":tiny_object_count",
        f"--config.logdir={tmp_path}", "--config.run_name=c",
        "--config.eval_freq=40", "--config.save_freq=40", "--config.eval_rewards=",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [
        json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()
    ]
    evals = [r["eval/reward_mean"] for r in rows if "eval/reward_mean" in r]
    assert len(evals) == 2 and evals[-1] > evals[0] + 0.1, evals
