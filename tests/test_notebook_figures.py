"""Readers who do not run a notebook (nbconvert HTML, GitHub) see every figure.

Every ``fig.show()`` stores a PNG next to the plotly JSON and every explorer a static snapshot
(rowsft_nb/widgets/static.py); scripts/run_notebooks.py keeps the PNG in the saved notebook.
Here: nbconvert each committed notebook and look for an <img> in each figure cell's output;
the explorers' display bundle; the fallback without Chromium (interactive only, one warning).
"""
from __future__ import annotations

import base64
import importlib.util
import re
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import nbformat
import numpy as np
import pytest

from rowsft_nb import testing
from rowsft_nb.widgets import static

ROOT = Path(__file__).resolve().parents[1]
# exercise notebooks are never executed (their blanks raise), so they hold no outputs
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").rglob("*.ipynb")
                   if "exercises" not in p.parts and ".ipynb_checkpoints" not in p.parts)
EXPLORERS = ("ImportanceExplorer", "BudgetExplorer", "TrainingLauncher")
HAVE_CHROMIUM = (importlib.util.find_spec("kaleido") is not None
                 and any(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")))
needs_chromium = pytest.mark.skipif(not HAVE_CHROMIUM, reason="no kaleido or no Chromium "
                                    "(make install browser): static PNG export cannot run")


def _code(source: str) -> list[str]:
    return [line.split("#", 1)[0].rstrip() for line in source.splitlines()
            if line.split("#", 1)[0].strip()]


def figure_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    """Code cells that show a figure: ``.show()``, or an explorer as the cell's last expression."""
    explorer_names: set[str] = set()
    found = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        lines = _code(cell.source)
        for line in lines:
            m = re.match(r"(\w+)\s*=\s*(?:\w+\.)*(%s)\(" % "|".join(EXPLORERS), line)
            if m:
                explorer_names.add(m.group(1))
        last = lines[-1].strip() if lines else ""
        shows = any(re.search(r"\.show\(\s*\)", line) for line in lines)
        displays = (last in explorer_names or re.match(r"display\((\w+)\)$", last) and
                    last[8:-1] in explorer_names or re.match(r"(%s)\(" % "|".join(EXPLORERS), last))
        if shows or displays:
            found.append(cell)
    return found


def cell_html(html: str) -> dict[str, str]:
    """nbconvert's lab HTML split by cell: {cell id: the cell's HTML (input and outputs)}."""
    parts = re.split(r'id="cell-id=([^"]+)"', html)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _with_figures(paths):
    return [p for p in paths if figure_cells(nbformat.read(p, as_version=4))]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT / "notebooks")))
def test_committed_notebooks_stay_under_1_mb(path):
    assert path.stat().st_size < 1_000_000, f"{path.name} is over 1 MB"


def test_most_notebooks_have_figures():
    """The figure check below covers the notebooks that draw (06 only prints tables)."""
    assert len(_with_figures(NOTEBOOKS)) >= len(NOTEBOOKS) - 1


@pytest.mark.parametrize("path", _with_figures(NOTEBOOKS),
                         ids=lambda p: str(p.relative_to(ROOT / "notebooks")))
def test_nbconvert_html_shows_every_figure(path):
    from nbconvert import HTMLExporter

    nb = nbformat.read(path, as_version=4)
    cells = figure_cells(nb)
    html, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    by_id = cell_html(html)
    missing = [c.id for c in cells
               if not re.search(r'<img [^>]*src="data:image/png;base64,', by_id[c.id])]
    assert not missing, (
        f"{path.name}: figure cells {missing} show no image in nbconvert HTML; re-execute with "
        f"scripts/run_notebooks.py (kaleido + Chromium installed: make install browser)")


