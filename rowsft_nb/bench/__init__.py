"""Measurement helpers and baselines for comparing row-sparse fine-tuning with other methods
at one trainable-parameter budget: exact memory by component, interleaved step timing with
trustworthy ratios, and the LoRA / full / dense-mask / one-hot baselines.

The benchmark *runner* (which models, which sizes, goals, markdown tables) is not part of
the installed package: it lives in the source repository's ``benchmarks/`` folder and is
what ``rowsft-nb bench`` runs from a checkout (:func:`find_runner`).

Usage::

    from rowsft_nb import bench
    plan, column_plan = bench.matched_plans(report, lora_rank=4)
    models = bench.build_methods(lambda: copy.deepcopy(base), plan, column_plan)
    memory = {k: bench.measure_memory(m, batch, method=k) for k, m in models.items()}
    timing = bench.time_methods(models, batch, rounds=100)  # interleaved, ratios with CIs

Quantized bases (rows with a residual start vs QLoRA / LoftQ, merges back into 4-bit):
``rowsft_nb.bench.quant`` (``step0_errors``, ``merge_errors``, ``update_survival``, ...).
"""
from .baselines import (METHODS, PEFT_MISSING, OneHotRowLinear, apply_dense_mask, apply_floor,
                        apply_full, apply_lora, apply_onehot, build_methods, matched_plans,
                        prepare_method, require_peft)
from .locate import RUNNER_MISSING, find_runner, load_runner
from .memory import MemoryBreakdown, forward_loss, make_optimizer, measure_memory, training_step
from .timing import (IMPOSSIBLE, impossible, machine_info, median_ci_ranks, ratio_stats,
                     round_robin_order, step_time, summarize_times, time_interleaved,
                     time_methods)

__all__ = ["METHODS", "PEFT_MISSING", "require_peft", "OneHotRowLinear", "apply_onehot",
           "apply_dense_mask", "apply_lora", "apply_full", "apply_floor", "prepare_method",
           "build_methods", "matched_plans", "MemoryBreakdown", "measure_memory",
           "make_optimizer", "forward_loss", "training_step", "IMPOSSIBLE",
           "round_robin_order", "time_interleaved", "median_ci_ranks", "ratio_stats",
           "impossible", "summarize_times", "time_methods", "step_time", "machine_info",
           "RUNNER_MISSING", "find_runner", "load_runner"]
