"""HPSv3 on transformers 5: the public file's keys at full size, our tensor path against transformers'
own image processor and an explicit-position forward, the gradient, and the clear errors."""

import pytest
import torch

from alignprop import rewards, tiny
from alignprop.errors import ConfigError, MissingWeightsError
from alignprop.rewards import hpsv3


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    c = rewards.default_config()
    tiny.apply_overrides(c, tiny.write_tiny_hpsv3(tmp_path_factory.mktemp("h") / "hpsv3"))
    return c


def public_keys() -> list[str]:
    """HPSv3.safetensors' 736 keys, from the public 4.x module tree (Qwen2VLRewardModelBT on
    Qwen2-VL-7B: 32 vision blocks, 28 text layers, lm_head, rm_head 0/3/5)."""
    keys = ["visual.patch_embed.proj.weight"]
    for i in range(32):
        for m in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            keys += [f"visual.blocks.{i}.{m}.weight", f"visual.blocks.{i}.{m}.bias"]
    keys += [
        f"visual.merger.{m}.{p}" for m in ("ln_q", "mlp.0", "mlp.2") for p in ("weight", "bias")
    ]
    keys += ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(28):
        keys += [
            f"model.layers.{i}.self_attn.{m}_proj.{p}" for m in "qkv" for p in ("weight", "bias")
        ]
        keys += [f"model.layers.{i}.{m}.weight" for m in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                 "mlp.down_proj", "input_layernorm", "post_attention_layernorm")]  # fmt: skip
    keys += [f"rm_head.{i}.{p}" for i in (0, 3, 5) for p in ("weight", "bias")]
    return keys


def test_public_keys_map_one_to_one_at_full_size():
    from transformers import Qwen2VLConfig

    config = Qwen2VLConfig(
        text_config=dict(vocab_size=151658, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4),
    )  # fmt: skip
    with torch.device("meta"):
        model = hpsv3.HPSv3Model(config)
    keys = public_keys()
    assert len(keys) == 736 == len(set(keys))
    mapped = {hpsv3.rename_key(k) for k in keys} - {None}
    assert mapped == set(model.state_dict())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["backbone.language_model.embed_tokens.weight"] == (151658, 3584)
    assert shapes["head.0.weight"] == (1024, 3584) and shapes["head.5.weight"] == (2, 16)
    with pytest.raises(ConfigError, match="unexpected key"):
        hpsv3.rename_key("score.weight")


def test_patches_equal_the_processors_and_the_score_an_explicit_forward(cfg):
    """pixel_patches against Qwen2VLImageProcessor on a 448 x 448 image (no resize on either side),
    and the reward against transformers' pieces called with explicit positions 0..L-1."""
    model, tokenizer, processor, ids = hpsv3.load(cfg.hpsv3, "cpu", torch.float32)
    img8 = (
        (torch.rand(3, 448, 448, generator=torch.Generator().manual_seed(0)) * 255)
        .round()
        .to(torch.uint8)
    )
    theirs = processor(images=img8, return_tensors="pt")
    ours, grid = hpsv3.pixel_patches(img8[None].float() / 127.5 - 1, processor, torch.float32)
    assert torch.equal(grid, theirs.image_grid_thw)
    torch.testing.assert_close(
        ours, theirs.pixel_values, rtol=0, atol=1e-5
    )  # fp32 normalise, two orders
    prompt = "three foxes"
    n = int(grid[0].prod()) // 4
    batch = tokenizer([hpsv3.chat_text(prompt, n)], return_tensors="pt")
    with torch.no_grad():
        bb = model.backbone
        feats = bb.get_image_features(
            theirs.pixel_values, image_grid_thw=theirs.image_grid_thw
        ).pooler_output[0]
        emb = bb.language_model.embed_tokens(batch.input_ids)
        emb[batch.input_ids == ids["<|image_pad|>"]] = feats
        pos = torch.arange(batch.input_ids.shape[1])[None, None].expand(3, 1, -1)
        h = bb.language_model(inputs_embeds=emb, position_ids=pos).last_hidden_state
        ref = model.head(h[batch.input_ids == ids[hpsv3.REWARD_TOKEN]])[:, 0]
        fn = rewards.get_reward("hpsv3", cfg, "cpu", torch.float32)
        r = fn(img8[None].float() / 127.5 - 1, [prompt])[0]
    torch.testing.assert_close(r, ref, rtol=1e-4, atol=1e-5)


def test_gradient_batching_and_errors(cfg):
    fn = rewards.get_reward("hpsv3", cfg, "cpu", torch.float32)
    x = (
        torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ).requires_grad_()
    r, info = fn(x, ["a cat", "three foxes in the snow at night"])
    info["loss"].sum().backward()
    assert r.shape == (2,) and x.grad.abs().sum() > 0
    with torch.no_grad():  # right padding under causal attention: a batch scores as singles
        singles = torch.cat(
            [fn(x[:1], ["a cat"])[0], fn(x[1:], ["three foxes in the snow at night"])[0]]
        )
    torch.testing.assert_close(r.detach(), singles, rtol=1e-4, atol=1e-5)
    assert (
        hpsv3.smart_resize(1024, 1024) == (448, 448) and hpsv3.smart_resize(512, 768)[0] % 28 == 0
    )
    c = cfg.copy_and_resolve_references()
    c.hpsv3.checkpoint = ""  # the hub file: HF_HUB_OFFLINE=1, not cached
    with pytest.raises(MissingWeightsError, match="reward_models.hpsv3.checkpoint"):
        rewards.get_reward("hpsv3", c, "cpu", torch.float32)
    c = cfg.copy_and_resolve_references()
    c.hpsv3.base = "Qwen/Qwen2-VL-7B-Instruct"
    with pytest.raises(MissingWeightsError, match="reward_models.hpsv3.base"):
        rewards.get_reward("hpsv3", c, "cpu", torch.float32)
