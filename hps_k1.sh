#!/usr/bin/env bash
# AlignProp 'hps_k1' on every GPU of this node. Extra arguments pass through, e.g.
#   bash hps_k1.sh --config.pretrained.model=/path/to/sd15 --config.resume_from=latest
# Pick GPUs through the visible-devices variable of your environment; set the process count with
# NUM_PROCESSES=N, or another launcher config with ACCELERATE_CONFIG=config/accelerate/single_gpu.yaml.
set -euo pipefail
cd "$(dirname "$0")"
exec accelerate launch --config_file "${ACCELERATE_CONFIG:-config/accelerate/multi_gpu.yaml}" ${NUM_PROCESSES:+--num_processes "$NUM_PROCESSES"} \
  scripts/train.py --config config/align_prop.py:hps_k1 "$@"
