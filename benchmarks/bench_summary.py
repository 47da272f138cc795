"""The table of a benchmark run: one line per row of benchmarks/benchmark.py's JSON lines.

  python benchmarks/bench_summary.py OUT/rows.jsonl

Each row prints its slot (gpu_bench.sh tags rows with it; else the recipe), family, checkpoint
mode, B, K, s/step, s/sample, warm-up, peak GiB, the allocator's peak reservation and whether
that reservation plus the CUDA context fits the usable memory of an 80, 48 and 24 GB card.
Then each SD-1.5-sized K=1 row's ratios against the reference at B=4 K=1 of the same file, with
the targets of issue #12 (>= 6x per sample at <= 50% of its peak memory; >= 10x compiled).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmark import fmt_cell  # this folder's benchmark.py: one formatter for both tables

from alignprop import cli
from alignprop.errors import ConfigError

# usable GiB that torch reports on common cards of each size (nvidia-smi memory.total, MiB / 1024)
CARDS = {"80GB": 79.2, "48GB": 44.9, "24GB": 22.4}  # H100 80GB; L40S 46068 MiB; L4 23034 MiB
CONTEXT_GIB = 1.0  # CUDA context and cuBLAS/cuDNN workspaces outside the caching allocator
TARGET_SPEEDUP, TARGET_MEM, TARGET_COMPILED = 6.0, 0.5, 10.0


NEEDED = ("recipe", "batch", "K")  # every timing row of benchmark.py has them


def load(path: Path) -> list[dict]:
    """The timing rows of a JSON-lines file; a missing, unreadable or garbled file is a ConfigError."""
    if not path.is_file():
        raise ConfigError(
            f"{path}: no such file (benchmark.py --out FILE, or gpu_bench.sh's OUT/rows.jsonl)"
        )
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read it ({err})") from None
    rows, failed = [], 0
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(
                f"{path}, line {n}: not a JSON row ({err.msg}); is this benchmark.py's --out?"
            ) from None
        if not isinstance(r, dict) or (
            not r.get("summary") and "error" not in r and not all(k in r for k in NEEDED)
        ):
            raise ConfigError(
                f"{path}, line {n}: not a benchmark.py row (it needs {', '.join(NEEDED)})"
            )
        if "error" in r:
            failed += 1
        elif not r.get("summary"):
            r.setdefault("slot", r["recipe"])
            rows.append(r)
    if not rows:
        raise ConfigError(
            f"{path}: no timing rows"
            + (f" ({failed} failed recipes)" if failed else " (an empty file)")
        )
    return rows


def fits(r: dict) -> str:
    reserved = r.get("cuda_max_reserved_gib")
    if not isinstance(reserved, (int, float)):
        return "-"
    return " ".join(name if reserved + CONTEXT_GIB <= gib else "-" for name, gib in CARDS.items())


def table(rows: list[dict]) -> list[str]:
    out = [
        f"{'slot':<14}{'family':>7}{'ckpt':>11}{'B':>3}{'K':>4}{'s/step':>8}{'s/sample':>9}"
        f"{'warm-up':>8}{'peak':>7}{'resv':>7}  fits (peak resv + {CONTEXT_GIB:.0f} GiB)"
    ]
    for r in rows:
        warm = r.get("first_step_s") if r.get("timed_steps") == 0 else r.get("warmup_extra_s")
        out.append(
            f"{r['slot']:<14}{r.get('family', 'sd'):>7}{r.get('checkpoint', ''):>11}"
            f"{r['batch']:>3}{r['K']:>4}{fmt_cell(r.get('s_per_step'), '.2f', 8)}"
            f"{fmt_cell(r.get('s_per_sample'), '.3f', 9)}{fmt_cell(warm, '.1f', 8)}"
            f"{fmt_cell(r.get('peak_mem_gib'), '.2f', 7)}{fmt_cell(r.get('cuda_max_reserved_gib'), '.2f', 7)}  {fits(r)}"
        )
    return out


def ratios(rows: list[dict]) -> list[str]:
    at = [r for r in rows if r["K"] == 1 and r.get("family", "sd") == "sd"]
    ref = next((r for r in at if r["recipe"] == "reference" and r["batch"] == 4), None)
    if ref is None:
        return ["no reference row at B=4 K=1: no ratios"]
    out = []
    for r in at:
        if r is ref or not r.get("s_per_sample") or r.get("timed_steps") == 0:
            continue
        speed = ref["s_per_sample"] / r["s_per_sample"]
        mem = r["peak_mem_gib"] / ref["peak_mem_gib"]
        goal = TARGET_COMPILED if r.get("compile") else TARGET_SPEEDUP
        met = "met" if speed >= goal and mem <= TARGET_MEM else "not met"
        out.append(
            f"K=1 {r['slot']} B={r['batch']}: {speed:.2f}x faster per sample than the reference "
            f"at B=4, peak {mem:.2f}x of its (target >= {goal:.0f}x at <= {TARGET_MEM:.0%}: {met})"
        )
    return out


def main(argv: list[str] | None = None) -> None:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rows", type=Path, help="a JSON-lines file of benchmark.py rows")
    rows = load(p.parse_args(sys.argv[1:] if argv is None else argv).rows)
    for line in [*table(rows), *ratios(rows)]:
        print(line)
    print(
        "warm-up: compile_cold = its first step (compilation on an empty cache); others = first "
        "step minus the fastest timed step"
    )


if __name__ == "__main__":
    sys.exit(cli.run(main))
