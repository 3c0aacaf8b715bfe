"""Step time that can be trusted on a shared machine: methods interleaved in rotating order,
many rounds, per-round ratios, and a check that rejects physically impossible results.

Sequential timing (all steps of method A, then all of B) lets a change in machine load
land on one method only; under load it reported adapter steps *faster* than the frozen
model, which is impossible. Here every method is built once and warmed up once, then each
round runs every method once, round ``k`` starting at method ``k mod M``
(:func:`round_robin_order`), so each method sees each position and the same load. Per
round the ratio ``t_method / t_reference`` cancels the load both saw; the reported figure
is the median of those per-round ratios over all rounds, with their interquartile range
and a distribution-free confidence interval for the median (order statistics of a
binomial(n, 1/2), :func:`median_ci_ranks`). Wall time (``time.perf_counter``, CUDA
synchronised) and CPU time of this process (``time.process_time``) are both recorded, with
the involuntary context switches per step (``resource``: how often the OS preempted us).

The frozen floor (forward + backward through the frozen model) is a lower bound on every
training step of the benchmark's methods: they do the same forward and backward plus
their own gradients and optimizer step (their plans put trainable weights in the first
layer, so their backward reaches as deep as the floor's). A method whose ratio to the
floor is below 1 with the whole confidence interval below 1 is therefore
``"rejected: impossible, machine too noisy"`` (:func:`impossible`), and its ratios are not
reported.

Usage::

    samples = time_interleaved({"floor": floor_step, "rowsft": row_step}, rounds=100)
    summary = summarize_times(samples, floor="floor", lora=None)
    summary["methods"]["rowsft"]["step_ratio_floor"]     # None when rejected
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

__all__ = ["IMPOSSIBLE", "round_robin_order", "time_interleaved", "median_ci_ranks",
           "ratio_stats", "impossible", "summarize_times", "time_methods", "step_time",
           "machine_info"]

IMPOSSIBLE = "rejected: impossible, machine too noisy"


def round_robin_order(methods: Sequence[str], rounds: int) -> list[list[str]]:
    """The order of every round: round ``k`` runs all methods once, starting at method
    ``k mod M`` and wrapping around.

    >>> round_robin_order(["a", "b", "c"], 4)
    [['a', 'b', 'c'], ['b', 'c', 'a'], ['c', 'a', 'b'], ['a', 'b', 'c']]
    """
    names = list(methods)
    if not names:
        raise ValueError("round_robin_order needs at least one method")
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be distinct, got {names}")
    if int(rounds) < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    m = len(names)
    return [[names[(k + i) % m] for i in range(m)] for k in range(int(rounds))]


def _involuntary_switches() -> int:
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw


def time_interleaved(steps: Mapping[str, Callable[[], Any]], rounds: int, *, warmup: int = 1,
                     sync: Callable[[], None] | None = None,
                     wall_clock: Callable[[], float] = time.perf_counter,
                     cpu_clock: Callable[[], float] = time.process_time
                     ) -> dict[str, dict[str, list[float]]]:
    """Run ``warmup`` steps of every method, then ``rounds`` rounds in rotating order
    (:func:`round_robin_order`); return ``{method: {"wall": [...], "cpu": [...],
    "switches": [...]}}`` with one entry per round (seconds, seconds, involuntary context
    switches). ``sync`` (e.g. ``torch.cuda.synchronize``) runs before and after each step.

    >>> samples = time_interleaved({"floor": floor_step, "rowsft": row_step}, rounds=100)
    """
    names = list(steps)
    order = round_robin_order(names, rounds)  # validates before any step runs
    if int(warmup) < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    sync = sync or (lambda: None)
    for _ in range(int(warmup)):
        for name in names:
            steps[name]()
    sync()
    out: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": [], "switches": []}
                                              for n in names}
    for round_order in order:
        for name in round_order:
            sync()
            s0, c0, t0 = _involuntary_switches(), cpu_clock(), wall_clock()
            steps[name]()
            sync()
            t1, c1, s1 = wall_clock(), cpu_clock(), _involuntary_switches()
            out[name]["wall"].append(t1 - t0)
            out[name]["cpu"].append(c1 - c0)
            out[name]["switches"].append(s1 - s0)
    return out


def median_ci_ranks(n: int, level: float = 0.95) -> tuple[int, int, float]:
    """1-based ranks ``(lo, hi)`` of the order statistics that bound a distribution-free
    confidence interval for the median of ``n`` samples, and its exact coverage
    ``1 - 2 P(Binomial(n, 1/2) < lo)`` (>= ``level`` when ``n`` allows it; with too few
    samples the widest interval, ``(1, n)``, and its lower coverage).

    >>> median_ci_ranks(100)          # the textbook 40th and 61st of 100
    (40, 61, 0.9648...)
    """
    if n < 1:
        raise ValueError(f"need at least one sample, got {n}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    alpha = (1.0 - level) / 2.0
    cdf = 0.0  # P(X <= j - 1), X ~ Binomial(n, 1/2)
    j = 0
    while j + 1 <= (n + 1) // 2:
        nxt = cdf + math.comb(n, j) / 2 ** n  # P(X <= j)
        if nxt > alpha:
            break
        cdf, j = nxt, j + 1
    lo = max(j, 1)
    below = sum(math.comb(n, i) for i in range(lo)) / 2 ** n
    return lo, n + 1 - lo, 1.0 - 2.0 * below


def ratio_stats(values: Sequence[float], reference: Sequence[float], level: float = 0.95
                ) -> dict[str, float]:
    """Statistics of the per-round ratios ``values[k] / reference[k]``: median, quartiles
    (``q1``, ``q3``, inclusive linear interpolation like ``numpy.quantile``), a
    distribution-free confidence interval for the median (``ci_low``, ``ci_high``, exact
    coverage ``ci_level``) and the number of rounds ``n``.

    >>> ratio_stats([1.1, 1.2, 1.3], [1.0, 1.0, 1.0])["median"]
    1.2
    """
    if len(values) != len(reference):
        raise ValueError(f"per-round ratios need one reference time per round: "
                         f"{len(values)} vs {len(reference)}")
    if not values:
        raise ValueError("no rounds to compare")
    if any(r <= 0 for r in reference):
        raise ValueError("reference times must be positive")
    ratios = sorted(v / r for v, r in zip(values, reference))
    n = len(ratios)
    lo, hi, coverage = median_ci_ranks(n, level)
    return {**_quartiles(ratios),
            "ci_low": ratios[lo - 1], "ci_high": ratios[hi - 1], "ci_level": coverage, "n": n}


def impossible(vs_floor: Mapping[str, float], margin: float = 0.0) -> bool:
    """True when a training step is faster than the frozen floor beyond the noise: the
    whole confidence interval of its median ratio to the floor lies below ``1 - margin``.

    >>> impossible({"median": 0.85, "ci_low": 0.80, "ci_high": 0.90})
    True
    """
    return vs_floor["ci_high"] < 1.0 - margin


def _quartiles(xs: Sequence[float]) -> dict[str, float]:
    if len(xs) == 1:
        return {"median": xs[0], "q1": xs[0], "q3": xs[0]}
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2]}


def summarize_times(samples: Mapping[str, Mapping[str, Sequence[float]]], floor: str = "floor",
                    lora: str | None = "lora", level: float = 0.95, margin: float = 0.0
                    ) -> dict[str, Any]:
    """Per method: wall and CPU seconds per step (median, quartiles), the per-round ratio
    statistics against ``floor`` and ``lora`` (each for wall and CPU time), a ``verdict``
    (``"ok"`` or :data:`IMPOSSIBLE`, from either clock) and the headline figures
    ``step_ratio_floor`` / ``step_ratio_lora`` (wall-time medians; None when this method,
    or LoRA for the LoRA ratio, was rejected). ``rejected`` lists the rejected methods.

    >>> summary = summarize_times(time_interleaved(steps, rounds=100))
    """
    if floor not in samples:
        raise ValueError(f"the floor method {floor!r} was not timed; timed: {sorted(samples)}")
    if lora is not None and lora not in samples:
        lora = None

    def ratios(s: Mapping[str, Sequence[float]], ref: str) -> dict[str, Any]:
        # a clock too coarse to see a step (0 s) gives no ratio for that clock
        return {c: ratio_stats(s[c], samples[ref][c], level)
                if all(t > 0 for t in samples[ref][c]) else None for c in ("wall", "cpu")}

    methods: dict[str, Any] = {}
    for name, s in samples.items():
        entry: dict[str, Any] = {
            "rounds": len(s["wall"]),
            "wall_s": _quartiles(s["wall"]), "cpu_s": _quartiles(s["cpu"]),
            "involuntary_switches_per_step": (statistics.fmean(s["switches"])
                                              if s.get("switches") else None),
            "ratio_floor": ratios(s, floor),
        }
        if lora is not None:
            entry["ratio_lora"] = ratios(s, lora)
        bad = [c for c, r in entry["ratio_floor"].items()
               if name != floor and r is not None and impossible(r, margin)]
        entry["verdict"] = IMPOSSIBLE if bad else "ok"
        if bad:
            r = entry["ratio_floor"][bad[0]]
            entry["rejected_because"] = (
                f"{bad[0]} time {r['median']:.3f}x the frozen floor "
                f"({100 * r['ci_level']:.0f}% CI {r['ci_low']:.3f}-{r['ci_high']:.3f}, "
                f"{r['n']} rounds): faster than the frozen model")
        methods[name] = entry
    rejected = [n for n, e in methods.items() if e["verdict"] != "ok"]
    for name, e in methods.items():
        ok = name not in rejected
        wall_floor = e["ratio_floor"]["wall"]
        wall_lora = e.get("ratio_lora", {}).get("wall")
        e["step_ratio_floor"] = wall_floor["median"] if ok and wall_floor else None
        e["step_ratio_lora"] = (wall_lora["median"]
                                if wall_lora and ok and lora not in rejected else None)
    return {"schedule": "interleaved, rotating order (round k starts at method k mod M)",
            "floor": floor, "lora": lora, "ci": "distribution-free CI of the median "
            "(binomial order statistics)", "level": level, "margin": margin,
            "methods": methods, "rejected": rejected}


def time_methods(models: Mapping[str, nn.Module], batch: Mapping[str, torch.Tensor], *,
                 rounds: int = 100, warmup: int = 1, lr: float = 1e-4, floor: str = "floor",
                 lora: str | None = "lora", level: float = 0.95, threads: int | None = 1
                 ) -> dict[str, Any]:
    """Interleaved step times of already-built models (``{method: model}``, ``floor``
    frozen): one AdamW optimizer each, ``warmup`` steps each, ``rounds`` rotating rounds,
    summarised by :func:`summarize_times` (plus ``samples``, the raw per-round times).
    ``threads``: torch threads while timing (default 1: stable CPU timings on a shared
    machine; restored afterwards); None keeps the current setting.

    >>> summary = time_methods(build_methods(make, plan, column_plan), batch, rounds=100)
    """
    from .memory import make_optimizer, training_step

    if floor not in models:
        raise ValueError(f"time_methods needs the frozen floor {floor!r} among the models "
                         f"(ratios are taken against it); got {sorted(models)}")
    steps = {}
    cuda = False
    for name, model in models.items():
        model.train()
        opt = None if name == floor else make_optimizer(model, lr)
        if opt is None and name != floor:
            raise ValueError(f"method {name!r}: the model has no trainable parameters")
        steps[name] = training_step(model, batch, opt)
        cuda = cuda or next(model.parameters()).device.type == "cuda"
    if threads is not None and int(threads) < 1:
        raise ValueError(f"threads must be >= 1 (or None), got {threads}")
    sync = torch.cuda.synchronize if cuda else None
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        used = torch.get_num_threads()
        samples = time_interleaved(steps, rounds, warmup=warmup, sync=sync)
    finally:
        torch.set_num_threads(before)
    summary = summarize_times(samples, floor=floor, lora=lora, level=level)
    summary.update(rounds=int(rounds), warmup=int(warmup), torch_threads=used, samples=samples)
    return summary


def step_time(model: nn.Module, batch: Mapping[str, torch.Tensor], *, method: str = "",
              warmup: int = 1, repeats: int = 7, lr: float = 1e-4) -> dict[str, float]:
    """Wall and CPU seconds per training step of one model alone (median, quartiles).
    For comparisons between methods use :func:`time_methods` (interleaved rounds).

    >>> step_time(model, batch, repeats=7)["median_s"]
    """
    from .memory import make_optimizer, training_step

    model.train()
    opt = None if method == "floor" else make_optimizer(model, lr)
    cuda = next(model.parameters()).device.type == "cuda"
    s = time_interleaved({method or "model": training_step(model, batch, opt)}, repeats,
                         warmup=warmup, sync=torch.cuda.synchronize if cuda else None)
    s = next(iter(s.values()))
    wall, cpu = _quartiles(s["wall"]), _quartiles(s["cpu"])
    return {"median_s": wall["median"], "q1_s": wall["q1"], "q3_s": wall["q3"],
            "min_s": min(s["wall"]), "max_s": max(s["wall"]), "cpu_median_s": cpu["median"],
            "repeats": int(repeats), "warmup": int(warmup)}


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """Machine, versions, threads and current load (the machine may be shared).
    ``>>> machine_info(1)["load_average_1m_5m_15m"]``"""
    import os
    import platform

    import transformers

    info = {"platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": threads or torch.get_num_threads(),
            "load_average_1m_5m_15m": list(os.getloadavg()),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        info["peft"] = None
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:  # pragma: no cover - not Linux
        pass
    return info
