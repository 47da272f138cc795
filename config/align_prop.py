"""Named experiments: `--config config/align_prop.py:NAME`, overrides as `--config.a.b=value`."""

import importlib.util
from pathlib import Path

# config files are loaded by path (ml_collections), so base.py is loaded by path too
_spec = importlib.util.spec_from_file_location(
    "alignprop_config_base", Path(__file__).with_name("base.py")
)
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)


def aesthetic():
    """The paper's aesthetic run: LAION aesthetic reward, K drawn uniformly in [5, 15] per trajectory."""
    config = base.get_config()
    config.name = "aesthetic"
    config.reward = "aesthetic"
    config.eval_rewards = ""
    config.prompts.train = "simple_animals"
    config.prompts.eval = "eval_simple_animals"
    config.truncation.strategy = "uniform"
    config.truncation.k_min, config.truncation.k_max = 5, 15
    # the published run stops at 7 epochs (14 updates) on purpose: longer over-optimises
    config.train.num_epochs = 7
    return config


def aesthetic_k1():
    """AlignProp K=1: gradient through the last denoising step only."""
    config = aesthetic()
    config.name = "aesthetic_k1"
    config.truncation.strategy = "fixed"
    config.truncation.k = 1
    return config


def hps():
    """HPSv2.1 reward on the HPDv2 benchmark prompts (fetched through huggingface_hub) or a prompt file."""
    config = base.get_config()
    config.name = "hps"
    config.reward = "hps"
    config.eval_rewards = "aesthetic"
    config.prompts.train = "hpdv2_train"  # or a path, e.g. the published hps_v2_all.txt
    config.prompts.eval = "hpdv2_eval"  # or a path, e.g. the published hps_v2_all_eval.txt
    config.truncation.strategy = "uniform"
    config.truncation.k_min, config.truncation.k_max = 5, 15
    # the published HPS run length: 200 epochs (400 updates)
    config.train.num_epochs = 200
    return config


def hps_k1():
    """HPS with K=1."""
    config = hps()
    config.name = "hps_k1"
    config.truncation.strategy = "fixed"
    config.truncation.k = 1
    return config


def tiny():
    """The whole pipeline on tiny random models on CPU, in about a minute (tests and laptops)."""
    config = aesthetic()
    config.name = "tiny"
    config.tiny = True  # SD and reward weights come from alignprop.tiny (written on first use)
    config.device = "cpu"
    # tiny ops: thread start-up costs more than it saves, and a busy core stalls it
    config.cpu_threads = 1
    config.mixed_precision = "no"
    config.log_with = "none"
    config.sample.resolution = 0  # the tiny UNet's native 64 px
    config.sample.num_steps = 20
    config.sample.batch_size = 2
    config.sample.decoder_checkpoint = False
    config.truncation.k_min, config.truncation.k_max = 1, 3
    config.eval_rewards = "hps"
    # random tiny head: push the score up, no fixed target
    config.reward_models.aesthetic.loss = "neg"
    config.train.total_batch_size = 2
    config.train.samples_per_epoch = 2
    config.train.num_epochs = 40
    # tiny random models need a large step to move in 40 updates
    config.train.learning_rate = 5e-2
    config.train.loss_coeff = 1.0
    config.prompts.num_eval = 4
    config.eval_freq = 10
    config.save_freq = 10
    config.log_images = 4
    return config


def evaluate():
    """Fixed-noise evaluation of checkpoints (scripts/evaluate.py)."""
    config = aesthetic()
    config.name = "evaluate"
    config.eval_rewards = "hps,pickscore,clipscore"
    return config


CONFIGS = {f.__name__: f for f in (aesthetic, aesthetic_k1, hps, hps_k1, tiny, evaluate)}


def get_config(name: str):
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; valid: {sorted(CONFIGS)}")
    return CONFIGS[name]()
