"""Training launcher: pick lr, steps/epochs, batch size and device, press Launch, watch the
loss and evaluation curves live, press Stop at any time, save the adapter.

Training runs in a background thread (``threading.Thread``) so the kernel keeps serving
widget events; a :class:`rowsft_nb.train.TrainingObserver` streams logs into
:class:`LaunchState` and asks the loop to stop. All rules live in :class:`LaunchState`;
:class:`TrainingLauncher` is the view.

Usage::

    from rowsft_nb.widgets import TrainingLauncher
    launcher = TrainingLauncher(model, plan, data.train, eval_dataset=data.validation,
                                tokenizer=tokenizer)
    launcher                           # Launch ... Stop ... save
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from ..plan import RowPlan
from ._common import (apply_or_message, explorer_box, figure_box, figure_widget, human_bytes,
                      human_count)

MODES = ("steps", "epochs")
IDLE, RUNNING, STOPPING, FINISHED, STOPPED, FAILED = (
    "idle", "running", "stopping", "finished", "stopped", "failed")


class EvalPoint(NamedTuple):
    """One evaluation: ``phase`` is ``before`` (step 0), ``during`` (every ``eval_every``
    steps) or ``after`` (the final evaluation, after the last step or Stop)."""

    step: int
    metrics: dict[str, float]
    phase: str


@dataclass
class ChartData:
    """What the launcher's chart draws: the loss, the evaluations on a second axis."""

    loss_steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    eval_key: str | None = None             # "accuracy" or "loss"; None before any evaluation
    eval_steps: list[int] = field(default_factory=list)
    eval_values: list[float] = field(default_factory=list)
    eval_phases: list[str] = field(default_factory=list)    # "before" / "during" / "after"
    eval_range: tuple[float, float] | None = None           # fixed [0, 1] for accuracy

    def phase_points(self, phase: str) -> tuple[list[int], list[float]]:
        """Steps and values of the evaluations of one phase (``before``/``during``/``after``)."""
        points = [(s, v) for s, v, p in zip(self.eval_steps, self.eval_values, self.eval_phases)
                  if p == phase]
        return [s for s, _ in points], [v for _, v in points]


def _same_rows(a: RowPlan, b: RowPlan) -> bool:
    if a.rows.keys() != b.rows.keys() or a.columns.keys() != b.columns.keys():
        return False
    return all(torch.equal(a.rows[k], b.rows[k]) for k in a.rows) and \
        all(torch.equal(a.columns[k], b.columns[k]) for k in a.columns)


