#!/usr/bin/env bash
# AlignProp 'aesthetic': accelerate launch scripts/train.py --config config/align_prop.py:aesthetic "$@"
# with one process per visible GPU (the visible-devices variable picks them), or one CPU process where
# there is none. Extra arguments pass through, e.g.
#   bash aesthetic.sh --config.pretrained.model=/path/to/sd15 --config.resume_from=latest
# NUM_PROCESSES=N sets the process count, ACCELERATE_CONFIG=FILE another launcher config;
# scripts/launch.sh (shared by the four scripts) builds the command.
exec bash "$(dirname "$0")/scripts/launch.sh" aesthetic "$@"
