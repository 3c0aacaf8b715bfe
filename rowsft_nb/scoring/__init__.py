"""Neuron importance scoring (see score())."""
from .report import ImportanceReport, gini, normalize_scores

__all__ = ["ImportanceReport", "gini", "normalize_scores"]
