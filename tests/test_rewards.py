"""Rewards on tiny real-architecture models, loaded through the production loading code."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

from alignprop import rewards, tiny
from alignprop.errors import MissingWeightsError
from alignprop.rewards import (
    aesthetic,
    clip_models,
    hps,
    imagereward,
    mps,
    object_count,
    preprocess,
)

LAION_HEAD = (
    Path(__file__).resolve().parents[1]
    / ".."
    / "shared"
    / "assets"
    / "sac+logos+ava1-l14-linearMSE.pth"
)
NAMES = ["aesthetic", "hps", "pickscore", "clipscore", "imagereward", "mps", "object_count"]
PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse", "a red bicycle"]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    """config.reward_models pointing at tiny reward models written once for this module."""
    c = rewards.default_config()
    tiny.apply_overrides(c, tiny.write_tiny_rewards(tmp_path_factory.mktemp("tiny_rewards")))
    return c


def images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def reward_modules(name: str, cfg, dtype: torch.dtype) -> list[torch.nn.Module]:
    """The frozen models behind a reward (the loaders' cached copies)."""
    if name == "aesthetic":
        return [
            clip_models.load_model("aesthetic.clip", cfg.aesthetic.clip, "cpu", dtype),
            aesthetic.load_head(cfg.aesthetic, "cpu", dtype),
        ]
    if name == "hps":
        return [hps.load(cfg.hps, "cpu", dtype)[0]]
    if name in ("imagereward", "mps", "object_count"):
        module = {"imagereward": imagereward, "mps": mps, "object_count": object_count}[name]
        return [module.load(cfg[name], "cpu", dtype)[0]]
    model_id = cfg.pickscore.model if name == "pickscore" else cfg.clipscore.clip
    return [clip_models.load_model(f"{name}.x", model_id, "cpu", dtype)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("size", [(64, 64), (40, 56)], ids=["square", "nonsquare"])
@pytest.mark.parametrize("name", NAMES)
def test_reward_shape_grad_and_frozen(cfg, name, size, dtype):
    reward_fn = rewards.get_reward(name, cfg, "cpu", dtype)
    x = images(3, 3, *size).requires_grad_()
    r, info = reward_fn(x, PROMPTS)
    assert r.shape == (3,) and r.dtype == torch.float32
    assert info["loss"].shape == (3,) and info["loss"].requires_grad
    assert set(info["parts"]) == {name} and not info["parts"][name].requires_grad
    torch.testing.assert_close(info["parts"][name], r.detach())
    info["loss"].mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    modules = reward_modules(name, cfg, dtype)
    for module in modules:
        assert not module.training
        for p in module.parameters():
            assert not p.requires_grad and p.grad is None and p.dtype == dtype


def test_loss_forms(cfg):
    x = images(2, 3, 32, 32)
    r, info = rewards.get_reward("aesthetic", cfg, "cpu", torch.float32)(x, PROMPTS[:2])
    torch.testing.assert_close(info["loss"], (r - cfg.aesthetic.target).abs())
    neg = cfg.copy_and_resolve_references()
    neg.aesthetic.loss = "neg"
    _, info = rewards.get_reward("aesthetic", neg, "cpu", torch.float32)(x, PROMPTS[:2])
    torch.testing.assert_close(info["loss"], -r)
    r, info = rewards.get_reward("hps", cfg, "cpu", torch.float32)(x, PROMPTS[:2])
    torch.testing.assert_close(info["loss"], 1 - r)
    neg.aesthetic.loss = "maximise"
    with pytest.raises(ValueError, match="reward_models.aesthetic.loss"):
        rewards.get_reward("aesthetic", neg, "cpu", torch.float32)


@pytest.mark.parametrize("name", ["hps", "pickscore", "clipscore", "imagereward", "mps"])
def test_each_image_scored_against_its_own_prompt(cfg, name):
    reward_fn = rewards.get_reward(name, cfg, "cpu", torch.float32)
    x = images(2, 3, 32, 32)
    p0, p1 = PROMPTS[:2]
    with torch.no_grad():
        r = reward_fn(x, [p0, p1])[0]
        swapped = reward_fn(x.flip(0), [p1, p0])[0]
        crossed = reward_fn(x, [p1, p0])[0]
        singles = torch.cat([reward_fn(x[:1], [p0])[0], reward_fn(x[1:], [p1])[0]])
    torch.testing.assert_close(swapped, r.flip(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(singles, r, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(crossed, r, atol=1e-4)  # the prompt matters
    with pytest.raises(ValueError, match="one prompt per image"):
        reward_fn(x, [p0])


def test_combined_reward_is_weighted_sum_of_parts(cfg):
    x = images(2, 3, 48, 48)
    with torch.no_grad():
        a, a_info = rewards.get_reward("aesthetic", cfg, "cpu", torch.float32)(x, PROMPTS[:2])
        h, h_info = rewards.get_reward("hps", cfg, "cpu", torch.float32)(x, PROMPTS[:2])
        r, info = rewards.get_reward("aesthetic=1.0, hps=0.5", cfg, "cpu", torch.float32)(
            x, PROMPTS[:2]
        )
        m, m_info = rewards.get_reward({"aesthetic": 2.0}, cfg, "cpu", torch.float32)(
            x, PROMPTS[:2]
        )
    torch.testing.assert_close(r, a + 0.5 * h)
    torch.testing.assert_close(info["loss"], a_info["loss"] + 0.5 * h_info["loss"])
    assert set(info["parts"]) == {"aesthetic", "hps"}
    torch.testing.assert_close(info["parts"]["aesthetic"], a)
    torch.testing.assert_close(info["parts"]["hps"], h)
    torch.testing.assert_close(m, 2 * a)
    torch.testing.assert_close(m_info["loss"], 2 * a_info["loss"])


def test_models_loaded_once_per_process(cfg):
    first = reward_modules("aesthetic", cfg, torch.float32)
    rewards.get_reward("aesthetic,clipscore", cfg, "cpu", torch.float32)
    again = reward_modules("aesthetic", cfg, torch.float32)
    assert all(a is b for a, b in zip(first, again, strict=True))
    assert hps.load(cfg.hps, "cpu", torch.float32)[0] is hps.load(cfg.hps, "cpu", torch.float32)[0]


def test_parse_spec():
    assert rewards.parse_spec("aesthetic") == [("aesthetic", 1.0)]
    assert rewards.parse_spec("aesthetic=1.0,hps=0.5") == [("aesthetic", 1.0), ("hps", 0.5)]
    assert rewards.parse_spec("pkg.mod:make=2") == [("pkg.mod:make", 2.0)]
    assert rewards.parse_spec({"hps": 3}) == [("hps", 3.0)]
    for bad in ["", "aesthetic=x", "hps,hps", "aesthetic=nan"]:
        with pytest.raises(ValueError):
            rewards.parse_spec(bad)


def test_unknown_reward_lists_registered_names(cfg):
    with pytest.raises(ValueError, match="unknown reward 'beauty'") as e:
        rewards.get_reward("aesthetic,beauty", cfg, "cpu", torch.float32)
    for name in rewards.REWARDS:
        assert name in str(e.value)


def test_missing_local_files_name_the_field(cfg, tmp_path):
    bad = cfg.copy_and_resolve_references()
    bad.hps.checkpoint = str(tmp_path / "HPS_v2.1_compressed.pt")
    with pytest.raises(MissingWeightsError, match=r"reward_models\.hps\.checkpoint") as e:
        rewards.get_reward("hps", bad, "cpu", torch.float32)
    assert bad.hps.checkpoint in str(e.value)
    assert "hf download xswu/HPSv2 HPS_v2.1_compressed.pt" in str(e.value)

    bad.aesthetic.clip = str(tmp_path / "no" / "clip")
    with pytest.raises(MissingWeightsError, match=r"reward_models\.aesthetic\.clip") as e:
        rewards.get_reward("aesthetic", bad, "cpu", torch.float32)
    assert bad.aesthetic.clip in str(e.value)


def test_hub_download_failure_names_the_field(cfg, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def offline(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        raise LocalEntryNotFoundError("offline and not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    bad = cfg.copy_and_resolve_references()
    bad.aesthetic.head = ""
    with pytest.raises(MissingWeightsError, match=r"reward_models\.aesthetic\.head") as e:
        rewards.get_reward("aesthetic", bad, "cpu", torch.float32)
    assert calls == [(bad.aesthetic.head_repo, bad.aesthetic.head_filename)]
    assert f"hf download {bad.aesthetic.head_repo} {bad.aesthetic.head_filename}" in str(e.value)
    assert "offline and not in the cache" in str(e.value)


def test_import_path_reward(cfg, tmp_path, monkeypatch):
    (tmp_path / "user_rewards_mod.py").write_text(
        "import torch\n"
        "def make(cfg, device, dtype):\n"
        "    def reward_fn(images, prompts):\n"
        "        return images.mean(dim=(1, 2, 3)), {}\n"
        "    return reward_fn\n"
        "def make_bad(cfg, device, dtype):\n"
        "    return lambda images: images.mean()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    x = images(2, 3, 8, 8).requires_grad_()
    r, info = rewards.get_reward("user_rewards_mod:make=2.0,hps=1.0", cfg, "cpu", torch.float32)(
        x, PROMPTS[:2]
    )
    user = info["parts"]["user_rewards_mod:make"]
    torch.testing.assert_close(user, x.detach().mean(dim=(1, 2, 3)))
    torch.testing.assert_close(r.detach(), 2 * user + info["parts"]["hps"])
    info["loss"].sum().backward()  # no loss given: the reward is maximised (loss -r)
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(TypeError, match=r"reward_fn\(images, prompts\)"):
        rewards.get_reward("user_rewards_mod:make_bad", cfg, "cpu", torch.float32)
    with pytest.raises(ValueError, match="cannot import"):
        rewards.get_reward("user_rewards_mod:nope", cfg, "cpu", torch.float32)


def test_preprocess_matches_the_clip_processor():
    """Downsampling a noisy, non-square image: within 8-bit rounding of the PIL processor."""
    try:
        from transformers import CLIPImageProcessorPil as Processor  # transformers >= 5
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    from PIL import Image

    processor = Processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    spec = preprocess.ImageInput.from_hf_processor(processor)
    u8 = torch.randint(
        0, 256, (1, 3, 96, 160), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    ref = processor(
        images=[Image.fromarray(u8[0].permute(1, 2, 0).numpy())], return_tensors="pt"
    ).pixel_values
    ours = preprocess.to_model_input(u8.float() / 255 * 2 - 1, spec, torch.float32)
    assert ours.shape == ref.shape == (1, 3, 32, 32)
    # One 8-bit step is 1/255/std ~ 0.015; without antialiasing the error is ~2.
    assert (ours - ref).abs().max() < 0.03


def test_preprocess_crop_and_normalise_once():
    spec = preprocess.ImageInput((4, 4), 4, (0.5, 0.25, 0.0), (0.5, 0.5, 2.0))
    x = images(2, 3, 4, 8)  # shortest side already 4: no resize, center crop only
    out = preprocess.to_model_input(x, spec, torch.float32)
    unit = (x[..., 2:6] / 2 + 0.5).clamp(0, 1)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (unit - mean) / std)
    assert preprocess.to_model_input(x * 5, spec, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.skipif(not LAION_HEAD.exists(), reason="LAION aesthetic head not in ../shared/assets")
def test_real_laion_head_loads_unchanged():
    cfg = rewards.default_config().aesthetic
    cfg.head = str(LAION_HEAD)
    head = aesthetic.load_head(cfg, "cpu", torch.float32)
    state = torch.load(LAION_HEAD, map_location="cpu", weights_only=True)
    assert head.state_dict().keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(head.state_dict()[k], v)
    emb = torch.nn.functional.normalize(
        torch.randn(4, 768, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    h = emb
    for i in (0, 2, 4, 6, 7):  # linear layers only; dropout is off in eval
        h = h @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    torch.testing.assert_close(head(emb), h)


def test_every_default_config_field_has_a_comment():
    lines = inspect.getsource(rewards.default_config).splitlines()
    lines += inspect.getsource(rewards._add_new_reward_configs).splitlines()
    fields = [i for i, line in enumerate(lines) if re.match(r"\s+\w\.\w+ = ", line)]
    sections = rewards.default_config().values()
    assert len(fields) == len(sections) + sum(len(v) for v in sections)
    for i in fields:
        assert lines[i - 1].strip().startswith("#"), lines[i]


def test_judges_preset_leaves_out_the_training_reward():
    assert rewards.expand_judges("judges", "aesthetic") == "hps,pickscore,imagereward,mps,clipscore"
    # the panel leaves the training reward out; an entry named explicitly stays
    assert rewards.expand_judges("jpeg,judges,hps", "hps=1,aesthetic=0.5") == (
        "jpeg,pickscore,imagereward,mps,clipscore,hps"
    )
    assert rewards.expand_judges("hps,pickscore", "aesthetic") == "hps,pickscore"  # untouched
    assert set(rewards.JUDGES) <= set(rewards.REWARDS)
