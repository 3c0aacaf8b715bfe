"""Accuracy at equal trainable parameters (MiniLM on movie_sentiment, every method through
``rowsft_nb.train``, several seeds, paired comparisons over seeds) and the causal-LM loss of
rows vs LoRA on SmolLM2. Part of ``benchmarks/bench_all.py`` (``--parts accuracy``); not
timing-sensitive.

Methods (all at the trainable-parameter budget of LoRA rank ``cfg.lora_rank`` on every
Linear, as :func:`rowsft_nb.bench.matched_plans` counts it; the classifier head trains fully
in every method): ``rowsft_taylor`` (the paper's Taylor, ``sum_j |w g|``),
``rowsft_taylor_multivariable`` (``|sum_j w g|``), ``rowsft_class_taylor`` (label-wise
Taylor, max over classes), ``rowsft_neurons`` (paper Taylor, ``couple="neurons"``: whole
neurons, rows + coupled input columns, both counted), ``rowsft_random``, ``rowsft_l2``,
``columns``, ``lora``, ``full``, ``head`` (only the head).

Run order (:func:`run_order`): the goal methods (paper-Taylor rows, LoRA, random rows) over
every seed first, then the other methods seed by seed; the result so far is saved after every
run, so a cut-off run holds the goal comparisons complete.

Usage (from bench_all)::

    acc = accuracy_minilm(cfg, on_partial=save)
    acc["paired"]["rowsft_taylor vs lora"]["p_two_sided"]
    lm = loss_smollm(cfg)
"""
from __future__ import annotations

import itertools
import statistics
from typing import Any, Callable, Sequence

from bench_methods import log
from rowsft_nb.bench import matched_plans, prepare_method

# method -> (importance metric, select(couple=...), prepare_method kind)
ACC_METHODS: dict[str, tuple[str | None, str | None, str]] = {
    "rowsft_taylor": ("taylor", None, "rowsft"),
    "rowsft_taylor_multivariable": ("taylor_multivariable", None, "rowsft"),
    "rowsft_class_taylor": ("class_taylor", None, "rowsft"),
    "rowsft_neurons": ("taylor", "neurons", "rowsft"),
    "rowsft_random": ("random", None, "rowsft"),
    "rowsft_l2": ("l2", None, "rowsft"),
    "columns": ("taylor", None, "columns"),
    "lora": ("taylor", None, "lora"),      # the report only sets the modules (all-linear)
    "full": (None, None, "full"),
    "head": ("taylor", None, "head"),
}
# (method, against): the paired comparisons reported, a - b (when both ran)
PAIRS = [("rowsft_taylor", "lora"), ("rowsft_taylor", "rowsft_random"),
         ("rowsft_taylor", "rowsft_l2"), ("rowsft_taylor", "rowsft_taylor_multivariable"),
         ("rowsft_taylor", "rowsft_class_taylor"), ("rowsft_taylor", "rowsft_neurons"),
         ("rowsft_neurons", "lora"), ("rowsft_neurons", "rowsft_random"), ("lora", "full")]
GOAL_METHODS = ("rowsft_taylor", "lora", "rowsft_random")  # run first, every seed
MAX_EXACT_SEEDS = 20  # 2**20 sign patterns


def sign_flip_p(diffs: Sequence[float], alternative: str = "two-sided") -> float:
    """Exact paired permutation (sign-flip) p-value of ``mean(diffs) == 0``: the share of the
    ``2**n`` sign patterns whose sum is at least as extreme as the observed one
    (``alternative``: ``"two-sided"``, ``"greater"`` or ``"less"``). With n pairs the
    smallest two-sided p is ``2 / 2**n`` (0.0625 for 5 seeds), one-sided ``1 / 2**n``.

    >>> sign_flip_p([1.2, 0.4, 2.0, 0.9, 1.1])   # 0.0625: every pair positive
    """
    d = [float(x) for x in diffs]
    if not d:
        raise ValueError("sign_flip_p needs at least one paired difference")
    if len(d) > MAX_EXACT_SEEDS:
        raise ValueError(f"exact sign-flip test enumerates 2**n patterns; n={len(d)} > "
                         f"{MAX_EXACT_SEEDS}: use fewer pairs")
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be 'two-sided', 'greater' or 'less', got "
                         f"{alternative!r}")
    observed = sum(d)
    tol = 1e-9 * max(1.0, sum(abs(x) for x in d))
    hits = 0
    for signs in itertools.product((1.0, -1.0), repeat=len(d)):
        s = sum(sg * x for sg, x in zip(signs, d))
        if alternative == "two-sided":
            hits += abs(s) >= abs(observed) - tol
        elif alternative == "greater":
            hits += s >= observed - tol
        else:
            hits += s <= observed + tol
    return hits / 2 ** len(d)


