#!/usr/bin/env bash
# Scoring + bf16 training on SmolLM2-135M on CUDA: peak GPU memory of the row-sparse adapter
# vs PEFT LoRA (same trainable parameter count) vs full fine-tuning. Never needed by CI.
#   scripts/gpu_check.sh             # on a CUDA machine
#   scripts/gpu_check.sh --tiny      # CPU dry run on a tiny random LLaMA
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py "$@"
