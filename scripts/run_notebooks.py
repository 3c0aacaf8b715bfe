"""Execute every tutorial notebook in place (outputs kept, widget state not stored).

Usage:  python scripts/run_notebooks.py [notebooks/01_quickstart.ipynb ...]
ROWSFT_FAST=1 selects the fast mode that CI validates with nbval (the default here when
unset; `make notebooks` runs full mode). The committed outputs of 01, 02, 03 and 06 come from
full mode, 04, 05 and the workshop solutions from fast mode. The cells come from
notebooks/src/: after editing a source, `make notebook-sources` first (notebooks/README.md).

Figures carry a static PNG next to their plotly JSON (rowsft_nb/widgets/static.py, needs
kaleido + Chromium: `make install browser`). A saved explorer output keeps the PNG and its
one-line text but not the live widget view, which needs the kernel: nbconvert, GitHub and a
reopened JupyterLab show the PNG until the cell is run again.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
FIGURE_TYPES = ("application/vnd.plotly.v1+json", WIDGET_VIEW)


def keep_static_figures(nb: nbformat.NotebookNode) -> tuple[int, int]:
    """Drop the stateless widget view where a PNG stands in; count (figure outputs, with PNG)."""
    figures = with_png = 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if not any(t in data for t in FIGURE_TYPES):
                continue
            figures += 1
            if "image/png" in data:
                with_png += 1
                # the view needs its kernel: reopened in JupyterLab it reads "model not found"
                # (nbconvert skips a view without widget state); the PNG shows everywhere
                data.pop(WIDGET_VIEW, None)
    return figures, with_png


def run(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=1800, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}},
                            store_widget_state=False)
    t = time.time()
    client.execute()
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    figures, with_png = keep_static_figures(nb)
    nbformat.write(nb, path)
    size = path.stat().st_size
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    print(f"{name}: {time.time() - t:.0f} s, {size // 1024} KB, "
          f"{with_png}/{figures} figure outputs with a static PNG")
    if with_png < figures:
        print("  WARNING: figures without a static PNG (kaleido/Chromium missing? see the "
              "notebook's warning); nbconvert/GitHub readers will not see them")
    if size > 1_000_000:
        print("  WARNING: over 1 MB; make the figures smaller (static.enable(scale=...))")


def main(argv: list[str]) -> None:
    os.environ.setdefault("ROWSFT_FAST", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    paths = [Path(a).resolve() for a in argv] or sorted(ROOT.glob("notebooks/**/*.ipynb"))
    for p in paths:
        if ".ipynb_checkpoints" not in p.parts and "exercises" not in p.parts:  # workshop blanks raise
            run(p)


if __name__ == "__main__":
    main(sys.argv[1:])
