#!/usr/bin/env bash
# The GPU measurements the README's performance table owes, as one script sized for ~8 minutes.
# On a bare GPU machine with torch/transformers/accelerate/peft: fill .whl/ first where pip
# reaches PyPI (bash ../shared/tools/gpu-wheels.sh), carry it along, then:
#   OUT=/some/dir bash scripts/gpu_bench.sh
# Every grid point is written as a JSON line as soon as it is measured, so a time-out keeps the
# finished rows. EXTRA is appended to every benchmark call (EXTRA="--tiny" PY=.venv/bin/python
# tries it on CPU); STEPS sets the timed steps per point (2).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  "${PY:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target .site .whl/*.whl || exit 3
  export PYTHONPATH=$PWD:$PWD/.site
fi
export HF_HUB_OFFLINE=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.csv"
B="${PY:-python3} scripts/benchmark.py --steps ${STEPS:-2} --warmup 1 ${EXTRA:-}"
run() { local name=$1 limit=$2; shift 2; timeout "$limit" $B "$@" --out "$OUT/$name.jsonl" 2>"$OUT/$name.txt"; echo "$name: rc=$?"; }
run b4k1_switches 160 --batch-sizes 4 --ks 1 --recipes reference,reference_one_call,reference_nograd,alignprop
run b4k1_compile 150 --batch-sizes 4 --ks 1 --compile --no-flops
run grid_k1 100 --batch-sizes 1,8 --ks 1 --no-flops
run grid_k10_50 90 --batch-sizes 1,4,8 --ks 10,50 --recipes alignprop --no-flops
grep -hv Loading "$OUT"/*.txt | tail -n 60
