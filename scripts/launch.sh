#!/usr/bin/env bash
# The launcher behind aesthetic.sh, aesthetic_k1.sh, hps.sh and hps_k1.sh:
#   bash scripts/launch.sh NAME [--config.a.b=value ...]
# runs, from the repository root,
#   accelerate launch --config_file CONFIG --num_processes N [--multi_gpu | --cpu] --quiet \
#     scripts/train.py --config config/align_prop.py:NAME "$@"
# after `scripts/train.py --check` with the same arguments (every check train.py makes before a
# model loads) has passed: a user error is train.py's one line and status 2, not accelerate's
# traceback. The training process's own status comes back (2 user error, 3 stopped), through
# alignprop.launcher, since accelerate reports every failure as 1.
#
# accelerate: the one on PATH (an activated environment), else <repo>/.venv/bin/accelerate (the
#   README's install, not activated), else a one-line message on how to install it (exit 2).
# N: NUM_PROCESSES if set, else one process per visible GPU, counted by torch in the same
#   environment (so CUDA_VISIBLE_DEVICES is honoured). CONFIG: config/accelerate/multi_gpu.yaml
#   with --multi_gpu for N > 1, single_gpu.yaml for N = 1, and cpu.yaml with --cpu (one process)
#   where no GPU is visible.
# ACCELERATE_CONFIG=FILE: that launcher config instead (found from the current folder or the
#   repository root), with --num_processes N (and --cpu without a GPU); its distributed_type
#   decides the rest, so DeepSpeed/FSDP configs work. It is read first by accelerate's own loader:
#   bad YAML, an unknown field or distributed_type is one line naming the file (exit 2).
# ALIGNPROP_LAUNCH_DRY_RUN=1: print the command on stdout and exit 0 instead of running it (the
#   launcher config is checked, the run's config is not).
# ALIGNPROP_GPU_COUNT=N: use N as the GPU count instead of asking torch (tests).
set -euo pipefail

die() {
  echo "alignprop launch: $*" >&2
  exit 2
}

[ $# -ge 1 ] || die "usage: bash scripts/launch.sh NAME [--config.a.b=value ...]"
name="$1"
shift
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

whole='^[0-9]+$'
if [ -n "${NUM_PROCESSES:-}" ]; then
  [[ "$NUM_PROCESSES" =~ $whole ]] && [ "$((10#$NUM_PROCESSES))" -ge 1 ] ||
    die "NUM_PROCESSES must be a whole number >= 1 (got '$NUM_PROCESSES')"
fi
launch_config=""
if [ -n "${ACCELERATE_CONFIG:-}" ]; then
  if [ -f "$ACCELERATE_CONFIG" ]; then
    launch_config="$(cd "$(dirname "$ACCELERATE_CONFIG")" && pwd)/$(basename "$ACCELERATE_CONFIG")"
  elif [ -f "$root/$ACCELERATE_CONFIG" ]; then
    launch_config="$ACCELERATE_CONFIG"
  else
    die "ACCELERATE_CONFIG=$ACCELERATE_CONFIG: no such file here or in $root"
  fi
fi

# accelerate, and the python of the same environment
if accelerate="$(command -v accelerate)"; then
  :
elif [ -x "$root/.venv/bin/accelerate" ]; then
  accelerate="$root/.venv/bin/accelerate"
else
  die "accelerate not found on PATH nor in $root/.venv: install the project with 'python3 -m venv .venv && .venv/bin/pip install -r requirements.txt -e .' (README) or activate its environment"
fi
bin="$(dirname "$accelerate")"
python="$bin/python"
[ -x "$python" ] || python="$bin/python3"

if [ -n "${ALIGNPROP_GPU_COUNT:-}" ]; then
  gpus="$ALIGNPROP_GPU_COUNT"
else
  gpus="$("$python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null)" ||
    die "could not count GPUs with $python (import torch failed): is this the project's environment?"
fi
[[ "$gpus" =~ $whole ]] || die "GPU count must be a whole number (got '$gpus')"
gpus="$((10#$gpus))"

n="${NUM_PROCESSES:-$gpus}"
n="$((10#$n))"
if [ "$gpus" -eq 0 ]; then
  [ "$n" -le 1 ] ||
    die "NUM_PROCESSES=$n but no GPU is visible: accelerate starts one CPU process (several go through torchrun, see README)"
  n=1
  mode=(--cpu)
  default_config=config/accelerate/cpu.yaml
else
  [ "$n" -le "$gpus" ] || die "NUM_PROCESSES=$n but only $gpus GPU(s) are visible (one process per GPU)"
  if [ "$n" -gt 1 ]; then
    mode=(--multi_gpu)
    default_config=config/accelerate/multi_gpu.yaml
  else
    mode=()
    default_config=config/accelerate/single_gpu.yaml
  fi
fi
cd "$root"
if [ -n "$launch_config" ]; then
  [ "$gpus" -eq 0 ] || mode=() # the user's config decides multi-GPU / DeepSpeed / FSDP
  "$python" -m alignprop.launcher --check-accelerate-config "$launch_config" || exit $?
else
  launch_config="$default_config"
fi

train=(scripts/train.py --config "config/align_prop.py:$name" "$@")
cmd=("$accelerate" launch --config_file "$launch_config" --num_processes "$n" ${mode[@]+"${mode[@]}"}
  --quiet "${train[@]}")
if [ "${ALIGNPROP_LAUNCH_DRY_RUN:-}" = 1 ]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
# the check's warnings are printed again by the run itself: shown only when the check fails
status=0
out="$(WORLD_SIZE="$n" "$python" "${train[0]}" --check "${train[@]:1}" 2>&1)" || status=$?
if [ "$status" -ne 0 ]; then
  printf '%s\n' "$out" >&2
  exit "$status"
fi
echo "alignprop launch: $(printf '%q ' "${cmd[@]}")" >&2
exec "$python" -m alignprop.launcher -- "${cmd[@]}"
