"""Small helpers shared by the explorers: number formatting, layer/type keys, a guarded
setter that turns a refused control change into a message.

Usage::

    human_count(6_738_415_616)     # '6.74 B'
    human_bytes(3 * 2**30)         # '3.00 GiB'
"""
from __future__ import annotations

import functools
from typing import Callable

from ..targets import layer_index, module_type


def human_count(n: float) -> str:
    """``1234567 -> '1.23 M'``; small numbers are printed whole."""
    n = float(n)
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(round(n)):,}"


def human_bytes(n: float) -> str:
    """``3 * 2**30 -> '3.00 GiB'``."""
    n = float(n)
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def layer_key(name: str) -> int:
    """Block index of a module, -1 for modules outside the repeated blocks."""
    idx = layer_index(name)
    return -1 if idx is None else idx


def layer_label(key: int) -> str:
    return "other" if key < 0 else f"layer {key}"


def types_in_order(names: list[str]) -> list[str]:
    """Distinct :func:`module_type` values in first-seen order."""
    seen: dict[str, None] = {}
    for n in names:
        seen.setdefault(module_type(n), None)
    return list(seen)


def apply_or_message(change: Callable[[], None], show: Callable[[str], None]) -> bool:
    """Run a state change; on ``ValueError`` show its message instead of raising.
    Returns True when the change was accepted. Views use it so a refused control
    setting leaves the state as it was and tells the user why."""
    try:
        change()
    except ValueError as err:
        show(str(err))
        return False
    show("")
    return True


# After a browser refresh JupyterLab restores every widget from the running kernel, but a
# plotly FigureWidget (an anywidget carrying plotly.js) can fail to start in time ("[anywidget]
# Failed to initialize model") and leave an empty box. Each figure sits in a
# ``rowsft-figure`` box; this CSS shows the explorer's hint while any of those boxes has had no
# drawn chart for a few seconds (``:has`` needs Chromium 105+, Firefox 121+, Safari 15.4+).
RELOAD_HINT_HTML = """<style>
.rowsft-explorer .rowsft-reload-hint { display: none; }
.rowsft-explorer:has(.rowsft-figure:not(:has(.js-plotly-plot))) .rowsft-reload-hint {
  display: block; animation: rowsft-hint-in 0s linear 6s both; }
@keyframes rowsft-hint-in { from { visibility: hidden; } to { visibility: visible; } }
</style><div class="rowsft-reload-hint" style="color:#b00;font-weight:bold">Charts missing?
After a page reload the charts cannot always reconnect to the running kernel: re-run this cell
to draw them again (the kernel kept every result).</div>"""


def figure_box(figure):
    """Wrap a plotly ``FigureWidget`` in the box the reload hint watches."""
    import ipywidgets as W

    return W.Box([figure]).add_class("rowsft-figure")


def explorer_box(children: list):
    """The root box of an explorer: its children plus the (normally hidden) reload hint."""
    import ipywidgets as W

    hint = W.HTML(RELOAD_HINT_HTML).add_class("rowsft-reload-hint-box")
    return W.VBox([hint, *children]).add_class("rowsft-explorer")


@functools.cache
def _shared_plotly_esm() -> str:
    """plotly's widget module wrapped so a page evaluates plotly.js once for all figures.

    Every ``FigureWidget`` ships plotly's ~5 MB widget module, and anywidget evaluates it
    anew for every figure and fails the widget when that takes over 2 s ("[anywidget] Failed
    to initialize model"). After a browser refresh all figures restore at once and, on a
    busy machine, time out; a failed figure takes its whole explorer box down with it. The
    wrapper keeps the module text as a string, imports it once per page (a promise on
    ``globalThis`` keyed by its hash), and holds up ``initialize`` for it at most 1.5 s
    (``render`` waits for the rest). plotly's default export is a factory with per-figure
    state, so it is called once per figure."""
    import hashlib
    import json
    import pathlib

    import plotly

    path = pathlib.Path(plotly.__file__).parent / "package_data" / "widgetbundle.js"
    src = path.read_text(encoding="utf-8")
    key = "__rowsft_plotly_" + hashlib.sha256(src.encode()).hexdigest()[:16]
    return (
        f"const KEY = {json.dumps(key)};\n"
        f"const SRC = {json.dumps(src)};\n"
        "export default function () {\n"
        "  globalThis[KEY] ??= import(URL.createObjectURL(\n"
        "    new Blob([SRC], { type: 'text/javascript' })));\n"
        "  const plotly = globalThis[KEY].then(async (mod) =>\n"
        "    typeof mod.default === 'function' ? await mod.default() : mod.default);\n"
        "  let initialized = null;\n"
        "  return {\n"
        "    initialize(ctx) {\n"
        "      initialized = plotly.then((w) => w.initialize(ctx));\n"
        "      // wait for plotly (edits sent meanwhile need its model), but not past\n"
        "      // anywidget's 2 s limit: a late figure still draws, a failed one never does\n"
        "      return Promise.race([initialized,\n"
        "                           new Promise((ok) => setTimeout(ok, 1500))]);\n"
        "    },\n"
        "    async render(ctx) {\n"
        "      const w = await plotly;\n"
        "      await initialized;\n"
        "      return w.render(ctx);\n"
        "    },\n"
        "  };\n"
        "}\n")


@functools.cache
def _figure_widget_class() -> type:
    import copy

    import plotly.graph_objects as go

    class FigureWidget(go.FigureWidget):
        """``go.FigureWidget`` that survives a browser refresh: plotly.js is evaluated once
        per page, and a reconnecting page gets the figure as it is now."""

        _esm = _shared_plotly_esm()

        def get_state(self, key=None, drop_defaults=False):
            # The full state goes out when a page (re)connects (ipywidgets' request_states /
            # request_state). plotly sends edits as messages and leaves _widget_data and
            # _widget_layout at the first draw, so a refreshed page drew empty axes: put the
            # current figure there first. Set without notifying: nothing but the full state
            # may go out while the page restores.
            if key is None and "_layout_obj" in self.__dict__:
                self._trait_values["_widget_data"] = copy.deepcopy(self._data)
                self._trait_values["_widget_layout"] = copy.deepcopy(self._layout_obj._props)
            return super().get_state(key=key, drop_defaults=drop_defaults)

    return FigureWidget


def figure_widget(*args, **kwargs):
    """A plotly ``FigureWidget`` that redraws after a browser refresh (see
    :func:`_figure_widget_class`); same arguments as ``go.FigureWidget``.

    Usage: ``fig = figure_widget(data=[go.Scatter(y=[1, 2])], layout=dict(height=300))``."""
    return _figure_widget_class()(*args, **kwargs)
