"""Nothing silent: a catalogue of bad inputs to the four scripts. Each ends with status 2 and one
line on stderr naming the field, flag or file, before any model loads (loading raises here)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignprop import checkpoints, cli, lora_io

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "config" / "align_prop.py") + ":tiny"
TINY_DDPO = str(ROOT / "config" / "align_prop.py") + ":tiny_ddpo"
TINY_SD3 = str(ROOT / "config" / "align_prop.py") + ":tiny_sd3"
EVAL = str(ROOT / "config" / "align_prop.py") + ":evaluate"


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Prompt files, LoRA-like files and checkpoint folders, good and bad; nothing is trained."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("inputs")
    (d / "empty.txt").write_text("")
    (d / "blank.txt").write_text("\n   \n\t\n")
    (d / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (d / "prompts.txt").write_text("a cat\na dog\n")
    (d / "nul.txt").write_bytes(b"a cat\na d\x00og\n")
    (d / "ddpo_trunc.py").write_text(  # a user's config file that sets a field DDPO ignores
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('ap', {str(ROOT / 'config' / 'align_prop.py')!r})\n"
        "ap = importlib.util.module_from_spec(spec); spec.loader.exec_module(ap)\n"
        "def get_config():\n"
        "    config = ap.get_config('tiny_ddpo')\n"
        "    config.truncation.k_max = 2\n"
        "    return config\n"
    )
    from PIL import Image

    images = d / "pretrain_bad"  # one good captioned image, one that is not an image
    images.mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(images / "good.png")
    (images / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    for stem in ("good", "bad"):
        (images / f"{stem}.txt").write_text(f"a {stem} picture")
    (d / "pretrain_good").mkdir()
    for name in ("good.png", "good.txt"):
        shutil.copy(images / name, d / "pretrain_good" / name)
    (d / "a_file").write_text("x")
    save_file({"unet.down.lora_A.weight": torch.zeros(2, 2)}, str(d / "lora.safetensors"))
    save_file({"conv_in.weight": torch.zeros(4, 4)}, str(d / "base.safetensors"))
    blob = (d / "lora.safetensors").read_bytes()
    (d / "torn.safetensors").write_bytes(blob[: len(blob) - 8])
    (d / "lora.bin").write_bytes(b"\0" * 16)
    run = d / "logs" / "done"  # a finished run (tiny: 40 updates) and its damaged siblings

    def checkpoint(run: Path, update: int, marker: bool = True) -> Path:
        c = checkpoints.checkpoint_dir(run, update)
        c.mkdir(parents=True)
        names = ("optimizer.bin", "custom_checkpoint_0.pkl", lora_io.LORA_WEIGHT_NAME)
        for n in names:
            (c / n).write_bytes(b"\1" * 64)
        if marker:
            meta = {"update": update, "files": {n: 64 for n in names}}
            (c / checkpoints.COMPLETE_MARKER).write_text(json.dumps(meta))
        return c

    checkpoint(run, 40)
    (run / "config.json").write_text("{}")
    checkpoint(d / "logs" / "toolong", 50)
    checkpoint(d / "logs" / "half", 3, marker=False)
    torn = checkpoint(d / "logs" / "torn", 3)
    (torn / "optimizer.bin").write_bytes(b"\1" * 10)
    gone = checkpoint(d / "logs" / "gone", 3)
    (gone / lora_io.LORA_WEIGHT_NAME).unlink()
    checkpoint(d / "logs" / "branch", 1)
    checkpoint(d / "logs" / "branch", 2)
    return d


def T(*a):  # train.py on the tiny config, logdir filled in by the test
    return ("train", ["--config", TINY, "--config.logdir={logs}", *a])


def D(*a):  # train.py on the tiny DDPO config
    return ("train", ["--config", TINY_DDPO, "--config.logdir={logs}", *a])


def S(*a):
    return ("sample", list(a))


def E(*a):
    return ("evaluate", ["--config", EVAL, "--out={d}/eval_out", *a])


def X(*a):
    return ("export_lora", list(a))


# (id, (script, argv), text the one-line message must contain); {d} = the files folder, {logs} its logs/
CASES = [
    ("unknown-field", T("--config.foo=1"), "--config.foo: no such config field"),
    ("unknown-nested-field", T("--config.train.nope=2"), "--config.train.nope"),
    ("unknown-config-name", ("train", ["--config", str(ROOT / "config/align_prop.py:nope")]), "unknown config 'nope'"),
    ("missing-config-file", ("train", ["--config", "/no/such/config.py:tiny"]), "/no/such/config.py"),
    ("unknown-flag", T("--bogus"), "--bogus"),
    ("positional", T("extra"), "unexpected argument 'extra'"),
    ("bad-int", T("--config.seed=abc"), "config.seed"),
    ("seed-negative", T("--config.seed=-1"), "seed=-1"),
    ("seed-too-big", T(f"--config.seed={2**32}"), "seed="),
    ("eval-seed", T("--config.eval_seed=-5"), "eval_seed"),
    ("beta1", T("--config.train.adam_beta1=1.0"), "train.adam_beta1"),
    ("beta2", T("--config.train.adam_beta2=-0.1"), "train.adam_beta2"),
    ("eps", T("--config.train.adam_epsilon=0"), "train.adam_epsilon"),
    ("weight-decay", T("--config.train.adam_weight_decay=-1"), "train.adam_weight_decay"),
    ("max-nonfinite", T("--config.train.max_nonfinite=-1"), "train.max_nonfinite"),
    ("lr", T("--config.train.learning_rate=0"), "train.learning_rate"),
    ("loss-coeff", T("--config.train.loss_coeff=-1"), "train.loss_coeff"),
    ("grad-norm", T("--config.train.max_grad_norm=-1"), "train.max_grad_norm"),
    ("num-steps-0", T("--config.sample.num_steps=0"), "sample.num_steps"),
    ("num-steps-vs-scheduler", T("--config.sample.num_steps=2000"), "num_train_timesteps=1000"),
    ("eta", T("--config.sample.eta=1.5"), "sample.eta"),
    ("guidance-0", T("--config.sample.guidance_scale=0"), "sample.guidance_scale"),
    ("guidance-negative", T("--config.sample.guidance_scale=-3"), "sample.guidance_scale"),
    ("batch-size", T("--config.sample.batch_size=0"), "sample.batch_size"),
    ("total-batch", T("--config.train.total_batch_size=3"), "train.total_batch_size"),
    ("samples-per-epoch", T("--config.train.samples_per_epoch=3"), "train.samples_per_epoch"),
    ("epochs", T("--config.train.num_epochs=0"), "train.num_epochs"),
    ("eval-freq", T("--config.eval_freq=-1"), "eval_freq"),
    ("save-freq", T("--config.save_freq=-1"), "save_freq"),
    ("keep-checkpoints", T("--config.keep_checkpoints=-1"), "keep_checkpoints"),
    ("eval-repeats", T("--config.eval_repeats=0"), "eval_repeats"),
    ("log-images", T("--config.log_images=-1"), "log_images"),
    ("rank", T("--config.lora.rank=0"), "lora.rank"),
    ("lora-init", T("--config.lora.init=orthogonal"), "lora.init"),
    ("resolution", T("--config.sample.resolution=500"), "sample.resolution"),
    ("decoder-checkpoint", T("--config.sample.decoder_checkpoint=blocks"), "sample.decoder_checkpoint='blocks' is not known; valid: ['none', 'block', 'layer']"),
    ("truncation", T("--config.truncation.strategy=random"), "truncation.strategy"),
    ("truncation-k", T("--config.truncation.strategy=fixed", "--config.truncation.k=99"), "truncation.k"),
    ("cpu-threads", T("--config.cpu_threads=-1"), "cpu_threads"),
    ("precision", T("--config.mixed_precision=fp8"), "mixed_precision"),
    ("fp16-on-cpu", T("--config.mixed_precision=fp16"), "mixed_precision=fp16"),
    ("device-missing", T("--config.device=cuda"), "device='cuda'"),
    ("device-unknown", T("--config.device=tpu9"), "device='tpu9'"),
    ("tracker", T("--config.log_with=mlflow"), "log_with"),
    ("wandb-no-login", T("--config.log_with=wandb"), "log_with=wandb: not logged in"),
    ("reward-name", T("--config.reward=beauty"), "reward"),
    ("reward-zero", T("--config.reward=aesthetic=0"), "every weight is 0"),
    ("reward-weight", T("--config.reward=aesthetic=x"), "weight 'x'"),
    ("eval-rewards", T("--config.eval_rewards=hps,nope"), "eval_rewards"),
    ("prompts-missing", T("--config.prompts.train=/no/such.txt"), "prompts.train='/no/such.txt'"),
    ("prompts-set", T("--config.prompts.eval=no_such_set"), "prompts.eval"),
    ("prompts-empty", T("--config.prompts.train={d}/empty.txt"), "holds no prompts"),
    ("prompts-blank", T("--config.prompts.eval={d}/blank.txt"), "prompts.eval="),
    ("prompts-not-utf8", T("--config.prompts.train={d}/latin1.txt"), "not UTF-8"),
    ("prompts-nul", T("--config.prompts.eval={d}/nul.txt"), "nul.txt', line 2: a NUL byte"),
    ("family-bogus", T("--config.pretrained.family=bogus"), "pretrained.family='bogus' is not known"),
    ("max-sequence-length", T("--config.pretrained.max_sequence_length=100000"), "pretrained.max_sequence_length=100000 must be in [0, 512]"),
    ("pretrain-image-corrupt", T("--config.train.pretrain_coeff=0.1", "--config.train.pretrain_data={d}/pretrain_bad"), "pretrain_bad/bad.png is not a readable image"),
    ("prompts-folder", T("--config.prompts.train={d}/"), "is a folder"),
    ("template-no-slot", T("--config.prompts.template=a photo"), "prompts.template='a photo' must contain {}"),
    ("template-two-slots", T("--config.prompts.template={} and {}"), "prompts.template"),
    ("template-named", T("--config.prompts.template=a {x}"), "prompts.template"),
    ("tiny-and-model", T("--config.pretrained.model={d}"), "tiny=True replaces pretrained.model"),
    ("model-missing", T("--config.tiny=False", "--config.pretrained.model=/no/model"), "pretrained.model"),
    ("vae-missing", T("--config.pretrained.vae=/no/vae"), "pretrained.vae"),
    ("resume-missing", T("--config.resume_from=/no/ckpt"), "resume_from='/no/ckpt'"),
    ("resume-incomplete", T("--config.resume_from={logs}/half/checkpoints/checkpoint_3"), "incomplete checkpoint"),
    ("resume-torn-file", T("--config.resume_from={logs}/torn/checkpoints/checkpoint_3"), "optimizer.bin is damaged"),
    ("resume-missing-file", T("--config.resume_from={logs}/gone/checkpoints/checkpoint_3"), "pytorch_lora_weights.safetensors is missing"),
    ("resume-older", T("--config.resume_from={logs}/branch/checkpoints/checkpoint_1"), "newer checkpoints (checkpoint_2)"),
    ("resume-fewer-updates", T("--config.run_name=toolong", "--config.resume_from=latest"), "train.num_epochs=40"),
    ("run-name-reused", T("--config.run_name=done"), "run_name='done'"),
    ("logdir-is-file", ("train", ["--config", TINY, "--config.logdir={d}/a_file"]), "logdir="),
    ("logdir-unwritable", ("train", ["--config", TINY, "--config.logdir={d}/a_file/sub"]), "logdir="),
    # settings the chosen setup would ignore
    ("kl-without-lora", T("--config.train.kl_coeff=0.1", "--config.lora.enabled=False"), "train.kl_coeff=0.1 with lora.enabled=False"),
    ("true-cfg-sd", T("--config.sample.true_cfg_scale=3"), "sample.true_cfg_scale=3.0 does nothing on the sd family"),
    ("true-cfg-sd3", ("train", ["--config", TINY_SD3, "--config.logdir={logs}", "--config.sample.true_cfg_scale=2"]), "does nothing on the sd3 family"),
    ("tiny-and-reward-path", T("--config.reward_models.hps.checkpoint={d}/a_file"), "tiny=True replaces reward_models.hps.checkpoint="),
    ("ddpo-min-count", D("--config.train.ddpo.min_count=65"), "train.ddpo.min_count=65 > train.ddpo.buffer_size=64"),
    ("ddpo-truncation", D("--config.truncation.k_max=2"), "truncation.k_max is ignored under train.algorithm=ddpo"),
    ("ddpo-truncation-file", ("train", ["--config", "{d}/ddpo_trunc.py", "--config.logdir={logs}"]), "truncation.k_max is ignored under train.algorithm=ddpo (2;"),
    ("ddpo-loss-coeff", D("--config.train.loss_coeff=2"), "train.loss_coeff is ignored under train.algorithm=ddpo"),
    ("ddpo-buckets", D("--config.sample.buckets=64x64"), "sample.buckets is ignored under train.algorithm=ddpo ('64x64'; config/base.py: ''): the RL objectives sample every image at sample.resolution"),
    ("ddpo-merge-lora", D("--config.sample.merge_lora=False"), "sample.merge_lora is ignored under train.algorithm=ddpo"),
    ("ddpo-cuda-graphs", D("--config.train.cuda_graphs=True"), "train.cuda_graphs is ignored under train.algorithm=ddpo"),
    ("ddpo-sd3-eta1", D("--config.tiny_kit=sd3"), "the sd3 family samples with 'flow': use train.algorithm=flow_grpo"),
    ("ddpo-sd3-eta0", D("--config.tiny_kit=sd3", "--config.sample.eta=0"), "the sd3 family samples with 'flow': use train.algorithm=flow_grpo"),
    ("ddpo-kl", D("--config.train.kl_coeff=0.1"), "train.kl_coeff=0.1: DDPO's PPO update adds no regulariser"),
    ("ddpo-pretrain", D("--config.train.pretrain_coeff=0.1"), "train.pretrain_coeff=0.1: DDPO"),
    ("objective-unknown", T("--config.train.algorithm=reinforce"), "train.algorithm='reinforce' is not known; valid: ['alignprop', 'ddpo', 'draft_lv', 'refl', 'drtune', 'direct_align', 'flow_grpo', 'diffusion_nft']"),
    ("objective-other-section", T("--config.train.draft_lv.n=3"), "train.draft_lv.n=3 is ignored under train.algorithm=alignprop (config/base.py: 2): only train.algorithm=draft_lv reads it"),
    ("objective-ddpo-section", T("--config.train.algorithm=refl", "--config.train.ddpo.clip_range=0.2"), "train.ddpo.clip_range=0.2 is ignored under train.algorithm=refl"),
    ("draft-lv-n", T("--config.train.algorithm=draft_lv", "--config.train.draft_lv.n=0"), "train.draft_lv.n must be an integer >= 1"),
    ("direct-align-discount", T("--config.train.algorithm=direct_align", "--config.train.direct_align.discount_min=1.5"), "train.direct_align.discount_min must be in [0, 1]"),
    ("refl-jpeg", T("--config.train.algorithm=refl", "--config.reward=jpeg"), "reward='jpeg' is not differentiable, and train.algorithm=refl backpropagates"),
    ("drtune-k", T("--config.train.algorithm=drtune", "--config.truncation.k_max=21"), "truncation.k_min=1, k_max=21 must satisfy 1 <= k_min <= k_max <= sample.num_steps=20"),
    ("sample-no-prompt", S("--tiny"), "give prompts"),
    ("sample-tiny-model", S("--tiny", "--model", "x", "a cat"), "--tiny and --model"),
    ("sample-steps", S("--tiny", "--steps", "0", "a cat"), "--steps"),
    ("sample-steps-vs-scheduler", S("--tiny", "--steps", "5000", "a cat"), "--steps=5000"),
    ("sample-seed", S("--tiny", "--seed", "-1", "a cat"), "--seed"),
    ("sample-eta", S("--tiny", "--eta", "2", "a cat"), "--eta"),
    ("sample-size", S("--tiny", "--resolution", "100", "a cat"), "--resolution=100"),
    ("sample-guidance", S("--tiny", "--guidance", "0", "a cat"), "--guidance"),
    ("sample-batch", S("--tiny", "--batch-size", "0", "a cat"), "--batch-size"),
    ("sample-per-prompt", S("--tiny", "--num-per-prompt", "0", "a cat"), "--num-per-prompt"),
    ("sample-empty-prompt", S("--tiny", " "), "empty"),
    ("sample-prompt-file", S("--tiny", "--prompt-file", "/no/p.txt"), "--prompt-file"),
    ("sample-prompt-file-empty", S("--tiny", "--prompt-file", "{d}/empty.txt"), "--prompt-file"),
    ("sample-device", S("--tiny", "--device", "cuda", "a cat"), "--device"),
    ("sample-fp16-cpu", S("--tiny", "--device", "cpu", "--precision", "fp16", "a cat"), "--precision"),
    ("sample-precision", S("--tiny", "--precision", "fp8", "a cat"), "--precision"),
    ("sample-lora-missing", S("--tiny", "--lora", "/no/lora.safetensors", "a cat"), "/no/lora.safetensors"),
    ("sample-lora-torn", S("--tiny", "--lora", "{d}/torn.safetensors", "a cat"), "torn.safetensors"),
    ("sample-lora-base", S("--tiny", "--lora", "{d}/base.safetensors:0.5", "a cat"), "holds no LoRA weights"),
    ("sample-lora-bin", S("--tiny", "--lora", "{d}/lora.bin", "a cat"), "not a .safetensors"),
    ("sample-model", S("--model", "/no/model", "a cat"), "--model"),
    ("sample-out", S("--tiny", "--out", "{d}/a_file/out", "a cat"), "--out"),
    ("sample-flag", S("--tiny", "--bogus", "a cat"), "--bogus"),
    ("eval-no-out", ("evaluate", ["--config", EVAL]), "--out"),
    ("eval-nothing", E("--no-base"), "nothing to evaluate"),
    ("eval-checkpoint", E("--checkpoints", "/no/run"), "/no/run"),
    ("eval-mix-three", E("--mix", "{d}/lora.safetensors", "{d}/lora.safetensors", "{d}/lora.safetensors"), "--mix takes one or two"),
    ("eval-coefs", E("--mix", "{d}/lora.safetensors", "--coefs", "a,b"), "--coefs"),
    ("eval-field", E("--config.foo=1"), "--config.foo"),
    ("eval-config-range", E("--config.sample.guidance_scale=0"), "sample.guidance_scale"),
    ("eval-lora-base", E("--checkpoints", "{d}/base.safetensors"), "holds no LoRA weights"),
    ("eval-out", ("evaluate", ["--config", EVAL, "--out={d}/a_file/x"]), "--out"),
    ("eval-wandb", E("--wandb"), "--wandb=wandb: not logged in"),
    ("export-missing", X("/no/run", "--out", "{d}/x.safetensors"), "/no/run"),
    ("export-format", X("{d}/lora.safetensors", "--format", "kohya", "--out", "{d}/x.safetensors"), "--format"),
    ("export-no-out", X("{d}/lora.safetensors"), "--out"),
    ("export-not-lora", X("{d}/base.safetensors", "--out", "{d}/x.safetensors"), "holds no LoRA weights"),
    ("export-torn", X("{d}/torn.safetensors", "--out", "{d}/x.safetensors"), "truncated"),
    ("export-out", X("{d}/lora.safetensors", "--format", "diffusers", "--out", "{d}/a_file/x.safetensors"), "--out"),
    ("export-onto-itself", X("{d}/lora.safetensors", "--format", "diffusers", "--out", "{d}/lora.safetensors"), "source file itself"),
]  # fmt: skip


@pytest.fixture
def no_loading(monkeypatch, tiny_overrides):
    """Loading a model or a reward raises: every case must end before that."""
    from alignprop import rewards
    from alignprop.families import base

    def forbidden(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(base.Family, "load", classmethod(forbidden))
    monkeypatch.setattr(rewards, "get_reward", forbidden)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", "/no/netrc")
    monkeypatch.setenv("WORLD_SIZE", "1")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def fill(argv: list[str], d: Path) -> list[str]:
    return [a.replace("{logs}", str(d / "logs")).replace("{d}", str(d)) for a in argv]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_status_2(case, files, no_loading, capsys):
    _, (name, argv), expected = case
    code = cli.run(script(name).main, fill(argv, files))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert expected.replace("{d}", str(files)) in err, err


def test_catalogue_is_broad():
    assert len(CASES) >= 60
    assert {s for _, (s, _), _ in CASES} == {"train", "sample", "evaluate", "export_lora"}


def test_finished_run_resumed_says_so_and_exits_0(files, no_loading, capsys):
    argv = ["--config", TINY, f"--config.logdir={files / 'logs'}", "--config.run_name=done"]
    assert cli.run(script("train").main, [*argv, "--config.resume_from=latest"]) == 0
    assert "already finished (40 of 40 updates); nothing to do" in capsys.readouterr().out


def test_suspicious_settings_warn_once(files, no_loading, capsys):
    argv = [
        "--config",
        TINY,
        "--config.sample.guidance_scale=0.5",
        "--config.reward=aesthetic=1,hps=0",
    ]
    from alignprop import checks

    train = script("train")
    config, _ = cli.parse_config(argv, train.DEFAULT_CONFIG)
    checks.validate_config(config)
    checks.validate_config(config)
    err = capsys.readouterr().err
    assert err.count("warning: sample.guidance_scale=0.5 < 1") == 1, err
    assert err.count("hps has weight 0") == 1, err


def test_pretrain_data_without_its_loss_warns_once(files, no_loading, capsys):
    argv = ["--config", TINY, f"--config.train.pretrain_data={files}"]
    config, _ = cli.parse_config(argv, script("train").DEFAULT_CONFIG)
    from alignprop import checks

    checks.validate_config(config)
    checks.validate_config(config)
    err = capsys.readouterr().err
    assert err.count(f"warning: train.pretrain_data='{files}' is not read") == 1, err
    assert "train.pretrain_coeff=0" in err
    config.train.pretrain_coeff = 0.5  # with its loss on, the folder is read: no warning
    config.train.pretrain_data = str(files / "pretrain_good")
    checks.validate_config(config)
    assert "pretrain_data" not in capsys.readouterr().err


SUBPROCESS = [
    "unknown-field",
    "sample-size",
    "eval-coefs",
    "export-torn",
    "wandb-no-login",
    "resume-torn-file",
]


def test_the_command_line_path(files, tiny_overrides, tmp_path):
    """The same errors through real processes: status 2, one stderr line, no traceback, nothing written."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env.update(NETRC="/no/netrc", OMP_NUM_THREADS="1")
    byid = {c[0]: c for c in CASES}
    procs = []
    for cid in SUBPROCESS:
        _, (name, argv), expected = byid[cid]
        cmd = [sys.executable, str(ROOT / "scripts" / f"{name}.py"), *fill(argv, files)]
        cmd = [
            a.replace(f"--config.logdir={files / 'logs'}", f"--config.logdir={tmp_path}")
            if "resume" not in cid
            else a
            for a in cmd
        ]
        procs.append((cid, expected, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))  # fmt: skip
    for cid, expected, proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (cid, err[-2000:])
        assert len(err.strip().splitlines()) == 1 and expected in err, (cid, err)
    assert not any(tmp_path.iterdir())
