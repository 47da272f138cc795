"""MPS (Multi-dimensional Preference Score, Zhang et al., CVPR 2024), overall preference, on transformers 5.

The public code (github.com/Kwai-Kolors/MPS, trainer/models/clip_model.py, cross_modeling.py)
scores an image against its prompt with a CLIP ViT-H/14 (laion/CLIP-ViT-H-14-laion2B-s32B-b79K's
architecture) and a 4-layer cross model (PaLM/CoCa-style blocks) between them:

1. text tokens t = text_projection(text_model(prompt).last_hidden_state) (B, 77, D), the
   prompt's pooled feature e = t at the argmax token (CLIP's end token); the condition prompt's
   tokens c likewise (CONDITION: the overall-preference condition);
2. image tokens x = visual_projection(vision_model(image).last_hidden_state) (B, 257, D): every
   token, without post_layernorm;
3. a text-token mask from the condition: s = max over condition tokens of <c_i, t_j>, scaled by
   its maximum, and the prompt tokens with s <= threshold masked out of the cross-attention;
4. x -> 4 x [x + CrossAttention(LN(x), t, mask) + its parallel SwiGLU feed-forward;
   x + ParallelBlock(LN(x)): multi-query self-attention with rotary positions + SwiGLU];
5. score = exp(logit_scale) * cos(e, x[:, 0]).

Two choices where the public code is inconsistent with itself: the mask threshold is 0.3, as in
its evaluation scripts (the model's forward defaults to 0.01; `reward_models.mps.threshold`), and
the scaling of s is per image, as the evaluation scripts get by scoring one image at a time (the
forward scales by the maximum over the whole batch, which couples the images of a batch).

The official checkpoint is a whole pickled model (torch.load of code, Google Drive only), so
it is never unpickled here: `reward_models.mps.checkpoint` is a safetensors file, either imscore's
conversion (hub `RE-N-Y/mpsv1`, keys `mps.model.*`, `mps.cross_model.*`) or one written once from
the pickle by `python scripts/convert_mps.py MPS_overall_checkpoint.pth mps.safetensors`,
which reads the pickle with an unpickler that builds inert stand-ins for every class it names
(no code from the file runs) and keeps only the tensors.

reward `mps` = score (higher is better), loss -score.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import zipfile

import torch
import torch.nn.functional as F
from torch import nn

from alignprop.errors import ConfigError
from alignprop.models import split_revision

from .clip_models import check_prompts
from .loading import check_local, freeze, missing_pretrained, resolve_file
from .preprocess import ImageInput, to_model_input

# the overall-preference condition (the public README and evaluation scripts)
CONDITION = (
    "light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, "
    "structure, instance, texture, quantity, attributes, position, number, location, word, things."
)
# Cross_model(dim=1024, layer_num=4, heads=16) with CoCa's dim_head 64 and ff_mult 4
CROSS = {"dim": 1024, "layers": 4, "heads": 16, "dim_head": 64, "ff_mult": 4}


def swiglu(x: torch.Tensor) -> torch.Tensor:
    value, gate = x.chunk(2, dim=-1)
    return F.silu(gate) * value


class LayerNorm(nn.Module):
    """CoCa's LayerNorm: a learned weight, a bias buffer of zeros (both in the checkpoint)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("bias", torch.zeros(dim))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)


class SwiGLU(nn.Module):
    def forward(self, x):
        return swiglu(x)


class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x, *args):
        return self.fn(x, *args) + x


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, _ = t.shape
    return t.view(b, n, heads, -1).transpose(1, 2)  # (B, h, n, d)


