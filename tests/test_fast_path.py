"""The fast path changes speed, not training: LoRA gradients with each switch on and off (CPU, tiny).

Every comparison takes the LoRA gradient of one loss (AlignProp.loss_on, the trainer's own
step, or the published recipe in benchmarks/reference.py) for the same prompts, x_T and K.

Tolerances. The exact switches (each sample.checkpoint mode: step, block, step+block; decoder
checkpointing by block or by layer, channels_last, decoding one image at a time, merged LoRA weights,
one UNet call on [uncond, cond] instead of two, no autograd instead of detach before the cut, the
reference recipe itself) run the same arithmetic in another order or layout, so they are compared
in float64: in float32 these short chaotic chains amplify round-off to ~1e-4 relative, and by a
different amount on another CPU (AVX-512/AMX kernels sum in another order), which no fixed fp32
tolerance separates from a bug. In float64 every switch is within 1.1e-14 of the plain gradient
(FP64_RTOL 1e-11); the reference recipe within 1.2e-6 (its DDIM step takes diffusers' float32
schedule constants; REF_RTOL 1e-5). A wrong step, a missing detach or a bad recomputation changes
the gradient by O(1). bf16 keeps 8 significant bits (unit round-off 2^-8 = 0.4%), and
the error of each rounding compounds through ~100 layers and K steps, so the bf16 gradient is
compared with the fp32 one by direction: cosine similarity > 0.99 and relative error < 0.15
(measured: 0.997 and 0.07 with merged LoRA weights before the cut). torch.compile (eager
backend) and CUDA graphs replay the same fp32 kernels: 1e-5 (CUDA graphs with TF32 off, CUDA only).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from alignprop import checks, solvers
from alignprop import trainer as T

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a cat", "an oil painting of two dogs"]
STEPS, K = 4, 2  # a short chain; the last K steps carry gradient
FP32_RTOL = 1e-5  # same arithmetic, another order or layout
FP64_RTOL = 1e-11  # float64: measured <= 1.1e-14 for every switch (0 for some)
# the reference's DDIM step reads diffusers' float32 alphas_cumprod, the sampler its own
# float32-derived coefficients: a fixed 1e-6 apart in float64 (measured 1.14e-6 and 0.98e-6)
REF_RTOL = 1e-5
NO_CUDA = "CUDA graphs capture CUDA kernels: this machine has no CUDA GPU"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for tiny ops


def load_reference():
    """benchmarks/reference.py (a script folder, not a package): imported from its file."""
    spec = importlib.util.spec_from_file_location("reference", ROOT / "benchmarks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reset_accelerate() -> None:
    """accelerate keeps one process-wide state (mixed precision included); start afresh."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def restore_fp32() -> None:
    """Back to the fp32 state that the module's fp32 run (and any later test) expects."""
    from accelerate import Accelerator

    reset_accelerate()
    Accelerator(mixed_precision="no", cpu=True)


def tiny_config(**fields):
    config = checks.load_config(ROOT / "config" / "align_prop.py:tiny")
    checks.apply_tiny(config)
    config.sample.num_steps = STEPS
    config.truncation.strategy, config.truncation.k = "fixed", K
    config.sample.checkpoint = "none"  # all switches off
    config.sample.decoder_checkpoint = "none"
    config.sample.merge_lora = False
    for key, value in fields.items():  # "section__name" or a top-level name
        section, _, name = key.rpartition("__")
        (config[section] if section else config)[name] = value
    return config


def randomise_lora_b(unet: torch.nn.Module) -> None:
    """B starts at zero (A's gradient is then zero): make it random, the same for every model."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(unet.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def make_run(tmp_path, precision: str = "no", device: str = "cpu", reward_fn=None, **fields):
    from accelerate import Accelerator

    reset_accelerate()
    config = tiny_config(**fields)
    config.mixed_precision = precision
    acc = Accelerator(mixed_precision=precision, cpu=device == "cpu")
    run = T.AlignProp(config, acc, checks.validate_config(config), tmp_path, reward_fn=reward_fn)
    randomise_lora_b(run.family.denoiser)
    return run


def lora_grad(unet: torch.nn.Module, loss_fn) -> torch.Tensor:
    """All LoRA gradients of loss_fn() as one vector in the LoRA's dtype (in parameter-name order)."""
    for p in unet.parameters():
        p.grad = None
    loss_fn().backward()
    named = sorted((n, p) for n, p in unet.named_parameters() if "lora_" in n)
    return torch.cat([p.grad.flatten().cpu() for _, p in named])


def alignprop_grad(run: T.AlignProp) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)  # x_T (and K, fixed here) from the same stream
    return lora_grad(run.family.denoiser, lambda: run.loss_on(PROMPTS, generator=gen)[0])


