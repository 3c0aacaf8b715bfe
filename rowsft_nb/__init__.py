"""rowsft_nb: row-based sparse fine-tuning (SPruFT) for Hugging Face models.

Data flows one way, one public function per arrow::

    report = rowsft_nb.score(model, batches, metric="taylor")      # ImportanceReport
    plan = rowsft_nb.select(report, rowsft_nb.Ratio(0.05))          # RowPlan
    rowsft_nb.inject(model, plan)                                   # RowSparseLinear layers
    result = rowsft_nb.train(model, dataset)                        # trains only the rows
    rowsft_nb.save_adapter(model, "adapter/"); rowsft_nb.merge_and_unload(model)
"""
__version__ = "0.1.0"

import logging as _logging


class _NoKernelsHubHint(_logging.Filter):
    """bitsandbytes (the optional ``quant`` extra) warns on import, on CPUs with AVX512-BF16,
    that its faster kernel could not be fetched from the Hugging Face hub (package
    ``kernels``). rowsft_nb never fetches from a hub and the built-in kernel is used instead,
    so that one message is dropped; every other bitsandbytes message passes."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "gemm_4bit_forward from kernels-community" not in str(record.msg)


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelsHubHint())

from .data import calibration_batches, prepare_task
from .adapter import (RowSparseLinear, inject, load_adapter, merge, merge_and_unload,
                      save_adapter, trainable_parameters, unload, unmerge)
from .adapter.peft_io import export_peft, import_peft
from .memory import MemoryEstimate
from .plan import RowPlan
from .scoring import METRICS, ImportanceReport, score
from .selection import FixedRows, ParamBudget, Ratio, TypeRatios, budget_from_dict, select
from .targets import find_targets
from .train import TrainingObserver, TrainResult, list_devices, pick_device, train
from .train import NaNGuardCallback, ObserverCallback, RowTrainer
from .widgets import BudgetExplorer, ImportanceExplorer, TrainingLauncher
from . import recipes
from .quant import dequantize, quantize

__all__ = [
    "__version__",
    # data
    "prepare_task", "calibration_batches",
    # model + data -> ImportanceReport
    "score", "ImportanceReport", "METRICS", "find_targets",
    # ImportanceReport -> RowPlan
    "select", "RowPlan", "FixedRows", "Ratio", "TypeRatios", "ParamBudget", "budget_from_dict",
    "MemoryEstimate",
    # RowPlan -> adapted model -> trained adapter -> merged model
    "inject", "RowSparseLinear", "trainable_parameters", "train", "TrainResult",
    "TrainingObserver", "pick_device", "list_devices", "save_adapter", "load_adapter",
    "merge", "unmerge", "merge_and_unload", "unload",
    "export_peft", "import_peft",  # exact PEFT LoRA export / import
    "RowTrainer", "ObserverCallback", "NaNGuardCallback",  # for transformers.Trainer scripts
    # notebook explorers (state objects: rowsft_nb.widgets.*State)
    "ImportanceExplorer", "BudgetExplorer", "TrainingLauncher",
    # the authors' setups in one call: rowsft_nb.recipes.spruft_llm(), spruft_encoder()
    "recipes",
    # quantized bases (bitsandbytes, the 'quant' extra): rowsft_nb.quant
    "quantize", "dequantize",
]