def _merge(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


class CrossAttention(nn.Module):
    """Multi-query cross-attention of the image tokens on the text tokens + a parallel SwiGLU FF."""

    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        self.norm = LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        inner = ff_mult * dim
        self.ff = nn.Sequential(
            nn.Linear(dim, 2 * inner, bias=False), SwiGLU(), nn.Linear(inner, dim, bias=False)
        )

    def forward(self, x, context, mask):
        x = self.norm(x)
        q = _heads(self.to_q(x), self.heads) * self.scale
        k, v = self.to_kv(context).chunk(2, dim=-1)  # one head shared by every query head
        sim = torch.einsum("bhid,bjd->bhij", q, k) + mask[:, None]
        attn = (sim - sim.amax(dim=-1, keepdim=True).detach()).softmax(dim=-1)
        out = self.to_out(_merge(torch.einsum("bhij,bjd->bhid", attn, v)))
        return out + self.ff(x)


class RotaryEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, n: int, device) -> torch.Tensor:
        freqs = torch.outer(
            torch.arange(n, device=device, dtype=self.inv_freq.dtype), self.inv_freq
        )
        return torch.cat([freqs, freqs], dim=-1)


def rotate(pos: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    x1, x2 = t.chunk(2, dim=-1)
    return t * pos.cos().to(t.dtype) + torch.cat([-x2, x1], dim=-1) * pos.sin().to(t.dtype)


class ParallelBlock(nn.Module):
    """Multi-query self-attention with rotary positions, in parallel with a SwiGLU FF (PaLM)."""

    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        inner = ff_mult * dim
        self.split = (heads * dim_head, dim_head, dim_head, 2 * inner)
        self.norm = LayerNorm(dim)
        self.rotary_emb = RotaryEmbedding(dim_head)
        self.fused_attn_ff_proj = nn.Linear(dim, sum(self.split), bias=False)
        self.attn_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.ff_out = nn.Sequential(SwiGLU(), nn.Linear(inner, dim, bias=False))

    def forward(self, x):
        x = self.norm(x)
        q, k, v, ff = self.fused_attn_ff_proj(x).split(self.split, dim=-1)
        pos = self.rotary_emb(x.shape[1], x.device)
        q = rotate(pos, _heads(q, self.heads)) * self.scale
        k = rotate(pos, k)
        sim = torch.einsum("bhid,bjd->bhij", q, k)
        attn = (sim - sim.amax(dim=-1, keepdim=True).detach()).softmax(dim=-1)
        return self.attn_out(_merge(torch.einsum("bhij,bjd->bhid", attn, v))) + self.ff_out(ff)


class CrossModel(nn.Module):
    def __init__(self, dim: int, layers: int, heads: int, dim_head: int, ff_mult: int):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    Residual(CrossAttention(dim, heads, dim_head, ff_mult)),
                    Residual(ParallelBlock(dim, heads, dim_head, ff_mult)),
                ]
            )  # fmt: skip
            for _ in range(layers)
        )

    def forward(self, x, context, mask):
        for cross, block in self.layers:
            x = block(cross(x, context, mask))
        return x