def reference_grad(ref) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return lora_grad(ref.family.denoiser, lambda: ref.loss_on(PROMPTS, generator=gen)[0])


def rel_err(g: torch.Tensor, g0: torch.Tensor) -> float:
    return float((g - g0).norm() / g0.norm())


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory, tiny_overrides):
    run = make_run(tmp_path_factory.mktemp("fp32"))
    yield run
    reset_accelerate()


def to_float64(run: T.AlignProp) -> T.AlignProp:
    """The run's models and LoRA in float64 (its reward_fn must be float64 too)."""
    for m in run.family.modules():
        m.double()
    run.dtype = torch.float64
    return run


def fp64_reward(config):
    from alignprop import rewards

    return rewards.get_reward(config.reward, config.reward_models, "cpu", torch.float64)


@pytest.fixture(scope="module")
def fp64_run(tmp_path_factory, tiny_overrides):
    run = to_float64(
        make_run(tmp_path_factory.mktemp("fp64"), reward_fn=fp64_reward(tiny_config()))
    )
    yield run
    reset_accelerate()


@pytest.fixture(scope="module")
def baseline64(fp64_run) -> torch.Tensor:
    """float64, no checkpointing anywhere: the gradient every exact switch is compared with."""
    g = alignprop_grad(fp64_run)
    assert g.dtype == torch.float64 and g.norm() > 0 and torch.isfinite(g).all()
    return g


@pytest.fixture(scope="module")
def baseline(fp32_run) -> torch.Tensor:
    """fp32, no checkpointing anywhere: the slow, plain gradient every switch is compared with."""
    g = alignprop_grad(fp32_run)
    assert g.norm() > 0 and torch.isfinite(g).all()
    return g


@pytest.fixture(scope="module")
def ref(fp64_run, tiny_overrides):
    from alignprop import families

    config = tiny_config()
    family = families.load_family(config.pretrained, torch.float64, "cpu")
    r = load_reference().Reference(config, family, fp64_reward(config), "cpu", torch.float64)
    randomise_lora_b(r.family.denoiser)
    return r


SWITCHES = [
    "step", "block", "step+block", "decoder=block", "decoder=layer", "channels_last",
    "decode_chunk", "merge_lora", "all",
]  # fmt: skip


@pytest.mark.parametrize("switch", SWITCHES)
def test_switches_keep_the_gradient_in_float64(fp64_run, baseline64, switch):
    run, unet, vae = fp64_run, fp64_run.family.denoiser, fp64_run.family.vae
    every = {"step+block", "decoder=layer", "channels_last", "decode_chunk", "merge_lora"}
    on = {switch} if switch != "all" else every
    opts = run.opts
    mode = next((m for m in ("step", "block", "step+block") if m in on), "none")
    # decode_chunk=1: the 2 images decoded one at a time, each under its own checkpoint
    run.opts = dataclasses.replace(
        opts, checkpoint=mode, decode_chunk=int("decode_chunk" in on), merge_lora="merge_lora" in on
    )
    decoder = next((m for m in ("block", "layer") if f"decoder={m}" in on), "none")
    solvers.set_decoder_checkpointing(vae, decoder)
    if "channels_last" in on:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    try:
        g = alignprop_grad(run)
    finally:
        run.opts = opts
        solvers.set_decoder_checkpointing(vae, "none")
        unet.to(memory_format=torch.contiguous_format)
        vae.to(memory_format=torch.contiguous_format)
    assert rel_err(g, baseline64) < FP64_RTOL, rel_err(g, baseline64)


def test_old_grad_checkpoint_false_turns_checkpointing_off(fp32_run):
    config = tiny_config(sample__checkpoint="step+block", sample__grad_checkpoint=False)
    assert solvers.Sampling.from_config(config.sample).checkpoint_mode == "none"
    config.sample.checkpoint = "blocks"
    with pytest.raises(ValueError, match="sample.checkpoint"):
        checks.validate_config(config)


def test_negative_decode_chunk_names_the_field(fp32_run):
    with pytest.raises(ValueError, match="sample.decode_chunk"):
        checks.validate_config(tiny_config(sample__decode_chunk=-1))


def test_decoder_layer_checkpointing_keeps_fewer_activations(fp32_run):
    """sample.decoder_checkpoint=layer: the decoder's forward with grad saves each layer's input,
    not its activations; idempotent, undone by "none", state_dict keys unchanged."""
    family = fp32_run.family
    z = torch.randn(1, *family.latent_shape(64, 64), generator=torch.Generator().manual_seed(0))

    def saved_bytes() -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            family.decode(z.clone().requires_grad_())
        return total

    keys = list(family.vae.state_dict())
    plain = saved_bytes()
    try:
        solvers.set_decoder_checkpointing(family.vae, "layer")
        layered = saved_bytes()
        solvers.set_decoder_checkpointing(family.vae, "layer")
        assert saved_bytes() == layered
        assert list(family.vae.state_dict()) == keys
    finally:
        solvers.set_decoder_checkpointing(family.vae, "none")
    assert layered < 0.5 * plain, (layered, plain)
    assert saved_bytes() == plain


