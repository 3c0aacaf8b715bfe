"""Interactive explorers: thin ipywidgets + plotly views over plain-Python state objects.

The state classes hold every rule and number (tests drive them without a browser); the
explorer classes only bind them to controls and figures.

Usage::

    from rowsft_nb.widgets import ImportanceExplorer, BudgetExplorer, TrainingLauncher
    ImportanceExplorer(report, plan=plan)
    budget = BudgetExplorer(report); budget          # budget.plan is the current RowPlan
    TrainingLauncher(model, budget.plan, dataset)
"""
from .budget import BudgetExplorer, BudgetState
from .importance import ImportanceExplorer, ImportanceState
from .launcher import LaunchState, TrainingLauncher

__all__ = ["ImportanceExplorer", "ImportanceState", "BudgetExplorer", "BudgetState",
           "TrainingLauncher", "LaunchState"]
