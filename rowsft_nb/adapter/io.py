"""Save and load a row-sparse adapter: ``adapter_model.safetensors`` + ``adapter_config.json``.

The safetensors file holds, per adapted module ``<name>``: ``<name>.row_index`` (int64),
``<name>.delta`` [r, d_in], ``<name>.delta_bias`` [r], ``<name>.column_index``,
``<name>.column_delta`` [d_out, c]; and each trained head parameter as
``heads.<module>.<param>``. The JSON config holds the plan, the base model class and
weights hash, the dtypes and the adapter options. Both are written atomically.

Usage::

    save_adapter(model, "out/adapter")
    model = load_adapter(base_model, "out/adapter")     # injects, then loads bit-exactly
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import read_json, read_safetensors, write_json, write_safetensors
from ..plan import RowPlan
from ..targets import model_fingerprint
from .model import _require_state, adapted_modules, inject

__all__ = ["save_adapter", "load_adapter", "read_adapter_config", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "rowsft_nb.adapter"
FORMAT_VERSION = 1


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"adapter config names an unknown dtype {name!r}")
    return dtype


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the deltas, their indices and trained head weights of an adapted ``model``
    to ``directory`` (created if needed); returns the directory.

    >>> save_adapter(model, "out/adapter")      # adapter_model.safetensors + adapter_config.json
    """
    from .. import __version__

    inner, state = _require_state(model, "save the adapter")
    directory = Path(directory)
    layers = adapted_modules(inner)
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, Any] = {}
    delta_dtype = base_dtype = None
    for name, layer in layers.items():
        if layer.delta is not None:
            tensors[f"{name}.row_index"] = layer.rows
            tensors[f"{name}.delta"] = layer.delta
        if layer.delta_bias is not None:
            tensors[f"{name}.delta_bias"] = layer.delta_bias
        if layer.column_delta is not None:
            tensors[f"{name}.column_index"] = layer.columns
            tensors[f"{name}.column_delta"] = layer.column_delta
        delta_dtype = delta_dtype or next(iter(layer.delta_parameters().values())).dtype
        base_dtype = base_dtype or layer.base_layer.weight.dtype
        modules[name] = {"shape": [layer.out_features, layer.in_features],
                         "rows": int(layer.rows.numel()), "columns": int(layer.columns.numel()),
                         "conv1d": layer.is_conv1d}
    params = dict(inner.named_parameters(remove_duplicate=False))
    head_params = []
    for key in state.head_backup:  # one entry per trained head parameter
        tensors[f"heads.{key}"] = params[key]
        head_params.append(key)
    config = {
        "format": FORMAT, "version": FORMAT_VERSION, "library_version": __version__,
        "base_model_class": state.base_class, "base_model_hash": state.base_hash,
        "base_dtype": _dtype_name(base_dtype) if base_dtype else None,
        "delta_dtype": _dtype_name(delta_dtype) if delta_dtype else None,
        "bias": state.bias, "dropout": state.dropout,
        "heads": list(state.heads), "head_parameters": head_params,
        "trainable_parameters": int(sum(t.numel() for k, t in tensors.items()
                                        if not k.endswith("_index"))),
        "modules": modules, "plan": state.plan.to_dict(),
    }
    write_safetensors(directory / WEIGHTS_NAME, tensors,
                      metadata={"format": FORMAT, "version": FORMAT_VERSION})
    write_json(directory / CONFIG_NAME, config)
    return directory


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``adapter_config.json`` of a saved adapter, format-checked.

    >>> read_adapter_config("out/adapter")["plan"]["rows"].keys()
    """
    path = Path(directory) / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {directory} a directory written "
                                "by rowsft_nb.save_adapter?")
    config = read_json(path)
    if config.get("format") != FORMAT:
        raise ValueError(f"{path} is not a rowsft_nb adapter (format={config.get('format')!r})")
    if int(config.get("version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{path} has adapter format version {config['version']}; this "
                         f"rowsft_nb reads up to {FORMAT_VERSION}: upgrade rowsft_nb")
    return config


def _expected_shapes(config: dict[str, Any], plan: RowPlan) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for name in plan.modules:
        d_out, d_in = plan.shapes[name]
        r = plan.rows[name].numel() if name in plan.rows else 0
        c = plan.columns[name].numel() if name in plan.columns else 0
        if r:
            shapes[f"{name}.row_index"] = (r,)
            shapes[f"{name}.delta"] = (r, d_in)
            if config.get("bias"):
                shapes[f"{name}.delta_bias"] = (r,)
        if c:
            shapes[f"{name}.column_index"] = (c,)
            shapes[f"{name}.column_delta"] = (d_out, c)
    return shapes


def load_adapter(base_model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Inject the saved plan into ``base_model`` (in place) and load the saved deltas and
    head weights bit-exactly; returns the model. Fails naming the module and both shapes
    when the adapter does not fit; warns when the base weights hash differs.

    >>> model = load_adapter(AutoModelForCausalLM.from_pretrained(...), "out/adapter")
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    tensors, _ = read_safetensors(directory / WEIGHTS_NAME)
    plan = RowPlan.from_dict(config["plan"])
    where = f"adapter {str(directory)!r}"

    cls = type(base_model).__name__
    if config.get("base_model_class") and config["base_model_class"] != cls:
        warnings.warn(f"{where} was trained on a {config['base_model_class']}, loading it onto "
                      f"a {cls}", stacklevel=2)
    try:
        plan.validate(base_model)
    except ValueError as e:
        raise ValueError(f"{where} does not fit this {cls}: {e}") from e

    # check every tensor before touching the model, so a mismatch leaves it unchanged
    expected = _expected_shapes(config, plan)
    for key, shape in expected.items():
        if key not in tensors:
            raise ValueError(f"{where}: {WEIGHTS_NAME} lacks {key!r}; the file is incomplete")
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{where}: {key!r} has shape {tuple(tensors[key].shape)} but the "
                             f"plan for this module needs {shape}")
    for name in plan.modules:
        for kind, index in (("row_index", plan.rows.get(name)),
                            ("column_index", plan.columns.get(name))):
            key = f"{name}.{kind}"
            if key in tensors and not torch.equal(tensors[key], index):
                raise ValueError(f"{where}: {key} differs from the plan in {CONFIG_NAME}")
    params = dict(base_model.named_parameters(remove_duplicate=False))
    for key in config.get("head_parameters", []):
        saved = tensors.get(f"heads.{key}")
        if saved is None:
            raise ValueError(f"{where}: {WEIGHTS_NAME} lacks the head parameter {key!r}")
        if key not in params:
            raise ValueError(f"{where}: head parameter {key!r} does not exist in this {cls}")
        if tuple(params[key].shape) != tuple(saved.shape):
            module = key.rpartition(".")[0]
            raise ValueError(f"{where}: head module {module!r} has {key!r} of shape "
                             f"{tuple(params[key].shape)} in this {cls} but the adapter saved "
                             f"{tuple(saved.shape)} (different number of labels?)")

    current_hash = model_fingerprint(base_model)
    if config.get("base_model_hash") and config["base_model_hash"] != current_hash:
        warnings.warn(f"{where} was trained on base weights with hash "
                      f"{config['base_model_hash']}, this model has {current_hash}: "
                      "different weights (another checkpoint or a merged model?)", stacklevel=2)

    heads = list(config.get("heads", []))
    inject(base_model, plan, bias=bool(config.get("bias")),
           dropout=float(config.get("dropout", 0.0)),
           delta_dtype=_dtype(config.get("delta_dtype")), train_heads=bool(heads))
    _, state = _require_state(base_model, "load the adapter")
    if sorted(state.heads) != sorted(heads):
        missing = sorted(set(heads) - set(state.heads))
        if missing:
            raise ValueError(f"{where}: trained heads {missing} are not classifier heads "
                             f"of this {cls}")
    with torch.no_grad():
        for name, layer in adapted_modules(base_model).items():
            for attr in ("delta", "delta_bias", "column_delta"):
                p = getattr(layer, attr)
                if p is not None:
                    p.copy_(tensors[f"{name}.{attr}"])
        params = dict(base_model.named_parameters(remove_duplicate=False))
        for key in config.get("head_parameters", []):
            params[key].copy_(tensors[f"heads.{key}"])
    return base_model
