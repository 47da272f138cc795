"""Base config: every field of a run, with a one-line comment. Experiments live in align_prop.py."""

import ml_collections

# the reward_models section is owned by the rewards package
from alignprop import rewards
from alignprop.early_stop import early_stop_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # ---- run ----
    # experiment name (set by align_prop.py); prefixes the run folder
    config.name = "base"
    # run folder name under logdir; "" = <name>_<timestamp>
    config.run_name = ""
    # where run folders are written
    config.logdir = "logs"
    # seeds every process once (offset by process index)
    config.seed = 42
    # fp16 | bf16 | no: frozen weights are cast to it, LoRA stays fp32
    config.mixed_precision = "fp16"
    # TF32 matmuls on Ampere+ GPUs
    config.allow_tf32 = True
    # torch CPU threads per process (0 = torch's default)
    config.cpu_threads = 0
    # "" = accelerate's choice (GPU if any); "cpu" forces CPU
    config.device = ""
    # wandb | tensorboard | none (metrics.jsonl is always written)
    config.log_with = "wandb"
    # wandb project; WANDB_MODE=offline/disabled is honoured
    config.wandb_project = "alignprop"
    # "" | "latest" (newest checkpoint of run_name, or of the newest run) | a checkpoint folder
    config.resume_from = ""
    # use the tiny random models (written on first use to a cache folder)
    config.tiny = False
    # which tiny pipeline: sd, sd2, sdxl, sd3, flux ("" = pretrained.family's, sd for auto)
    config.tiny_kit = ""

    # ---- model ----
    config.pretrained = pretrained = ml_collections.ConfigDict()
    # hub id, diffusers folder or single .safetensors/.ckpt (deleted ids: models.MOVED_HUB_IDS)
    pretrained.model = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    # model family: auto (from model_index.json) or a name in alignprop.families.FAMILIES
    pretrained.family = "auto"
    # hub revision of pretrained.model: a commit, tag or branch ("" = the default branch)
    pretrained.revision = ""
    # weight variant, e.g. "fp16" ("" = full)
    pretrained.variant = ""
    # for a single file: a diffusers config folder or hub id ("" = inferred)
    pretrained.single_file_config = ""
    # another VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix ("" = the model's)
    pretrained.vae = ""
    # SD3: leave T5-XXL out (not loaded; its tokens are zeros, as diffusers does without it)
    pretrained.drop_t5 = False
    # SD3/FLUX: text encoders wait on the CPU; each new prompt is encoded once on the GPU, cached
    pretrained.offload_text_encoders = False
    # SD3/FLUX: T5 tokens per prompt (0 = the family's default: SD3 256, FLUX 512)
    pretrained.max_sequence_length = 0

    config.lora = lora = ml_collections.ConfigDict()
    # train a LoRA adapter; False trains the full denoiser in fp32
    lora.enabled = True
    # LoRA rank r
    lora.rank = 4
    # LoRA alpha (scale = alpha / r)
    lora.alpha = 4.0
    # gaussian | default (peft's kaiming A); B starts at zero either way
    lora.init = "gaussian"
    # modules that get adapters; () = the family's default (attention projections)
    lora.target_modules = ()

    # ---- sampling ----
    config.sample = sample = ml_collections.ConfigDict()
    # solver steps (DDIM for UNet families)
    sample.num_steps = 50
    # DDIM eta in [0, 1] (0 deterministic, 1 DDPM-like)
    sample.eta = 0.0
    # classifier-free guidance weight (FLUX.1-dev: the distilled guidance input, one call per
    # step; FLUX.1-schnell: ignored, as FluxPipeline ignores it)
    sample.guidance_scale = 7.5
    # FLUX.1 (dev and schnell) only: true CFG on [negative, prompt] (1 = off)
    sample.true_cfg_scale = 1.0
    # images per process per micro-batch (training and evaluation). The paper used 4; a
    # micro-batch of 8 leaves the update the same (train.total_batch_size) and on an H200 costs
    # the time of 4 (8.30 vs 8.36 s per step at K=10, commit 773f185): half the time per sample
    sample.batch_size = 8
    # square image side in pixels (0 = the model's native size); height/width override it
    sample.resolution = 512
    # image height in pixels (0 = sample.resolution)
    sample.height = 0
    # image width in pixels (0 = sample.resolution)
    sample.width = 0
    # training sizes "HxW,HxW,...", one drawn per micro-batch from the run's RNG ("" = off; eval uses height/width)
    sample.buckets = ""
    # the unconditional prompt for guidance
    sample.negative_prompt = ""
    # video families (wan) only: frames per clip, 4 k + 1 (0 = the model card's, Wan 81)
    sample.num_frames = 0
    # video families only: the decoded frames the reward scores, e.g. "0,4,8" or "-1" ("" = all);
    # image rewards average over them, and only the latent frames up to the last one are decoded
    sample.reward_frames = ""
    # checkpoint the differentiable denoiser calls (False = none, whatever sample.checkpoint says)
    sample.grad_checkpoint = True
    # none | step | block | step+block: how (alignprop.solvers.CHECKPOINTS)
    sample.checkpoint = "step+block"
    # none | block | layer (alignprop.solvers.DECODER_CHECKPOINTS); layer: CPU fp32 step peak at 512 px
    # B=1 3.13 -> 2.20 GiB vs block, same speed (benchmarks/phase_memory.py loss --px 512 --dckpt block|layer)
    sample.decoder_checkpoint = "layer"
    # images per checkpointed VAE decode (0 = whole batch); 1 = the step's lowest peak
    sample.decode_chunk = 1
    # the steps without autograd (all but the last K; all of eval/sample.py) on merged LoRA
    # weights: one matmul per layer instead of the adapter's six ops (alignprop.fast.merged_lora)
    sample.merge_lora = True

    config.truncation = trunc = ml_collections.ConfigDict()
    # fixed | uniform | gaussian | full: how K is drawn, once per trajectory
    trunc.strategy = "uniform"
    # K for fixed
    trunc.k = 1
    # uniform: K in [k_min, k_max] (the paper's cut in [35, 45] of 50)
    trunc.k_min = 5
    trunc.k_max = 15
    # gaussian: cut index ~ N(cut_mean, cut_std) on 50 steps, K = steps - cut
    trunc.cut_mean = 42.0
    trunc.cut_std = 5.0

    # ---- reward ----
    # name, "a=1.0,b=0.5", or "pkg.module:factory"; see alignprop.rewards
    config.reward = "aesthetic"
    # extra comma-separated rewards logged at evaluation (watch reward hacking); "judges" is the
    # held-out panel (alignprop.rewards.JUDGES minus the training reward)
    config.eval_rewards = ""
    # where each reward's weights live, loss forms
    config.reward_models = rewards.default_config()

    # ---- prompts ----
    config.prompts = prompts = ml_collections.ConfigDict()
    # a built-in set (simple_animals, hpdv2_train; alignprop/prompts.py BUILTIN) or a .txt file,
    # one prompt a line (UTF-8)
    prompts.train = "simple_animals"
    # held-out prompts, same forms
    prompts.eval = "eval_simple_animals"
    # optional format string applied to each prompt, e.g. "a photo of a {}"
    prompts.template = ""
    # evaluate on the first N eval prompts (0 = all)
    prompts.num_eval = 0

    # ---- training ----
    config.train = train = ml_collections.ConfigDict()
    # samples per optimizer update over all processes (accumulation derived)
    train.total_batch_size = 128
    # the paper's "epoch"
    train.samples_per_epoch = 256
    # run length in epochs (updates = epochs * samples_per_epoch / total_batch_size)
    train.num_epochs = 100
    # AdamW learning rate
    train.learning_rate = 1e-3
    train.adam_beta1 = 0.9
    train.adam_beta2 = 0.999
    train.adam_weight_decay = 0.1
    train.adam_epsilon = 1e-8
    # gradient clipping (0 = off)
    train.max_grad_norm = 5.0
    # loss = loss_coeff * mean(reward loss)
    train.loss_coeff = 0.01
    # stop after this many consecutive updates skipped for NaN/inf loss or grads (0 = never)
    train.max_nonfinite = 5
    # tests: save each process's local and synchronised gradients under <run>/debug_grads/
    train.debug_dump_grads = False
    # torch.compile denoiser, VAE decoder, reward (GPU; warm-up cached on disk)
    train.compile_unet = False
    # replay the steps without autograd as CUDA graphs (CUDA, fixed shapes)
    train.cuda_graphs = False
    # UNet and VAE in channels_last (NHWC) memory format, cuDNN's native layout for bf16 convs
    train.channels_last = False
    # + kl_coeff * mean over the K grad steps and elements of (out_lora - out_base)^2 (0 = off);
    # a step-weighted KL at eta > 0, an L2 pull to the base at eta 0 (README, solvers.sample)
    train.kl_coeff = 0.0
    # + pretrain_coeff * denoising loss on base samples or pretrain_data, as ReFL (0 = off)
    train.pretrain_coeff = 0.0
    # folder of images with same-name .txt captions for the pretraining loss ("" = base samples)
    train.pretrain_data = ""
    # stop when an eval metric stops improving; keep its best LoRA in <run>/best/
    train.early_stop = early_stop_config()

    # ---- algorithm: the objective (alignprop/objectives/; README "Objectives") ----
    # how the LoRA learns from the reward: alignprop | draft_lv | refl | drtune | direct_align
    # (reward gradients; truncation.* draws K, what K means per objective: README) | ddpo
    # (PPO on the DDIM chain, sample.eta > 0) | flow_grpo (GRPO on the flow families' SDE) |
    # diffusion_nft (forward-process RL on the flow families)
    train.algorithm = "alignprop"
    train.ddpo = ddpo = ml_collections.ConfigDict()
    # passes over each sampled batch (train.total_batch_size images) per update
    ddpo.inner_epochs = 1
    # optimizer steps per pass: the sampled batch is split into this many minibatches
    ddpo.minibatches = 4
    # PPO clip range of the importance ratio (DDPO's 1e-4)
    ddpo.clip_range = 1e-4
    # advantages are clipped to [-adv_clip_max, adv_clip_max]
    ddpo.adv_clip_max = 5.0
    # fraction of the chain's steps trained per sample (1.0 = all)
    ddpo.timestep_fraction = 1.0
    # normalise rewards per prompt (a buffer of recent rewards each); False = batch statistics
    ddpo.per_prompt_stats = True
    # rewards kept per prompt for its mean and std
    ddpo.buffer_size = 16
    # below this many rewards for a prompt, the batch's mean and std are used
    ddpo.min_count = 16
    # DRaFT-LV (train.algorithm=draft_lv): re-noised copies of each final image, each denoised
    # by the last K steps with gradient (K=1: the paper's)
    train.draft_lv = ml_collections.ConfigDict()
    train.draft_lv.n = 2
    # Direct-Align (train.algorithm=direct_align): the reward weight falls linearly from 1 at
    # the last step's level (K=1) to discount_min at the first's (K=num_steps)
    train.direct_align = ml_collections.ConfigDict()
    train.direct_align.discount_min = 0.5
    # Flow-GRPO (train.algorithm=flow_grpo, flow families): GRPO on the flow ODE's SDE
    train.flow_grpo = fg = ml_collections.ConfigDict()
    # the SDE's noise level a: step noise g_t = a sqrt(t / (1 - t)) (Flow-GRPO's 0.7)
    fg.noise_level = 0.7
    # images per prompt; advantages are normalised within each prompt's group
    fg.group_size = 2
    # steps of the training chain, fewer than evaluation's sample.num_steps (0 = the same)
    fg.num_steps = 0
    # KL to the base model (adapter off) per trained step, the loss's weight (0 = off)
    fg.beta = 0.04
    # PPO, as train.ddpo: passes per sampled batch, optimizer steps per pass, clip range,
    # advantage clip, fraction of the chain's steps trained per image
    fg.inner_epochs = 1
    fg.minibatches = 1
    fg.clip_range = 1e-4
    fg.adv_clip_max = 5.0
    fg.timestep_fraction = 1.0
    # DiffusionNFT (train.algorithm=diffusion_nft, flow families): reward-weighted positive and
    # negative velocity targets on the forward process, no likelihoods
    train.diffusion_nft = nft = ml_collections.ConfigDict()
    # images per prompt; each image's optimality comes from its group-normalised reward
    nft.group_size = 2
    # the implicit policies' step beta: v+- = (1 -+ beta) v_old +- beta v_theta (the paper's 1)
    nft.beta = 1.0
    # noise levels drawn per micro-batch per update (each one denoiser call with gradient)
    nft.timesteps = 2
    # passes over the sampled batch, optimizer steps per pass
    nft.inner_epochs = 1
    nft.minibatches = 1
    # optimality r = 1/2 + 1/2 clip(advantage / adv_clip_max, -1, 1)
    nft.adv_clip_max = 5.0
    # sample the training images with the run's CFG (False: CFG-free, as the paper)
    nft.sample_cfg = False

    # ---- evaluation, checkpoints ----
    # evaluate every N updates (and at the end); 0 = only at the end
    config.eval_freq = 10
    # seed of the fixed evaluation noise (its own generator)
    config.eval_seed = 1234
    # fixed-noise draws (seeds) per eval prompt; >= 2 also logs eval/diversity across them
    config.eval_repeats = 1
    # checkpoint every N updates (and at the end)
    config.save_freq = 10
    # keep the newest N complete checkpoints (0 = all)
    config.keep_checkpoints = 3
    # images per eval panel logged to the tracker (0 = no panel)
    config.log_images = 8
    # hub repo id to upload final/ (best/ with early stopping) with its model card ("" = off)
    config.push_to_hub = ""
    return config
