"""Launch scripts: each of aesthetic.sh, aesthetic_k1.sh, hps.sh, hps_k1.sh runs end to end through
the real `accelerate launch` on CPU; the process count and launcher config per GPU count, checked
with accelerate's own argument parsing; the one-line errors (exit 2) of the launcher, of a bad
launcher config and of the run's config, and the run's own exit status (3 for a stopped run)."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["aesthetic", "aesthetic_k1", "hps", "hps_k1"]
# The environment running the tests holds accelerate and the project, like the README's .venv.
ENV_BIN = Path(sys.executable).parent
SYSTEM_PATH = "/usr/bin:/bin"  # bash and coreutils, without the environment: a non-activated .venv

needs_env_accelerate = pytest.mark.skipif(
    shutil.which("accelerate", path=str(ENV_BIN)) is None,
    reason="no accelerate next to the test interpreter",
)
needs_clean_system_path = pytest.mark.skipif(
    shutil.which("accelerate", path=SYSTEM_PATH) is not None,
    reason=f"an accelerate on {SYSTEM_PATH} would be found first",
)

# The smallest run of any named config: tiny models, 2 DDIM steps, 1 update of 1 sample, one eval
# prompt; the HPDv2 prompt sets of hps/hps_k1 come from the hub, so the built-in sets replace them.
TINY_RUN = [
    "--config.tiny=True",
    "--config.device=cpu",
    "--config.mixed_precision=no",
    "--config.log_with=none",
    "--config.sample.resolution=0",
    "--config.sample.num_steps=2",
    "--config.sample.batch_size=1",
    "--config.truncation.k_min=1",
    "--config.truncation.k_max=1",
    "--config.train.total_batch_size=1",
    "--config.train.samples_per_epoch=1",
    "--config.train.num_epochs=1",
    "--config.eval_freq=0",
    "--config.save_freq=0",
    "--config.eval_rewards=",
    "--config.prompts.train=simple_animals",
    "--config.prompts.eval=eval_simple_animals",
    "--config.prompts.num_eval=1",
]


# What the launcher reads from the environment: only what a test sets reaches it.
LAUNCH_VARIABLES = (
    "VIRTUAL_ENV",
    "NUM_PROCESSES",
    "ACCELERATE_CONFIG",
    "ALIGNPROP_LAUNCH_DRY_RUN",
    "ALIGNPROP_GPU_COUNT",
)


def checkout(dest: Path, venv: bool) -> Path:
    """A checkout as the README installs it: the launch scripts, scripts/ and config/ copied, and
    with venv=True a `.venv` (not activated) that is the test environment (a link to it)."""
    dest.mkdir()
    for name in NAMES:
        shutil.copy2(ROOT / f"{name}.sh", dest / f"{name}.sh")
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "scripts", dest / "scripts", ignore=skip)
    shutil.copytree(ROOT / "config", dest / "config", ignore=skip)
    (dest / "alignprop").symlink_to(ROOT / "alignprop")  # train.py puts the checkout on sys.path
    if venv:
        (dest / ".venv").symlink_to(ENV_BIN.parent)  # bin/ and pyvenv.cfg as python needs them
    return dest


def launch(
    script: Path, *args: str, path: str, timeout: int = 60, cwd: Path | None = None, **env: str
) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    environ.update(PATH=path, OMP_NUM_THREADS="1", **env)
    return subprocess.run(
        ["bash", str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or script.parent,
        env=environ,
    )


def dry_run(
    gpus: int, *args: str, name: str = "aesthetic", cwd: Path | None = None, **env: str
) -> list[str]:
    """The exact command the launch script would run, with `gpus` GPUs visible."""
    proc = launch(
        ROOT / f"{name}.sh",
        *args,
        path=f"{ENV_BIN}:{SYSTEM_PATH}",
        cwd=cwd,
        ALIGNPROP_LAUNCH_DRY_RUN="1",
        ALIGNPROP_GPU_COUNT=str(gpus),
        **env,
    )
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    assert argv[:2] == [str(ENV_BIN / "accelerate"), "launch"], argv
    return argv[2:]


def accelerate_view(launch_args: list[str], monkeypatch):
    """accelerate 1.15's own parse and validation of `accelerate launch ARGS` (as run from the repo)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    monkeypatch.chdir(ROOT)  # the config paths are relative to the repository root
    args = launch_command_parser().parse_args(launch_args)
    args, _, _ = _validate_launch_command(args)
    return args


