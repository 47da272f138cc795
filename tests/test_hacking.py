"""Reward-hacking tools: reward embeddings, diversity, early stopping, model card, report plots."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from alignprop import diversity, early_stop, model_card, report, rewards, tiny
from alignprop.errors import ConfigError
from alignprop.rewards import clip_models, preprocess


@pytest.fixture(scope="module")
def reward_cfg(tmp_path_factory, one_thread):
    c = rewards.default_config()
    tiny.apply_overrides(c, tiny.write_tiny_rewards(tmp_path_factory.mktemp("tiny_rewards")))
    return c


def rand_images(n: int, seed: int = 0, size: int = 64) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------- embeddings


@pytest.mark.parametrize("name", ["aesthetic", "hps", "pickscore", "clipscore"])
def test_embed_unit_rows_no_grad_rng_untouched(reward_cfg, name):
    reward_fn = rewards.get_reward(name, reward_cfg, "cpu", torch.float32)
    x = rand_images(3)
    x = torch.cat([x, x[:1]]).requires_grad_()  # row 3 repeats row 0
    rng = torch.get_rng_state()
    e = reward_fn.embed(x)
    assert torch.equal(rng, torch.get_rng_state())
    assert e.ndim == 2 and e.shape[0] == 4 and e.dtype == torch.float32 and not e.requires_grad
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(e[3], e[0])
    assert not torch.allclose(e[0], e[1], atol=1e-3)
    r, info = reward_fn(x[:3], ["a cat", "a dog", "a car"])  # the reward call is unchanged
    assert r.shape == (3,) and info["loss"].requires_grad


def test_aesthetic_embed_uses_the_reward_preprocessing(reward_cfg):
    c = reward_cfg.aesthetic
    reward_fn = rewards.get_reward("aesthetic", reward_cfg, "cpu", torch.float32)
    clip = clip_models.load_model("aesthetic.clip", c.clip, "cpu", torch.float32)
    image_input, _ = clip_models.load_processor("aesthetic.clip", c.clip)
    x = rand_images(2, size=40)  # resized and cropped to the CLIP input
    with torch.no_grad():
        want = clip_models.image_embeds(
            clip, preprocess.to_model_input(x, image_input, torch.float32)
        )
    torch.testing.assert_close(reward_fn.embed(x), want)


def test_combined_reward_embeds_with_its_first_part(reward_cfg):
    x = rand_images(2)
    combined = rewards.get_reward("hps=1.0,aesthetic=0.5", reward_cfg, "cpu", torch.float32)
    hps_only = rewards.get_reward("hps", reward_cfg, "cpu", torch.float32)
    aes_only = rewards.get_reward("aesthetic", reward_cfg, "cpu", torch.float32)
    torch.testing.assert_close(combined.embed(x), hps_only.embed(x))
    assert combined.embed(x).shape != aes_only.embed(x).shape  # 32-d tiny HPS vs 768-d CLIP


# ---------------------------------------------------------------- diversity


def test_pairwise_diversity_values():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 0.0]])  # same direction: no diversity
    assert pairwise_close(diversity.pairwise_diversity(a), 0.0)
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # pairs: 1, 2, 1
    assert pairwise_close(diversity.pairwise_diversity(b), 4 / 3)
    assert diversity.pairwise_diversity(torch.randn(1, 8)) == 0.0
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        diversity.pairwise_diversity(torch.randn(2, 3, 4))


def pairwise_close(x: float, want: float) -> bool:
    return isinstance(x, float) and math.isclose(x, want, abs_tol=1e-6)


def test_diversity_per_prompt_on_reward_embeddings(reward_cfg):
    embed = rewards.get_reward("aesthetic", reward_cfg, "cpu", torch.float32).embed
    same = rand_images(1, seed=1).expand(3, -1, -1, -1)  # one image from three "seeds"
    different = rand_images(3, seed=2)
    e = torch.stack([embed(same), embed(different)])  # (P=2, S=3, D)
    d = diversity.diversity_per_prompt(e)
    assert d.shape == (2,) and d.dtype == torch.float32
    assert d[0].item() == pytest.approx(0.0, abs=1e-5) and d[1].item() > 1e-3
    assert d[1].item() == pytest.approx(diversity.pairwise_diversity(e[1]), rel=1e-5)
    m = diversity.diversity_metrics(e)
    assert m["eval/diversity"] == pytest.approx(d.mean().item())
    assert m["eval/diversity_min"] == pytest.approx(d[0].item(), abs=1e-6)


def test_tradeoff_table_and_plot(tmp_path):
    rows = [
        {"scale": 1.0, "hps_mean": 0.30, "diversity": 0.10},
        {"scale": 0.0, "hps_mean": 0.20, "diversity": 0.40},
        {"scale": 0.5, "hps_mean": 0.27, "diversity": 0.30},
    ]
    lines = diversity.tradeoff_table(rows).strip().splitlines()
    assert lines[0] == "| scale | hps_mean | diversity |"
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == ["0", "0.5", "1"]
    assert lines[-1] == "| 1 | 0.3 | 0.1 |"
    path = diversity.plot_tradeoff(rows, tmp_path / "sweep.png")
    from PIL import Image

    assert Image.open(path).size[0] > 100


# ---------------------------------------------------------------- early stopping


def run_stop(stop: early_stop.EarlyStop, values: list[float]) -> tuple[list[bool], int | None]:
    """Feed evaluations at steps 10, 20, ...; return the new-best flags and the step it stopped at."""
    bests = []
    for i, v in enumerate(values):
        bests.append(stop.update(10 * (i + 1), {stop.metric: v, "eval/other": 0.0}))
        if stop.should_stop:
            return bests, 10 * (i + 1)
    return bests, None


def test_early_stop_max_with_patience():
    stop = early_stop.EarlyStop("eval/hps_mean", "max", patience=2)
    bests, stopped = run_stop(stop, [0.1, 0.3, 0.3, 0.35, 0.34, 0.33, 0.9])  # a tie is no best
    assert bests == [True, True, False, True, False, False] and stopped == 60
    assert stop.best_value == 0.35 and stop.best_step == 40


def test_early_stop_min_with_min_delta():
    stop = early_stop.EarlyStop("eval/loss", "min", patience=3, min_delta=0.05)
    # 0.97 and 0.96 improve on 1.0 by less than min_delta; 0.8 is a real improvement
    bests, stopped = run_stop(stop, [1.0, 0.97, 0.96, 0.8, 0.79, float("nan"), 0.78])
    assert bests == [True, False, False, True, False, False, False] and stopped == 70
    assert stop.best_value == 0.8 and stop.best_step == 40


def test_early_stop_never_stops_while_improving():
    stop = early_stop.EarlyStop("eval/diversity", "max", patience=1)
    bests, stopped = run_stop(stop, [0.1, 0.2, 0.3])
    assert all(bests) and stopped is None and not stop.should_stop


def test_early_stop_state_round_trip(tmp_path):
    a = early_stop.EarlyStop("eval/hps_mean", "max", patience=3)
    run_stop(a, [0.5, 0.4, 0.45])
    path = tmp_path / "es.pt"
    torch.save(a.state_dict(), path)  # as accelerate's custom state does
    b = early_stop.EarlyStop("eval/hps_mean", "max", patience=3)
    b.load_state_dict(torch.load(path, weights_only=True))
    assert (b.best_value, b.best_step, b.bad_evals) == (0.5, 10, 2)
    assert not b.update(40, {"eval/hps_mean": 0.49}) and b.should_stop
    c = early_stop.EarlyStop("eval/diversity", "max", patience=3)
    with pytest.warns(UserWarning, match="anew"):
        c.load_state_dict(a.state_dict())
    assert c.best_value is None


def test_early_stop_missing_metric_lists_available():
    stop = early_stop.EarlyStop("eval/hps_mean", "max", patience=2)
    with pytest.raises(ConfigError, match=r"eval/hps_mean.*available.*eval/aesthetic_mean"):
        stop.update(10, {"eval/aesthetic_mean": 1.0, "eval/reward_mean": 1.0})


def test_early_stop_config_and_validation():
    import inspect
    import re

    lines = inspect.getsource(early_stop.early_stop_config).splitlines()
    fields = [i for i, ln in enumerate(lines) if re.match(r"\s+c\.\w+ = ", ln)]
    assert len(fields) == len(early_stop.early_stop_config()) == 4
    assert all(lines[i - 1].strip().startswith("#") for i in fields)

    full = _full_config()
    assert early_stop.EarlyStop.from_config(full) is None  # metric "" = off
    full.train.early_stop.metric = "eval/hps_mean"
    assert early_stop.EarlyStop.from_config(full).metric == "eval/hps_mean"
    bad = {
        "mode": ("up", "train.early_stop.mode"),
        "patience": (0, "train.early_stop.patience"),
        "min_delta": (-1.0, "train.early_stop.min_delta"),
        "metric": ("hps_mean", "train.early_stop.metric"),
    }
    for field, (value, name) in bad.items():
        cfg = _full_config(metric="eval/hps_mean")
        cfg.train.early_stop[field] = value
        with pytest.raises(ConfigError, match=re.escape(name)):
            early_stop.validate_early_stop(cfg)
    with pytest.raises(ConfigError, match="eval_freq"):
        early_stop.validate_early_stop(_full_config(metric="eval/hps_mean", eval_freq=0))
    with pytest.raises(ConfigError, match="pickscore"):
        early_stop.validate_early_stop(_full_config(metric="eval/pickscore_mean"))
    for ok in ("eval/reward_mean", "eval/aesthetic_mean", "eval/diversity"):
        early_stop.validate_early_stop(_full_config(metric=ok))


def _full_config(metric: str = "", eval_freq: int = 10):
    import ml_collections

    cfg = ml_collections.ConfigDict()
    cfg.reward = "aesthetic"
    cfg.eval_rewards = "hps"
    cfg.eval_freq = eval_freq
    cfg.train = ml_collections.ConfigDict()
    cfg.train.early_stop = early_stop.early_stop_config()
    cfg.train.early_stop.metric = metric
    return cfg


# ---------------------------------------------------------------- model card


def split_card(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def test_model_card_front_matter_and_body(tmp_path):
    from PIL import Image

    grid = tmp_path / "run" / "images" / "eval_000100.png"
    grid.parent.mkdir(parents=True)
    Image.new("RGB", (64, 64), "gray").save(grid)
    lora = tmp_path / "run" / "final"
    path = model_card.write_model_card(
        lora,
        base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
        reward="aesthetic=1.0,hps=0.5",
        config_summary={"train.learning_rate": 1e-3, "lora.rank": 4, "sample.num_steps": 50},
        eval_metrics={"eval/hps_mean": 0.312, "eval/diversity": 0.42},
        grid_image=grid,
        run_name="sd15_aesthetic",
    )
    assert path == lora / "README.md"
    meta, body = split_card(path.read_text())
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert meta["license"] == "creativeml-openrail-m"
    assert "instance_prompt" not in meta
    for tag in ("text-to-image", "lora", "alignprop", "diffusers", "stable-diffusion"):
        assert tag in meta["tags"]
    assert {"reward-aesthetic", "reward-hps"} <= set(meta["tags"])
    assert "from diffusers import StableDiffusionPipeline" in body
    assert f'pipe.load_lora_weights("{lora.as_posix()}"' in body
    assert "| `eval/hps_mean` | 0.312 |" in body and "| `eval/diversity` | 0.42 |" in body
    assert "| `lora.rank` | 4 |" in body
    assert "](samples.png)" in body and (lora / "samples.png").is_file()


def test_model_card_names_the_objective(tmp_path):
    """A DDPO or ReFL LoRA is not called an AlignProp LoRA: the title, text and tags say which."""
    for objective, label in (("ddpo", "DDPO"), ("refl", "ReFL"), ("alignprop", "AlignProp")):
        path = model_card.write_model_card(
            tmp_path / objective, base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
            reward="aesthetic", config_summary={}, eval_metrics={}, grid_image=None,
            run_name="r", objective=objective,
        )  # fmt: skip
        meta, body = split_card(path.read_text())
        title = body.strip().splitlines()[0]
        assert title.startswith(f"# r: {label} LoRA for "), title
        assert f"fine-tuned with [{label}](" in body
        assert objective.replace("_", "-") in meta["tags"]
        others = {"AlignProp", "DDPO", "ReFL"} - {label}
        assert not any(f"[{o}](" in body for o in others), body


def test_model_card_local_base_and_other_family(tmp_path):
    base = tmp_path / "my_sdxl"
    base.mkdir()
    path = model_card.write_model_card(
        tmp_path / "lora",
        base_model=str(base),
        family_pipeline="StableDiffusionXLPipeline",
        reward="pickscore",
        config_summary={},
        eval_metrics={},
        grid_image=None,
        run_name="r",
        repo_id="me/sdxl-pick",
    )
    meta, body = split_card(path.read_text())
    assert "base_model" not in meta and "license" not in meta  # local folder, unknown license
    assert "stable-diffusion-xl" in meta["tags"] and "reward-pickscore" in meta["tags"]
    assert "StableDiffusionXLPipeline.from_pretrained" in body
    assert 'pipe.load_lora_weights("me/sdxl-pick"' in body and "![" not in body


def test_check_push_to_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"push_to_hub.*HF_HUB_OFFLINE"):
        model_card.check_push_to_hub("me/lora")
    with pytest.raises(ConfigError, match="push_to_hub"):
        model_card.check_push_to_hub("not a/valid/id")
    model_card.check_push_to_hub("")  # off: nothing to check
    monkeypatch.setattr(model_card, "_offline", lambda: False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(ConfigError, match=r"push_to_hub.*token.*hf auth login"):
        model_card.check_push_to_hub("me/lora")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_x")
    model_card.check_push_to_hub("me/lora")


def test_push_to_hub_creates_then_uploads(tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw["repo_id"], kw))

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    (tmp_path / "README.md").write_text("card")
    url = model_card.push_to_hub(tmp_path, "me/lora")
    assert url == "https://huggingface.co/me/lora"
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][2]["exist_ok"] is True
    assert calls[1][2]["folder_path"] == str(tmp_path)


# ---------------------------------------------------------------- report


def test_report_hacking_plots_and_update_count(tmp_path):
    rows = [{"step": 0, "eval/reward_mean": 5.0, "eval/hps_mean": 0.30, "eval/diversity": 0.5}]
    for step in range(1, 9):
        rows.append({"step": step, "samples_seen": 4 * step, "reward_mean": 5 + 0.5 * step})
        if step % 4 == 0:  # eval-only rows at the same step, as a separate log call
            rows.append(
                {
                    "step": step,
                    "eval/reward_mean": 5 + 0.6 * step,
                    "eval/hps_mean": 0.30 - 0.01 * step,  # the judge falls: hacking
                    "eval/diversity": 0.5 - 0.05 * step,
                }
            )
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = report.write_report(tmp_path)
    names = {p.name for p in (tmp_path / "report").glob("*.png")}
    assert {"reward_vs_judges.png", "reward_vs_diversity.png"} <= names
    text = out.read_text()
    assert "src='report/reward_vs_judges.png'" in text
    assert "<th>updates</th><td>8</td>" in text  # 11 rows, 8 updates
    points = report._reward_diversity_points(report.read_metrics(tmp_path))
    assert [(p[0], p[3]) for p in points] == [(s, "eval/reward_mean") for s in (0, 4, 8)]
    assert report._minmax([1.0, 3.0, float("nan"), 2.0])[:2] == [0.0, 1.0]
    import matplotlib.pyplot as plt

    fig = report._normalized_plot(plt, report.read_metrics(tmp_path), ["eval/hps_mean"], "step")
    lines = {ln.get_label(): list(ln.get_ydata()) for ln in fig.axes[0].get_lines()}
    plt.close(fig)
    assert lines["train reward_mean"][0] == 0.0 and lines["train reward_mean"][-1] == 1.0
    assert lines["eval/hps_mean"] == pytest.approx([1.0, 0.5, 0.0])  # falls while reward rises


def test_report_skips_hacking_plots_without_the_data(tmp_path):
    rows = [{"step": s, "reward_mean": float(s)} for s in range(1, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report.write_report(tmp_path)
    names = {p.name for p in (tmp_path / "report").glob("*.png")}
    assert "reward.png" in names
    assert not {"reward_vs_judges.png", "reward_vs_diversity.png"} & names
