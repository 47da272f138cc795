"""Tiny SDXL / SD2 / SD3 / FLUX kits: each loads with its family's own diffusers pipeline and runs."""

import json
from pathlib import Path

import pytest
import torch

from alignprop import tiny

KIT_FAMILIES = ("sdxl", "sd2", "sd3", "flux")
PIPELINES = {
    "sdxl": "StableDiffusionXLPipeline",
    "sd2": "StableDiffusionPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}
PROMPT = "a photo of a cute cat"


@pytest.fixture(scope="module")
def kit_root(tmp_path_factory, one_thread):
    """The cache root the kits are written under once (ensure_tiny_model's cache_dir)."""
    root = tmp_path_factory.mktemp("kits") / "tiny"
    for family in KIT_FAMILIES:
        tiny.ensure_tiny_model(family, root)
    return root


@pytest.fixture(scope="module")
def pipes(kit_root):
    """Each kit loaded once, through its family's pipeline class, from the cached folder."""
    import diffusers

    loaded = {}
    for family in KIT_FAMILIES:
        cls = getattr(diffusers, PIPELINES[family])
        pipe = cls.from_pretrained(tiny.ensure_tiny_model(family, kit_root))
        pipe.set_progress_bar_config(disable=True)
        loaded[family] = pipe
    return loaded


def _latent_shape(family: str, height: int, width: int) -> tuple:
    h, w = height // 8, width // 8  # the tiny VAEs downsample 8x, like the real ones
    if family == "flux":  # FluxPipeline returns its 2x2-packed latents: (B, tokens, 16 * 4)
        return (1, (h // 2) * (w // 2), 64)
    return (1, 16 if family == "sd3" else 4, h, w)


CASES = [
    ("sdxl", 64, 64),
    ("sdxl", 64, 96),
    ("sd2", 64, 64),
    ("sd3", 64, 64),
    ("flux", 64, 64),
    ("flux", 64, 96),
]


@pytest.mark.parametrize(("family", "height", "width"), CASES)
def test_kit_generates_latents(pipes, family, height, width):
    pipe = pipes[family]
    out = pipe(
        PROMPT,
        num_inference_steps=2,
        height=height,
        width=width,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert tuple(out.shape) == _latent_shape(family, height, width)
    assert torch.isfinite(out).all()
    assert out.std() > 0


@pytest.mark.parametrize("family", KIT_FAMILIES)
def test_kit_decodes_images(pipes, family):
    out = pipes[family](
        PROMPT,
        num_inference_steps=2,
        height=64,
        width=96,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert tuple(out.shape) == (1, 3, 64, 96)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_sdxl_layout(pipes):
    pipe = pipes["sdxl"]
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time"
    pooled = pipe.text_encoder_2.config.projection_dim
    assert unet.projection_class_embeddings_input_dim == pooled + 6 * unet.addition_time_embed_dim
    hidden = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert unet.cross_attention_dim == hidden
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert (pipe.tokenizer.pad_token, pipe.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
    assert len(pipe.tokenizer) == len(pipe.tokenizer_2) == tiny.CLIP_VOCAB_SIZE
    assert pipe.vae.config.scaling_factor == tiny.SDXL_VAE_SCALING and pipe.vae.config.force_upcast
    sched = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert (sched.beta_schedule, sched.beta_start, sched.beta_end) == (
        "scaled_linear",
        0.00085,
        0.012,
    )
    assert (sched.timestep_spacing, sched.steps_offset) == ("leading", 1)
    assert pipe.default_sample_size * pipe.vae_scale_factor == tiny.TINY_RESOLUTION


def test_sd2_layout(pipes):
    pipe = pipes["sd2"]
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.text_encoder.config.hidden_act == "gelu"
    assert pipe.tokenizer.pad_token == "!" and pipe.tokenizer.pad_token_id == 0
    unet = pipe.unet.config
    assert unet.use_linear_projection and isinstance(unet.attention_head_dim, (list, tuple))
    assert len(unet.attention_head_dim) == len(unet.block_out_channels)
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size


def test_sd3_layout(pipes):
    pipe = pipes["sd3"]
    tr = pipe.transformer.config
    assert pipe.vae.config.latent_channels == tr.in_channels == 16
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (1.5305, 0.0609)
    assert tr.joint_attention_dim == pipe.text_encoder_3.config.d_model
    clip_proj = pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    assert tr.pooled_projection_dim == clip_proj
    assert tr.caption_projection_dim == tr.num_attention_heads * tr.attention_head_dim
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.scheduler.config.shift == 3.0
    assert pipe.tokenizer_3.pad_token_id == 0
    assert pipe.text_encoder_3.config.vocab_size >= len(pipe.tokenizer_3)


def test_flux_layout(pipes):
    pipe = pipes["flux"]
    tr = pipe.transformer.config
    assert tr.guidance_embeds and sum(tr.axes_dims_rope) == tr.attention_head_dim
    assert tr.in_channels == 4 * pipe.vae.config.latent_channels == 64
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (0.3611, 0.1159)
    assert tr.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert tr.joint_attention_dim == pipe.text_encoder_2.config.d_model
    sched = pipe.scheduler.config
    assert {k: sched[k] for k in tiny.FLUX_SCHEDULER} == tiny.FLUX_SCHEDULER
    assert pipe.text_encoder_2.config.vocab_size >= len(pipe.tokenizer_2)


def test_t5_tokenizer_round_trips_and_pads(kit_root):
    from transformers import T5TokenizerFast

    tok = T5TokenizerFast.from_pretrained(tiny.ensure_tiny_model("flux", kit_root) + "/tokenizer_2")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert 256 <= len(tok) <= 1024
    prompt = "A majestic hippopotamus riding a bicycle in Paris, 4k!"
    ids = tok(prompt).input_ids
    assert ids[-1] == 1 and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == prompt
    batch = tok([prompt, "a cat"], padding="max_length", max_length=32, truncation=True)
    assert [len(x) for x in batch.input_ids] == [32, 32]
    short_ids, short_mask = batch.input_ids[1], batch.attention_mask[1]
    assert short_ids[sum(short_mask) :] == [0] * (32 - sum(short_mask))
    assert 0 not in short_ids[: sum(short_mask)]


def test_t5_tokenizer_is_deterministic(tmp_path, kit_root):
    tiny.write_t5_tokenizer(tmp_path / "again")
    written = tiny.ensure_tiny_model("sd3", kit_root) + "/tokenizer_3/tokenizer.json"
    again = json.loads((tmp_path / "again" / "tokenizer.json").read_text())
    assert again["model"] == json.loads(Path(written).read_text())["model"]


def test_kit_writers_are_seeded_and_leave_global_rng_alone(tmp_path, one_thread):
    from safetensors.torch import load_file

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = tiny.write_tiny_flux(tmp_path / "a", seed=0)
    b = tiny.write_tiny_flux(tmp_path / "b", seed=0)
    c = tiny.write_tiny_flux(tmp_path / "c", seed=1)
    assert torch.equal(torch.rand(3), expected)
    weights = [
        load_file(p / "transformer" / "diffusion_pytorch_model.safetensors") for p in (a, b, c)
    ]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_ensure_tiny_model_caches_beside_ensure_tiny(kit_root, monkeypatch):
    paths = {f: tiny.ensure_tiny_model(f, kit_root) for f in KIT_FAMILIES}
    for family, path in paths.items():
        assert path == str(kit_root.with_name("tiny_models") / family)
        index = json.loads((Path(path) / "model_index.json").read_text())
        assert index["_class_name"] == PIPELINES[family]

    def no_rewrite(*args, **kwargs):
        raise AssertionError("cached kit rewritten")

    monkeypatch.setattr(tiny, "write_tiny_model", no_rewrite)
    assert tiny.ensure_tiny_model("sdxl", kit_root) == paths["sdxl"]
    assert sorted(p.name for p in kit_root.with_name("tiny_models").iterdir()) == sorted(
        KIT_FAMILIES
    )
    with pytest.raises(ValueError, match="family"):
        tiny.ensure_tiny_model("sd4", kit_root)


def test_ensure_tiny_model_sd_is_ensure_tiny(tiny_overrides):
    # tiny_overrides points ALIGNPROP_TINY_DIR at its cache: the default root for both.
    assert tiny.ensure_tiny_model("sd") == tiny_overrides["pretrained.model"]


def test_cli_writes_one_family(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setattr("sys.argv", ["alignprop.tiny", str(tmp_path / "out"), "--family", "sd2"])
    tiny.main()
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    scheduler = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"


def test_a_cached_kit_of_another_version_is_rewritten(tmp_path, monkeypatch, one_thread):
    """A kit folder from an older writer (another version, or none) is replaced, not reused."""
    root = tmp_path / "tiny"
    path = Path(tiny.ensure_tiny_model("flux_schnell", root))
    config = json.loads((path / "transformer" / "config.json").read_text())
    assert config["guidance_embeds"] is False  # FLUX.1-schnell: no guidance embedding
    marker = path / tiny.KIT_MARKER
    assert json.loads(marker.read_text()) == {"kit": "flux_schnell", "version": 1}
    for stale in ({"kit": "flux_schnell", "version": 0}, None):  # an old version; unversioned
        (path / "leftover").write_text("from the old kit")
        if stale is None:
            marker.unlink()
        else:
            marker.write_text(json.dumps(stale))
        assert tiny.ensure_tiny_model("flux_schnell", root) == str(path)
        assert not (path / "leftover").exists()
        assert json.loads(marker.read_text())["version"] == tiny.KIT_VERSIONS["flux_schnell"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["flux_schnell"]  # nothing left over

    def no_rewrite(*args, **kwargs):
        raise AssertionError("current kit rewritten")

    monkeypatch.setattr(tiny, "write_tiny_model", no_rewrite)
    assert tiny.ensure_tiny_model("flux_schnell", root) == str(path)
