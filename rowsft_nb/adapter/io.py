"""Save and load a row-sparse adapter: ``adapter_model.safetensors`` + ``adapter_config.json``
(the layout PEFT users know).

The safetensors file holds, per adapted module ``<name>``: ``<name>.row_index`` (int64),
``<name>.delta`` [r, d_in], ``<name>.delta_bias`` [r], ``<name>.column_index``,
``<name>.column_delta`` [d_out, c]; and each trained head parameter as
``heads.<module>.<param>``. The JSON config holds the plan, the base model class and
weights hash, the dtypes and the adapter options.

Format version 2 (rowsft_nb >= this change) makes the weights file self-describing: its
header metadata carries the full config (``rowsft["config"]``) and a sha256 per tensor, and
``adapter_config.json`` is a readable copy. ``save_adapter`` writes the weights file first
(one atomic rename: the commit point), then the JSON copy (another atomic rename), so a save
killed at any instant leaves a folder that loads as exactly the old or exactly the new
adapter: ``load_adapter`` uses the config stored with the tensors and warns when the JSON copy
is missing or differs (an interrupted save). Other files in the folder are never touched;
temporary files of a killed save (``.<name>.<pid>-<hex>.tmp``) are ignored and deleted by the
next save into the folder. Version 1 adapters (JSON config only, no checksums) still load.

``load_adapter`` checks everything before it changes the model: a damaged file (truncated,
garbled, checksum mismatch, non-finite deltas, malformed config) raises one
:class:`~rowsft_nb._io.FileFormatError` (a ``ValueError``) naming the file and the problem.

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

from .._io import (FileFormatError, read_json_object, read_safetensors,
                   read_safetensors_metadata, verify_checksums, write_json, write_safetensors)
from ..plan import RowPlan
from ..targets import model_fingerprint
from .card import label_config, write_model_card
from ..quant import quant_settings
from .layer import INITS
from .model import (_require_state, adapted_modules, adapter_state, inject,
                    trainable_head_names, unload)

__all__ = ["save_adapter", "load_adapter", "read_adapter_config", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "rowsft_nb.adapter"
FORMAT_VERSION = 2  # 2: config + sha256 inside the safetensors header; 1: JSON config only


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
    to ``directory`` (created if needed); returns the directory. Crash-safe: a save killed
    at any point leaves the folder loading as the previous adapter or the new one.

    >>> save_adapter(model, "out/adapter")      # adapter_model.safetensors + adapter_config.json
    """
    from .. import __version__

    inner, state = _require_state(model, "save the adapter")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"cannot save the adapter: {directory} is a file, not a folder")
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
        "bias": state.bias, "dropout": state.dropout, "init": state.init, "seed": state.seed,
        "heads": list(state.heads), "head_parameters": head_params,
        "trainable_parameters": int(sum(t.numel() for k, t in tensors.items()
                                        if not k.endswith("_index"))),
        "modules": modules, "plan": state.plan.to_dict(), **label_config(inner),
        # the base's bitsandbytes settings ({"method": "nf4", "blocksize": 64, ...}) or None
        "quantization": quant_settings(inner),
    }
    # weights (with their own config) first: that rename is the commit point
    write_safetensors(directory / WEIGHTS_NAME, tensors,
                      metadata={"format": FORMAT, "version": FORMAT_VERSION, "config": config})
    write_json(directory / CONFIG_NAME, config)
    write_model_card(directory, inner, config)  # README.md, as PEFT writes (adapter/card.py)
    return directory


# ---------------------------------------------------------------------------- reading
def _is_str_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(v, str) for v in x)


def _check_config(config: dict[str, Any], path: Path) -> RowPlan:
    """Format, version and types of an adapter config; returns its plan. Raises
    ``FileFormatError`` naming ``path`` and the first problem."""
    if config.get("format") != FORMAT:
        raise FileFormatError(f"{path} is not a rowsft_nb adapter (format="
                              f"{config.get('format')!r})")
    version = config.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FileFormatError(f"{path}: 'version' must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise FileFormatError(f"{path} has adapter format version {version}; this rowsft_nb "
                              f"reads up to {FORMAT_VERSION}: upgrade rowsft_nb")
    if "plan" not in config:
        raise FileFormatError(f"{path} lacks the 'plan' entry (which rows of which modules "
                              "the adapter trains); the file is incomplete: re-save the adapter")
    checks = {"bias": (lambda v: isinstance(v, bool), "true or false"),
              "dropout": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                          and 0.0 <= v < 1.0, "a number in [0, 1)"),
              "heads": (_is_str_list, "a list of module names"),
              "head_parameters": (_is_str_list, "a list of parameter names"),
              "delta_dtype": (lambda v: v is None or isinstance(v, str), "a dtype name or null"),
              "init": (lambda v: v in INITS, f"one of {INITS}"),
              "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
              "base_model_class": (lambda v: v is None or isinstance(v, str), "a string or null"),
              "base_model_hash": (lambda v: v is None or isinstance(v, str), "a string or null")}
    for key, (ok, what) in checks.items():
        if key in config and not ok(config[key]):
            raise FileFormatError(f"{path}: {key!r} must be {what}, got {config[key]!r}")
    try:
        _dtype(config.get("delta_dtype"))
    except ValueError as e:
        raise FileFormatError(f"{path}: {e}") from None
    try:
        return RowPlan.from_dict(config["plan"])
    except (ValueError, TypeError) as e:
        raise FileFormatError(f"{path}: its 'plan' is malformed: {e}") from None


