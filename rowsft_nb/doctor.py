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


def report() -> tuple[str, bool]:
    """``(text, ok)``: the installation report and whether every required package and asset
    is present.

    >>> text, ok = report()
    """
    problems: list[str] = []
    lines = [f"rowsft_nb: python {sys.version.split()[0]}", "packages:"]
    for name in REQUIRED:
        try:
            lines.append(f"  {name:14s} {md.version(name)}")
        except md.PackageNotFoundError:
            lines.append(f"  {name:14s} MISSING")
            problems.append(f"{name} is missing: pip install rowsft-nb (or make install)")
    for name, fix in OPTIONAL.items():
        try:
            lines.append(f"  {name:14s} {md.version(name)}")
        except md.PackageNotFoundError:
            lines.append(f"  {name:14s} not installed (optional: {fix})")
    lines += [f"device: {device_description()}", "assets:"]
    for label, status in assets.asset_status().items():
        lines.append(f"  {label}: {status}")
        if not status.startswith("ok"):
            problems.append(f"{label}: {status}")
    cache = assets.cache_dir()
    lm = "converted" if assets._cache_is_complete(assets._smollm_cache()) else \
        "not converted yet (the first load_causal_lm() takes ~30 s)"
    lines.append(f"cache: {cache} (SmolLM2 checkpoint {lm}; set ROWSFT_CACHE to move it)")
    if problems:
        lines += ["", "problems:"] + ["  - " + p for p in problems]
    else:
        lines += ["", "all good"]
    return "\n".join(lines), not problems


def main() -> int:
    """``rowsft-nb doctor``: write the report to stdout; 0 when all is present, else 1."""
    text, ok = report()
    sys.stdout.write(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