def test_reference_recipe_has_the_same_gradient(ref, baseline64):
    # The published recipe (two checkpointed UNet calls, autograd at every step, early
    # predictions detached, diffusers' DDIM step) is the same math as the project's step.
    assert rel_err(reference_grad(ref), baseline64) < REF_RTOL, rel_err(
        reference_grad(ref), baseline64
    )


@pytest.mark.parametrize(
    "cfg_calls, grad_before_cut",
    [(1, True), (2, False), (1, False)],
    ids=["one_call", "nograd", "both"],
)
def test_batched_cfg_and_nograd_keep_the_gradient(ref, baseline64, cfg_calls, grad_before_cut):
    ref.cfg_calls, ref.grad_before_cut = cfg_calls, grad_before_cut
    try:
        g = reference_grad(ref)
    finally:
        ref.cfg_calls, ref.grad_before_cut = 2, True
    assert rel_err(g, baseline64) < REF_RTOL, rel_err(g, baseline64)


def test_bf16_gradient_points_the_same_way(tmp_path, baseline, fp32_run):
    # the default path in bf16: merged LoRA weights (rounded to bf16) in the steps before the cut
    run = make_run(
        tmp_path, precision="bf16", sample__checkpoint="step+block", sample__decoder_checkpoint="layer",
        sample__merge_lora=True,
    )  # fmt: skip
    try:
        g = alignprop_grad(run)
    finally:
        restore_fp32()
    cos = float(torch.nn.functional.cosine_similarity(g, baseline, dim=0))
    assert cos > 0.99 and rel_err(g, baseline) < 0.15, (cos, rel_err(g, baseline))


def fresh_aesthetic(config, dtype=torch.float32):
    """The tiny aesthetic reward on models of its own (compiling them in place leaves the shared cache alone)."""
    from transformers import AutoImageProcessor, CLIPModel

    from alignprop.rewards import aesthetic
    from alignprop.rewards.preprocess import ImageInput

    c = config.reward_models.aesthetic
    clip = CLIPModel.from_pretrained(c.clip, dtype=dtype).eval().requires_grad_(False)
    image_input = ImageInput.from_hf_processor(AutoImageProcessor.from_pretrained(c.clip))
    head = aesthetic.AestheticHead(clip.config.projection_dim)
    head.load_state_dict(torch.load(c.head, weights_only=True))
    return aesthetic.aesthetic_reward(
        clip, image_input, head.to(dtype).eval().requires_grad_(False), c, dtype
    )


def test_compile_keeps_the_gradient_and_k_does_not_recompile(tmp_path, fp64_run, monkeypatch):
    # train.compile_unet through the trainer (accelerate.prepare of the compiled UNet, the VAE
    # decoder, checkpointed per layer, and the reward's image models compiled in place, peft
    # layers, step+block checkpointing, no-grad and grad graphs), on dynamo's "eager" backend: inductor's C++
    # build takes ~7 minutes on a 2-core CPU (the guards, hence recompiles, are the same).
    # K=1 keeps it to two graph captures of the UNet (the no-grad steps on merged LoRA weights,
    # the grad step on the adapter); then K=2 must reuse them.
    fp64_run.truncation = dataclasses.replace(fp64_run.truncation, k=1)
    fp64_run.opts = dataclasses.replace(fp64_run.opts, checkpoint="step+block", merge_lora=True)
    try:
        g0 = alignprop_grad(fp64_run)
    finally:
        fp64_run.truncation = dataclasses.replace(fp64_run.truncation, k=K)
        fp64_run.opts = dataclasses.replace(fp64_run.opts, checkpoint="none", merge_lora=False)
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compile_(m, **{**kw, "backend": "eager"}))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    config = tiny_config()
    run = make_run(
        tmp_path, reward_fn=fresh_aesthetic(config, torch.float64), train__compile_unet=True,
        truncation__k=1, sample__checkpoint="step+block", sample__merge_lora=True,
        sample__decoder_checkpoint="layer",
    )  # fmt: skip
    to_float64(run)
    try:
        assert run.model is not run.family.denoiser  # loss_on calls the compiled wrapper
        g = alignprop_grad(run)
        run.truncation = dataclasses.replace(run.truncation, k=2)
        with torch._dynamo.config.patch(error_on_recompile=True):
            alignprop_grad(run)  # K changes the number of calls, not the graphs
    finally:
        restore_fp32()
        torch._dynamo.reset()
    assert rel_err(g, g0) < FP64_RTOL, rel_err(g, g0)


