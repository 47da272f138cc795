"""Base config: every field of a run, with a one-line comment. Experiments live in align_prop.py."""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from alignprop import rewards  # noqa: E402  (the reward_models section is owned by the rewards package)


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # ---- run ----
    config.name = "base"  # experiment name (set by align_prop.py); prefixes the run folder
    config.run_name = ""  # run folder name under logdir; "" = <name>_<timestamp>
    config.logdir = "logs"  # where run folders are written
    config.seed = 42  # seeds every process once (offset by process index)
    config.mixed_precision = (
        "fp16"  # fp16 | bf16 | no: frozen weights are cast to it, LoRA stays fp32
    )
    config.allow_tf32 = True  # TF32 matmuls on Ampere+ GPUs
    config.cpu_threads = 0  # torch CPU threads per process (0 = torch's default)
    config.device = ""  # "" = accelerate's choice (GPU if any); "cpu" forces CPU
    config.log_with = "wandb"  # wandb | tensorboard | none (metrics.jsonl is always written)
    config.wandb_project = "alignprop"  # wandb project; WANDB_MODE=offline/disabled is honoured
    config.resume_from = ""  # "" | "latest" (newest checkpoint of run_name, or of the newest run) | a checkpoint path
    config.tiny = False  # use the tiny random models (written on first use to a cache folder)

    # ---- model ----
    config.pretrained = pretrained = ml_collections.ConfigDict()
    pretrained.model = (
        "runwayml/stable-diffusion-v1-5"  # hub id, diffusers folder, or single .safetensors/.ckpt
    )
    pretrained.revision = ""  # hub revision ("" = default branch)
    pretrained.variant = ""  # weight variant, e.g. "fp16" ("" = full)
    pretrained.single_file_config = (
        ""  # for a single file: a diffusers config folder/hub id ("" = inferred)
    )

    config.lora = lora = ml_collections.ConfigDict()
    lora.enabled = True  # train a LoRA adapter; False trains the full UNet in fp32
    lora.rank = 4  # LoRA rank r
    lora.alpha = 4.0  # LoRA alpha (scale = alpha / r)
    lora.init = "gaussian"  # gaussian | default (peft's kaiming A); B starts at zero either way
    lora.target_modules = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
    )  # attention projections that get adapters

    # ---- sampling ----
    config.sample = sample = ml_collections.ConfigDict()
    sample.num_steps = 50  # DDIM steps
    sample.eta = 0.0  # DDIM eta (0 deterministic, 1 DDPM-like)
    sample.guidance_scale = 7.5  # classifier-free guidance weight
    sample.batch_size = 4  # images per process per micro-batch (training and evaluation)
    sample.resolution = 512  # image side in pixels (0 = the UNet's native size)
    sample.negative_prompt = ""  # the unconditional prompt for guidance
    sample.grad_checkpoint = True  # checkpoint each differentiable UNet call (memory flat in K)
    sample.decoder_checkpoint = (
        True  # gradient-checkpoint the VAE decoder's blocks (its backward is the peak)
    )

    config.truncation = trunc = ml_collections.ConfigDict()
    trunc.strategy = (
        "uniform"  # fixed | uniform | gaussian | full: how K is drawn, once per trajectory
    )
    trunc.k = 1  # K for fixed
    trunc.k_min = 5  # uniform: K in [k_min, k_max] (the paper's cut in [35, 45] of 50)
    trunc.k_max = 15
    trunc.cut_mean = 42.0  # gaussian: cut index ~ N(cut_mean, cut_std) on 50 steps, K = steps - cut
    trunc.cut_std = 5.0

    # ---- reward ----
    config.reward = (
        "aesthetic"  # name, "a=1.0,b=0.5", or "pkg.module:factory"; see alignprop.rewards
    )
    config.eval_rewards = (
        ""  # extra comma-separated rewards logged at evaluation (watch reward hacking)
    )
    config.reward_models = rewards.default_config()  # where each reward's weights live, loss forms

    # ---- prompts ----
    config.prompts = prompts = ml_collections.ConfigDict()
    prompts.train = (
        "simple_animals"  # built-in set name, a .txt file (one prompt a line), or hub:REPO/FILE
    )
    prompts.eval = "eval_simple_animals"  # held-out prompts, same forms
    prompts.template = ""  # optional format string applied to each prompt, e.g. "a photo of a {}"
    prompts.num_eval = 0  # evaluate on the first N eval prompts (0 = all)

    # ---- training ----
    config.train = train = ml_collections.ConfigDict()
    train.total_batch_size = (
        128  # samples per optimizer update over all processes (accumulation derived)
    )
    train.samples_per_epoch = 256  # the paper's "epoch"
    train.num_epochs = (
        100  # run length in epochs (updates = epochs * samples_per_epoch / total_batch_size)
    )
    train.learning_rate = 1e-3  # AdamW learning rate
    train.adam_beta1 = 0.9
    train.adam_beta2 = 0.999
    train.adam_weight_decay = 0.1
    train.adam_epsilon = 1e-8
    train.max_grad_norm = 5.0  # gradient clipping (0 = off)
    train.loss_coeff = 0.01  # loss = loss_coeff * mean(reward loss)
    train.max_nonfinite = (
        5  # stop after this many consecutive updates skipped for NaN/inf loss or grads
    )
    train.debug_dump_grads = False  # tests: save each process's local and synchronised gradients under <run>/debug_grads/
    train.compile_unet = False  # torch.compile the UNet (GPU; first steps are slow)

    # ---- evaluation, checkpoints ----
    config.eval_freq = 10  # evaluate every N updates (and at the end); 0 = only at the end
    config.eval_seed = 1234  # seed of the fixed evaluation noise (its own generator)
    config.save_freq = 10  # checkpoint every N updates (and at the end)
    config.keep_checkpoints = 3  # keep the newest N checkpoints
    config.log_images = 8  # images per eval panel logged to the tracker
    return config
