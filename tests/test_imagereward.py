"""ImageReward on transformers 5: the public checkpoint's keys onto our module, our score against
an independent float64 forward written from the public code, the gradient, and the clear errors."""

import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from alignprop import checks, rewards, tiny
from alignprop.errors import ConfigError, MissingWeightsError
from alignprop.rewards import imagereward as ir


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    c = rewards.default_config()
    tiny.apply_overrides(
        c, tiny.write_tiny_imagereward(tmp_path_factory.mktemp("ir") / "imagereward")
    )
    return c


def test_public_keys_map_one_to_one_onto_our_module_at_full_size():
    public = tiny.imagereward_public_keys(ir.ARCHITECTURE)
    # ImageReward.pt as the public code's model.state_dict() writes it: 625 entries (294 ViT-L/16,
    # 317 BERT with cross-attention and its position_ids buffer, 4 unused projections, 10 head)
    assert len(public) == 625
    assert public["blip.visual_encoder.pos_embed"] == (1, 197, 1024)
    assert public["blip.text_encoder.encoder.layer.11.crossattention.self.key.weight"] == (
        768,
        1024,
    )
    assert public["blip.text_encoder.embeddings.word_embeddings.weight"] == (30524, 768)
    assert public["mlp.layers.7.weight"] == (1, 16)
    with torch.device("meta"):
        model = ir.ImageRewardModel(ir.ARCHITECTURE)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapped = {ir.rename_key(k): shape for k, shape in public.items() if ir.rename_key(k)}
    assert mapped == ours
    dropped = [k for k in public if ir.rename_key(k) is None]
    assert sorted(dropped) == sorted(
        ["blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight",
         "blip.text_proj.bias", "blip.text_encoder.embeddings.position_ids"]
    )  # fmt: skip
    assert ir.rename_key("module.mlp.layers.0.bias") == "mlp.layers.0.bias"  # a DDP-saved copy
    with pytest.raises(ConfigError, match="unexpected key"):
        ir.rename_key("blip.text_decoder.bert.embeddings.word_embeddings.weight")


def reference_score(sd: dict, arch: dict, pixels, ids, mask) -> torch.Tensor:
    """ImageReward's forward from the public code (vit.py, med.py, ImageReward.py) in plain torch."""
    v, t = arch["vision"], arch["text"]
    heads, p = v["num_attention_heads"], v["patch_size"]

    def attend(q, k, val, n_heads, bias=None):
        b, lq, w = q.shape
        split = lambda x: x.view(b, -1, n_heads, w // n_heads).transpose(1, 2)  # noqa: E731
        s = split(q) @ split(k).transpose(-1, -2) / math.sqrt(w // n_heads)
        if bias is not None:
            s = s + bias
        return (s.softmax(-1) @ split(val)).transpose(1, 2).reshape(b, lq, w)

    def lin(x, name):
        return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])

    def ln(x, name, eps):
        return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)

    ve = "blip.visual_encoder."
    x = F.conv2d(
        pixels, sd[ve + "patch_embed.proj.weight"], sd[ve + "patch_embed.proj.bias"], stride=p
    )
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[ve + "cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd[ve + "pos_embed"]
    for i in range(v["num_hidden_layers"]):
        blk = f"{ve}blocks.{i}."
        q, k, val = lin(ln(x, blk + "norm1", 1e-6), blk + "attn.qkv").chunk(3, dim=-1)
        x = x + lin(attend(q, k, val, heads), blk + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, blk + "norm2", 1e-6), blk + "mlp.fc1")), blk + "mlp.fc2")
    image = ln(x, ve + "norm", 1e-6)
    te = "blip.text_encoder."
    h = (
        sd[te + "embeddings.word_embeddings.weight"][ids]
        + sd[te + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    )
    h = ln(h, te + "embeddings.LayerNorm", 1e-12)
    bias = (1.0 - mask[:, None, None, :].to(h.dtype)) * -10000.0  # med.py's extended mask
    for i in range(t["num_hidden_layers"]):
        lay = f"{te}encoder.layer.{i}."
        a = attend(lin(h, lay + "attention.self.query"), lin(h, lay + "attention.self.key"),
                   lin(h, lay + "attention.self.value"), t["num_attention_heads"], bias)  # fmt: skip
        h = ln(
            lin(a, lay + "attention.output.dense") + h, lay + "attention.output.LayerNorm", 1e-12
        )
        c = attend(lin(h, lay + "crossattention.self.query"), lin(image, lay + "crossattention.self.key"),
                   lin(image, lay + "crossattention.self.value"), t["num_attention_heads"])  # fmt: skip
        h = ln(
            lin(c, lay + "crossattention.output.dense") + h,
            lay + "crossattention.output.LayerNorm",
            1e-12,
        )
        f = lin(F.gelu(lin(h, lay + "intermediate.dense")), lay + "output.dense")
        h = ln(f + h, lay + "output.LayerNorm", 1e-12)
    r = h[:, 0]
    for index in (0, 2, 4, 6, 7):
        r = lin(r, f"mlp.layers.{index}")
    return (r.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def test_score_matches_the_public_forward_in_float64(cfg):
    c = cfg.imagereward
    sd = {k: v.double() for k, v in torch.load(c.checkpoint, weights_only=True).items()}
    arch = ir.read_architecture(c.architecture)
    model, tokenizer, image_input = ir.load(c, "cpu", torch.float64)
    prompts = ["three foxes", "a photo of a cat", "one dog"]
    tokens = tokenizer(
        prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
    )
    assert tokens.input_ids.shape == (3, 35) and (tokens.attention_mask == 0).any()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 48, 40, generator=g, dtype=torch.float64) * 2 - 1
    pixels = rewards.preprocess.to_model_input(images, image_input, torch.float64)
    ref = reference_score(sd, arch, pixels, tokens.input_ids, tokens.attention_mask)
    fn = rewards.get_reward("imagereward", cfg, "cpu", torch.float64)
    ours = model(pixels, tokens.input_ids, tokens.attention_mask)
    assert ref.std() > 1e-3  # the tiny head spreads its scores: the comparison is not of constants
    # float64 through two implementations of the same network: rounding only (1e-12 relative)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(
        fn(images, prompts)[0].double(), ref.float().double(), rtol=1e-6, atol=1e-6
    )