class MPSModel(nn.Module):
    """`model` (a transformers CLIPModel) and `cross_model`: the public module tree's names."""

    def __init__(self, clip_config, cross: dict):
        super().__init__()
        from transformers import CLIPModel

        self.model = CLIPModel(clip_config)
        self.cross_model = CrossModel(**cross)

    def text_tokens(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (B, L, D), pooled at the argmax token (B, D)), no attention mask (as the public code)."""
        hidden = self.model.text_model(input_ids=input_ids).last_hidden_state
        tokens = self.model.text_projection(hidden)
        return tokens, tokens[
            torch.arange(len(input_ids), device=tokens.device), input_ids.argmax(-1)
        ]

    def forward(self, pixels, input_ids, condition_ids, threshold: float):
        image = self.model.visual_projection(
            self.model.vision_model(pixel_values=pixels).last_hidden_state
        )
        with torch.no_grad():
            text, pooled = self.text_tokens(input_ids)
            cond, _ = self.text_tokens(condition_ids)
            s = torch.einsum("bid,bjd->bji", text, cond).amax(dim=1, keepdim=True)  # (B, 1, L)
            s = s / s.amax(dim=-1, keepdim=True)  # per image (see the module docstring)
            mask = torch.zeros_like(s).masked_fill(s <= threshold, float("-inf"))
            mask = mask.expand(-1, image.shape[1], -1).to(image.dtype)
        x = self.cross_model(image, text, mask)[:, 0]
        cos = (F.normalize(x, dim=-1) * F.normalize(pooled, dim=-1)).sum(-1)
        return self.model.logit_scale.exp() * cos  # (B,) in the model's dtype


def read_cross(path: str) -> dict:
    if not path:
        return CROSS
    if not os.path.isfile(path):
        raise ConfigError(f"reward_models.mps.cross: no json at {path!r} ('' = MPS's cross model)")
    return json.loads(open(path).read())


def mps_state(raw: dict, path: str) -> dict:
    """A checkpoint's tensors under our module's names: imscore's `mps.` prefix dropped, and
    the position_ids buffers (recomputed by transformers) left out."""
    out = {}
    for key, value in raw.items():
        key = key.removeprefix("mps.").removeprefix("module.")
        if key.endswith("position_ids"):
            continue
        if not key.startswith(("model.", "cross_model.")):
            raise ConfigError(f"reward_models.mps.checkpoint: {path} has an unexpected key {key!r}")
        out[key] = value
    return out


@functools.cache
def _load(path: str, clip_id: str, cross_path: str, device, dtype):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor

    repo, revision = split_revision(clip_id)
    clip_config = CLIPConfig.from_pretrained(repo, revision=revision)
    with torch.random.fork_rng(devices=[]):
        model = MPSModel(clip_config, read_cross(cross_path))
    try:
        raw = load_file(path)
    except Exception as e:  # noqa: BLE001 - not a safetensors file
        raise ConfigError(
            f"reward_models.mps.checkpoint: {path} is not a safetensors file ({str(e)[:200]}); convert "
            "the official pickle once: python scripts/convert_mps.py MPS_overall_checkpoint.pth "
            "mps.safetensors"
        ) from e
    missing, unexpected = model.load_state_dict(mps_state(raw, path), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ConfigError(
            f"reward_models.mps.checkpoint: {path} does not fit the architecture ({len(missing)} "
            f"missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]})"
        )
    tokenizer = AutoTokenizer.from_pretrained(repo, revision=revision)
    image_input = ImageInput.from_hf_processor(
        CLIPImageProcessor.from_pretrained(repo, revision=revision)
    )
    return freeze(model, device, dtype), tokenizer, image_input


def load(cfg, device: torch.device | str, dtype: torch.dtype):
    """(frozen MPSModel, tokenizer, ImageInput) for cfg = config.reward_models.mps."""
    path = resolve_file("mps.checkpoint", cfg.checkpoint, cfg.repo, cfg.filename)
    check_local("mps.clip", cfg.clip)
    try:
        return _load(path, cfg.clip, cfg.cross, torch.device(device), dtype)
    except OSError as e:  # the CLIP config, tokenizer or processor: missing or offline
        raise missing_pretrained("mps.clip", cfg.clip, e) from e


def make_reward(cfg, device: torch.device | str, dtype: torch.dtype):
    """MPS (overall): r = exp(logit_scale) * cos(prompt, cross-attended image); loss -r."""
    c = cfg.mps
    if not 0 <= c.threshold < 1:
        raise ConfigError(f"reward_models.mps.threshold={c.threshold!r}; give a value in [0, 1)")
    model, tokenizer, image_input = load(c, device, dtype)
    device = next(model.parameters()).device
    length = model.model.config.text_config.max_position_embeddings

    def tokens(texts):
        return tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=length,
            return_tensors="pt",
        ).input_ids.to(device)

    def reward_fn(images: torch.Tensor, prompts) -> tuple[torch.Tensor, dict]:
        check_prompts(images, prompts)
        pixels = to_model_input(images.to(device), image_input, dtype)
        rewards = model(pixels, tokens(prompts), tokens([CONDITION] * len(prompts)), c.threshold)
        return rewards.float(), {"loss": -rewards.float()}

    reward_fn.modules = (model.model.vision_model,)  # what train.compile_unet compiles
    return reward_fn


# ---- converting the official pickle without running it


class _Inert:
    """Stands in for any class a pickle names: takes whatever state it is given, runs nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    def __call__(self, *args, **kwargs):  # a pickled function reference, called by REDUCE
        return _Inert()


