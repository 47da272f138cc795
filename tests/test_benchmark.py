"""The benchmark scripts run end to end: benchmark.py and gpu_bench.sh on the tiny models, op_count.py and flop_count.py."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_tiny_writes_both_recipes(tmp_path, tiny_overrides):
    # Each recipe in its own process (the default), as a user runs it from the checkout.
    out = tmp_path / "bench.jsonl"
    cmd = [
        sys.executable, "benchmarks/benchmark.py", "--tiny", "--batch-sizes", "1",
        "--ks", "1", "--steps", "1", "--warmup", "0", "--num-steps", "4", "--threads", "1",
        "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=dict(os.environ)
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    stdout_rows = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows == stdout_rows
    by_recipe = {r["recipe"]: r for r in rows if not r.get("summary")}
    assert set(by_recipe) == {"reference", "alignprop"}
    for r in by_recipe.values():
        assert (r["batch"], r["K"], r["num_steps"], r["tiny"]) == (1, 1, 4, True)
        assert r["isolated"] is True
        for key in ("s_per_step", "s_per_sample", "peak_mem_gib", "tflop_per_step", "tflops"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, key
        assert isinstance(r["first_step_s"], float)
    assert by_recipe["reference"]["batched_cfg"] is False
    assert by_recipe["alignprop"]["attn_processors"] == ["AttnProcessor2_0"]
    assert by_recipe["alignprop"]["checkpoint"] == "step+block"
    # no flag: the config's switches, what train.py runs
    assert (by_recipe["alignprop"]["decode_chunk"], by_recipe["alignprop"]["merge_lora"]) == (
        1,
        True,
    )
    (summary,) = [r for r in rows if r.get("summary")]
    assert summary["speedup_per_sample"] > 0
    assert "alignprop" in proc.stderr and "faster per sample" in proc.stderr  # the table


def test_op_count_merged_lora_dispatches_the_bare_models_ops(tiny_overrides):
    # benchmarks/op_count.py --tiny: a no-grad call on merged LoRA weights dispatches exactly the
    # bare UNet's ops; with the adapter, each LoRA layer adds its own.
    proc = subprocess.run(
        [sys.executable, "benchmarks/op_count.py", "--tiny"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=dict(os.environ),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["variant"]: r for r in map(json.loads, proc.stdout.splitlines()) if r}
    bare, adapter, merged = rows["bare"], rows["adapter"], rows["merged"]
    assert bare["lora_layers"] > 0
    assert merged["kernel_ops"] == bare["kernel_ops"]
    assert adapter["kernel_ops"] >= bare["kernel_ops"] + 3 * bare["lora_layers"]


def test_gpu_bench_script_runs_its_slots_on_the_tiny_models(tmp_path, tiny_overrides):
    # benchmarks/gpu_bench.sh as a GPU session runs it, two of its slots on the tiny models:
    # rows tagged with their slot, in order, and the summary table with the ratio line.
    out = tmp_path / "out"
    env = dict(
        os.environ, OUT=str(out), PY=sys.executable, INSTALL_WHEELS="0", SLOTS="reference no_merge",
        EXTRA="--tiny --num-steps 4 --threads 1", PARTS="speed",
    )  # fmt: skip
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_bench.sh"], capture_output=True, text=True, timeout=300,
        cwd=ROOT, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    status = (out / "status.txt").read_text()
    assert "reference: rc=0" in status and "no_merge: rc=0" in status, status
    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    runs = [r for r in rows if not r.get("summary")]
    assert [r["slot"] for r in runs] == ["reference", "no_merge"]
    assert (runs[1]["batch"], runs[1]["merge_lora"]) == (8, False)
    summary = (out / "summary.txt").read_text()
    assert "K=1 no_merge B=8:" in summary and "faster per sample" in summary, summary


def test_flop_count_on_the_meta_device_matches_the_gpu_count():
    # benchmarks/flop_count.py counts a full-size step on the meta device in seconds. With the
    # published recipe's switches at SD-1.5 size, B=4, K=1, the same FlopCounterMode counted
    # 364.6 TFLOP on an H200 running the step (commit 6dbc2df, ../shared/bench/h200-2026-11-27).
    proc = subprocess.run(
        [sys.executable, "benchmarks/flop_count.py", "--batch-sizes", "4", "--ks", "1",
         "--checkpoint", "step", "--decoder-checkpoint", "block", "--decode-chunk", "0",
         "--no-merge-lora"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=dict(os.environ),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert (row["batch"], row["K"], row["num_steps"]) == (4, 1, 50)
    assert row["tflop_per_step"] == pytest.approx(364.6, rel=5e-3)
    # the 49 steps before the cut: one guided UNet forward at batch 8 each
    assert 0.8 < 49 * row["tflop_nograd_step"] / row["tflop_per_step"] < 0.95


@pytest.fixture
def bench_modules(monkeypatch):
    """benchmarks/ on sys.path, as Python puts a script's own folder there."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_summary
    import benchmark
    import efficiency

    return benchmark, bench_summary, efficiency


def test_the_2025_families_are_built_at_their_published_sizes(bench_modules):
    """benchmark.py's real-size random-weight Z-Image-Turbo, FLUX.2 [klein] 4B, Qwen-Image and
    Wan 2.1 1.3B, on the meta device: parameters within 10% of the sizes their cards publish
    (transformer, text encoder; Qwen2.5-VL-7B's 8.29 B include its vision tower)."""
    import torch

    benchmark = bench_modules[0]
    published = {"zimage": (6.0, 4.0), "flux2": (4.0, 4.0), "qwenimage": (20.0, 8.29),
                 "wan": (1.3, 5.7)}  # fmt: skip
    for name, (transformer, text) in published.items():
        family = benchmark.random_2025_family(name, torch.bfloat16, torch.device("meta"), 0)
        size = {k: sum(p.numel() for p in family.components[k].parameters()) / 1e9
                for k in ("transformer", "text_encoder")}  # fmt: skip
        assert abs(size["transformer"] / transformer - 1) < 0.1, (name, size)
        assert abs(size["text_encoder"] / text - 1) < 0.1, (name, size)


