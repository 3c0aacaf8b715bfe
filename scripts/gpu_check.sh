#!/usr/bin/env bash
# GPU benchmark (issue 14 item 5, issue 16 item 5): on SmolLM2-135M and a random
# Llama-3.2-1B-shaped model, in bf16, at equal trainable parameters (LoRA rank-4 budget):
# the frozen floor, rows on the delta path, fused rows, fused rows + activation sharing (the
# default inject), PEFT LoRA and full fine-tuning; with --quant also the NF4 floor, NF4 + rows
# and QLoRA. Per method: peak CUDA memory (max_memory_allocated, also above the floor and x
# LoRA's) and step time from CUDA events, methods interleaved in rotating order, medians of
# per-round ratios vs the floor and vs LoRA with their CI, impossible results flagged; plus
# the Taylor scoring step's time and peak. Prints a table per model and the seconds of every
# phase; writes gpu_check.json (and gpu_check.log) to $OUT when set, else gpu_check.json here.
# Default sizes are meant to finish in ~2-4 min on one H200 (--time-budget 420 s caps the
# timing rounds). Never needed by CI; the CI runs `--tiny` (tests/test_gpu_check.py).
#
#   scripts/gpu_check.sh                    # CUDA: smollm2, then llama1b
#   scripts/gpu_check.sh --quant            # + the 4-bit group (needs bitsandbytes)
#   scripts/gpu_check.sh --tiny --quant     # CPU dry run on a tiny random LLaMA (seconds)
#   scripts/gpu_check.sh prepare            # here, before a device run: see below
#
# On a lent GPU machine (the device tool's `run`; its image has torch, transformers and peft,
# not bitsandbytes, gguf or the 94 MB SmolLM2 asset, so smollm2 runs with random weights of
# its shapes): `scripts/gpu_check.sh prepare` here copies this checkout's bitsandbytes (CPU
# and CUDA 13 libraries only, ~10 MB) into .gpu_site/ (git-ignored);
# then run, in one call,
#   command: scripts/gpu_check.sh --quant     carry: [".gpu_site"]     timeout_s: 540
# .gpu_site/ is put on PYTHONPATH whenever it exists.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "prepare" ]; then
    PY=${PYTHON:-.venv/bin/python}
    src=$("$PY" -c "import bitsandbytes, os; print(os.path.dirname(bitsandbytes.__file__))")
    rm -rf .gpu_site && mkdir -p .gpu_site
    cp -r "$src" "$src"/../bitsandbytes-*.dist-info .gpu_site/
    find .gpu_site/bitsandbytes -name 'libbitsandbytes_*' ! -name '*_cpu.so' \
        ! -name '*_cuda13*.so' -delete
    find .gpu_site -name __pycache__ -prune -exec rm -rf {} +
    echo "prepared .gpu_site ($(du -sh .gpu_site | cut -f1)): carry it, e.g." \
         "run(command='scripts/gpu_check.sh --quant', carry=['.gpu_site'], timeout_s=540)"
    exit 0
fi

if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
if [ -d .gpu_site ]; then export PYTHONPATH="$PWD/.gpu_site${PYTHONPATH:+:$PYTHONPATH}"; fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
    "$PY" scripts/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.log"
    exit "${PIPESTATUS[0]}"
fi
exec "$PY" scripts/gpu_check.py "$@"
