#!/usr/bin/env bash
# Starts the same training command on every host, detached (log: ~/detailflow_train.log).
#   TPU_NAME=df16 TPU_ZONE=us-west4-a CONFIG=configs/detailflow16_gpt_l.py WORKDIR=gs://BUCKET/runs/df16_gpt_l \
#     launch/tpu/run.sh [--dry-run] [--foreground] [-- --config.data.path=gs://BUCKET/codes/df16 ...]
# Settings: env vars or flags, see launch/tpu/commands.py. DRY_RUN=1 or --dry-run prints the commands.
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/commands.py" run "$@"