def test_optimizer_updates_lora_in_place(tmp_path, tiny_overrides):
    # CUDA graphs replay kernels that read the LoRA weights at fixed addresses: they see each
    # update only because AdamW writes into the same tensors.
    run = make_run(tmp_path, truncation__k=1)
    try:
        before = [(p.data_ptr(), p.detach().clone()) for p in run.params]
        run.update()
        assert [p.data_ptr() for p in run.params] == [ptr for ptr, _ in before]
        assert any(not torch.equal(p, old) for p, (_, old) in zip(run.params, before, strict=True))
    finally:
        restore_fp32()


def test_channels_last_switch_moves_unet_and_vae(tmp_path, tiny_overrides):
    run = make_run(tmp_path, train__channels_last=True)
    try:
        for model in (run.family.denoiser, run.family.vae):
            convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
            assert convs and all(
                c.weight.is_contiguous(memory_format=torch.channels_last)
                and not c.weight.is_contiguous()
                for c in convs
                if c.weight.shape[-1] > 1  # 1x1 kernels are both layouts at once
            )
    finally:
        restore_fp32()


def test_cuda_graphs_need_cuda(tmp_path, tiny_overrides):
    with pytest.raises(ValueError, match="train.cuda_graphs"):
        make_run(tmp_path, train__cuda_graphs=True)
    restore_fp32()


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_graphs_keep_the_gradient_across_updates(tmp_path, tiny_overrides):
    # Two runs from the same init, one replaying the steps without autograd as CUDA graphs:
    # the same gradient before and after an optimizer step (replays see the new weights).
    # TF32 off: with it, cuBLAS/cuDNN may pick other kernels under capture than in eager mode,
    # each exact to TF32's 10-bit mantissa only (~1e-3 apart; the H200 run saw 2.2e-3).
    runs = [
        make_run(
            tmp_path / str(i), device="cuda", train__cuda_graphs=i == 1, allow_tf32=False,
            sample__merge_lora=True,
        )
        for i in (0, 1)
    ]  # fmt: skip
    try:
        for _ in range(2):
            g0, g1 = (alignprop_grad(r) for r in runs)
            assert rel_err(g1, g0) < FP32_RTOL
            for r in runs:
                r.optimizer.step()
                r.optimizer.zero_grad(set_to_none=True)
    finally:
        restore_fp32()


def test_merged_lora_is_the_adapter_and_restores_the_base(fp64_run):
    # Inside merged_lora each LoRA layer is one matmul on W + s B A, adapter off; the output is
    # the adapter's (B is random here, so the adapter changes it) and the base comes back exactly.
    from peft.tuners.lora import Linear as LoraLinear

    from alignprop import fast
    from alignprop.lora_io import adapters_disabled

    unet = fp64_run.family.denoiser
    layers = [m for m in unet.modules() if isinstance(m, LoraLinear)]
    base = {id(m): m.base_layer.weight.detach().clone() for m in layers}
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, *fp64_run.family.latent_shape(64, 64), generator=gen, dtype=torch.float64)
    cond = fp64_run.family.encode(PROMPTS)

    def out() -> torch.Tensor:
        with torch.no_grad():
            return fp64_run.family.denoise(unet, x, torch.tensor([500.0, 500.0]), cond)

    adapter_calls = []
    hooks = [
        m.lora_A["default"].register_forward_hook(lambda *a: adapter_calls.append(1))
        for m in layers
    ]
    try:
        with_adapter = out()
        with adapters_disabled(unet):
            bare = out()
        adapter_calls.clear()
        with fast.merged_lora(unet) as merged:
            inside = out()
            assert fast.lora_merged(unet)
        assert merged == len(layers) > 0 and not adapter_calls  # the adapter never ran
        assert rel_err(bare, with_adapter) > 1e-3  # the adapter matters here
        assert rel_err(inside, with_adapter) < FP64_RTOL
        assert not fast.lora_merged(unet)
        assert all(torch.equal(m.base_layer.weight, base[id(m)]) for m in layers)
        assert torch.equal(out(), with_adapter) and adapter_calls  # back to the adapter
    finally:
        for h in hooks:
            h.remove()


def test_attention_is_sdpa(fp32_run):
    from diffusers.models.attention_processor import AttnProcessor2_0

    procs = fp32_run.family.denoiser.attn_processors.values()
    assert procs and all(isinstance(p, AttnProcessor2_0) for p in procs)