class _Unpickler(pickle.Unpickler):
    """Resolves torch's tensor rebuilders and OrderedDict; every other global becomes an inert class."""

    SAFE = {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch", "HalfStorage"), ("torch", "FloatStorage"), ("torch", "BFloat16Storage"),
        ("torch", "LongStorage"), ("torch", "IntStorage"), ("torch", "BoolStorage"),
        ("torch", "DoubleStorage"),
    }  # fmt: skip

    def __init__(self, file, zf: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.zf, self.prefix = zf, prefix

    def find_class(self, module, name):
        if (module, name) in self.SAFE:
            return super().find_class(module, name)
        return type(name, (_Inert,), {"__module__": "inert." + module})

    def persistent_load(self, pid):
        # ("storage", storage_type, key, location, numel): torch's zip layout, bytes at data/<key>
        _, storage_type, key, _, _ = pid
        data = bytearray(self.zf.read(f"{self.prefix}/data/{key}"))
        untyped = (
            torch.frombuffer(data, dtype=torch.uint8).untyped_storage()
            if data
            else torch.UntypedStorage(0)
        )
        import warnings

        with warnings.catch_warnings():  # TypedStorage is what _rebuild_tensor_v2 takes
            warnings.simplefilter("ignore", UserWarning)
            return torch.storage.TypedStorage(
                wrap_storage=untyped, dtype=storage_type.dtype, _internal=True
            )


def _tensors(obj, prefix: str, out: dict, seen: set) -> None:
    """Walk a module tree of inert objects: _parameters, _buffers, _modules (as nn.Module keeps them)."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out[prefix.rstrip(".")] = obj
        return
    state = obj.__dict__.get("_state", obj.__dict__) if hasattr(obj, "__dict__") else {}
    if not isinstance(state, dict):
        return
    for group in ("_parameters", "_buffers"):
        for name, t in (state.get(group) or {}).items():
            if isinstance(t, torch.Tensor):
                out[prefix + name] = t
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            _tensors(child, f"{prefix}{name}.", out, seen)


def convert(src: str, dst: str) -> int:
    """Write the tensors of a pickled whole MPS model (torch zip format) to a safetensors file."""
    from safetensors.torch import save_file

    if not os.path.isfile(src) or not zipfile.is_zipfile(src):
        raise ConfigError(
            f"{src}: no such file, or not a torch.save checkpoint (a zip); give MPS_overall_checkpoint.pth"
        )
    with zipfile.ZipFile(src) as zf:
        pkl = next(n for n in zf.namelist() if n.endswith("data.pkl"))
        prefix = pkl[: -len("/data.pkl")]
        with zf.open(pkl) as f:
            root = _Unpickler(f, zf, prefix).load()
    tensors: dict = {}
    _tensors(root, "", tensors, set())
    state = mps_state({k: v.contiguous().clone() for k, v in tensors.items()}, src)
    if not any(k.startswith("cross_model.") for k in state):
        raise ConfigError(
            f"{src}: no cross_model tensors found; is this MPS_overall_checkpoint.pth?"
        )
    save_file(state, dst)
    return len(state)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "convert":  # scripts/convert_mps.py passes "convert" first
        raise ConfigError(
            "usage: python scripts/convert_mps.py MPS_overall_checkpoint.pth mps.safetensors"
        )
    n = convert(argv[1], argv[2])
    print(f"wrote {n} tensors to {argv[2]}; set --config.reward_models.mps.checkpoint={argv[2]}")
    return 0