def _read_config(directory: Path) -> tuple[dict[str, Any], RowPlan, dict[str, str]]:
    """``(config, plan, {tensor: sha256})`` of a saved adapter: the config stored inside the
    weights file when there is one (version >= 2), else ``adapter_config.json``."""
    cpath, wpath = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not directory.is_dir() or not (cpath.exists() or wpath.exists()):
        raise FileNotFoundError(f"{directory} holds no adapter ({CONFIG_NAME} and "
                                f"{WEIGHTS_NAME}): is it a directory written by "
                                "rowsft_nb.save_adapter?")
    if not wpath.exists():
        raise FileNotFoundError(f"{wpath} does not exist: the adapter is incomplete")
    meta, sums = read_safetensors_metadata(wpath)
    if meta.get("format") != FORMAT:
        raise FileFormatError(f"{wpath} is not a rowsft_nb adapter weights file (format="
                              f"{meta.get('format')!r}); a PEFT adapter (LoRA etc.) loads with "
                              "peft.PeftModel.from_pretrained instead")
    embedded = meta.get("config")
    if embedded is not None and not isinstance(embedded, dict):
        raise FileFormatError(f"{wpath}: the config in its header is not a JSON object; the "
                              "file is garbled: re-save the adapter")
    hint = (f" ({WEIGHTS_NAME} carries an intact copy of the config: delete {cpath.name} "
            "and load again, or re-save the adapter)")
    copy = None
    if cpath.exists():
        try:
            copy = read_json_object(cpath)
            plan = _check_config(copy, cpath)
        except FileFormatError as e:
            raise FileFormatError(f"{e}{hint if embedded is not None else ''}") from None
    elif embedded is None:
        raise FileNotFoundError(f"{cpath} does not exist and {wpath.name} (format version 1) "
                                "has no copy of it: the adapter is incomplete")
    if embedded is None:
        return copy, plan, sums
    plan = _check_config(embedded, wpath)
    if copy is None:
        warnings.warn(f"{cpath} is missing; using the config stored in {wpath.name} (an "
                      "interrupted save?). Re-save the adapter to restore the copy.",
                      stacklevel=3)
    elif copy != embedded:
        warnings.warn(f"{cpath} differs from the config stored in {wpath.name} with the "
                      "tensors (an interrupted save, or an edited copy); loading the stored "
                      "one. Re-save the adapter to make them agree.", stacklevel=3)
    return embedded, plan, sums


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The config of a saved adapter, format-checked: the copy stored in the weights file
    (format >= 2), else ``adapter_config.json``.

    >>> read_adapter_config("out/adapter")["plan"]["rows"].keys()
    """
    return _read_config(Path(directory))[0]


def _module_of(key: str) -> str:
    if key.startswith("heads."):
        return key[len("heads."):].rpartition(".")[0]
    return key.rpartition(".")[0]


def _check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    bad = []
    for key, t in tensors.items():
        if t.is_floating_point():
            n = int((~torch.isfinite(t)).sum())
            if n:
                bad.append((key, n))
    if bad:
        key, n = bad[0]
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise FileFormatError(
            f"{path}: module {_module_of(key)!r} has {n} non-finite values (NaN/inf) in "
            f"{key!r}{more}; loading it would make the model output NaN/inf. The training "
            "diverged or the file is corrupted: retrain (lower lr) or restore a good copy")


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


def _check_quantization(saved: Any, current: dict[str, Any] | None, where: str) -> None:
    """Refuse a base quantized differently from the one the adapter was trained on (the
    deltas were learned against ``deq(Q)`` of those settings); warn when a float-trained
    adapter goes onto a quantized base."""
    if saved is None:
        if current is not None:
            warnings.warn(f"{where} was trained on a float base; this model is quantized "
                          f"({current}): outputs differ by the quantization error",
                          stacklevel=3)
        return
    if not isinstance(saved, dict):
        raise FileFormatError(f"{where}: 'quantization' must be a JSON object or null, "
                              f"got {saved!r}")
    keys = ("method", "blocksize", "double_quant")  # what the stored weights depend on
    if current is None or any(current.get(k) != saved.get(k) for k in keys):
        what = "a float (unquantized) model" if current is None else f"quantized as {current}"
        raise ValueError(
            f"{where} was trained on a base quantized as {saved}, but this model is {what}: "
            "the deltas were learned against that quantization. Quantize the float base the "
            f"same way first: rowsft_nb.quantize(model, {saved.get('method')!r}, blocksize="
            f"{saved.get('blocksize')}, double_quant={saved.get('double_quant')}, "
            f"compute_dtype=torch.{saved.get('compute_dtype') or 'bfloat16'})")


def load_adapter(base_model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Inject the saved plan into ``base_model`` (in place) and load the saved deltas and
    head weights bit-exactly; returns the model. Every check runs before the model changes:
    a damaged file raises ``FileFormatError`` naming it; an adapter that does not fit fails
    naming the module and both shapes; warns when the base weights hash differs.

    >>> model = load_adapter(AutoModelForCausalLM.from_pretrained(...), "out/adapter")
    """
    directory = Path(directory)
    config, plan, sums = _read_config(directory)
    wpath = directory / WEIGHTS_NAME
    tensors, _ = read_safetensors(wpath, verify=False)
    _check_finite(wpath, tensors)        # names module and count, so before the checksum
    verify_checksums(wpath, tensors, sums)
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
            raise FileFormatError(f"{wpath} lacks {key!r}; the file is incomplete")
        if tuple(tensors[key].shape) != shape:
            raise FileFormatError(f"{wpath}: {key!r} has shape {tuple(tensors[key].shape)} but "
                                  f"the plan for this module needs {shape}")
    for name in plan.modules:
        for kind, index in (("row_index", plan.rows.get(name)),
                            ("column_index", plan.columns.get(name))):
            key = f"{name}.{kind}"
            if key in tensors and (tensors[key].dtype != torch.int64
                                   or not torch.equal(tensors[key], index)):
                raise FileFormatError(f"{wpath}: {key} differs from the plan in the config")
    params = dict(base_model.named_parameters(remove_duplicate=False))
    for key in config.get("head_parameters", []):
        saved = tensors.get(f"heads.{key}")
        if saved is None:
            raise FileFormatError(f"{wpath} lacks the head parameter {key!r}")
        if key not in params:
            raise ValueError(f"{where}: head parameter {key!r} does not exist in this {cls}")
        if tuple(params[key].shape) != tuple(saved.shape):
            module = key.rpartition(".")[0]
            raise ValueError(f"{where}: head module {module!r} has {key!r} of shape "
                             f"{tuple(params[key].shape)} in this {cls} but the adapter saved "
                             f"{tuple(saved.shape)} (different number of labels?)")
    heads = list(config.get("heads", []))
    if heads:  # modules trained fully (modules_to_save): they must exist in this model
        available = [n for n, m in base_model.named_modules()
                     if n and any(True for _ in m.parameters())]
        missing = sorted(set(heads) - set(available))
        if missing:
            raise ValueError(f"{where}: trained heads {missing} are not classifier heads of "
                             f"this {cls} (its trainable heads: "
                             f"{trainable_head_names(base_model, plan) or 'none'}); load "
                             "the adapter onto the model class it was trained with")

    _check_quantization(config.get("quantization"), quant_settings(base_model), where)

    current_hash = model_fingerprint(base_model)
    if config.get("base_model_hash") and config["base_model_hash"] != current_hash:
        warnings.warn(f"{where} was trained on base weights with hash "
                      f"{config['base_model_hash']}, this model has {current_hash}: "
                      "different weights (another checkpoint or a merged model?)", stacklevel=2)

    inject(base_model, plan, bias=bool(config.get("bias")),
           dropout=float(config.get("dropout", 0.0)),
           delta_dtype=_dtype(config.get("delta_dtype")), modules_to_save=heads or None,
           init="zeros" if config.get("init") == "residual" else config.get("init", "zeros"),
           seed=int(config.get("seed", 0)))
    try:
        if config.get("init") == "residual":  # the deltas are loaded below; record the init
            adapter_state(base_model).init = "residual"
        with torch.no_grad():
            for name, layer in adapted_modules(base_model).items():
                for attr in ("delta", "delta_bias", "column_delta"):
                    p = getattr(layer, attr)
                    if p is not None:
                        p.copy_(tensors[f"{name}.{attr}"])
            params = dict(base_model.named_parameters(remove_duplicate=False))
            for key in config.get("head_parameters", []):
                params[key].copy_(tensors[f"heads.{key}"])
    except BaseException:
        unload(base_model)  # back to the base model exactly (modules, flags, head weights)
        raise
    return base_model