class LaunchState:
    """Settings, the running thread and everything the run reported.

    Usage::

        state = LaunchState(model, plan, dataset, eval_dataset=eval_ds)   # plan: RowPlan or
                                                                          # a BudgetExplorer
        state.set_lr(1e-3); state.set_steps(200); state.set_eval_every(50)
        state.launch_problem()          # None, or why Launch is disabled
        state.launch(); ...; state.stop(); state.wait()
        state.loss_points               # [(step, loss), ...] as they arrived
        state.eval_points               # [EvalPoint(step, metrics, phase), ...]
        state.save("out/adapter")
    """

    def __init__(self, model: nn.Module, plan, dataset, *, eval_dataset=None,
                 tokenizer=None, task: str | None = None, lr: float = 1e-4, steps: int = 100,
                 epochs: float = 1.0, mode: str = "steps", batch_size: int = 8,
                 device: str | None = None, logging_steps: int = 1,
                 eval_every: int | None = None,
                 devices: list[tuple[str, str]] | None = None,
                 train_kwargs: dict[str, Any] | None = None) -> None:
        from ..train import list_devices

        self.status = IDLE    # first: every setter below checks it
        self.model = model
        self._plan: RowPlan | None = None
        self._plan_source = None
        self.set_plan(plan)
        self.dataset = dataset
        self.eval_dataset = eval_dataset
        self.tokenizer = tokenizer
        self.task = task
        self.train_kwargs = dict(train_kwargs or {})
        self.devices: list[tuple[str, str]] = list(devices) if devices is not None else list_devices()
        self.lr = self.steps = self.epochs = self.batch_size = None  # set below, validated
        self.set_lr(lr)
        self.set_steps(steps)
        self.set_epochs(epochs)
        self.set_mode(mode)
        self.set_batch_size(batch_size)
        if logging_steps < 1:
            raise ValueError(f"logging_steps must be >= 1, got {logging_steps}")
        self.logging_steps = int(logging_steps)
        self.eval_every: int | None = None
        self.set_eval_every(eval_every)
        # An unknown device is kept (and Launch refused) so a notebook written on a GPU box
        # still opens on a laptop and says why it cannot launch.
        self.device = device if device is not None else self.devices[0][0]
        self.error: str | None = None
        self.total_steps: int | None = None
        self.step = 0
        self.loss_points: list[tuple[int, float]] = []
        self.eval_points: list[EvalPoint] = []
        self.result = None
        self.stopped_by_user = False
        self.started_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._listeners: list[Callable[[str], None]] = []

    # ------------------------------------------------------------------ settings
    def _require_idle(self, what: str) -> None:
        if self.running:
            raise ValueError(f"Cannot change {what} while training runs; press Stop first")

    def set_lr(self, lr: float) -> None:
        lr = float(lr)
        if not (math.isfinite(lr) and 0.0 < lr < 1.0):
            raise ValueError(f"Learning rate must be in (0, 1), got {lr}; 1e-4 is a usual start")
        if self.lr is not None:
            self._require_idle("the learning rate")
        self.lr = lr

    def set_steps(self, steps: int) -> None:
        if int(steps) != steps or int(steps) < 1:
            raise ValueError(f"Steps must be a whole number >= 1, got {steps}")
        if self.steps is not None:
            self._require_idle("the number of steps")
        self.steps = int(steps)

    def set_epochs(self, epochs: float) -> None:
        epochs = float(epochs)
        if not (math.isfinite(epochs) and epochs > 0):
            raise ValueError(f"Epochs must be > 0, got {epochs}")
        if self.epochs is not None:
            self._require_idle("the number of epochs")
        self.epochs = epochs

    def set_mode(self, mode: str) -> None:
        """``steps``: stop after ``steps`` optimizer steps; ``epochs``: after ``epochs`` passes."""
        if mode not in MODES:
            raise ValueError(f"Unknown mode {mode!r}; choose one of {MODES}")
        if hasattr(self, "mode"):
            self._require_idle("steps/epochs")
        self.mode = mode

    def set_batch_size(self, batch_size: int) -> None:
        if int(batch_size) != batch_size or int(batch_size) < 1:
            raise ValueError(f"Batch size must be a whole number >= 1, got {batch_size}")
        if self.batch_size is not None:
            self._require_idle("the batch size")
        self.batch_size = int(batch_size)

    def set_eval_every(self, steps: int | None) -> None:
        """Evaluate every ``steps`` optimizer steps as well as before and after (None or 0:
        before and after only)."""
        steps = None if not steps else steps
        if steps is not None:
            if int(steps) != steps or int(steps) < 1:
                raise ValueError(f"eval_every must be a whole number of steps >= 1 (or 0 "
                                 f"for before/after only), got {steps}")
            if self.eval_dataset is None:
                raise ValueError("eval_every needs an eval_dataset: pass "
                                 "eval_dataset=... to the launcher")
        self._require_idle("the evaluation interval")
        self.eval_every = None if steps is None else int(steps)

    def set_device(self, device: str) -> None:
        self._require_idle("the device")
        if device not in self.device_ids:
            raise ValueError(f"Device {device!r} is not available here; choose one of "
                             f"{self.device_ids}")
        self.device = device

    def set_plan(self, plan) -> None:
        """The plan to train: a RowPlan, or a ``BudgetExplorer``/``BudgetState`` whose
        current ``.plan`` is read at every Launch (so moving its sliders is enough)."""
        self._require_idle("the plan")
        if plan is None or isinstance(plan, RowPlan):
            self._plan, self._plan_source = plan, None
        elif isinstance(getattr(plan, "plan", None), RowPlan):
            self._plan, self._plan_source = None, plan
        else:
            raise ValueError(f"plan must be a RowPlan or a BudgetExplorer, got "
                             f"{type(plan).__name__}; make one with rowsft_nb.select(report, budget)")

    @property
    def plan(self) -> RowPlan | None:
        return self._plan_source.plan if self._plan_source is not None else self._plan

    @property
    def device_ids(self) -> list[str]:
        return [d for d, _ in self.devices]

    # ------------------------------------------------------------------ launching
    @property
    def running(self) -> bool:
        """True from launch() until the run has ended (finished, stopped or failed)."""
        return self.status in (RUNNING, STOPPING)

    def launch_problem(self) -> str | None:
        """Why Launch is refused right now, or None when it may start."""
        from ..adapter import adapter_state

        if self.running:
            return "A run is in progress; press Stop to end it"
        if self.plan is None or self.plan.is_empty():
            return "The plan selects no rows: raise the budget (BudgetExplorer) first"
        if self.device not in self.device_ids:
            return (f"Device {self.device!r} is missing on this machine; available: "
                    f"{', '.join(self.device_ids)}")
        if self.dataset is None or len(self.dataset) == 0:
            return "The training dataset is empty"
        existing = adapter_state(self.model)
        if existing is not None and not _same_rows(existing.plan, self.plan):
            return ("The model already carries an adapter for another plan: call "
                    "rowsft_nb.adapter.unload(model) (or merge_and_unload) before launching "
                    "this plan")
        return None

    def subscribe(self, listener: Callable[[str], None]) -> None:
        """``listener(event)`` is called (from the training thread) on ``begin``, ``log``,
        ``evaluate`` and ``end``."""
        self._listeners.append(listener)

    def _emit(self, event: str) -> None:
        for fn in list(self._listeners):
            try:
                fn(event)
            except Exception:  # a broken view must not kill the training run
                pass

    def launch(self) -> None:
        """Inject the plan (unless the model already carries it) and start training in a
        background thread. Raises ``ValueError`` with the reason when Launch is refused."""
        from ..adapter import adapter_state, inject

        problem = self.launch_problem()
        if problem:
            raise ValueError(problem)
        if self._thread is not None:
            self._thread.join()       # the previous run already ended; let its thread exit
        if adapter_state(self.model) is None:
            inject(self.model, self.plan)
        with self._lock:
            self._stop.clear()
            self.status, self.error, self.result = RUNNING, None, None
            self.step, self.total_steps = 0, None
            self.loss_points, self.eval_points = [], []
            self.stopped_by_user = False
            self.started_at = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="rowsft-train", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from ..train import TrainingObserver, train

        state = self

        class Observer(TrainingObserver):
            began = False

            def on_begin(self, total_steps: int) -> None:
                self.began = True
                state.total_steps = int(total_steps)
                state._emit("begin")

            def on_log(self, step: int, logs: dict[str, float]) -> None:
                with state._lock:
                    state.step = int(step)
                    if "loss" in logs:
                        state.loss_points.append((int(step), float(logs["loss"])))
                state._emit("log")

            def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
                # "after" is known only when train() returns: see _mark_final_evaluation
                phase = "during" if self.began else "before"
                with state._lock:
                    state.eval_points.append(EvalPoint(int(step), dict(metrics), phase))
                state._emit("evaluate")

            def should_stop(self) -> bool:
                return state._stop.is_set()

        kwargs: dict[str, Any] = dict(
            eval_dataset=self.eval_dataset, tokenizer=self.tokenizer, task=self.task,
            lr=self.lr, batch_size=self.batch_size, device=self.device.split(":")[0],
            observer=Observer(), logging_steps=self.logging_steps, progress_bar=False)
        if self.mode == "steps":
            kwargs["max_steps"] = self.steps
        else:
            kwargs["epochs"] = self.epochs
        if self.eval_every and self.eval_dataset is not None:
            kwargs["eval_steps"] = self.eval_every
        kwargs.update(self.train_kwargs)
        try:
            result = train(self.model, self.dataset, **kwargs)
            with self._lock:
                if result.metrics_after:
                    self._mark_final_evaluation()
                self.stopped_by_user = result.stopped_early and self._stop.is_set()
                self.result = result
                self.step = result.steps
                self.status = STOPPED if result.stopped_early else FINISHED
        except Exception as err:  # shown in the view; the thread must not die silently
            with self._lock:
                self.status, self.error = FAILED, f"{type(err).__name__}: {err}"
        self._emit("end")

    def _mark_final_evaluation(self) -> None:
        """The last evaluation of a run is the one after training; an evaluation at the same
        step just before it (``eval_every`` divides the steps) is the same point: drop it."""
        if not self.eval_points:
            return
        last = self.eval_points.pop()
        if self.eval_points and self.eval_points[-1].phase == "during" and \
                self.eval_points[-1].step == last.step:
            self.eval_points.pop()
        self.eval_points.append(last._replace(phase="after"))

    def stop(self) -> None:
        """Ask the run to stop after the current optimizer step (returns at once)."""
        if not self.running:
            raise ValueError("Nothing to stop: no run is in progress")
        self.status = STOPPING
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run ends (tests, scripts); True when it ended."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    # ------------------------------------------------------------------ results
    @property
    def progress(self) -> float:
        """Fraction of planned steps done, in [0, 1]."""
        if self.status in (FINISHED,):
            return 1.0
        if not self.total_steps:
            return 0.0
        return min(1.0, self.step / self.total_steps)

    def summary(self) -> dict[str, Any] | None:
        """Metric before/after, steps, seconds, peak memory of the last run."""
        r = self.result
        if r is None:
            return None
        key = "accuracy" if "accuracy" in r.metrics_after else "loss"
        reason = f"stopped by you at step {r.steps}" if self.stopped_by_user else r.stop_reason
        return {"metric": key, "before": r.metrics_before.get(key),
                "after": r.metrics_after.get(key), "steps": r.steps, "seconds": r.seconds,
                "peak_memory_bytes": r.peak_memory_bytes, "peak_memory_kind": r.peak_memory_kind,
                "stop_reason": reason, "trainable_parameters": r.trainable_parameters}

    def chart(self) -> ChartData:
        """The loss points and the evaluations (before / every ``eval_every`` / after) as
        the chart draws them; the evaluation axis is fixed to [0, 1] for accuracy."""
        with self._lock:
            loss = list(self.loss_points)
            evals = list(self.eval_points)
        data = ChartData(loss_steps=[s for s, _ in loss], loss=[v for _, v in loss])
        if not evals:
            return data
        key = "accuracy" if "accuracy" in evals[-1].metrics else "loss"
        points = [p for p in evals if key in p.metrics]
        data.eval_key = key
        data.eval_steps = [p.step for p in points]
        data.eval_values = [float(p.metrics[key]) for p in points]
        data.eval_phases = [p.phase for p in points]
        data.eval_range = (0.0, 1.0) if key == "accuracy" else None
        return data

    def summary_text(self) -> str:
        if self.status == FAILED:
            return f"training failed: {self.error}"
        s = self.summary()
        if s is None:
            return ""
        text = f"{s['steps']} steps in {s['seconds']:.1f} s"
        if s["before"] is not None and s["after"] is not None:
            text += f" · {s['metric']} {s['before']:.4g} → {s['after']:.4g}"
        if s["peak_memory_bytes"]:
            kind = " (process peak RSS)" if s["peak_memory_kind"] == "process_peak_rss" else ""
            text += f" · peak memory {human_bytes(s['peak_memory_bytes'])}{kind}"
        text += f" · {human_count(s['trainable_parameters'])} trainable"
        if s["stop_reason"]:
            text += f" · {s['stop_reason']}"
        return text

    def save_problem(self) -> str | None:
        from ..adapter import adapter_state

        if self.running:
            return "Training is still running; stop it or wait for the end before saving"
        if adapter_state(self.model) is None or self.result is None:
            return "Nothing trained yet: launch a run first"
        return None

    def save(self, directory: str) -> str:
        """``save_adapter(model, directory)`` after a finished or stopped run."""
        from ..adapter import save_adapter

        problem = self.save_problem()
        if problem:
            raise ValueError(problem)
        if not str(directory).strip():
            raise ValueError("Give a folder for the adapter, e.g. out/adapter")
        return str(save_adapter(self.model, directory))


