"""Static PNG copies of plotly figures and explorers, for readers who do not run a notebook.

nbconvert and GitHub show neither plotly JSON nor live widgets, but they do show a PNG stored
next to them. :func:`enable` (the notebooks' setup cell) makes every ``fig.show()`` carry an
``image/png`` as well as the plotly JSON; the explorers display :func:`explorer_bundle`, which
adds a snapshot of their figures and the line :data:`RUN_LINE`. The PNGs come from kaleido
driving one headless Chromium kept warm for the whole session (about 0.5 s a figure instead of
about 4 s when each export starts a browser). Best-effort: without kaleido or a Chromium the
figures stay interactive, and one warning says that no static copies are stored.
``ROWSFT_STATIC_FIGURES=0`` turns the copies off without a warning (e.g. a slow laptop).

Usage::

    from rowsft_nb.widgets import static
    static.enable()                      # every fig.show() now also stores a PNG
    png = static.figure_png(fig)         # bytes, or None when no Chromium is available
"""
from __future__ import annotations

import asyncio
import base64
import os
import threading
import warnings
from typing import Any

RUN_LINE = "Static snapshot: run this cell for the interactive explorer."
RENDERER = "rowsft_png"
TIMEOUT_S = 120.0          # one export, Chromium's start included (slow on a busy 2-core machine)
_DEFAULT_SIZE = (700, 450)