def test_missing_damaged_and_foreign_checkpoints_are_clear(cfg, tmp_path):
    c = cfg.copy_and_resolve_references()
    c.imagereward.checkpoint = ""  # the hub default; HF_HUB_OFFLINE=1 and not cached
    with pytest.raises(MissingWeightsError, match="reward_models.imagereward.checkpoint"):
        rewards.get_reward("imagereward", c, "cpu", torch.float32)
    c = cfg.copy_and_resolve_references()
    c.imagereward.tokenizer = "google-bert/bert-base-uncased"
    with pytest.raises(MissingWeightsError, match="reward_models.imagereward.tokenizer"):
        rewards.get_reward("imagereward", c, "cpu", torch.float32)
    c = cfg.copy_and_resolve_references()
    c.imagereward.filename = "ImageReward_tiny.pt"  # treat the tiny file as the pinned one
    c.imagereward.sha256 = "0" * 64
    with pytest.raises(MissingWeightsError, match="sha256"):
        rewards.get_reward("imagereward", c, "cpu", torch.float32)
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"x": ConfigError("a class, not a tensor")}, f)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    for path in (evil, garbage):
        c = cfg.copy_and_resolve_references()
        c.imagereward.checkpoint = str(path)
        with pytest.raises(ConfigError, match="not a tensor-only ImageReward state dict"):
            rewards.get_reward("imagereward", c, "cpu", torch.float32)
    partial = tmp_path / "partial.pt"
    sd = torch.load(cfg.imagereward.checkpoint, weights_only=True)
    torch.save({k: v for k, v in sd.items() if "mlp" not in k}, partial)
    c = cfg.copy_and_resolve_references()
    c.imagereward.checkpoint = str(partial)
    with pytest.raises(ConfigError, match="does not fit the architecture"):
        rewards.get_reward("imagereward", c, "cpu", torch.float32)


def test_renamed_hub_ids_are_mapped_with_a_note(capsys):
    from alignprop.objectives.base import base_defaults

    config = base_defaults()
    config.reward_models.imagereward.repo = "THUDM/ImageReward@main"
    config.reward_models.imagereward.tokenizer = "bert-base-uncased"
    checks.resolve_moved_ids(config)
    assert config.reward_models.imagereward.repo == "zai-org/ImageReward@main"
    assert config.reward_models.imagereward.tokenizer == "google-bert/bert-base-uncased"
    assert "renamed" in capsys.readouterr().err
