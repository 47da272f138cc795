"""benchmarks/benchmark.py runs end to end on the tiny models and writes JSON lines for both recipes."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

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
    (summary,) = [r for r in rows if r.get("summary")]
    assert summary["speedup_per_sample"] > 0
    assert "alignprop" in proc.stderr and "faster per sample" in proc.stderr  # the table
