"""`rowsft-nb doctor`: what is installed, which device trains, which assets load.

Usage::

    rowsft-nb doctor        # exit code 0 when everything needed is present
"""
from __future__ import annotations

import importlib.metadata as md
import sys

import torch

from . import assets

REQUIRED = ["torch", "transformers", "datasets", "safetensors", "accelerate", "tqdm",
            "plotly", "ipywidgets", "anywidget", "pandas"]
OPTIONAL = {"gguf": "pip install 'rowsft-nb[llm]'  (needed by load_causal_lm)",
            "peft": "pip install 'rowsft-nb[dev]'  (LoRA baselines)",
            "torch-pruning": "pip install 'rowsft-nb[prune]'  (optional scoring backend)",
            "nbval": "pip install 'rowsft-nb[dev]'  (notebook tests)"}


def device_description() -> str:
    """The device training would use, in words."""
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"cuda:0 — {p.name}, {p.total_memory / 2**30:.0f} GB ({torch.cuda.device_count()} GPU(s))"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps — Apple GPU"
    return f"cpu — {torch.get_num_threads()} threads"


def main() -> int:
    """Print the report; return 0 when every required package and asset is present."""
    problems: list[str] = []
    print(f"rowsft_nb: python {sys.version.split()[0]}")
    print("packages:")
    for name in REQUIRED:
        try:
            print(f"  {name:14s} {md.version(name)}")
        except md.PackageNotFoundError:
            print(f"  {name:14s} MISSING")
            problems.append(f"{name} is missing: pip install rowsft-nb (or make install)")
    for name, fix in OPTIONAL.items():
        try:
            print(f"  {name:14s} {md.version(name)}")
        except md.PackageNotFoundError:
            print(f"  {name:14s} not installed (optional: {fix})")
    print(f"device: {device_description()}")
    print("assets:")
    for label, status in assets.asset_status().items():
        print(f"  {label}: {status}")
        if not status.startswith("ok"):
            problems.append(f"{label}: {status}")
    cache = assets.cache_dir()
    lm = "converted" if assets._cache_is_complete(assets._smollm_cache()) else \
        "not converted yet (the first load_causal_lm() takes ~30 s)"
    print(f"cache: {cache} (SmolLM2 checkpoint {lm}; set ROWSFT_CACHE to move it)")
    if problems:
        print("\nproblems:")
        for p in problems:
            print("  - " + p)
        return 1
    print("\nall good")
    return 0


if __name__ == "__main__":
    sys.exit(main())
