"""How fast the explorers answer a control change at Llama-2-7B shapes.

A budget slider move must update the plan, every readout and both figures within 100 ms.
Measured here on ``testing.llama2_7b_report()`` (224 modules, 1.36 M rows): the full
handler path (set the slider widget's value -> state update -> figure update), and the
state update alone, median over distinct values (no plan-cache hits), per strategy.

Usage::

    .venv/bin/python benchmarks/bench_widgets.py            # writes ./rowsft-bench-results/widgets.json
    .venv/bin/python benchmarks/bench_widgets.py --moves 10
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from rowsft_nb._io import write_json
from rowsft_nb.testing import llama2_7b_report
from rowsft_nb.widgets import BudgetExplorer, ImportanceExplorer

TARGET_MS = 100.0
RESULTS = Path("rowsft-bench-results") / "widgets.json"  # under the current directory


def _median_ms(times: list[float]) -> float:
    return round(1000 * statistics.median(times), 2)


def bench_budget(report, moves: int) -> dict:
    ex = BudgetExplorer(report)
    out = {}
    # (strategy, unit, the widget that moves); per-type moves one type slider.
    cases = [("uniform", "rows", ex.percent), ("topk", "params", ex.percent),
             ("coverage", "params", ex.percent),
             ("per-type", "rows", ex.type_sliders["mlp.up_proj"])]
    for strategy, unit, widget in cases:
        if ex.state.settings.strategy != "uniform":
            ex.strategy.value = "uniform"
        ex.unit.value = unit
        ex.strategy.value = strategy
        assert ex.state.settings.strategy == strategy, ex.message.value
        widget.value = 1.0                    # warm: first sort of a new order is cached
        full, state_only, figure = [], [], []
        for i in range(moves):
            v = 2.0 + 0.7 * i                 # distinct values: no plan-cache hits
            t0 = time.perf_counter()
            widget.value = v                  # the whole handler: state + readouts + figures
            full.append(time.perf_counter() - t0)
            assert ex.message.value == "", ex.message.value
        for i in range(moves):                # the same two parts timed separately
            v = 2.35 + 0.7 * i
            t0 = time.perf_counter()
            if strategy == "per-type":
                ex.state.set_type_percent("mlp.up_proj", v)
            else:
                ex.state.set_percent(v)
            t1 = time.perf_counter()
            ex.update_view()
            figure.append(time.perf_counter() - t1)
            state_only.append(t1 - t0)
        out[strategy] = {"slider_move_ms_median": _median_ms(full),
                         "slider_move_ms_max": round(1000 * max(full), 2),
                         "state_update_ms_median": _median_ms(state_only),
                         "figure_update_ms_median": _median_ms(figure),
                         "moves": moves,
                         "within_target": _median_ms(full) <= TARGET_MS}
    return out


def bench_importance(report, repeats: int) -> dict:
    t0 = time.perf_counter()
    ex = ImportanceExplorer(report)
    build = time.perf_counter() - t0
    times = {}
    for name, change in (("log_scale", lambda i: setattr(ex.log_scale, "value", i % 2 == 0)),
                         ("order", lambda i: setattr(ex.order, "value",
                                                     "sorted" if i % 2 == 0 else "index")),
                         ("types", lambda i: setattr(ex.types, "value",
                                                     tuple(ex.state.available_types()[: 2 + i % 5])))):
        ts = []
        for i in range(repeats):
            t0 = time.perf_counter()
            change(i)
            ts.append(time.perf_counter() - t0)
        times[f"{name}_ms_median"] = _median_ms(ts)
    ts = []
    for i in range(repeats):
        t0 = time.perf_counter()
        ex.state.select_cell(i % 32, (7 * i) % 36)
        ex._draw_profile()
        ts.append(time.perf_counter() - t0)
    times["drill_down_ms_median"] = _median_ms(ts)
    t0 = time.perf_counter()
    ex.normalization.value = "rank"           # first rank normalization of 1.36 M scores
    times["first_rank_normalization_ms"] = round(1000 * (time.perf_counter() - t0), 1)
    return {"build_s": round(build, 2), "heatmap_shape": list(ex.state.heatmap().z.shape), **times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--moves", type=int, default=15)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(2)
    report = llama2_7b_report()
    result = {
        "what": "explorer response time at Llama-2-7B shapes (llama2_7b_report: 224 modules, "
                "1.36 M rows); slider_move = setting the widget value runs the whole handler "
                "(state + readouts + figures), no browser attached",
        "target_ms": TARGET_MS,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "budget_explorer": bench_budget(report, args.moves),
        "importance_explorer": bench_importance(report, max(5, args.moves // 2)),
    }
    write_json(args.out, result)
    for k, v in result["budget_explorer"].items():
        print(f"budget {k:9s}: slider move {v['slider_move_ms_median']:7.2f} ms median "
              f"(state {v['state_update_ms_median']:.2f}, figures {v['figure_update_ms_median']:.2f})")
    print("importance:", result["importance_explorer"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
