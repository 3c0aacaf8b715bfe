"""rowsft_nb: row-based sparse fine-tuning (SPruFT) for Hugging Face models.

Data flows one way, one public function per arrow::

    report = rowsft_nb.score(model, data, metric="taylor")        # ImportanceReport
    plan = rowsft_nb.select(report, rowsft_nb.Ratio(0.05))          # RowPlan
    rowsft_nb.inject(model, plan)                                   # RowSparseLinear layers
    rowsft_nb.train(model, dataset)                                 # trains only the rows
    rowsft_nb.save_adapter(model, "adapter/"); rowsft_nb.merge_and_unload(model)
"""
__version__ = "0.1.0"

from .plan import RowPlan
from .scoring import ImportanceReport
from .targets import find_targets

__all__ = ["__version__", "RowPlan", "ImportanceReport", "find_targets"]
