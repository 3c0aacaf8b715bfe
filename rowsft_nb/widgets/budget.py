"""Budget explorer: choose how many rows to train (globally, per module type, by strategy)
and see at once what it costs: trainable parameters, equivalent LoRA rank, estimated
training memory next to LoRA and full fine-tuning, importance covered per layer.

:class:`BudgetState` holds all logic and always has a valid ``plan``; a refused setting
raises ``ValueError`` and leaves the state unchanged. :class:`BudgetExplorer` is the view.

Usage::

    from rowsft_nb.widgets import BudgetExplorer
    explorer = BudgetExplorer(report)      # move the sliders ...
    plan = explorer.plan                   # ... and take the current RowPlan
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..plan import RowPlan
from ..scoring.report import ImportanceReport
from ..targets import module_type
from ._common import (apply_or_message, explorer_box, figure_box, figure_widget, human_bytes,
                      human_count, layer_key, layer_label, types_in_order)

STRATEGIES = ("uniform", "per-type", "topk", "coverage")
UNITS = ("rows", "params")
UNIT_LABELS = {"rows": "% of rows", "params": "% of params"}   # params of the target modules
NORMALIZERS = ("rank", "mean", "max", "sum")
# Which budget units each strategy understands.
STRATEGY_UNITS = {"uniform": ("rows", "params"), "per-type": ("rows",),
                  "topk": ("params",), "coverage": ("params",)}
STRATEGY_HELP = {
    "uniform": "the same share of rows in every module",
    "per-type": "a share of rows per module type (type sliders)",
    "topk": "the globally most important rows until the parameter budget is spent",
    "coverage": "rows per module so that each covers the most importance for the budget",
}
METHOD_LABELS = {"rowsft": "row-sparse (this plan)", "lora": "LoRA (same params)",
                 "full": "full fine-tune"}


@dataclass(frozen=True)
class BudgetSettings:
    """Every control of the budget explorer; hashable so plans can be cached."""

    percent: float = 5.0
    unit: str = "rows"
    strategy: str = "uniform"
    normalizer: str = "rank"
    type_percent: tuple[tuple[str, float], ...] = ()
    min_rows: int = 0
    max_rows: int | None = None
    head_aligned: bool = False
    per_head: bool = False            # an equal number of rows in every head (the authors')
    couple: str | None = None         # "neurons": MLP rows + the matching down-proj columns
    batch_size: int = 8
    seq_len: int = 512


@dataclass
class BudgetReadout:
    """What the explorer shows for one setting."""

    plan: RowPlan
    trainable: int
    percent_of_model: float
    rows: int
    percent_of_rows: float
    lora_rank: float
    memory: dict[str, dict[str, int]]           # method -> component -> bytes
    coverage: dict[int, float]                  # layer key -> share of importance selected
    coverage_total: float
    meta: dict[str, Any] = field(default_factory=dict)


class BudgetState:
    """All budget logic; ``state.plan`` is always the plan of the current settings.

    Usage::

        state = BudgetState(report)
        state.set_percent(10)                      # 10% of rows in every module
        state.set_strategy("per-type"); state.set_type_percent("mlp.up_proj", 20)
        state.readout.trainable, state.readout.lora_rank
        state.export("plan.json")
    """

    def __init__(self, report: ImportanceReport, percent: float = 5.0, batch_size: int = 8,
                 seq_len: int = 512, dtype: torch.dtype = torch.float32,
                 cache_size: int = 64) -> None:
        if not isinstance(report, ImportanceReport):
            raise ValueError(f"BudgetState needs an ImportanceReport, got {type(report).__name__}")
        self.report = report
        self.dtype = dtype
        self.types = types_in_order(report.modules)
        self.layers = sorted({layer_key(n) for n in report.modules})
        self.total_rows = report.total_rows()
        self.target_params = sum(o * i for o, i in report.shapes.values())
        self.model_params = int(report.meta.get("model_parameters") or self.target_params)
        # Per-module non-negative score mass, mean-normalized so every row weighs 1 on
        # average: a layer's importance is comparable across module types.
        self._mass = {n: _mean_normalized(s) for n, s in report.scores.items()}
        self._layer_of = {n: layer_key(n) for n in report.modules}
        self._layer_total: dict[int, float] = {}
        for n, m in self._mass.items():
            self._layer_total[self._layer_of[n]] = self._layer_total.get(self._layer_of[n], 0.0) \
                + float(m.sum())
        self._cache: OrderedDict[BudgetSettings, BudgetReadout] = OrderedDict()
        self._cache_size = cache_size
        start = BudgetSettings(percent=float(percent), batch_size=batch_size, seq_len=seq_len,
                               type_percent=tuple((t, float(percent)) for t in self.types))
        self.settings = start
        self.readout = self._compute(start)
        self.notice = ""    # what the last control change did besides the obvious (or "")

    # ------------------------------------------------------------------ reading
    @property
    def plan(self) -> RowPlan:
        return self.readout.plan

    @property
    def message(self) -> str:
        """One line describing the current strategy."""
        s = self.settings
        return f"{s.strategy}: {STRATEGY_HELP[s.strategy]}"

    def type_percent(self, module_type_name: str) -> float:
        return dict(self.settings.type_percent)[module_type_name]

    @property
    def percent_follows_plan(self) -> bool:
        """True under ``per-type``: the type sliders set the budget, and the global budget
        slider only shows the plan's share of rows (disabled)."""
        return self.settings.strategy == "per-type"

    @property
    def display_percent(self) -> float:
        """What the global budget slider shows: the budget, or under ``per-type`` the share
        of rows the plan actually selects."""
        if self.percent_follows_plan:
            return self.readout.percent_of_rows
        return self.settings.percent

    # ------------------------------------------------------------------ controls
    def set_percent(self, percent: float) -> None:
        """Global budget in the current unit. Under ``per-type`` it sets every type."""
        percent = float(percent)
        if not 0.0 < percent <= 100.0:
            raise ValueError(f"Budget must be in (0, 100] percent, got {percent}")
        changes: dict[str, Any] = {"percent": percent}
        if self.settings.strategy == "per-type":
            changes["type_percent"] = tuple((t, percent) for t in self.types)
        self._apply(**changes)

    def set_unit(self, unit: str) -> None:
        """``rows``: percent of the targets' rows; ``params``: percent of their parameters."""
        if unit not in UNITS:
            raise ValueError(f"Unknown unit {unit!r}; choose one of {UNITS}")
        allowed = STRATEGY_UNITS[self.settings.strategy]
        if unit not in allowed:
            raise ValueError(f"Strategy {self.settings.strategy!r} takes a budget in "
                             f"{' or '.join(UNIT_LABELS[u] for u in allowed)}; pick another "
                             "strategy first")
        self._apply(unit=unit)

    def set_strategy(self, strategy: str) -> None:
        """Pick a strategy; one that takes another budget unit (``topk``/``coverage`` spend
        a parameter budget) switches the unit too and says so in :attr:`notice`."""
        if strategy not in STRATEGIES:
            raise ValueError(f"Unknown strategy {strategy!r}; choose one of {STRATEGIES}")
        allowed = STRATEGY_UNITS[strategy]
        changes: dict[str, Any] = {"strategy": strategy}
        notice = ""
        if self.settings.unit not in allowed:
            changes["unit"] = allowed[0]
            notice = (f"Switched the unit to {UNIT_LABELS[allowed[0]]}: {strategy!r} spends "
                      f"a budget in {UNIT_LABELS[allowed[0]]} ({self.settings.percent:g}% of "
                      f"the target modules' {'parameters' if allowed[0] == 'params' else 'rows'})")
        if strategy == "per-type":
            # the type sliders start where the global budget is
            changes["type_percent"] = tuple((t, self.settings.percent) for t in self.types)
        self._apply(**changes)
        self.notice = notice

    def set_normalizer(self, normalizer: str) -> None:
        """How ``topk``/``coverage`` make scores comparable across modules."""
        if normalizer not in NORMALIZERS:
            raise ValueError(f"Unknown normalizer {normalizer!r}; choose one of {NORMALIZERS}")
        self._apply(normalizer=normalizer)

    def set_type_percent(self, module_type_name: str, percent: float) -> None:
        """Share of rows for one module type (used by the ``per-type`` strategy)."""
        if module_type_name not in self.types:
            raise ValueError(f"Unknown module type {module_type_name!r}; "
                             f"available: {self.types}")
        percent = float(percent)
        if not 0.0 <= percent <= 100.0:
            raise ValueError(f"Type budget must be in [0, 100] percent, got {percent}")
        if self.settings.strategy != "per-type":
            raise ValueError("Per-type budgets apply to the 'per-type' strategy; "
                             "select it first")
        tp = tuple((t, percent if t == module_type_name else p)
                   for t, p in self.settings.type_percent)
        if all(p == 0.0 for _, p in tp):
            raise ValueError("Every module type is at 0%: the plan would train nothing. "
                             "Give at least one type some rows")
        self._apply(type_percent=tp)

    def set_min_rows(self, min_rows: int) -> None:
        min_rows = int(min_rows)
        if min_rows < 0:
            raise ValueError(f"min rows must be >= 0, got {min_rows}")
        mx = self.settings.max_rows
        if mx is not None and min_rows > mx:
            raise ValueError(f"min rows ({min_rows}) is above max rows ({mx}); lower it or "
                             "raise max rows first")
        smallest = min(o for o, _ in self.report.shapes.values())
        if min_rows > smallest:
            raise ValueError(f"min rows ({min_rows}) exceeds the smallest module "
                             f"({smallest} rows)")
        self._apply(min_rows=min_rows)

    def set_max_rows(self, max_rows: int | None) -> None:
        """Cap on rows per module; ``None`` or 0 removes the cap."""
        max_rows = None if not max_rows else int(max_rows)
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max rows must be >= 1 (or 0 for no cap), got {max_rows}")
        if max_rows is not None and max_rows < self.settings.min_rows:
            raise ValueError(f"max rows ({max_rows}) is below min rows "
                             f"({self.settings.min_rows}); lower min rows first")
        self._apply(max_rows=max_rows)

    def set_head_aligned(self, on: bool) -> None:
        """Select whole attention heads (report.head_dims) instead of single rows."""
        self._set_head_option("head_aligned", on,
                              "rows cannot be head-aligned; leave 'whole heads' off",
                              "'rows per head' turned off: 'whole heads' selects heads entire")

    def set_per_head(self, on: bool) -> None:
        """An equal number of rows in every attention head (the authors' per-head allocation).
        Turning it on turns 'whole heads' off (the two are alternatives) and says so."""
        self._set_head_option("per_head", on,
                              "rows cannot be spread over heads; leave 'rows per head' off",
                              "'whole heads' turned off: 'rows per head' gives every head the "
                              "same rows")

    def _set_head_option(self, name: str, on: bool, refusal: str, notice: str) -> None:
        """Set ``head_aligned`` or ``per_head``; turning one on turns the other off (notice)."""
        other = "per_head" if name == "head_aligned" else "head_aligned"
        on = bool(on)
        if on and not self.report.head_dims:
            raise ValueError("This report has no attention heads (report.head_dims is empty), "
                             f"so {refusal}")
        other_was_on = getattr(self.settings, other)
        self._apply(**{name: on, other: other_was_on and not on})
        if on and other_was_on:
            self.notice = notice

    def set_couple(self, on: bool) -> None:
        """Whole-neuron mode (``select(couple="neurons")``): each selected MLP neuron trains its
        gate/up rows and the matching input column of the down projection (value rows with the
        output projection's columns); the budget counts both."""
        self._apply(couple="neurons" if on else None)
        if on:
            self.notice = ("whole neurons: selected MLP rows also train the matching "
                           "down-projection columns (counted in the budget)")

    def set_memory_shape(self, batch_size: int, seq_len: int) -> None:
        """Batch size and sequence length the memory estimate assumes."""
        if int(batch_size) < 1 or int(seq_len) < 1:
            raise ValueError(f"batch size and sequence length must be >= 1, got "
                             f"{batch_size} x {seq_len}")
        self._apply(batch_size=int(batch_size), seq_len=int(seq_len))

    def export(self, path: str) -> str:
        """Write the current plan as JSON (``RowPlan.save``); returns the path."""
        if not str(path).strip():
            raise ValueError("Give a file name for the plan, e.g. plan.json")
        self.plan.save(path)
        return str(path)

    # ------------------------------------------------------------------ computing
    def _apply(self, **changes: Any) -> None:
        settings = dataclasses.replace(self.settings, **changes)
        readout = self._compute(settings)   # raises before anything changes
        self.settings, self.readout = settings, readout
        self.notice = ""

    def budget(self, settings: BudgetSettings | None = None):
        """The ``rowsft_nb.selection`` budget object for ``settings`` (default: current)."""
        from .. import selection

        s = settings or self.settings
        frac = s.percent / 100.0
        if s.strategy == "uniform":
            return selection.Ratio(frac)
        if s.strategy == "per-type":
            return selection.TypeRatios({t: p / 100.0 for t, p in s.type_percent}, default=0.0)
        return selection.ParamBudget(frac, allocator=s.strategy, normalizer=s.normalizer)

    def _compute(self, s: BudgetSettings) -> BudgetReadout:
        if s in self._cache:
            self._cache.move_to_end(s)
            return self._cache[s]
        from ..selection import select

        try:
            plan = select(self.report, self.budget(s), min_rows=s.min_rows,
                          max_rows=s.max_rows, head_aligned=s.head_aligned,
                          per_head=s.per_head, couple=s.couple)
        except (ValueError, TypeError) as err:
            raise ValueError(f"This budget cannot be selected: {err}") from err
        if plan.is_empty():
            raise ValueError("This budget selects no rows at all; raise the budget or "
                             "min rows")
        est = plan.memory_estimate(s.batch_size, s.seq_len, dtype=self.dtype)
        memory = {m: {c: int(b) for c, b in comps.items()} for m, comps in est.methods.items()}
        covered: dict[int, float] = {k: 0.0 for k in self._layer_total}
        for name, idx in plan.rows.items():
            if idx.numel() and name in self._mass:
                covered[self._layer_of[name]] += float(self._mass[name][idx.numpy()].sum())
        coverage = {k: (covered[k] / t if t > 0 else 0.0) for k, t in self._layer_total.items()}
        total_mass = sum(self._layer_total.values())
        trainable = plan.trainable_parameters()
        rows = plan.num_rows()
        readout = BudgetReadout(
            plan=plan, trainable=trainable, percent_of_model=100.0 * trainable / self.model_params,
            rows=rows, percent_of_rows=100.0 * rows / self.total_rows,
            lora_rank=float(plan.equivalent_lora_rank()), memory=memory, coverage=coverage,
            coverage_total=(sum(covered.values()) / total_mass if total_mass > 0 else 0.0))
        self._cache[s] = readout
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return readout

    def trainable_text(self) -> str:
        """``trainable parameters: 1,234 (0.5% of the model)``: the one place the count is
        printed."""
        r = self.readout
        short = f"{human_count(r.trainable)}; " if r.trainable >= 1000 else ""
        return (f"trainable parameters: {r.trainable:,} ({short}"
                f"{r.percent_of_model:.3g}% of the model)")

    def summary_text(self, trainable: bool = True) -> str:
        """The live readout as one line of text (without the trainable count when
        ``trainable=False``: the explorer prints it on its own line)."""
        r = self.readout
        parts = [f"trainable {human_count(r.trainable)} params ({r.trainable:,}; "
                 f"{r.percent_of_model:.3g}% of the model)"] if trainable else []
        parts += [f"{r.rows:,} rows ({r.percent_of_rows:.3g}% of the target rows)",
                  f"equivalent LoRA rank {r.lora_rank:.1f}",
                  f"importance covered {100 * r.coverage_total:.1f}%"]
        return " · ".join(parts)


