"""Row-sparse adapter: RowSparseLinear layers, inject / merge / unload, save / load.

Usage::

    from rowsft_nb.adapter import inject, merge_and_unload, save_adapter, load_adapter
    inject(model, plan)
    save_adapter(model, "out/adapter")
    model = load_adapter(base_model, "out/adapter")
"""
from .io import load_adapter, read_adapter_config, save_adapter
from .layer import RowSparseLinear
from .peft_io import export_peft, import_peft
from .fused import FusedRowLinear
from .model import (adapted_modules, adapter_modes, adapter_state, inject, merge, merge_and_unload,
                    trainable_parameters, unload, unmerge)

__all__ = ["RowSparseLinear", "FusedRowLinear", "inject", "adapted_modules", "adapter_modes",
           "adapter_state",
           "trainable_parameters", "merge", "unmerge", "merge_and_unload", "unload",
           "save_adapter", "load_adapter", "read_adapter_config", "export_peft", "import_peft"]