class _WarmChromium:
    """One kaleido (headless Chromium) on an event loop of its own, reused for every export."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="rowsft-kaleido")
        self._thread.start()
        self._lock = threading.Lock()
        try:
            self._kaleido = self._call(self._open())
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise

    @staticmethod
    async def _open() -> Any:
        import kaleido

        k = kaleido.Kaleido(n=1, mathjax=False)    # mathjax would come from a CDN: offline here
        await k.open()
        return k

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=TIMEOUT_S)

    def png(self, fig_dict: dict, width: int, height: int, scale: float) -> bytes:
        opts = dict(format="png", width=width, height=height, scale=scale)
        with self._lock:
            return self._call(self._kaleido.calc_fig(fig_dict, opts=opts))

    def close(self) -> None:
        try:
            self._call(self._kaleido.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)


_chromium: _WarmChromium | None = None
_off_reason: str | None = None     # set once export failed: no more tries, no more warnings
_state_lock = threading.Lock()


def _warm() -> _WarmChromium | None:
    global _chromium, _off_reason
    with _state_lock:
        if os.environ.get("ROWSFT_STATIC_FIGURES") == "0":
            return None
        if _chromium is None and _off_reason is None:
            try:
                _chromium = _WarmChromium()
                import atexit
                atexit.register(_chromium.close)
            except Exception as exc:  # noqa: BLE001 - any failure only turns the copies off
                _turn_off(exc)
        return _chromium


def _turn_off(exc: BaseException) -> None:
    global _off_reason
    _off_reason = f"{type(exc).__name__}: {exc}".strip()[:300]
    warnings.warn(
        "rowsft_nb: no static PNG copies of figures are stored (plotly image export needs "
        f"kaleido and a Chromium: {_off_reason}). The figures stay interactive when you run the "
        "notebook; only readers of the saved file (nbconvert, GitHub) will not see them. Fix: "
        "`pip install kaleido` and a Chromium (`make browser` installs Debian's).",
        RuntimeWarning, stacklevel=3)


def figure_png(fig: Any, width: int | None = None, height: int | None = None,
               scale: float = 1.0) -> bytes | None:
    """PNG bytes of a plotly figure (Figure, FigureWidget or dict); None when export is off.

    Usage: ``png = figure_png(fig)``. The size defaults to the figure's layout width/height
    (700 x 450 when unset). The first failure warns once and turns exports off for the session.
    """
    global _chromium
    fig_dict = fig if isinstance(fig, dict) else fig.to_dict()
    layout = fig_dict.get("layout", {})
    width = int(width or layout.get("width") or _DEFAULT_SIZE[0])
    height = int(height or layout.get("height") or _DEFAULT_SIZE[1])
    chromium = _warm()
    if chromium is None:
        return None
    try:
        return chromium.png(fig_dict, width, height, scale)
    except Exception as exc:  # noqa: BLE001 - a failed export never fails the notebook
        with _state_lock:
            _chromium = None
        _turn_off(exc)
        return None


def _renderer_class() -> type:
    from plotly.io._base_renderers import MimetypeRenderer

    class PngCopyRenderer(MimetypeRenderer):
        """``fig.show()`` adds ``image/png`` when it can; adds nothing (never fails) otherwise."""

        def __init__(self, scale: float) -> None:
            self.scale = scale

        def to_mimebundle(self, fig_dict: dict) -> dict:
            png = figure_png(fig_dict, scale=self.scale)
            return {"image/png": base64.b64encode(png).decode("ascii")} if png else {}

    return PngCopyRenderer


def enable(scale: float = 1.0) -> str:
    """Make every ``fig.show()`` store plotly JSON (interactive) plus a static PNG.

    Usage: ``static.enable()`` in a notebook's setup cell. Sets and returns the default plotly
    renderer, ``"plotly_mimetype+rowsft_png"`` (``"plotly_mimetype"`` when
    ``ROWSFT_STATIC_FIGURES=0``). The browser starts at the first figure.
    """
    import plotly.io as pio

    pio.renderers[RENDERER] = _renderer_class()(scale)
    off = os.environ.get("ROWSFT_STATIC_FIGURES") == "0"
    pio.renderers.default = "plotly_mimetype" if off else f"plotly_mimetype+{RENDERER}"
    return pio.renderers.default


def _place(widget: Any, x: int, y: int, avail: int | None) -> tuple[int, int, list]:
    """Lay out the visible plotly figures of a widget tree: (width, height, [(fig, x, y, w, h)])."""
    from ipywidgets import Box, HBox
    from plotly.basedatatypes import BaseFigure

    if getattr(getattr(widget, "layout", None), "display", None) == "none":
        return 0, 0, []
    if isinstance(widget, BaseFigure):
        w = int(widget.layout.width or (_DEFAULT_SIZE[0] if avail is None else avail))
        h = int(widget.layout.height or _DEFAULT_SIZE[1])
        return w, h, [(widget, x, y, w, h)]
    if not isinstance(widget, Box):
        return 0, 0, []
    horizontal = isinstance(widget, HBox)
    if not horizontal and avail is None:   # width-less figures fill the widest fixed sibling
        avail = max([_place(c, 0, 0, 0)[0] for c in widget.children] + [0]) or None
    width = height = 0
    boxes: list = []
    for child in widget.children:
        if horizontal:
            w, h, b = _place(child, x + width, y, None)
            width, height = width + w, max(height, h)
        else:
            w, h, b = _place(child, x, y + height, avail)
            width, height = max(width, w), height + h
        boxes += b
    return width, height, boxes


def widget_png(widget: Any, title: str = RUN_LINE, scale: float = 1.0) -> bytes | None:
    """One PNG of every visible plotly figure in an ipywidgets tree, laid out like the boxes.

    Usage: ``png = widget_png(explorer.widget)``. Controls are not drawn; ``title`` goes on top.
    None when the tree holds no figure or export is off.
    """
    width, height, boxes = _place(widget, 0, 0, None)
    if not boxes:
        return None
    top = 34
    images = []
    for fig, x, y, w, h in boxes:
        png = figure_png(fig, w, h, scale)
        if png is None:
            return None
        images.append(dict(source="data:image/png;base64," + base64.b64encode(png).decode("ascii"),
                           xref="paper", yref="paper", x=x / width, y=1 - (y + top) / (height + top),
                           sizex=w / width, sizey=h / (height + top), xanchor="left",
                           yanchor="top", sizing="stretch", layer="above"))
    sheet = dict(data=[], layout=dict(
        width=width, height=height + top, margin=dict(l=0, r=0, t=0, b=0), images=images,
        xaxis=dict(visible=False, range=[0, 1]), yaxis=dict(visible=False, range=[0, 1]),
        plot_bgcolor="white", paper_bgcolor="white",
        annotations=[dict(text=f"<i>{title}</i>", xref="paper", yref="paper", x=0.01, y=1,
                          xanchor="left", yanchor="top", showarrow=False,
                          font=dict(size=14, color="#555"))]))
    return figure_png(sheet, width, height + top, scale)


def explorer_bundle(widget: Any) -> dict:
    """The display bundle of an explorer: the live widget view, a static PNG and one text line.

    Usage: ``display(explorer_bundle(self.widget), raw=True)``. JupyterLab draws the live widget;
    nbconvert, without widget state, shows the PNG. ``scripts/run_notebooks.py`` drops the
    kernel-bound widget view from saved notebooks, so a reopened JupyterLab shows the PNG too.
    """
    bundle = dict(widget._repr_mimebundle_())
    bundle["text/plain"] = RUN_LINE
    png = widget_png(widget)
    if png is not None:
        bundle["image/png"] = base64.b64encode(png).decode("ascii")
    return bundle


def display_explorer(widget: Any) -> None:
    """Display an explorer's widget with its static fallback. Usage: ``display_explorer(self.widget)``."""
    from IPython.display import display

    display(explorer_bundle(widget), raw=True)
