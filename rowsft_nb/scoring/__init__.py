"""Neuron importance scoring.

Usage::

    from rowsft_nb.scoring import score, METRICS
    report = score(model, batches, metric="taylor", n_samples=64)   # ImportanceReport
    report.summary(); report.save("taylor.safetensors")
"""
from .groups import DependencyGroup, apply_groups, find_groups, group_scores
from .metrics import METRICS, FunctionMetric, ModuleStats, get_metric, register_metric
from .report import ImportanceReport, gini, normalize_scores
from .scorer import preserved_state, score

__all__ = ["score", "ImportanceReport", "METRICS", "register_metric", "get_metric",
           "FunctionMetric", "ModuleStats", "DependencyGroup", "find_groups", "apply_groups",
           "group_scores", "preserved_state", "gini", "normalize_scores"]