class TrainingLauncher:
    """Controls, progress and live curves over :class:`LaunchState`.

    Usage: ``TrainingLauncher(model, plan, dataset, eval_dataset=..., tokenizer=...)``.
    """

    def __init__(self, model: nn.Module, plan, dataset, *,
                 adapter_dir: str = "adapter", **state_kwargs: Any) -> None:
        import ipywidgets as W
        import plotly.graph_objects as go

        self.state = LaunchState(model, plan, dataset, **state_kwargs)
        self._view_lock = threading.RLock()
        st = self.state
        wide = {"description_width": "90px"}
        self.lr = W.FloatLogSlider(value=st.lr, base=10, min=-6, max=-1, step=0.1,
                                   description="lr", readout_format=".1e", style=wide)
        self.mode = W.ToggleButtons(options=list(MODES), value=st.mode, description="length",
                                    style={**wide, "button_width": "70px"})
        self.steps = W.BoundedIntText(value=st.steps, min=1, max=10**9, description="steps",
                                      style=wide, layout=W.Layout(width="200px"))
        self.epochs = W.BoundedFloatText(value=st.epochs, min=0.01, max=1000, step=0.5,
                                         description="epochs", style=wide,
                                         layout=W.Layout(width="200px"))
        self.batch_size = W.BoundedIntText(value=st.batch_size, min=1, max=10**6,
                                           description="batch size", style=wide,
                                           layout=W.Layout(width="200px"))
        self.eval_every = W.BoundedIntText(
            value=st.eval_every or 0, min=0, max=10**9, description="eval every",
            style=wide, layout=W.Layout(width="200px"),
            tooltip="evaluate every N steps as well as before and after (0: before/after only)",
            disabled=st.eval_dataset is None)
        options = [(label, d) for d, label in st.devices]
        if st.device not in st.device_ids:
            options.append((f"{st.device} (missing)", st.device))
        self.device = W.Dropdown(options=options, value=st.device, description="device",
                                 style=wide, layout=W.Layout(width="420px"))
        self.launch_button = W.Button(description="Launch", button_style="success",
                                      icon="play").add_class("rowsft-launch")
        self.stop_button = W.Button(description="Stop", button_style="danger", icon="stop",
                                    disabled=True).add_class("rowsft-stop")
        self.reason = W.HTML().add_class("rowsft-launch-reason")
        self.progress = W.FloatProgress(value=0.0, min=0.0, max=1.0, description="progress",
                                        style=wide)
        self.status = W.Label().add_class("rowsft-status")
        self.summary = W.HTML().add_class("rowsft-summary")
        self.path = W.Text(value=adapter_dir, description="adapter dir", style=wide)
        self.save_button = W.Button(description="Save adapter", icon="save", disabled=True)
        self.curves = figure_widget(
            data=[go.Scatter(mode="lines+markers", name="train loss", marker=dict(size=4)),
                  go.Scatter(mode="lines+markers", name="eval", yaxis="y2",
                             line=dict(color="darkorange", dash="dot"),
                             marker=dict(size=6, color="darkorange")),
                  # the evaluations before and after training, marked and named in the legend
                  go.Scatter(mode="markers", name="before training", yaxis="y2",
                             marker=dict(size=12, color="darkorange", symbol="circle-open",
                                         line=dict(width=2))),
                  go.Scatter(mode="markers", name="after training", yaxis="y2",
                             marker=dict(size=12, color="firebrick", symbol="diamond"))],
            # legend above the plot area, clear of both axes' tick labels
            layout=dict(height=340, margin=dict(l=60, r=70, t=70, b=40), title="training",
                        xaxis_title="step", yaxis_title="train loss",
                        legend=dict(orientation="h", x=1, xanchor="right", y=1.02,
                                    yanchor="bottom"),
                        # own ticks (not synced to the loss axis's grid): 0, 0.2, ..., 1
                        yaxis2=dict(title="eval", overlaying="y", side="right", visible=False,
                                    showgrid=False, tickmode="auto")))

        setters = {self.lr: st.set_lr, self.mode: st.set_mode, self.steps: st.set_steps,
                   self.epochs: st.set_epochs, self.batch_size: st.set_batch_size,
                   self.device: st.set_device, self.eval_every: st.set_eval_every}
        for w, setter in setters.items():
            w.observe(lambda ch, setter=setter: self._on_control(setter, ch["new"]), names="value")
        self.launch_button.on_click(lambda _b: self._act(st.launch))
        self.stop_button.on_click(lambda _b: self._act(st.stop))
        self.save_button.on_click(lambda _b: self._save())
        st.subscribe(self._on_event)
        self.widget = explorer_box([
            W.HBox([W.VBox([self.lr, self.mode, W.HBox([self.steps, self.epochs]),
                            W.HBox([self.batch_size, self.eval_every]), self.device]),
                    W.VBox([W.HBox([self.launch_button, self.stop_button]), self.reason,
                            self.progress, self.status])]),
            figure_box(self.curves), self.summary, W.HBox([self.path, self.save_button])]
        ).add_class("rowsft-launcher")
        self.update_view()

    def _on_control(self, setter, value) -> None:
        apply_or_message(lambda: setter(value), self._show)
        self.update_view()

    def _act(self, action) -> None:
        apply_or_message(action, self._show)
        self.update_view()

    def _save(self) -> None:
        if apply_or_message(lambda: self.state.save(self.path.value), self._show):
            self._show(f"saved the adapter to {self.path.value}", error=False)

    def _show(self, text: str, error: bool = True) -> None:
        color = "#b00" if error else "#060"
        self.reason.value = f"<span style='color:{color}'>{text}</span>" if text else ""

    # Redraw live curves at most this often: a tiny model logs hundreds of steps a second
    # and every redraw sends the whole series to the browser.
    min_redraw_s = 0.25
    _problem_shown: str | None = None
    _last_redraw = 0.0

    def _on_event(self, event: str) -> None:
        now = time.perf_counter()
        if event == "log" and now - self._last_redraw < self.min_redraw_s:
            return
        self._last_redraw = now
        self.update_view(curves=event in ("log", "evaluate", "end"))

    def update_view(self, curves: bool = True) -> None:
        """Push the state into the buttons, progress bar, text and curves. Called from the
        kernel's thread (buttons) and the training thread (logs): one at a time, or two
        interleaved plotly batch updates lose edits (unlabelled traces, axis ranges)."""
        with self._view_lock:
            self._update_view(curves)

    def _update_view(self, curves: bool) -> None:
        st = self.state
        problem = st.launch_problem()
        running = st.running
        self.launch_button.disabled = problem is not None
        self.launch_button.tooltip = problem or "start training"
        self.stop_button.disabled = not running or st.status == STOPPING
        for w in (self.lr, self.mode, self.steps, self.epochs, self.batch_size, self.device):
            w.disabled = running
        self.eval_every.disabled = running or st.eval_dataset is None
        self.steps.layout.display = "" if st.mode == "steps" else "none"
        self.epochs.layout.display = "" if st.mode == "epochs" else "none"
        # The reason Launch is disabled stays visible; it goes away once the problem does.
        if problem and not running:
            self._show(problem)
            self._problem_shown = problem
        elif self._problem_shown is not None:
            if self._problem_shown in self.reason.value:
                self._show("")
            self._problem_shown = None
        self.progress.value = st.progress
        total = f"/{st.total_steps}" if st.total_steps else ""
        self.status.value = f"{st.status}: step {st.step}{total}"
        self.save_button.disabled = st.save_problem() is not None
        self.summary.value = st.summary_text()
        if curves:
            self._draw_curves()

    def _draw_curves(self) -> None:
        c = self.state.chart()
        name = f"eval {c.eval_key}" if c.eval_key else "eval"
        with self.curves.batch_update():
            self.curves.data[0].name = "train loss"
            self.curves.data[0].x = c.loss_steps
            self.curves.data[0].y = c.loss
            ev = self.curves.data[1]
            ev.x, ev.y, ev.name = c.eval_steps, c.eval_values, name
            ev.hovertemplate = f"{name} at step %{{x}}: %{{y:.4g}}<extra></extra>"
            for trace, phase in zip(self.curves.data[2:], ("before", "after")):
                xs, ys = c.phase_points(phase)
                trace.x, trace.y, trace.showlegend = xs, ys, bool(xs)
                trace.hovertemplate = (f"{name} {phase} training (step %{{x}}): "
                                       "%{y:.4g}<extra></extra>")
            ax = self.curves.layout.yaxis2
            ax.visible = c.eval_key is not None
            ax.title = name
            if c.eval_range is not None:
                ax.range, ax.autorange = list(c.eval_range), False
            else:
                ax.range, ax.autorange = None, True

    def _ipython_display_(self) -> None:
        from .static import display_explorer

        display_explorer(self.widget)  # live widget + static PNG for readers who do not run it
