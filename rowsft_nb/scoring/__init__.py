"""Neuron importance scoring.

Usage::

    from rowsft_nb.scoring import score, METRICS, Taylor, ClassTaylor
    report = score(model, batches, metric="taylor", n_samples=64)   # ImportanceReport
    report = score(model, batches, metric=ClassTaylor(aggregate="quantiles"))
    report.summary(); report.save("taylor.safetensors")
"""
from .groups import DependencyGroup, apply_groups, find_groups, group_scores
from .metrics import (AGGREGATES, METRICS, ClassTaylor, Fisher, FunctionMetric, Hessian,
                      Magnitude, Metric, ModuleStats, Random, SecondOrderClassTaylor, Taylor,
                      Wanda, ZerothOrderTaylor, aggregate_classes, get_metric, register_metric)
from .report import ImportanceReport, gini, normalize_scores
from .scorer import preserved_state, score
from .statistics import STATISTICS, LayerCall, Statistic, register_statistic

__all__ = ["score", "ImportanceReport", "METRICS", "register_metric", "get_metric",
           "Metric", "FunctionMetric", "ModuleStats", "Magnitude", "Random", "Taylor", "Fisher",
           "Hessian", "Wanda", "ZerothOrderTaylor", "ClassTaylor", "SecondOrderClassTaylor",
           "AGGREGATES", "aggregate_classes", "STATISTICS", "Statistic", "LayerCall",
           "register_statistic", "DependencyGroup", "find_groups", "apply_groups",
           "group_scores", "preserved_state", "gini", "normalize_scores"]
