"""How fast does select() re-plan under a new budget at Llama-2-7B shapes? (goal: <= 50 ms)

Run: ``.venv/bin/python benchmarks/bench_selection.py [--repeats 21] [--out PATH]``
Writes ``./rowsft-bench-results/selection.json`` (``--out``) and prints a table. One CPU thread.

Measured per strategy: ``cold`` = first call on a fresh report (sorts every module and the
global order), ``warm`` = median of calls with a new budget each time on the same report
(what a slider move costs), ``plan_check`` = trainable parameters vs the budget.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

from rowsft_nb._io import write_json
from rowsft_nb.selection import FixedRows, ParamBudget, Ratio, TypeRatios, select
from rowsft_nb.testing import llama2_7b_report

GOAL_MS = 50.0
RESULTS = Path("rowsft-bench-results") / "selection.json"  # under the current directory


def _cases():
    """(label, budget for step i, select() options)."""
    frac = lambda i: 0.002 + 0.0007 * i  # noqa: E731 - a new budget every call
    return [
        ("topk/rank", lambda i: ParamBudget(frac(i), "topk", "rank"), {}),
        ("topk/mean", lambda i: ParamBudget(frac(i), "topk", "mean"), {}),
        ("coverage", lambda i: ParamBudget(frac(i), "coverage"), {}),
        ("topk/rank multiple_of=8", lambda i: ParamBudget(frac(i)), {"multiple_of": 8}),
        ("topk/rank head_aligned", lambda i: ParamBudget(frac(i)), {"head_aligned": True}),
        ("topk/rank min_rows=8 max_rows=512", lambda i: ParamBudget(frac(i)),
         {"min_rows": 8, "max_rows": 512}),
        ("topk/rank exclude down_proj", lambda i: ParamBudget(frac(i)),
         {"exclude": ["down_proj"]}),
        ("topk/rank 20% budget", lambda i: ParamBudget(0.2 + 0.001 * i), {}),
        ("fixed_rows", lambda i: FixedRows(32 + i), {}),
        ("ratio", lambda i: Ratio(0.005 + 0.001 * i), {}),
        ("type_ratios", lambda i: TypeRatios({"q_proj": 0.01 + 0.001 * i, "v_proj": 0.02}), {}),
    ]


def run(repeats: int = 21) -> dict:
    """Time every case; return the results dict (also what the JSON holds)."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    report = llama2_7b_report()
    build_s = time.perf_counter() - t0
    rows = []
    for label, budget_at, opts in _cases():
        fresh = llama2_7b_report()  # a new report object: nothing cached yet
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            select(fresh, budget_at(0), **opts)
            cold = time.perf_counter() - t0
            times, plan = [], None
            for i in range(1, repeats + 1):
                t0 = time.perf_counter()
                plan = select(fresh, budget_at(i), **opts)
                times.append(time.perf_counter() - t0)
        limit = plan.meta.get("budget_params")
        rows.append({"case": label, "cold_ms": cold * 1e3,
                     "warm_median_ms": statistics.median(times) * 1e3,
                     "warm_max_ms": max(times) * 1e3, "rows_selected": plan.num_rows(),
                     "trainable_parameters": plan.trainable_parameters(),
                     "budget_params": limit,
                     "under_budget_by": None if limit is None else
                     limit - plan.trainable_parameters()})
    del report
    return {"benchmark": "selection", "goal": f"warm select() <= {GOAL_MS} ms on 1 CPU thread",
            "report": {"shapes": "Llama-2-7B (32 layers, q/k/v/o 4096x4096, gate/up "
                                 "11008x4096, down 4096x11008)",
                       "rows": sum(s[0] for s in llama2_7b_report().shapes.values()),
                       "build_s": build_s},
            "repeats": repeats, "threads": torch.get_num_threads(),
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpu_count": os.cpu_count(), "python": platform.python_version(),
                        "torch": torch.__version__,
                        "load_average_1m": os.getloadavg()[0]},  # shared machine: contention
            "results": rows,
            "all_warm_within_goal": all(r["warm_median_ms"] <= GOAL_MS for r in rows)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    res = run(args.repeats)
    write_json(args.out, res)
    print(f"report: {res['report']['rows']:,} rows, built in {res['report']['build_s']:.3f} s; "
          f"{res['threads']} thread, {res['repeats']} repeats")
    print(f"{'case':38s} {'cold ms':>9s} {'warm ms':>9s} {'max ms':>8s} {'rows':>9s} "
          f"{'under budget':>12s}")
    for r in res["results"]:
        under = "" if r["under_budget_by"] is None else f"{r['under_budget_by']:,}"
        print(f"{r['case']:38s} {r['cold_ms']:9.1f} {r['warm_median_ms']:9.1f} "
              f"{r['warm_max_ms']:8.1f} {r['rows_selected']:9,} {under:>12s}")
    print(f"goal (warm <= {GOAL_MS} ms): {'met' if res['all_warm_within_goal'] else 'NOT met'}"
          f"; wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
