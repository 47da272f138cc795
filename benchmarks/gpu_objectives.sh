#!/usr/bin/env bash
# Issue #23's GPU check, one device call of under 8 minutes on one H100/H200 (each slot has a
# time limit; a time-out keeps what was written). Offline: no weights are downloaded.
#   ratio_bf16 (~1 min, limit 120)  Flow-GRPO on the tiny SD3 kit and DDPO on the tiny SD, in bf16
#       on CUDA, one pass and one optimizer step per update: the first ratio is 1 only up to bf16
#       round-off, and Flow-GRPO clips at 1 +- 1e-4; prints logprob_mismatch, ratio_min/max and
#       clipfrac per update (the noise floor the clip range must sit above)
#   efficiency (~3 min, limit 240)   benchmarks/efficiency.py --tiny on CUDA: every objective on
#       the tiny SD and SD3, GPU-seconds and peak memory per objective, the reach table
#   cost_sd (~2.5 min, limit 200)     benchmarks/objective_cost.py on full-size random SD 1.5
#       (512 px, 50 steps, fp16, K = 1, 8 images per update): seconds and peak memory per update
#       of every objective that runs on SD, DDPO included (the memory row owed since #22)
# Default: all three, ~6.5 min (limits 9.3 if each runs out). Prepare .whl/ where pip reaches
# PyPI (shared/tools/gpu-wheels.sh), carry it, then:
#   OUT=$OUT bash benchmarks/gpu_objectives.sh
# On a CPU, the same slots at CPU sizes (tested so): CPU=1 PY=.venv/bin/python bash benchmarks/gpu_objectives.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_objectives_out}
PY=${PY:-python3}
mkdir -p "$OUT"
: >"$OUT/status.txt"
if [ "${INSTALL_WHEELS:-1}" = 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target .site .whl/*.whl || exit 3
  export PYTHONPATH=$PWD:$PWD/.site${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled ALIGNPROP_TINY_DIR=${ALIGNPROP_TINY_DIR:-$OUT/tiny}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.csv"
picked() { [ -z "${SLOTS:-}" ] || [[ " $SLOTS " == *" $1 "* ]]; }
slot() {  # slot NAME LIMIT command...: its output in $OUT/NAME.log, its rc in status.txt
  local name=$1 limit=$2; shift 2
  picked "$name" || return 0
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "$name: rc=$? in $((SECONDS - t0)) s (limit $limit)" | tee -a "$OUT/status.txt"
}
if [ "${CPU:-0}" = 1 ]; then
  DEV=cpu PREC=no COST="--batch 1 --steps 2 --resolution 64 --precision no --updates 1"
  EFF="--budget 32 --rl-factor 1 --eval-every 32 --num-eval 2" COST_OBJ=alignprop,ddpo
else
  DEV=cuda PREC=bf16 COST="--batch 8 --precision fp16 --updates 2"
  EFF="--budget 64 --rl-factor 2 --eval-every 32" COST_OBJ=alignprop,draft_lv,refl,drtune,direct_align,ddpo
fi
export OUT PY DEV PREC

ratio() {  # the tiny RL runs in $PREC on $DEV, then their per-update ratio statistics
  for run in "tiny_sd3_flow_grpo" "tiny_ddpo"; do
    "$PY" scripts/train.py --config "config/align_prop.py:$run" --config.device=$DEV \
      --config.mixed_precision=$PREC --config.train.num_epochs=3 --config.eval_freq=0 \
      --config.save_freq=3 --config.log_images=0 --config.logdir="$OUT/runs" --config.run_name=$run || return $?
    "$PY" - "$OUT/runs/$run/metrics.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "logprob_mismatch" in r:
        print(sys.argv[1].split("/")[-2], {k: r[k] for k in ("logprob_mismatch", "ratio_min", "ratio_max", "clipfrac", "approx_kl", "peak_mem_gib")})
EOF
  done
}
export -f ratio
slot ratio_bf16 120 bash -c ratio
slot efficiency 240 "$PY" benchmarks/efficiency.py --tiny --device $DEV $EFF --out "$OUT/efficiency"
slot cost_sd 200 "$PY" benchmarks/objective_cost.py --config aesthetic_k1 --random-weights sd --k 1 $COST \
  --objectives $COST_OBJ --out "$OUT/cost_sd"
for f in ratio_bf16 efficiency cost_sd; do
  [ -f "$OUT/$f.log" ] && { echo "== $f"; grep -v "Loading\|it/s\]" "$OUT/$f.log" | grep "^{\"objective\|^tiny\|^|\|^sd\|rror" | tail -n 40; }
done | tee "$OUT/summary.txt"