# ---------------------------------------------------------------- end to end, as users run them


@needs_env_accelerate
@needs_clean_system_path
@pytest.mark.parametrize("name", NAMES[1:])
def test_the_other_launch_scripts_find_the_non_activated_venv(name, tmp_path_factory):
    """hps.sh, aesthetic_k1.sh, hps_k1.sh are the same wrapper on another config: each finds the
    checkout's .venv without PATH and names its own config (aesthetic.sh trains, below)."""
    repo = checkout(tmp_path_factory.mktemp(name) / "repo", venv=True)
    proc = launch(
        repo / f"{name}.sh", *TINY_RUN, path=SYSTEM_PATH, ALIGNPROP_LAUNCH_DRY_RUN="1",
        CUDA_VISIBLE_DEVICES="",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    argv = shlex.split(proc.stdout)
    assert argv[:2] == [f"{repo}/.venv/bin/accelerate", "launch"], argv
    assert argv[argv.index("--config") + 1] == f"config/align_prop.py:{name}", argv
    assert "--cpu" in argv and argv[argv.index("--num_processes") + 1] == "1", argv


@needs_env_accelerate
@needs_clean_system_path
def test_launch_script_trains_on_cpu_from_the_non_activated_venv(tmp_path_factory, tiny_overrides):
    name = NAMES[0]
    repo = checkout(tmp_path_factory.mktemp(name) / "repo", venv=True)
    logdir = repo.parent / "logs"
    proc = launch(
        repo / f"{name}.sh",
        *TINY_RUN,
        f"--config.logdir={logdir}",
        f"--config.run_name={name}_run",
        path=SYSTEM_PATH,  # accelerate only in the checkout's .venv
        timeout=300,
        CUDA_VISIBLE_DEVICES="",  # a machine without a GPU, whatever runs the tests
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    announced = f"alignprop launch: {repo}/.venv/bin/accelerate launch --config_file config/accelerate/cpu.yaml --num_processes 1 --cpu --quiet scripts/train.py --config config/align_prop.py:{name} "
    assert announced in proc.stderr, proc.stderr[-3000:]
    run_dir = logdir / f"{name}_run"
    assert (run_dir / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert f'"name": "{name}"' in (run_dir / "config.json").read_text()


# ---------------------------------------------------------------- process counts and configs


@needs_env_accelerate
@pytest.mark.parametrize("gpus", [2, 8])
def test_every_visible_gpu_gets_a_process(gpus, monkeypatch):
    args = dry_run(gpus, "--config.train.learning_rate=3e-4", "--config.run_name=a b")
    assert args == [
        "--config_file",
        "config/accelerate/multi_gpu.yaml",
        "--num_processes",
        str(gpus),
        "--multi_gpu",
        "--quiet",
        "scripts/train.py",
        "--config",
        "config/align_prop.py:aesthetic",
        "--config.train.learning_rate=3e-4",
        "--config.run_name=a b",
    ]
    from accelerate.utils.launch import prepare_multi_gpu_env

    parsed = accelerate_view(args, monkeypatch)
    assert (parsed.multi_gpu, parsed.num_processes, parsed.num_machines) == (True, gpus, 1)
    assert parsed.gpu_ids == "all"
    prepare_multi_gpu_env(parsed)  # what accelerate hands to torchrun
    assert parsed.nproc_per_node == str(gpus)


@needs_env_accelerate
def test_multi_gpu_yaml_alone_is_what_issue_13_hit(monkeypatch):
    """The yaml has no num_processes on purpose; accelerate asks for it, and the scripts pass it."""
    with pytest.raises(ValueError, match="manually pass in `--num_processes`"):
        accelerate_view(
            ["--config_file", "config/accelerate/multi_gpu.yaml", "scripts/train.py"], monkeypatch
        )


@needs_env_accelerate
def test_one_gpu_uses_single_gpu_yaml_and_keeps_the_visible_devices(monkeypatch):
    args = dry_run(1)
    assert args[:4] == [
        "--config_file",
        "config/accelerate/single_gpu.yaml",
        "--num_processes",
        "1",
    ]
    assert "--multi_gpu" not in args and "--cpu" not in args
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    parsed = accelerate_view(args, monkeypatch)
    assert (parsed.multi_gpu, parsed.num_processes, parsed.use_cpu) == (False, 1, False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    _, env = prepare_simple_launcher_cmd_env(parsed)
    assert env["CUDA_VISIBLE_DEVICES"] == "3"  # gpu_ids: all, so the user's choice stands


@needs_env_accelerate
def test_no_gpu_runs_one_cpu_process(monkeypatch):
    args = dry_run(0, name="hps")
    assert args[:5] == [
        "--config_file",
        "config/accelerate/cpu.yaml",
        "--num_processes",
        "1",
        "--cpu",
    ]
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    parsed = accelerate_view(args, monkeypatch)
    assert (parsed.multi_gpu, parsed.num_processes) == (False, 1)
    _, env = prepare_simple_launcher_cmd_env(parsed)
    assert env["ACCELERATE_USE_CPU"] == "True"


@needs_env_accelerate
@pytest.mark.parametrize(
    "num,expected",
    [("2", ["--num_processes", "2", "--multi_gpu"]), ("1", ["--num_processes", "1"])],
)
def test_num_processes_picks_the_count(num, expected):
    args = dry_run(8, NUM_PROCESSES=num)
    assert args[2 : 2 + len(expected) + 2] == [*expected, "--quiet", "scripts/train.py"]


@needs_env_accelerate
def test_accelerate_config_selects_another_launcher_config():
    args = dry_run(4, ACCELERATE_CONFIG="config/accelerate/single_gpu.yaml")  # from the repo root
    # the user's config decides the distribution (DeepSpeed/FSDP configs too): no --multi_gpu
    assert args[:5] == [
        "--config_file",
        str(ROOT / "config/accelerate/single_gpu.yaml"),
        "--num_processes",
        "4",
        "--quiet",
    ]


@needs_env_accelerate
def test_accelerate_config_relative_to_the_repo_from_elsewhere(tmp_path):
    args = dry_run(2, cwd=tmp_path, ACCELERATE_CONFIG="config/accelerate/single_gpu.yaml")
    assert args[:2] == ["--config_file", "config/accelerate/single_gpu.yaml"]  # run from the root
    proc = launch(
        ROOT / "hps.sh",
        path=f"{ENV_BIN}:{SYSTEM_PATH}",
        cwd=tmp_path,
        ACCELERATE_CONFIG="no_such.yaml",
        ALIGNPROP_LAUNCH_DRY_RUN="1",
    )
    one_line_error(proc, "ACCELERATE_CONFIG=no_such.yaml")


# ---------------------------------------------------------------- one-line errors, exit 2


def one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("alignprop launch: "), proc.stderr
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize("value", ["abc", "0", "-1", "1.5", "2x"])
def test_bad_num_processes(value):
    proc = launch(ROOT / "aesthetic.sh", path=f"{ENV_BIN}:{SYSTEM_PATH}", NUM_PROCESSES=value)
    one_line_error(proc, "NUM_PROCESSES", repr(value))


@needs_env_accelerate
@pytest.mark.parametrize("num,gpus", [("3", "2"), ("2", "0")])
def test_more_processes_than_gpus(num, gpus):
    proc = launch(
        ROOT / "hps.sh",
        path=f"{ENV_BIN}:{SYSTEM_PATH}",
        NUM_PROCESSES=num,
        ALIGNPROP_GPU_COUNT=gpus,
        ALIGNPROP_LAUNCH_DRY_RUN="1",
    )
    one_line_error(proc, f"NUM_PROCESSES={num}")


@needs_clean_system_path
def test_missing_accelerate_says_how_to_install(tmp_path):
    repo = checkout(tmp_path / "repo", venv=False)
    proc = launch(repo / "aesthetic_k1.sh", path=SYSTEM_PATH)
    one_line_error(proc, "accelerate not found", "pip install -r requirements.txt -e .")


# ---------------------------------------------------------------- the run's config and status


def user_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """train.py's one line, status 2, and accelerate never started."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for word in words:
        assert word in lines[0], lines[0]


@needs_env_accelerate
def test_a_bad_field_is_train_py_s_one_line_before_accelerate_starts(tmp_path):
    proc = launch(
        ROOT / "aesthetic.sh",
        *TINY_RUN,
        f"--config.logdir={tmp_path}",
        "--config.train.learning_rate=-1",
        path=f"{ENV_BIN}:{SYSTEM_PATH}",
        ALIGNPROP_GPU_COUNT="0",
    )
    user_error(proc, "train.learning_rate must be > 0, got -1.0")


@needs_env_accelerate
def test_a_reused_run_name_is_found_before_launch_too(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.json").write_text("{}")
    proc = launch(
        ROOT / "scripts" / "launch.sh",
        "tiny",
        f"--config.logdir={tmp_path}",
        "--config.run_name=taken",
        path=f"{ENV_BIN}:{SYSTEM_PATH}",
        ALIGNPROP_GPU_COUNT="0",
    )
    user_error(proc, "run_name='taken'", "resume_from=latest")


BAD_LAUNCHER_CONFIGS = {
    "yaml": "distributed_type: [oops\n",
    "distributed-type": "compute_environment: LOCAL_MACHINE\ndistributed_type: BOGUS\n",
    "unknown-key": "compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nnum_gpus: 2\n",
    "not-a-mapping": "- cpu\n",
}


@needs_env_accelerate
@pytest.mark.parametrize("kind", BAD_LAUNCHER_CONFIGS)
def test_a_bad_launcher_config_is_one_line_naming_the_file(kind, tmp_path):
    bad = tmp_path / f"{kind}.yaml"
    bad.write_text(BAD_LAUNCHER_CONFIGS[kind])
    proc = launch(
        ROOT / "scripts" / "launch.sh",
        "tiny",
        path=f"{ENV_BIN}:{SYSTEM_PATH}",
        cwd=tmp_path,
        ACCELERATE_CONFIG=bad.name,
        ALIGNPROP_GPU_COUNT="0",
    )
    one_line_error(proc, f"ACCELERATE_CONFIG={bad}", "not a launcher config")
    assert "Traceback" not in proc.stderr


@needs_env_accelerate
def test_a_stopped_run_exits_3_through_accelerate_without_a_traceback(tmp_path, tiny_overrides):
    """lr 1e30 blows the LoRA up after one update; accelerate alone would exit 1 with a traceback."""
    proc = launch(
        ROOT / "aesthetic.sh",
        *TINY_RUN,
        f"--config.logdir={tmp_path}",
        "--config.run_name=nan",
        "--config.train.num_epochs=4",
        "--config.save_freq=1",
        "--config.train.learning_rate=1e30",
        "--config.train.max_nonfinite=2",
        path=f"{ENV_BIN}:{SYSTEM_PATH}",
        timeout=300,
        ALIGNPROP_GPU_COUNT="0",
        TQDM_DISABLE="1",
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "--quiet scripts/train.py" in proc.stderr.splitlines()[0]  # accelerate ran the run
    stops = [x for x in proc.stderr.splitlines() if x.startswith("stopped: ")]
    assert len(stops) == 1 and "NaN/inf" in stops[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "CalledProcessError" not in proc.stderr