def test_figure_cells_are_found():
    """The cell finder sees .show() and explorers (direct, assigned then named, displayed)."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in [
        "fig = go.Figure()\nfig.show()",
        "memory_figure(est).show()  # a chained call",
        "ex = BudgetExplorer(report, percent=5.0)\nex",
        "ImportanceExplorer(report, plan=plan)",
        "launcher = rs.widgets.TrainingLauncher(model, plan, data)\ndisplay(launcher)",
        "print(ex.plan)",
        "# fig.show() in a comment\nx = 1",
        "ex2 = BudgetExplorer(report)",
    ]])
    assert [nb.cells.index(c) for c in figure_cells(nb)] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT / "notebooks")))
def test_output_checked_cells_show_no_figure(path):
    """nbval compares the outputs of NBVAL_CHECK_OUTPUT cells: a PNG there would never match."""
    nb = nbformat.read(path, as_version=4)
    figures = {c.id for c in figure_cells(nb)}
    for cell in nb.cells:
        if cell.cell_type == "code" and "NBVAL_CHECK_OUTPUT" in cell.source:
            assert cell.id not in figures, f"{path.name}: checked cell {cell.id} shows a figure"
            for out in cell.get("outputs", []):
                assert "image/png" not in out.get("data", {}), f"{path.name}: {cell.id}"


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    return struct.unpack(">II", png[16:24])


def _png_pixels(png: bytes) -> np.ndarray:
    """Decode an 8-bit RGB(A) non-interlaced PNG (what Chromium writes): [height, width, channels]."""
    width, height = _png_size(png)
    depth, color, _, _, interlace = png[24:29]
    assert depth == 8 and color in (2, 6) and interlace == 0
    bpp = 3 if color == 2 else 4
    pos, idat = 8, b""
    while pos < len(png):
        n, kind = struct.unpack(">I4s", png[pos:pos + 8])
        if kind == b"IDAT":
            idat += png[pos + 8:pos + 8 + n]
        pos += 12 + n
    raw = zlib.decompress(idat)
    stride = width * bpp
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = bytearray(stride)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out[y] = np.frombuffer(bytes(line), dtype=np.uint8)
        prev = line
    return out.reshape(height, width, bpp)[:, :, :3]


@needs_chromium
@pytest.mark.slow
def test_widget_png_lays_out_figures_like_the_boxes():
    import ipywidgets as W
    import plotly.graph_objects as go

    m = dict(l=20, r=10, t=10, b=20)
    a = go.FigureWidget(go.Bar(y=[1, 3, 2]), layout=dict(width=300, height=200, margin=m))
    b = go.FigureWidget(go.Scatter(y=[2, 1, 3]), layout=dict(width=200, height=100, margin=m))
    c = go.FigureWidget(go.Heatmap(z=[[1, 2], [3, 4]], showscale=False),   # no width
                        layout=dict(height=150, margin=m))
    hidden = go.FigureWidget(layout=dict(width=900, height=900))
    hidden_box = W.VBox([hidden], layout=W.Layout(display="none"))
    tree = W.VBox([W.HTML("controls are not drawn"), W.HBox([a, b]), c, hidden_box])
    png = static.widget_png(tree, title="t")
    # width: the HBox row (300 + 200); the width-less heatmap fills it; 34 px title band on top
    assert _png_size(png) == (500, 34 + 200 + 150)
    pixels = _png_pixels(png)
    assert (pixels[:34] > 200).all(axis=-1).mean() > 0.9       # the title band: white, some text
    # each figure where the boxes put it, drawn in plotly's colours: the bar chart's plot area
    # (pale blue-grey #E5ECF6) and first trace colour (#636EFA) inside x 0-300, y 34-234; the
    # heatmap (Plasma-like colours, not grey) across the full width below y 234
    def has(region, rgb, tol=12):
        return (np.abs(region.astype(int) - rgb).max(axis=-1) <= tol).any()
    assert has(pixels[34:234, :300], (0x63, 0x6E, 0xFA)) and has(pixels[34:234, :300], (0xE5, 0xEC, 0xF6))
    assert has(pixels[34:134, 300:500], (0x63, 0x6E, 0xFA))        # the scatter's line
    assert not has(pixels[34:234, :300], (0x0D, 0x08, 0x87))
    assert has(pixels[234:, :], (0x0D, 0x08, 0x87), tol=40)        # heatmap's darkest colour


@needs_chromium
@pytest.mark.slow
def test_explorer_display_bundle_carries_a_static_image(monkeypatch):
    import IPython.display
    from rowsft_nb.widgets import BudgetExplorer

    shapes = {f"layer.{i}.{t}": (32, 16) for i in range(2) for t in ("query", "up")}
    ex = BudgetExplorer(testing.synthetic_report(shapes, seed=0), percent=10)
    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *a, **k: shown.append((a, k)))
    ex._ipython_display_()
    assert len(shown) == 1 and shown[0][1] == {"raw": True}
    bundle = shown[0][0][0]
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == ex.widget.model_id
    assert bundle["text/plain"] == static.RUN_LINE
    width, height = _png_size(base64.b64decode(bundle["image/png"]))
    figs = [ex.memory, ex.coverage]
    assert width >= max(f.layout.width or 0 for f in figs) and height > max(
        f.layout.height for f in figs)

    # the saved notebook keeps the PNG instead of the stateless widget view
    import importlib
    import sys
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        run_notebooks = importlib.import_module("run_notebooks")
    finally:
        sys.path.pop(0)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "ex", outputs=[nbformat.v4.new_output("display_data", data=dict(bundle))])])
    assert run_notebooks.keep_static_figures(nb) == (1, 1)
    assert set(nb.cells[0].outputs[0].data) == {"image/png", "text/plain"}


@pytest.fixture
def no_chromium(monkeypatch):
    """Static export as on a laptop without Chromium; the module's state restored afterwards."""
    import plotly.io as pio

    class Missing:
        def __init__(self):
            raise RuntimeError("no Chromium found (test)")

    monkeypatch.setattr(static, "_WarmChromium", Missing)
    monkeypatch.setattr(static, "_chromium", None)
    monkeypatch.setattr(static, "_off_reason", None)
    default = pio.renderers.default
    yield
    pio.renderers.default = default


def test_without_chromium_figures_stay_interactive_with_one_warning(no_chromium):
    import plotly.graph_objects as go
    from rowsft_nb.widgets import BudgetExplorer

    assert static.enable() == "plotly_mimetype+rowsft_png"
    fig = go.Figure(go.Bar(y=[1, 2]))
    shapes = {f"layer.{i}.up": (16, 8) for i in range(2)}
    ex = BudgetExplorer(testing.synthetic_report(shapes, seed=0), percent=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bundles = [fig._repr_mimebundle_(), fig._repr_mimebundle_(),
                   static.explorer_bundle(ex.widget)]
    ours = [w for w in caught if "static PNG" in str(w.message)]
    assert len(ours) == 1 and "no Chromium found (test)" in str(ours[0].message)
    assert "application/vnd.plotly.v1+json" in bundles[0] and "image/png" not in bundles[0]
    assert "image/png" not in bundles[1]
    assert set(bundles[2]) == {"application/vnd.jupyter.widget-view+json", "text/plain"}


def test_static_copies_can_be_turned_off_without_a_warning(no_chromium, monkeypatch):
    import plotly.graph_objects as go

    monkeypatch.setenv("ROWSFT_STATIC_FIGURES", "0")
    assert static.enable() == "plotly_mimetype"
    with warnings.catch_warnings():
        warnings.simplefilter("error")         # Missing() would warn: it is never started
        assert static.figure_png(go.Figure(go.Bar(y=[1]))) is None
    assert static._off_reason is None
