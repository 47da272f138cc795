"""MPS on transformers 5: the public module tree's key names and shapes at full size, the score against
an independent float64 forward, the pickle converter on a pickled whole model, and the clear errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from alignprop import rewards, tiny
from alignprop.errors import ConfigError, MissingWeightsError
from alignprop.rewards import mps


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    c = rewards.default_config()
    tiny.apply_overrides(c, tiny.write_tiny_mps(tmp_path_factory.mktemp("mps") / "mps"))
    return c


def test_full_size_keys_are_the_public_module_trees():
    """Names and shapes from the public code (clip_model.py: model = CLIPModel of laion ViT-H/14,
    cross_model = Cross_model(dim=1024, layer_num=4, heads=16); CoCa's blocks, bias-free)."""
    from transformers import CLIPConfig

    vit_h = CLIPConfig(
        text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                         num_attention_heads=16, projection_dim=1024, hidden_act="gelu"),
        vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                           num_attention_heads=16, patch_size=14, image_size=224, hidden_act="gelu",
                           projection_dim=1024),
        projection_dim=1024,
    )  # fmt: skip
    with torch.device("meta"):
        model = mps.MPSModel(vit_h, mps.CROSS)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    public = {
        "model.logit_scale": (),
        "model.visual_projection.weight": (1024, 1280),
        "model.text_projection.weight": (1024, 1024),
        "model.vision_model.embeddings.patch_embedding.weight": (1280, 3, 14, 14),
        "model.vision_model.embeddings.position_embedding.weight": (257, 1280),
        "model.vision_model.pre_layrnorm.weight": (1280,),
        "model.vision_model.encoder.layers.31.mlp.fc1.weight": (5120, 1280),
        "model.text_model.embeddings.token_embedding.weight": (49408, 1024),
        "model.text_model.encoder.layers.23.self_attn.q_proj.weight": (1024, 1024),
        "cross_model.layers.0.0.fn.norm.weight": (1024,),
        "cross_model.layers.0.0.fn.norm.bias": (1024,),
        "cross_model.layers.3.0.fn.to_q.weight": (1024, 1024),
        "cross_model.layers.3.0.fn.to_kv.weight": (128, 1024),
        "cross_model.layers.3.0.fn.to_out.weight": (1024, 1024),
        "cross_model.layers.3.0.fn.ff.0.weight": (8192, 1024),
        "cross_model.layers.3.0.fn.ff.2.weight": (1024, 4096),
        "cross_model.layers.3.1.fn.rotary_emb.inv_freq": (32,),
        "cross_model.layers.3.1.fn.fused_attn_ff_proj.weight": (9344, 1024),
        "cross_model.layers.3.1.fn.attn_out.weight": (1024, 1024),
        "cross_model.layers.3.1.fn.ff_out.1.weight": (1024, 4096),
    }
    for key, shape in public.items():
        assert shapes.get(key) == shape, key
    # 13 tensors per cross layer (7 + 6), all bias-free Linears; no patch-embedding bias
    assert len([k for k in shapes if k.startswith("cross_model.")]) == 52
    assert "model.vision_model.embeddings.patch_embedding.bias" not in shapes
    assert not any(
        k.startswith("cross_model.") and k.endswith("bias") and ".norm." not in k for k in shapes
    )


def reference_score(model, pixels, ids, cond_ids, threshold):
    """The public forward (clip_model.py, cross_modeling.py) re-derived with the model's tensors."""
    clip, sd = model.model, {k: v for k, v in model.cross_model.state_dict().items()}
    image = clip.visual_projection(clip.vision_model(pixel_values=pixels).last_hidden_state)
    text = clip.text_projection(clip.text_model(input_ids=ids).last_hidden_state)
    cond = clip.text_projection(clip.text_model(input_ids=cond_ids).last_hidden_state)
    eos = text[torch.arange(len(ids)), ids.argmax(-1)]
    sim = torch.einsum("bid,bjd->bji", text, cond).max(dim=1, keepdim=True).values
    sim = torch.stack([s / s.max() for s in sim])  # one image at a time, as the eval scripts
    mask = (
        torch.where(sim > threshold, 0.0, float("-inf"))
        .to(image.dtype)
        .repeat(1, image.shape[1], 1)
    )
    h, dh = 2, 8  # tiny.TINY_MPS_CROSS

    def ln(x, p):
        return F.layer_norm(x, x.shape[-1:], sd[p + "norm.weight"], sd[p + "norm.bias"])

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], h, dh).permute(0, 2, 1, 3)

    def swiglu(t):
        a, g = t.chunk(2, -1)
        return a * g * torch.sigmoid(g)

    x = image
    for i in range(2):
        p = f"layers.{i}.0.fn."
        xn = ln(x, p)
        q = split(xn @ sd[p + "to_q.weight"].T) * dh**-0.5
        k, v = (text @ sd[p + "to_kv.weight"].T).chunk(2, -1)
        a = (q @ k[:, None].transpose(-1, -2) + mask[:, None]).softmax(-1) @ v[:, None]
        a = a.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], h * dh)
        x = (
            x
            + a @ sd[p + "to_out.weight"].T
            + swiglu(xn @ sd[p + "ff.0.weight"].T) @ sd[p + "ff.2.weight"].T
        )
        p = f"layers.{i}.1.fn."
        xn = ln(x, p)
        q, k, v, ff = (xn @ sd[p + "fused_attn_ff_proj.weight"].T).split(
            [h * dh, dh, dh, 4 * 32], -1
        )
        n = x.shape[1]
        inv = 1.0 / 10000 ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh)
        ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None]
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

        def rope(t, cos=cos, sin=sin):
            half = t.shape[-1] // 2
            return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin

        q = rope(split(q)) * dh**-0.5
        k = rope(k)
        a = (q @ k[:, None].transpose(-1, -2)).softmax(-1) @ v[:, None]
        a = a.permute(0, 2, 1, 3).reshape(x.shape[0], n, h * dh)
        x = x + a @ sd[p + "attn_out.weight"].T + swiglu(ff) @ sd[p + "ff_out.1.weight"].T
    return clip.logit_scale.exp() * F.cosine_similarity(eos, x[:, 0], dim=-1)


