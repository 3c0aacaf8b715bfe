"""Exact PEFT LoRA export and import of a row-sparse adapter.

A row delta ``D`` [r, d_in] on output rows ``idx`` *is* a LoRA with
``lora_A.weight = D`` [r, d_in], ``lora_B.weight = one-hot columns of idx`` [d_out, r] and
scaling 1 (``lora_alpha = r``): ``B @ A`` puts row k of ``D`` into output row ``idx[k]``.
A column delta ``dC`` [d_out, c] on input columns ``cols`` is the transposed case
(``lora_A`` = one-hot rows of ``cols`` [c, d_in], ``lora_B = dC``); a module with both gets
rank r + c (rows first, then columns). GPT-2 ``Conv1D`` modules use the same [r, d_in] /
[d_out, r] layout (PEFT's ``fan_in_fan_out`` only transposes when merging). Bias deltas are
exported exactly through PEFT's ``lora_bias=True`` (``lora_B.bias`` = the bias delta
scattered into the selected rows, zeros elsewhere); trained classifier heads go to
``modules_to_save``. Ranks differ per module: ``rank_pattern`` / ``alpha_pattern`` hold
every module whose rank differs from the global ``r`` (keys are ``re.escape``-d full module
names, so each matches exactly one module).

The export needs no ``peft`` installed; ``peft.PeftModel.from_pretrained(base, dir)``
loads it. The safetensors header also records the row/column split per module and the
adapter settings, so :func:`import_peft` reads it back into the same row adapter bit-exactly;
a LoRA without that record (e.g. re-saved by PEFT) is decomposed from the one-hot structure.

Usage::

    rowsft_nb.export_peft(model, "out/peft")   # adapter_config.json + adapter_model.safetensors
    peft_model = PeftModel.from_pretrained(base, "out/peft")
    model = rowsft_nb.import_peft(base2, "out/peft")  # a row adapter again, same deltas
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import (FileFormatError, atomic_path, read_json_object, read_safetensors_metadata,
                   tensor_sha256, verify_checksums, write_json)
from ..plan import RowPlan
from ..targets import is_linear_like, linear_shape, model_fingerprint
from .layer import RowSparseLinear
from .model import _require_state, adapted_modules, inject, unload

__all__ = ["export_peft", "import_peft", "lora_factors", "PEFT_PREFIX", "EXPORT_FORMAT"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: PEFT's prefix of every saved key (``PeftModel.base_model.model``).
PEFT_PREFIX = "base_model.model."
EXPORT_FORMAT = "rowsft_nb.peft_export"
EXPORT_VERSION = 1
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<param>weight|bias)$")


# ---------------------------------------------------------------------------- export
def lora_factors(layer: RowSparseLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(A [r + c, d_in], B [d_out, r + c], bias [d_out] or None)`` with
    ``B @ A`` = the layer's dense delta (rows: A = delta, B = one-hot; columns: A = one-hot,
    B = column delta) and ``bias`` the bias delta scattered into the selected rows.

    >>> A, B, b = lora_factors(model.get_submodule("model.layers.0.mlp.up_proj"))
    """
    params = layer.delta_parameters()
    dtype = next(iter(params.values())).dtype
    device = layer.rows.device
    d_out, d_in = layer.out_features, layer.in_features
    r, c = layer.rows.numel(), layer.columns.numel()
    a_parts, b_parts = [], []
    if r:
        one_hot = torch.zeros(d_out, r, dtype=dtype, device=device)
        one_hot[layer.rows, torch.arange(r, device=device)] = 1
        a_parts.append(layer.delta.detach())
        b_parts.append(one_hot)
    if c:
        one_hot = torch.zeros(c, d_in, dtype=dtype, device=device)
        one_hot[torch.arange(c, device=device), layer.columns] = 1
        a_parts.append(one_hot)
        b_parts.append(layer.column_delta.detach())
    bias = None
    if layer.delta_bias is not None:
        bias = torch.zeros(d_out, dtype=dtype, device=device)
        bias[layer.rows] = layer.delta_bias.detach()
    return torch.cat(a_parts, 0), torch.cat(b_parts, 1), bias


_TASK_TYPES = (("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
               ("ForQuestionAnswering", "QUESTION_ANS"), ("ForCausalLM", "CAUSAL_LM"),
               ("LMHeadModel", "CAUSAL_LM"))


#: Modules PEFT adds to ``modules_to_save`` by itself for these task types.
_PEFT_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
               "QUESTION_ANS": ("qa_outputs",)}


