#!/usr/bin/env bash
# Creates the TPU slice (gcloud compute tpus tpu-vm create).
#   TPU_NAME=df16 TPU_ZONE=us-west4-a ACCELERATOR_TYPE=v5litepod-64 launch/tpu/create_slice.sh [--spot] [--dry-run]
# Settings: env vars or flags, see launch/tpu/commands.py. DRY_RUN=1 or --dry-run prints the commands.
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/commands.py" create "$@"