def _mean_normalized(s: torch.Tensor) -> np.ndarray:
    m = np.clip(s.numpy().astype(np.float64), 0, None)
    mean = m.mean() if m.size else 0.0
    return m / mean if mean > 0 else np.zeros_like(m)


class BudgetExplorer:
    """Sliders and live readouts over :class:`BudgetState`; ``explorer.plan`` is the
    current RowPlan.

    Usage: ``explorer = BudgetExplorer(report)`` as the last line of a cell.
    """

    def __init__(self, report: ImportanceReport, percent: float = 5.0, batch_size: int = 8,
                 seq_len: int = 512, dtype: torch.dtype = torch.float32,
                 plan_path: str = "plan.json") -> None:
        import ipywidgets as W
        import plotly.graph_objects as go

        self.state = BudgetState(report, percent=percent, batch_size=batch_size,
                                 seq_len=seq_len, dtype=dtype)
        st = self.state
        s = st.settings
        wide = {"description_width": "110px"}
        # log scale: 0.1 .. 100 %, the usual 0.5-10 % get 43% of the track
        self.percent = W.FloatLogSlider(value=s.percent, base=10, min=-1, max=2, step=0.01,
                                        description="budget %", continuous_update=True,
                                        style=wide, readout_format=".3g",
                                        layout=W.Layout(width="420px"))
        self.unit = W.ToggleButtons(options=[(UNIT_LABELS[u], u) for u in UNITS], value=s.unit,
                                    description="unit", style={**wide, "button_width": "110px"},
                                    tooltips=["share of the target modules' rows",
                                              "share of the target modules' parameters"])
        self.strategy = W.Dropdown(options=list(STRATEGIES), value=s.strategy,
                                   description="strategy", style=wide)
        self.normalizer = W.Dropdown(options=list(NORMALIZERS), value=s.normalizer,
                                     description="normalizer", style=wide)
        self.min_rows = W.BoundedIntText(value=s.min_rows, min=0, max=10**9,
                                         description="min rows", style=wide,
                                         layout=W.Layout(width="220px"))
        self.max_rows = W.BoundedIntText(value=0, min=0, max=10**9, description="max rows (0=∞)",
                                         style=wide, layout=W.Layout(width="220px"))
        self.per_head = W.Checkbox(value=False, description="rows per head", indent=False,
                                   tooltip="an equal number of rows in every attention head",
                                   disabled=not report.head_dims)
        self.couple = W.Checkbox(value=False, description="whole neurons", indent=False,
                                 tooltip="MLP rows + the matching down-projection columns")
        self.head_aligned = W.Checkbox(value=False, description="whole heads", indent=False,
                                       disabled=not report.head_dims)
        self.batch_size = W.BoundedIntText(value=s.batch_size, min=1, max=10**6,
                                           description="batch", style=wide,
                                           layout=W.Layout(width="200px"))
        self.seq_len = W.BoundedIntText(value=s.seq_len, min=1, max=10**7, description="seq len",
                                        style=wide, layout=W.Layout(width="200px"))
        self.type_sliders = {t: W.FloatSlider(value=st.type_percent(t), min=0.0, max=100.0,
                                              step=0.5, description=t, readout_format=".1f",
                                              continuous_update=True,
                                              style={"description_width": "170px"},
                                              layout=W.Layout(width="440px"))
                             for t in st.types}
        self.readout = W.HTML().add_class("rowsft-budget-readout")
        self.trainable = W.Label().add_class("rowsft-trainable")
        self.message = W.HTML()
        self.path = W.Text(value=plan_path, description="plan file", style=wide)
        self.export_button = W.Button(description="Export plan JSON", icon="download")
        self.export_button.on_click(lambda _b: self.export())

        methods = list(st.readout.memory)
        components = list(next(iter(st.readout.memory.values())))
        self.memory = figure_widget(
            data=[go.Bar(name=c, x=[METHOD_LABELS.get(m, m) for m in methods]) for c in components],
            layout=dict(barmode="stack", height=300, width=520,
                        margin=dict(l=60, r=10, t=40, b=40), title="estimated training memory"))
        self.coverage = figure_widget(
            data=[go.Bar(x=[layer_label(k) for k in st.layers], marker_color="seagreen")],
            layout=dict(height=300, width=420, margin=dict(l=50, r=10, t=40, b=60),
                        title="importance covered per layer", yaxis=dict(title="%", range=[0, 100])))
        self._methods, self._components = methods, components

        st_set = {self.percent: st.set_percent, self.unit: st.set_unit,
                  self.strategy: st.set_strategy, self.normalizer: st.set_normalizer,
                  self.min_rows: st.set_min_rows, self.max_rows: st.set_max_rows,
                  self.head_aligned: st.set_head_aligned, self.per_head: st.set_per_head,
                  self.couple: st.set_couple,
                  self.batch_size: lambda v: st.set_memory_shape(v, st.settings.seq_len),
                  self.seq_len: lambda v: st.set_memory_shape(st.settings.batch_size, v)}
        for w, setter in st_set.items():
            self._bind(w, setter)
        for t, w in self.type_sliders.items():
            self._bind(w, lambda v, t=t: st.set_type_percent(t, v))

        types_box = W.VBox([W.HTML("<b>per module type</b> (strategy per-type)"),
                            *self.type_sliders.values()])
        left = W.VBox([self.percent, self.unit, self.strategy, self.normalizer,
                       W.HBox([self.min_rows, self.max_rows]),
                       W.HBox([self.head_aligned, self.per_head, self.couple]),
                       W.HBox([self.batch_size, self.seq_len])])
        self.widget = explorer_box([W.HBox([left, types_box]), self.trainable, self.readout,
                                    self.message,
                                    W.HBox([figure_box(self.memory), figure_box(self.coverage)]),
                                    W.HBox([self.path, self.export_button])]
                                   ).add_class("rowsft-budget")
        self.update_view()

    @property
    def plan(self) -> RowPlan:
        """The plan of the current settings."""
        return self.state.plan

    def export(self) -> None:
        if apply_or_message(lambda: self.state.export(self.path.value), self._show):
            self.message.value = f"wrote {self.path.value}"

    def _bind(self, widget, setter) -> None:
        def on_change(change):
            if self._syncing:
                return
            if apply_or_message(lambda: setter(change["new"]), self._show) and \
                    self.state.notice:
                self._show(self.state.notice, error=False)
            self.update_view()   # also puts a refused control back to the state's value
        widget.observe(on_change, names="value")

    _syncing = False

    def _show(self, text: str, error: bool = True) -> None:
        color = "#b00" if error else "#06c"
        self.message.value = f"<span style='color:{color}'>{text}</span>" if text else ""

    def _sync_controls(self) -> None:
        s = self.state.settings
        self._syncing = True
        try:
            values = {self.percent: self.state.display_percent, self.unit: s.unit,
                      self.strategy: s.strategy,
                      self.normalizer: s.normalizer, self.min_rows: s.min_rows,
                      self.max_rows: s.max_rows or 0, self.head_aligned: s.head_aligned,
                      self.per_head: s.per_head, self.couple: s.couple == "neurons",
                      self.batch_size: s.batch_size, self.seq_len: s.seq_len}
            values.update({w: self.state.type_percent(t) for t, w in self.type_sliders.items()})
            for w, v in values.items():
                if w.value != v:
                    w.value = v
            per_type = s.strategy == "per-type"
            for w in self.type_sliders.values():
                w.disabled = not per_type
            self.percent.disabled = self.state.percent_follows_plan
            self.percent.description = "rows %" if per_type else "budget %"
            self.percent.tooltip = ("per-type: the type sliders set the budget; this shows the "
                                    "plan's share of rows") if per_type else ""
            self.normalizer.disabled = s.strategy not in ("topk", "coverage")
        finally:
            self._syncing = False

    def update_view(self) -> None:
        """Push the state's readout into the controls, text and figures."""
        self._sync_controls()
        r = self.state.readout
        self.trainable.value = self.state.trainable_text()
        self.readout.value = (f"{self.state.summary_text(trainable=False)}<br>"
                              f"<i>{self.state.message}</i>")
        peak = max(sum(c.values()) for c in r.memory.values())
        unit, scale = next((u, b) for u, b in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10),
                                               ("bytes", 1)) if peak >= b or b == 1)
        with self.memory.batch_update():
            self.memory.layout.yaxis.title = unit
            for trace, comp in zip(self.memory.data, self._components):
                trace.y = [r.memory[m][comp] / scale for m in self._methods]
                trace.hovertemplate = [f"{comp}: {human_bytes(r.memory[m][comp])}<extra></extra>"
                                       for m in self._methods]
        with self.coverage.batch_update():
            self.coverage.data[0].y = [100.0 * r.coverage[k] for k in self.state.layers]

    def _ipython_display_(self) -> None:
        from .static import display_explorer

        display_explorer(self.widget)  # live widget + static PNG for readers who do not run it