def _task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for the model class (None: a plain ``PeftModel``)."""
    from ..train import _is_seq2seq_lm

    if _is_seq2seq_lm(model):
        return "SEQ_2_SEQ_LM"
    name = type(model).__name__
    for suffix, task in _TASK_TYPES:
        if name.endswith(suffix):
            return task
    return None


def _holds_rowsft_adapter(directory: Path) -> bool:
    cpath = directory / CONFIG_NAME
    if not cpath.is_file():
        return False
    try:
        return json.loads(cpath.read_text()).get("format") == "rowsft_nb.adapter"
    except (OSError, ValueError, AttributeError):
        return False


def _check_unambiguous(model: nn.Module, targets: list[str], heads: list[str]) -> None:
    """PEFT matches ``target_modules`` entries as ``name`` or ``*.name`` and
    ``modules_to_save`` as ``*name``: refuse names another module would also match."""
    wanted = set(targets)
    for name, _ in model.named_modules():
        if not name or name in wanted or name in heads:
            continue
        hit = next((t for t in targets if name.endswith("." + t)), None)
        hit = hit or next((h for h in heads if name.endswith(h)
                           and not any(name.startswith(x + ".") for x in heads)), None)
        if hit is not None:
            raise ValueError(f"export_peft: PEFT would also apply the entry {hit!r} to module "
                             f"{name!r} (it matches names by suffix), so the export would not "
                             "load exactly; rename or leave out one of the modules")


def export_peft(model: nn.Module, directory: str | os.PathLike, *, uniform_rank: bool = False,
                task_type: str | None = "auto",
                base_model_name_or_path: str | None = None) -> Path:
    """Write the row adapter of ``model`` as a PEFT LoRA adapter (``adapter_config.json`` +
    ``adapter_model.safetensors``) to ``directory``; returns the directory.

    Each module becomes a LoRA of rank rows + columns with scaling 1 (see the module doc);
    ``peft.PeftModel.from_pretrained(base, directory)`` gives the row-adapted outputs (to
    float rounding). ``uniform_rank=True`` pads every module with zero components to the
    largest rank (no ``rank_pattern``: for serving stacks that want one rank). ``task_type``:
    PEFT's (``"auto"``: from the model class). Bias deltas use PEFT's ``lora_bias=True``
    (exact; PEFT cannot merge it into layers without a bias, and some servers do not load
    it). Refuses a merged or non-finite adapter and a folder holding a rowsft_nb adapter.

    >>> export_peft(model, "out/peft"); PeftModel.from_pretrained(base, "out/peft")
    """
    inner, state = _require_state(model, "export a PEFT adapter")
    if not isinstance(uniform_rank, bool):
        raise TypeError(f"uniform_rank must be True or False, got {uniform_rank!r}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"cannot export: {directory} is a file, not a folder")
    if _holds_rowsft_adapter(directory):
        raise ValueError(f"{directory} holds a rowsft_nb adapter (save_adapter) with the same "
                         "file names; export the PEFT adapter into another folder")
    layers = adapted_modules(inner)
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"the adapter is merged into the base weights ({len(merged)} layers, "
                         f"e.g. {merged[0]!r}); a LoRA is applied on top of the *base* "
                         "weights: call rowsft_nb.unmerge(model) first")
    for name, layer in layers.items():
        layer.check_finite(name)
    heads = list(state.heads)
    _check_unambiguous(inner, list(layers), heads)
    if task_type == "auto":
        task_type = _task_type(inner)
    clash = [n for n in layers for head in _PEFT_HEADS.get(task_type, ()) if n.endswith(head)]
    if clash:  # PEFT would wrap the head as a module to save and look for its full weights
        warnings.warn(f"export_peft: {clash[0]!r} has row deltas, but PEFT's task_type="
                      f"{task_type!r} trains it as a whole module; writing task_type=None "
                      "(load with peft.PeftModel.from_pretrained; outputs are the same)",
                      stacklevel=2)
        task_type = None

    factors = {name: lora_factors(layer) for name, layer in layers.items()}
    ranks = {name: a.shape[0] for name, (a, _, _) in factors.items()}
    if uniform_rank:
        top = max(ranks.values())
        for name, (a, b, bias) in list(factors.items()):
            pad = top - a.shape[0]
            if pad:
                a = torch.cat([a, a.new_zeros(pad, a.shape[1])], 0)
                b = torch.cat([b, b.new_zeros(b.shape[0], pad)], 1)
                factors[name] = (a, b, bias)
        r_global, patterns = top, {}
    else:
        counts = Counter(ranks.values())
        r_global = max(counts, key=lambda k: (counts[k], k))
        patterns = {re.escape(n): k for n, k in ranks.items() if k != r_global}
    lora_bias = any(bias is not None for _, _, bias in factors.values())

    tensors: dict[str, torch.Tensor] = {}
    for name, (a, b, bias) in factors.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
        if lora_bias:  # PEFT gives every targeted module a lora_B bias then
            tensors[f"{PEFT_PREFIX}{name}.lora_B.bias"] = (
                bias if bias is not None else b.new_zeros(b.shape[0]))
    params = dict(inner.named_parameters(remove_duplicate=False))
    for key in state.head_backup:
        tensors[f"{PEFT_PREFIX}{key}"] = params[key].detach()

    delta_dtype = next(iter(next(iter(layers.values())).delta_parameters().values())).dtype
    conv = [layer.is_conv1d for layer in layers.values()]
    name_or_path = base_model_name_or_path
    if name_or_path is None:
        name_or_path = getattr(getattr(inner, "config", None), "_name_or_path", None) or None
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": name_or_path,
        "revision": None, "inference_mode": True, "r": int(r_global),
        "lora_alpha": int(r_global), "rank_pattern": patterns, "alpha_pattern": dict(patterns),
        "target_modules": list(layers),
        "lora_dropout": float(state.dropout), "fan_in_fan_out": bool(conv) and all(conv),
        "bias": "none", "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": heads or None,
        "layers_to_transform": None, "layers_pattern": None,
    }
    if lora_bias:  # peft >= 0.14; left out otherwise so that older PEFT reads the config
        config["lora_bias"] = True
    record = {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION,
        "modules": {n: {"rows": int(m.rows.numel()), "columns": int(m.columns.numel())}
                    for n, m in layers.items()},
        "bias": state.bias, "dropout": state.dropout, "init": state.init, "seed": state.seed,
        "heads": heads, "head_parameters": list(state.head_backup),
        "delta_dtype": str(delta_dtype).removeprefix("torch."),
        "base_model_class": state.base_class, "base_model_hash": state.base_hash,
        "plan": state.plan.to_dict(),
    }
    _write_weights(directory / WEIGHTS_NAME, tensors, record)
    write_json(directory / CONFIG_NAME, config)
    return directory


def _write_weights(path: Path, tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
    """safetensors with ``format: pt`` (what loaders of PEFT files expect), the export record
    and a sha256 per tensor in the header; atomic."""
    from safetensors.torch import save

    from .._io import CHECKSUM_KEY

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"format": "pt", "rowsft": json.dumps(record),
            CHECKSUM_KEY: json.dumps({k: tensor_sha256(v) for k, v in tensors.items()})}
    data = save(tensors, metadata=meta)
    with atomic_path(path) as tmp:
        with open(tmp, "r+b") as fh:
            fh.write(data)


# ---------------------------------------------------------------------------- import
def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup (``peft.utils.other.get_pattern_key``)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _one_hot(v: torch.Tensor) -> int | None:
    """The index of the single 1 in ``v`` (all else exactly 0), else None."""
    nz = torch.nonzero(v).flatten()
    if nz.numel() == 1 and float(v[nz[0]]) == 1.0:
        return int(nz[0])
    return None


def _split(name: str, a: torch.Tensor, b: torch.Tensor, split: dict[str, int] | None,
           where: str) -> tuple[list[int], list[int], list[int], list[int]]:
    """``(row components, row indices, column components, column indices)`` of one module's
    LoRA; components that are all zero (padding) are skipped."""
    rank = a.shape[0]
    row_k, rows, col_k, cols = [], [], [], []
    if split is not None:
        r, c = int(split.get("rows", 0)), int(split.get("columns", 0))
        if r + c > rank:
            raise FileFormatError(f"{where}: {name!r} has rank {rank} but its record says "
                                  f"{r} rows + {c} columns")
    for k in range(rank):
        kind = None if split is None else ("row" if k < r else "col" if k < r + c else "pad")
        row = _one_hot(b[:, k]) if kind in (None, "row") else None
        col = _one_hot(a[k]) if kind in (None, "col") and row is None else None
        if row is not None:
            row_k.append(k)
            rows.append(row)
        elif col is not None:
            col_k.append(k)
            cols.append(col)
        elif kind in (None, "pad") and not (bool(a[k].any()) and bool(b[:, k].any())):
            continue  # a zero component (padding): contributes nothing
        else:
            what = {"row": "its lora_B column is not one-hot",
                    "col": "its lora_A row is not one-hot",
                    "pad": "it is recorded as padding but is not zero"}.get(
                kind, "neither its lora_B column nor its lora_A row is one-hot")
            raise ValueError(f"{where}: module {name!r} rank component {k} is not row-sparse "
                             f"({what}): this LoRA is not an exact row adapter; load it with "
                             "peft.PeftModel.from_pretrained instead")
    for what, idx in (("row", rows), ("column", cols)):
        if len(set(idx)) != len(idx):
            dup = next(i for i in idx if idx.count(i) > 1)
            raise ValueError(f"{where}: module {name!r} has two rank components on {what} {dup}; "
                             "a row adapter holds each row/column once")
    return row_k, rows, col_k, cols


def import_peft(base_model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Read a PEFT LoRA adapter written by :func:`export_peft` (or any LoRA whose every rank
    component has a one-hot ``lora_B`` column or ``lora_A`` row) into ``base_model`` as a row
    adapter (in place; returns it). Deltas of an :func:`export_peft` file come back
    bit-exactly. Everything is checked before the model changes; a LoRA that is not
    row-sparse raises ``ValueError`` naming the module.

    >>> model = import_peft(AutoModelForCausalLM.from_pretrained(...), "out/peft")
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    cpath, wpath = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not cpath.is_file() or not wpath.is_file():
        raise FileNotFoundError(f"{directory} holds no PEFT adapter ({CONFIG_NAME} and "
                                f"{WEIGHTS_NAME}); export one with rowsft_nb.export_peft")
    config = read_json_object(cpath)
    if config.get("format") == "rowsft_nb.adapter":
        raise ValueError(f"{directory} is a rowsft_nb adapter, not a PEFT one: load it with "
                         "rowsft_nb.load_adapter")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{cpath}: peft_type is {config.get('peft_type')!r}; only LoRA "
                         "adapters can be row adapters")
    for key in ("use_dora", "use_rslora"):
        if config.get(key):
            raise ValueError(f"{cpath}: {key}=true changes the LoRA beyond B @ A; such an "
                             "adapter cannot be a row adapter")
    record, sums = read_safetensors_metadata(wpath)
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FileFormatError(f"{wpath} is not a readable safetensors file ({e})") from None
    verify_checksums(wpath, tensors, sums)
    if record.get("format") != EXPORT_FORMAT:
        record = {}
    where = f"PEFT adapter {str(directory)!r}"

    lora: dict[str, dict[str, torch.Tensor]] = {}
    head_tensors: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise FileFormatError(f"{wpath}: key {key!r} lacks PEFT's {PEFT_PREFIX!r} prefix")
        rest = key[len(PEFT_PREFIX):]
        m = _LORA_KEY.match(rest)
        if m:
            lora.setdefault(m["module"], {})[f"{m['ab']}.{m['param']}"] = t
        elif ".lora_" in rest:
            raise ValueError(f"{where}: unsupported LoRA tensor {key!r} (only lora_A/lora_B "
                             "of Linear layers)")
        else:
            head_tensors[rest] = t
    if not lora:
        raise FileFormatError(f"{wpath} holds no lora_A/lora_B tensors")

    modules = dict(base_model.named_modules())
    cls = type(base_model).__name__
    if any(isinstance(m, RowSparseLinear) for m in modules.values()):
        raise ValueError(f"{where}: this {cls} already has a row-sparse adapter; import into "
                         "the plain base model (rowsft_nb.unload(model) first)")
    alpha0, r0 = config.get("lora_alpha", 8), config.get("r", 8)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rows: dict[str, list[int]] = {}
    columns: dict[str, list[int]] = {}
    shapes: dict[str, tuple[int, int]] = {}
    deltas: dict[str, dict[str, torch.Tensor]] = {}
    any_bias = bool(config.get("lora_bias"))
    splits = record.get("modules", {})
    for name, parts in lora.items():
        if "A.weight" not in parts or "B.weight" not in parts:
            raise FileFormatError(f"{wpath}: module {name!r} lacks lora_A or lora_B")
        module = modules.get(name)
        if module is None or not is_linear_like(module):
            raise ValueError(f"{where}: module {name!r} is not a Linear/Conv1D of this {cls}; "
                             "was the adapter made for another model?")
        d_out, d_in = linear_shape(module)
        a, b = parts["A.weight"], parts["B.weight"]
        rank = a.shape[0]
        if tuple(a.shape) != (rank, d_in) or tuple(b.shape) != (d_out, rank):
            raise ValueError(f"{where}: module {name!r} has lora_A {tuple(a.shape)} and lora_B "
                             f"{tuple(b.shape)} but this {cls} needs ({rank}, {d_in}) and "
                             f"({d_out}, {rank})")
        r_cfg = _pattern_value(rank_pattern, name, r0)
        if r_cfg != rank:
            raise FileFormatError(f"{wpath}: module {name!r} has rank {rank} but the config "
                                  f"says r={r_cfg}")
        scaling = _pattern_value(alpha_pattern, name, alpha0) / rank
        row_k, idx, col_k, cols = _split(name, a, b, splits.get(name) if record else None, where)
        bias = parts.get("B.bias")
        if not row_k and not col_k:
            continue  # an all-zero LoRA: nothing to adapt
        order = sorted(range(len(idx)), key=idx.__getitem__)
        corder = sorted(range(len(cols)), key=cols.__getitem__)
        idx_sorted = [idx[i] for i in order]
        delta: dict[str, torch.Tensor] = {}
        if row_k:
            delta["delta"] = a[[row_k[i] for i in order]]
        if col_k:
            delta["column_delta"] = b[:, [col_k[i] for i in corder]]
        if bias is not None:
            outside = torch.ones(d_out, dtype=torch.bool)
            outside[idx_sorted] = False
            if bool(bias[outside].any()):
                raise ValueError(f"{where}: module {name!r} has a lora_B bias on rows without "
                                 "a row delta; a row adapter's bias delta covers its rows only")
            if row_k:
                delta["delta_bias"] = bias[idx_sorted]
        if scaling != 1:
            delta = {k: v * scaling if k != "delta_bias" else v for k, v in delta.items()}
        rows[name] = idx_sorted
        columns[name] = sorted(cols)
        shapes[name] = (d_out, d_in)
        deltas[name] = delta
    if not deltas:
        raise ValueError(f"{where}: every LoRA in it is zero; nothing to import")

    meta = {"source": "peft", "peft_directory": str(directory)}
    plan = RowPlan(rows={k: v for k, v in rows.items() if v}, shapes=shapes,
                   columns={k: v for k, v in columns.items() if v}, meta=meta)
    if record.get("plan"):
        saved = RowPlan.from_dict(record["plan"])
        same = (set(saved.modules) == set(plan.modules) and all(
            torch.equal(saved.rows.get(n, torch.empty(0, dtype=torch.int64)),
                        plan.rows.get(n, torch.empty(0, dtype=torch.int64)))
            and torch.equal(saved.columns.get(n, torch.empty(0, dtype=torch.int64)),
                            plan.columns.get(n, torch.empty(0, dtype=torch.int64)))
            for n in plan.modules))
        if not same:
            raise FileFormatError(f"{wpath}: the LoRA tensors do not match the plan recorded "
                                  "with them (edited file?)")
        plan = saved

    # heads (modules_to_save): every parameter of each head module must be in the file
    heads = sorted({k.rpartition(".")[0] for k in head_tensors})
    params = dict(base_model.named_parameters(remove_duplicate=False))
    for key, t in head_tensors.items():
        if key not in params:
            raise ValueError(f"{where}: trained module parameter {key!r} does not exist in "
                             f"this {cls}")
        if tuple(params[key].shape) != tuple(t.shape):
            raise ValueError(f"{where}: {key!r} has shape {tuple(params[key].shape)} in this "
                             f"{cls} but the adapter saved {tuple(t.shape)} (different "
                             "number of labels?)")
    for head in heads:
        missing = [f"{head}.{p}" for p, _ in modules[head].named_parameters()
                   if f"{head}.{p}" not in head_tensors]
        if missing:
            raise ValueError(f"{where}: module {head!r} is saved without {missing}; a row "
                             "adapter trains whole heads")
    dtypes = {t.dtype for d in deltas.values() for t in d.values()}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise FileFormatError(f"{wpath}: LoRA tensors have dtypes {sorted(map(str, dtypes))}; "
                              "expected one floating dtype")
    if record.get("base_model_hash") and record["base_model_hash"] != model_fingerprint(base_model):
        warnings.warn(f"{where} was exported from base weights with hash "
                      f"{record['base_model_hash']}, this model differs (another checkpoint "
                      "or a merged model?)", stacklevel=2)

    inject(base_model, plan, bias=any_bias, dropout=float(config.get("lora_dropout") or 0.0),
           delta_dtype=next(iter(dtypes)), modules_to_save=heads or None,
           init=record.get("init", "zeros"), seed=int(record.get("seed", 0)))
    try:
        with torch.no_grad():
            for name, layer in adapted_modules(base_model).items():
                for attr, value in deltas[name].items():
                    getattr(layer, attr).copy_(value)
            params = dict(base_model.named_parameters(remove_duplicate=False))
            for key, t in head_tensors.items():
                params[key].copy_(t)
    except BaseException:
        unload(base_model)
        raise
    return base_model
