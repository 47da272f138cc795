#!/usr/bin/env bash
# The GPU measurements the README's performance tables owe, in parts sized to fit one device
# call each (limits below are per slot; a time-out keeps the rows already written):
#   PARTS="speed" (~4.5 min on an H200, limits 5.8)   the SD-1.5-sized step at K=1:
#     reference     the published recipe alone in its process, B=4 (its micro-batch)
#     alignprop     the default path (what train.py runs: config/base.py's switches), B=4, 8, 16
#     no_merge      the default path at B=8 (the default micro-batch) without sample.merge_lora
#     cuda_graphs   the default path at B=8 + train.cuda_graphs
#     grid          the default path at K=10,50 x B=4,8 (memory flat in K)
#     cuda_tests    tests/test_fast_path.py -k cuda (CUDA graphs keep the gradient), if pytest imports
#   PARTS="families" (~3 min, limits 3.8)  real-size random weights at 1024 px, B=1, each alone:
#     flux (K=1, 28 steps, T5 offloaded as the flux_* configs; a failure is rerun as flux_sync
#     with CUDA_LAUNCH_BLOCKING=1 to name the failing kernel), sdxl and sd3 (K=1 and K=10)
#   PARTS="families2025" (~8 min, limits 8.5)  Z-Image-Turbo, FLUX.2 [klein] 4B, Qwen-Image (1328 px)
#     and Wan 2.1 1.3B (81 frames at 480 x 832, reward on frames 0, 4, 8) at real size, B=1,
#     K=1, FLOPs counted: one device call of its own
#   PARTS="extra" (~2.5 min)  at B=8: no_chunk (sample.decode_chunk=0: its share of memory),
#     channels_last (+ train.channels_last); sd3_offload (SD3.5 medium K=1 with its text
#     encoders off the GPU: does it fit 24 GB?)
#   PARTS="compile" (~6 min)  train.compile_unet: compile_cold on an empty inductor cache (warm-up
#     only), then compile on the cache it filled (the warm-up every later run pays) + 2 steps
# Default PARTS="speed families": ~7.5 min, slot limits 9.6 (+1.5 if FLUX fails): one 10-minute
# device call. On a bare GPU machine with torch/transformers/accelerate/peft: fill .whl/ first
# where pip reaches PyPI (shared/tools/gpu-wheels.sh of the development checkout, plus
# `gpu-wheels.sh pytest iniconfig pluggy pygments` for cuda_tests), carry it along, then:
#   OUT=/some/dir PARTS=speed bash benchmarks/gpu_bench.sh
# Rows are gathered into $OUT/rows.jsonl after each slot, the logs' tails into $OUT/logs.txt,
# exit codes into $OUT/status.txt, and a table (with "fits in 80/48/24 GB" from each row's peak
# reservation) to stdout and $OUT/summary.txt at the end. Nothing runs beside a slot: the first
# FLUX.1-dev try failed in cuBLAS while a compile job shared the GPU.
# SLOTS="a b" runs only the slots named; INSTALL_WHEELS=0 skips .whl/. EXTRA is appended to
# every benchmark call: on CPU,
#   EXTRA="--tiny --num-steps 10" PY=.venv/bin/python SLOTS="alignprop sd3" bash benchmarks/gpu_bench.sh
# tries the script on the tiny models (tests/test_benchmark.py runs this).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
PY=${PY:-python3}
PARTS=${PARTS:-speed families}
mkdir -p "$OUT"
W=$(mktemp -d)  # each slot's rows and log; gathered into $OUT after every slot
: >"$OUT/status.txt"
if [ "${INSTALL_WHEELS:-1}" = 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target .site .whl/*.whl || exit 3
  export PYTHONPATH=$PWD:$PWD/.site${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled
# A fresh compile cache for this run, so that compile_cold is cold and compile is warm.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$(mktemp -d)/inductor}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.csv"
picked() { [ -z "${SLOTS:-}" ] || [[ " $SLOTS " == *" $1 "* ]]; }
run() {
  local name=$1 limit=$2; shift 2
  picked "$name" || return 0
  local t0=$SECONDS
  timeout "$limit" "$PY" benchmarks/benchmark.py "$@" ${EXTRA:-} --out "$W/$name.jsonl" >/dev/null 2>"$W/$name.log"
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - t0)) s (limit $limit)" | tee -a "$OUT/status.txt"
  # tag this slot's rows with its name (the summary's first column)
  [ -f "$W/$name.jsonl" ] && sed -i "s/^{/{\"slot\": \"$name\", /" "$W/$name.jsonl"
  ORDER="$ORDER $name"
  gather
  return $rc
}
ORDER=""
gather() {  # in the order the slots ran
  for n in $ORDER; do cat "$W/$n.jsonl" 2>/dev/null; done >"$OUT/rows.jsonl"
  for n in $ORDER; do echo "== $n"; grep -v Loading "$W/$n.log" | tail -n 25; done >"$OUT/logs.txt"
}
# FLOPs are counted once, at commit 6dbc2df (364.6 TFLOP per step at B=4 K=1): counting them
# here made the slots overrun on an H200
B4K1="--batch-sizes 4 --ks 1 --steps 2 --warmup 1 --no-flops"
AP="--recipes alignprop --batch-sizes 8 --ks 1 --steps 2 --warmup 1 --no-flops"  # B=8: the default
for part in $PARTS; do
  case $part in
  speed)
    run reference 75 --recipes reference $B4K1
    run alignprop 65 --recipes alignprop --batch-sizes 4,8,16 --ks 1 --steps 2 --warmup 1 --no-flops
    run no_merge 40 $AP --no-merge-lora
    run cuda_graphs 40 $AP --cuda-graphs
    run grid 85 --recipes alignprop --ks 10,50 --batch-sizes 4,8 --steps 1 --warmup 0 --no-flops
    if picked cuda_tests && "$PY" -c "import pytest" 2>/dev/null; then  # the CUDA-only gradient tests (tiny models)
      t1=$SECONDS
      timeout 40 "$PY" -m pytest -q -p no:cacheprovider tests/test_fast_path.py -k cuda >"$OUT/cuda_tests.log" 2>&1
      echo "cuda_tests: rc=$? in $((SECONDS - t1)) s (limit 40)" | tee -a "$OUT/status.txt"
    fi
    ;;
  families)
    FAM="--recipes alignprop --batch-sizes 1 --steps 1 --warmup 1 --no-flops"
    # a failure that is not a time-out is rerun with synchronous launches, so that its log
    # names the kernel that failed (the first try's cuBLAS error may be an earlier fault's echo)
    run flux 90 --family flux --num-steps 28 --ks 1 $FAM
    rc=$?
    if [ $rc -ne 0 ] && [ $rc -ne 124 ] && picked flux; then
      CUDA_LAUNCH_BLOCKING=1 run flux_sync 90 --family flux --num-steps 28 --ks 1 $FAM
    fi
    run sdxl 75 --family sdxl --ks 1,10 $FAM
    run sd3 60 --family sd3 --num-steps 40 --ks 1,10 $FAM
    ;;
  families2025)
    # the 2025-26 families at their cards' sizes, real-size random weights, B=1 K=1, each alone;
    # FLOPs counted on the GPU here (flop_count.py's meta device cannot run their encoders'
    # value-dependent masks). Chains shortened where the card's are long (the per-step cost
    # is what these rows measure): Qwen-Image 10 of 50 steps, Wan 10 of 50.
    F25="--recipes alignprop --batch-sizes 1 --ks 1 --steps 1 --warmup 1"
    run zimage 100 --family zimage --num-steps 9 $F25
    run flux2 80 --family flux2 --num-steps 4 $F25
    run qwenimage 180 --family qwenimage --num-steps 10 $F25
    run wan 150 --family wan --num-steps 10 $F25
    ;;
  extra)
    run no_chunk 45 $AP --decode-chunk 0
    run channels_last 45 $AP --channels-last
    run sd3_offload 50 --family sd3 --num-steps 40 --ks 1 --offload-text-encoders \
      --recipes alignprop --batch-sizes 1 --steps 1 --warmup 1 --no-flops
    ;;
  compile)
    run compile_cold 300 --recipes alignprop --compile --batch-sizes 4 --ks 1 --steps 0 --warmup 1 --no-flops
    run compile 70 $AP --compile
    ;;
  *) echo "unknown part $part (speed, families, families2025, extra, compile)" | tee -a "$OUT/status.txt" ;;
  esac
done
echo "total: $SECONDS s" | tee -a "$OUT/status.txt"
gather
"$PY" benchmarks/bench_summary.py "$OUT/rows.jsonl" | tee "$OUT/summary.txt"