def paired_comparison(a: dict[int, float], b: dict[int, float], *, margin: float = 0.0
                      ) -> dict[str, Any]:
    """``a - b`` in points (x100) over the seeds both have: per-seed pairs, mean, sample
    std, min/max, wins, and exact sign-flip p-values (:func:`sign_flip_p`) for ``mean == 0``
    (two-sided, and one-sided ``a > b``) and for ``mean < -margin`` vs ``>= -margin``
    (``p_within_margin``: evidence that ``b`` leads by less than ``margin`` points).

    >>> paired_comparison({0: 0.80, 1: 0.82}, {0: 0.79, 1: 0.80}, margin=1.0)
    """
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("no seed in common between the two methods")
    d = [100.0 * (a[s] - b[s]) for s in seeds]
    out = {"seeds": seeds, "n": len(d),
           "pairs": [{"seed": s, "a": a[s], "b": b[s], "diff_points": x}
                     for s, x in zip(seeds, d)],
           "mean_diff_points": statistics.fmean(d),
           "std_diff_points": statistics.stdev(d) if len(d) > 1 else 0.0,
           "min_diff_points": min(d), "max_diff_points": max(d),
           "wins": sum(x > 0 for x in d), "ties": sum(x == 0 for x in d),
           "losses": sum(x < 0 for x in d),
           "test": "exact sign-flip permutation test over seeds",
           "p_two_sided": sign_flip_p(d, "two-sided"),
           "p_a_greater": sign_flip_p(d, "greater"),
           "smallest_possible_p_two_sided": 2.0 / 2 ** len(d)}
    if margin:
        out["margin_points"] = margin
        out["p_within_margin"] = sign_flip_p([x + margin for x in d], "greater")
    return out


def _by_seed(rs: list[dict[str, Any]]) -> dict[int, float]:
    return {r["seed"]: r["accuracy"] for r in rs if r.get("accuracy") is not None}


def _accuracy_summary(cfg: Any, data, runs: dict[str, list[dict[str, Any]]]
                      ) -> dict[str, Any]:
    summary = {}
    for method, rs in runs.items():
        accs = [r["accuracy"] for r in rs if r.get("accuracy") is not None]
        if not accs:
            continue
        summary[method] = {"mean": statistics.fmean(accs),
                           "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                           "min": min(accs), "max": max(accs), "n": len(accs),
                           "trainable_parameters": rs[0]["trainable_parameters"]}
    paired = {}
    for a, b in PAIRS:
        if a in summary and b in summary and set(_by_seed(runs[a])) & set(_by_seed(runs[b])):
            paired[f"{a} vs {b}"] = paired_comparison(
                _by_seed(runs[a]), _by_seed(runs[b]), margin=1.0 if b == "lora" else 0.0)
    return {"task": "movie_sentiment", "model": "all-MiniLM-L6-v2", "max_length": cfg.acc_max_length,
            "n_train": len(data.train), "n_eval": len(data.validation),
            "split": "validation" if cfg.acc_n_eval is None else
            f"validation (seeded subsample of {cfg.acc_n_eval})",
            "steps": cfg.acc_steps, "batch_size": cfg.acc_batch, "seeds": list(cfg.acc_seeds),
            "methods": list(cfg.acc_methods),
            "lr": {"adapters_and_head": cfg.lr_adapter, "full": cfg.lr_full},
            "lora_rank": cfg.lora_rank, "calibration_samples": cfg.calib_samples,
            "note": ("classifier head trains fully in every method ('head' trains only it); "
                     "a seed sets the head's init, the training order and the random rows; "
                     "calibration data are the same 32 training examples for every seed; "
                     "the test split is not used"),
            "runs": runs, "summary": summary, "paired": paired}


def _plan_for(method: str, report, lora_rank: int):
    """(row plan, column plan) at LoRA rank ``lora_rank``'s budget for ``method``."""
    from rowsft_nb.selection import ParamBudget, select

    plan, column_plan = matched_plans(report, lora_rank)
    if ACC_METHODS[method][1] == "neurons":  # the same budget, counting rows + coupled columns
        budget = lora_rank * sum(d_out + d_in for d_out, d_in in report.shapes.values())
        plan = select(report, ParamBudget(int(budget)), min_rows=1, couple="neurons")
    return plan, column_plan


def run_order(methods: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, int]]:
    """(method, seed) in run order: the goal methods (:data:`GOAL_METHODS`) first, each over
    every seed; then the others seed by seed (all methods on a seed before the next seed), so
    a run cut off early holds complete goal comparisons and equal seed counts elsewhere.

    >>> run_order(["rowsft_taylor", "lora", "full"], [0, 1])[-2:]   # [('full', 0), ('full', 1)]
    """
    core = [m for m in methods if m in GOAL_METHODS]
    rest = [m for m in methods if m not in GOAL_METHODS]
    return [(m, s) for m in core for s in seeds] + [(m, s) for s in seeds for m in rest]