def test_flop_count_refuses_the_2025_families_in_one_line():
    proc = subprocess.run([sys.executable, "benchmarks/flop_count.py", "--family", "qwenimage"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --family qwenimage: its encoder and masks select tokens by value, which the meta "
        "device cannot run; benchmark.py counts its FLOPs on a GPU (benchmarks/gpu_bench.sh "
        "PARTS=families2025)"
    ]


def _one_error(capsys, status: int, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--device", "cuda"], ["--device", "no CUDA GPU"]),
        (["--device", "gpu0"], ["--device", "not a device"]),
        (["--steps", "0", "--warmup", "0"], ["measures nothing"]),
        (["--steps", "-1"], ["--steps must be >= 0"]),
        (["--precision", "fp8"], ["--precision"]),
        (["--precision", "fp16", "--device", "cpu"], ["fp16 needs a GPU"]),
        (["--batch-sizes", "0,4"], ["--batch-sizes", "positive integers"]),
        (["--ks", "9", "--num-steps", "4"], ["--ks 9", "--num-steps 4"]),
        (["--checkpoint", "bogus"], ["--checkpoint"]),
        (["--recipes", "alignprop,nope"], ["--recipes"]),
        (["--out", "{tmp}/no/such/rows.jsonl"], ["--out", "cannot write"]),
        (["--bogus"], ["unrecognized arguments: --bogus"]),
    ],
)
def test_benchmark_flag_errors_are_one_line_before_any_model(
    argv, needles, bench_modules, capsys, tmp_path
):
    # A bad flag is `error: ...` and status 2 before a model loads; --device cuda without a GPU
    # would otherwise time the CPU and report it as a result, --steps 0 --warmup 0 a NaN row.
    if "cuda" in argv and __import__("torch").cuda.is_available():
        pytest.skip("a GPU is visible")
    benchmark = bench_modules[0]
    argv = [a.replace("{tmp}", str(tmp_path)) for a in ["--tiny", *argv]]
    _one_error(capsys, benchmark.cli_main(argv), *needles)


def test_benchmark_cli_reports_a_bad_flag_as_one_line():
    # the script itself, as a user runs it: one line on stderr, status 2
    proc = subprocess.run(
        [sys.executable, "benchmarks/benchmark.py", "--tiny", "--steps", "0", "--warmup", "0"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=dict(os.environ),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --steps 0 --warmup 0")
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_bench_summary_refuses_missing_empty_and_garbled_files(bench_modules, capsys, tmp_path):
    from alignprop import cli

    summary = bench_modules[1]
    missing = tmp_path / "nothing.jsonl"
    _one_error(capsys, cli.run(summary.main, [str(missing)]), "nothing.jsonl", "no such file")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _one_error(capsys, cli.run(summary.main, [str(empty)]), "no timing rows")
    failed = tmp_path / "failed.jsonl"
    failed.write_text(
        json.dumps({"recipe": "alignprop", "error": "its process exited with 1"}) + "\n"
    )
    _one_error(capsys, cli.run(summary.main, [str(failed)]), "1 failed recipes")
    row = {"recipe": "alignprop", "batch": 4, "K": 1, "s_per_step": 1.0}
    garbled = tmp_path / "garbled.jsonl"
    garbled.write_text(json.dumps(row) + "\n" + '{"recipe": "alig\n')
    _one_error(capsys, cli.run(summary.main, [str(garbled)]), "line 2", "not a JSON row")
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"update": 3, "loss": 0.1}) + "\n")
    _one_error(capsys, cli.run(summary.main, [str(other)]), "line 1", "recipe, batch, K")
    _one_error(capsys, cli.run(summary.main, []), "rows")
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(row) + "\n")
    assert cli.run(summary.main, [str(good)]) == 0
    out = capsys.readouterr().out
    assert "alignprop" in out and "no reference row" in out, out


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--budget", "0"], ["--budget must be >= 1"]),
        (["--alignprop-config", "bogus"], ["--alignprop-config bogus", "valid"]),
        (["--ddpo-config", "nope"], ["--ddpo-config nope"]),
        (["--algorithms", "reinforce"], ["train.algorithm='reinforce'", "flow_grpo"]),
        (["--family", "sd4"], ["--family 'sd4'", "valid"]),
        (["--config", "flow_grpo"], ["NAME=CONFIG"]),
        (["--eval-every", "3"], ["--eval-every=3", "total_batch_size"]),
        (["--device", "cuda"], ["device", "no CUDA GPU"]),
        (["--out", "{tmp}/file/sub"], ["--out", "cannot write"]),
    ],
)
def test_efficiency_errors_are_one_line_before_any_model(
    argv, needles, bench_modules, capsys, tmp_path
):
    from alignprop import cli

    if "cuda" in argv and __import__("torch").cuda.is_available():
        pytest.skip("a GPU is visible")
    (tmp_path / "file").write_text("a file where --out wants a folder")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in ["--tiny", *argv]]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "eff")]
    _one_error(capsys, cli.run(bench_modules[2].main, argv), *needles)
    assert not (tmp_path / "eff").exists()  # nothing written before the checks pass
