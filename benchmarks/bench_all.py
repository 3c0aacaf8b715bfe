"""Issue 8 benchmark driver: memory by component, step time, scoring cost, interactive cost
and accuracy of row-sparse fine-tuning vs LoRA, full FT, dense-mask and one-hot baselines.

The logic lives in ``rowsft_nb.bench`` (also ``rowsft-nb bench``); this script only runs it.

Usage::

    .venv/bin/python benchmarks/bench_all.py --quick                    # a few minutes
    .venv/bin/python benchmarks/bench_all.py --parts memory,scoring,interactive \
        --out benchmarks/results/bench.json
    .venv/bin/python benchmarks/bench_all.py --parts accuracy \
        --out benchmarks/results/bench_accuracy.json
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from rowsft_nb.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