def test_score_matches_the_public_forward_in_float64(cfg):
    model, tokenizer, image_input = mps.load(cfg.mps, "cpu", torch.float64)
    prompts = ["three foxes", "a photo of a cat sitting on a red chair", "dog"]
    ids = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    cond = tokenizer(
        [mps.CONDITION] * 3, padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    images = (
        torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        * 2
        - 1
    )
    pixels = rewards.preprocess.to_model_input(images, image_input, torch.float64)
    with torch.no_grad():
        ref = reference_score(model, pixels, ids, cond, cfg.mps.threshold)
        ours = model(pixels, ids, cond, cfg.mps.threshold)
    assert ref.std() > 1e-3
    torch.testing.assert_close(ours.double(), ref, rtol=1e-9, atol=1e-9)  # float64 rounding only
    assert math.isfinite(ours.sum().item())


def test_convert_reads_a_pickled_whole_model_without_running_it(cfg, tmp_path):
    """The official file is torch.save(model): pickle a whole tiny MPSModel, convert, load, compare."""
    model = mps.load(cfg.mps, "cpu", torch.float32)[0]
    whole = tmp_path / "MPS_overall_checkpoint.pth"
    torch.save(model.half(), whole)  # the official file holds fp16 weights
    model.float()
    out = tmp_path / "mps.safetensors"
    assert mps.main(["convert", str(whole), str(out)]) == 0
    from safetensors.torch import load_file

    converted = load_file(str(out))
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    assert set(converted) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(converted[k].float(), v.half().float(), rtol=0, atol=0)
    c = cfg.copy_and_resolve_references()
    c.mps.checkpoint = str(out)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    a = rewards.get_reward("mps", c, "cpu", torch.float32)(x, ["a cat"])[0]
    b = rewards.get_reward("mps", cfg, "cpu", torch.float32)(x, ["a cat"])[0]
    torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)  # fp16 round trip of the weights


def test_missing_and_wrong_files_are_clear(cfg, tmp_path):
    c = cfg.copy_and_resolve_references()
    c.mps.checkpoint = ""  # RE-N-Y/mpsv1 from the hub: HF_HUB_OFFLINE=1 and not cached
    with pytest.raises(MissingWeightsError, match="reward_models.mps.checkpoint"):
        rewards.get_reward("mps", c, "cpu", torch.float32)
    c = cfg.copy_and_resolve_references()
    c.mps.clip = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    with pytest.raises(MissingWeightsError, match="reward_models.mps.clip"):
        rewards.get_reward("mps", c, "cpu", torch.float32)
    pickled = tmp_path / "MPS_overall_checkpoint.pth"
    torch.save({"x": torch.zeros(1)}, pickled)
    c = cfg.copy_and_resolve_references()
    c.mps.checkpoint = str(pickled)
    with pytest.raises(ConfigError, match="python scripts/convert_mps.py"):
        rewards.get_reward("mps", c, "cpu", torch.float32)
    c = cfg.copy_and_resolve_references()
    c.mps.threshold = 1.0
    with pytest.raises(ConfigError, match="mps.threshold"):
        rewards.get_reward("mps", c, "cpu", torch.float32)
    with pytest.raises(ConfigError, match="no cross_model tensors"):
        mps.convert(str(pickled), str(tmp_path / "out.safetensors"))