def accuracy_minilm(cfg: Any, on_partial: Callable[[dict], None] | None = None
                     ) -> dict[str, Any]:
    """movie_sentiment with MiniLM: every method through rowsft_nb.train, equal budgets,
    paired comparisons over seeds, in :func:`run_order`; ``on_partial(result so far)`` is
    called after every run."""
    from rowsft_nb import assets
    from rowsft_nb.data import calibration_batches, prepare_task
    from rowsft_nb.scoring import score
    from rowsft_nb.train import train

    unknown = [m for m in cfg.acc_methods if m not in ACC_METHODS]
    if unknown:
        raise ValueError(f"unknown accuracy methods {unknown}; choose from {list(ACC_METHODS)}")
    _, tok = assets.load_encoder(num_labels=2, seed=0)
    data = prepare_task("movie_sentiment", tok, max_length=cfg.acc_max_length,
                        n_train=cfg.acc_n_train, n_eval=cfg.acc_n_eval, seed=0)
    calib = calibration_batches(data.train, 16, cfg.calib_samples, data.collator, seed=0)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in cfg.acc_methods}
    reports: dict[tuple[int, str], Any] = {}
    for method, seed in run_order(cfg.acc_methods, cfg.acc_seeds):
        metric, _, kind = ACC_METHODS[method]
        metric = metric or "taylor"  # full: the report only names the head
        if (seed, metric) not in reports:
            probe, _ = assets.load_encoder(num_labels=2, seed=seed)
            reports[seed, metric] = score(probe, calib, metric=metric, seed=seed,
                                          progress=False)
            del probe
        plan, column_plan = _plan_for(method, reports[seed, metric], cfg.lora_rank)
        model, _ = assets.load_encoder(num_labels=2, seed=seed)
        model = prepare_method(model, kind, plan, column_plan, train_heads=True,
                               lora_rank=cfg.lora_rank)
        lr = cfg.lr_full if method == "full" else cfg.lr_adapter
        res = train(model, data.train, eval_dataset=data.validation, tokenizer=tok, lr=lr,
                    max_steps=cfg.acc_steps, batch_size=cfg.acc_batch, eval_batch_size=128,
                    seed=seed, device="cpu", progress_bar=False, logging_steps=10,
                    evaluate_before=False)
        used = column_plan if kind == "columns" else plan
        row = {"seed": seed, "accuracy": res.metrics_after.get("accuracy"),
               "trainable_parameters": res.trainable_parameters,
               "plan_parameters": (used.trainable_parameters()
                                   if kind in ("rowsft", "columns") else None),
               "seconds": res.seconds, "steps": res.steps, "lr": lr,
               "stop_reason": res.stop_reason}
        runs[method].append(row)
        acc = row["accuracy"]
        log(f"accuracy {method:28s} seed {seed}: "
            f"{'n/a' if acc is None else f'{acc:.4f}'} "
            f"({row['trainable_parameters']:,} trainable, {res.seconds:.0f} s)")
        del model
        if on_partial is not None:
            on_partial({**_accuracy_summary(cfg, data, runs), "partial": True})
    return _accuracy_summary(cfg, data, runs)


def loss_smollm(cfg: Any) -> dict[str, Any]:
    from rowsft_nb import assets
    from rowsft_nb.data import calibration_batches, prepare_task
    from rowsft_nb.scoring import score
    from rowsft_nb.train import train

    _, tok = assets.load_causal_lm()
    data = prepare_task(cfg.lm_task, tok, max_length=cfg.lm_max_length, n_train=cfg.lm_n_train,
                        n_eval=cfg.lm_n_eval, seed=0)
    out = {}
    for method in ("rowsft", "lora"):
        model, _ = assets.load_causal_lm()
        calib = calibration_batches(data.train, 8, cfg.calib_samples // 2, data.collator, seed=0)
        plan, column_plan = matched_plans(score(model, calib, metric="taylor", progress=False),
                                          cfg.lora_rank)
        model = prepare_method(model, method, plan, column_plan, lora_rank=cfg.lora_rank)
        res = train(model, data.train, eval_dataset=data.validation, tokenizer=tok, lr=cfg.lm_lr,
                    max_steps=cfg.lm_steps, batch_size=cfg.lm_batch, eval_batch_size=16, seed=0,
                    device="cpu", progress_bar=False, logging_steps=5)
        out[method] = {"loss_before": res.metrics_before.get("loss"),
                       "loss_after": res.metrics_after.get("loss"),
                       "trainable_parameters": res.trainable_parameters, "seconds": res.seconds}
        log(f"causal LM {method}: loss {out[method]['loss_before']:.4f} -> "
            f"{out[method]['loss_after']:.4f} ({res.seconds:.0f} s)")
        del model
    return {"task": cfg.lm_task, "model": "SmolLM2-135M-Instruct", "steps": cfg.lm_steps,
            "batch_size": cfg.lm_batch, "max_length": cfg.lm_max_length,
            "n_train": len(data.train), "n_eval": len(data.validation), "lr": cfg.lm_lr,
            "lora_rank": cfg.lora_rank, "seed": 0, "methods": out}
