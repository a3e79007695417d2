#!/usr/bin/env bash
# Copies this working tree to every worker and installs a Python 3.11 venv with the
# pinned requirements and jax[tpu] (gcloud compute tpus tpu-vm ssh --worker=all).
#   TPU_NAME=df16 TPU_ZONE=us-west4-a launch/tpu/setup.sh [--no-gcsfuse] [--dry-run]
# Settings: env vars or flags, see launch/tpu/commands.py. DRY_RUN=1 or --dry-run prints the commands.
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/commands.py" setup "$@"
