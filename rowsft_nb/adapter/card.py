"""The model card (``README.md``) that :func:`rowsft_nb.save_adapter` writes next to the
adapter, as PEFT does: base model, plan summary, metric, budget, trainable parameters,
labels, and the metrics before/after training when known.

Usage::

    result = train(model, data.train, eval_dataset=data.validation)
    note_training(model, result)          # the card of the next save shows its metrics
    save_adapter(model, "out/adapter")    # adapter files + README.md
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["CARD_NAME", "note_training", "model_card", "write_model_card", "label_config"]

CARD_NAME = "README.md"
_NOTE_ATTR = "_rowsft_training"  # what note_training() recorded, on the adapted model


def _unwrap(model: nn.Module) -> nn.Module:
    from .model import _unwrap as unwrap

    return unwrap(model)


def note_training(model: nn.Module, result: Any = None, **extra: Any) -> None:
    """Record a training run on ``model`` for the model card of its next
    :func:`~rowsft_nb.save_adapter`: ``result`` is a :class:`~rowsft_nb.TrainResult` (its
    ``metrics_before``/``metrics_after``, ``steps``, ``task``); ``extra`` adds or overrides
    entries (e.g. ``data="reviews.csv"``). JSON-able values only.

    >>> note_training(model, result, data="reviews.csv")
    """
    note: dict[str, Any] = {}
    if result is not None:
        for key in ("metrics_before", "metrics_after", "steps", "task", "device"):
            value = getattr(result, key, None)
            if value not in (None, {}, ""):
                note[key] = value
    note.update(extra)
    json.dumps(note)  # refuse what the card could not hold, now rather than at save time
    inner = _unwrap(model)
    inner.__dict__[_NOTE_ATTR] = {**inner.__dict__.get(_NOTE_ATTR, {}), **note}


def label_config(model: nn.Module) -> dict[str, Any]:
    """``{"id2label": {"0": name, ...}}`` for a single-label classifier (what the adapter
    config records so that a base model can be rebuilt with the same labels), else ``{}``.

    >>> label_config(model)   # {'id2label': {'0': 'negative', '1': 'positive'}}
    """
    config = getattr(_unwrap(model), "config", None)
    id2label = getattr(config, "id2label", None)
    if not type(_unwrap(model)).__name__.endswith("ForSequenceClassification") or not id2label:
        return {}
    return {"id2label": {str(int(i)): str(n) for i, n in sorted(id2label.items())}}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def model_card(model: nn.Module, config: dict[str, Any]) -> str:
    """The README.md text for an adapter of ``model`` with the saved adapter ``config``.

    >>> print(model_card(model, read_adapter_config("out/adapter")))
    """
    from .. import __version__

    inner = _unwrap(model)
    plan = config.get("plan", {})
    meta = plan.get("meta", {}) if isinstance(plan, dict) else {}
    base = getattr(getattr(inner, "config", None), "_name_or_path", "") or \
        config.get("base_model_class") or "unknown"
    modules = config.get("modules", {})
    rows = sum(int(m.get("rows", 0)) for m in modules.values())
    columns = sum(int(m.get("columns", 0)) for m in modules.values())
    trainable = int(config.get("trainable_parameters", 0))
    total = meta.get("model_parameters")
    note = inner.__dict__.get(_NOTE_ATTR, {})
    budget = meta.get("budget")
    lines = [
        "---",
        f"base_model: {json.dumps(str(base))}",
        "library_name: rowsft_nb",
        "tags:", "- rowsft_nb", "- row-sparse-fine-tuning", "- spruft",
        "---", "",
        f"# Row-sparse adapter for `{base}`", "",
        "Trained with rowsft_nb (SPruFT: row-based sparse fine-tuning, "
        "Li & Bhaskara 2025): only the selected output rows of each layer were trained.", "",
        "| | |", "|---|---|",
        f"| base model | `{base}` ({config.get('base_model_class') or '?'}) |",
        f"| base weights hash | `{config.get('base_model_hash') or '?'}` |",
        f"| importance metric | {meta.get('metric', '?')} |",
        f"| budget | `{json.dumps(budget, sort_keys=True) if budget is not None else '?'}` |",
        f"| selection | {meta.get('strategy', '?')} |",
        f"| adapted layers | {len(modules)} ({rows:,} rows"
        + (f", {columns:,} columns" if columns else "") + ") |",
        f"| trainable parameters | {trainable:,}"
        + (f" ({100 * trainable / total:.3f}% of {total:,})" if total else "") + " |",
        f"| trained heads | {', '.join(config.get('heads', [])) or 'none'} |",
    ]
    labels = config.get("id2label") or {}
    if labels:
        lines.append(f"| labels | {', '.join(f'{i}: {n}' for i, n in labels.items())} |")
    for key in ("task", "data", "steps", "device"):
        if key in note:
            lines.append(f"| {key} | {_fmt(note[key])} |")
    before, after = note.get("metrics_before") or {}, note.get("metrics_after") or {}
    keys = [k for k in ("accuracy", "loss", "perplexity") if k in before or k in after]
    if keys:
        lines += ["", "## Held-out metrics", "", "| metric | before | after |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(before.get(k, '-'))} | {_fmt(after.get(k, '-'))} |"
                  for k in keys]
    lines += ["", "## Use", "", "```python",
              "from rowsft_nb import load_adapter, merge_and_unload",
              f"model = load_adapter(base_model, \"{{this folder}}\")  # base: {base}",
              "merged = merge_and_unload(model)     # a plain transformers model",
              "```", "",
              f"rowsft_nb {__version__}, adapter format {config.get('version', '?')}.", ""]
    return "\n".join(lines)


def write_model_card(directory: str | os.PathLike, model: nn.Module,
                     config: dict[str, Any]) -> Path:
    """Write :func:`model_card` to ``directory/README.md`` atomically; returns the path.
    A README.md that rowsft_nb did not write (no ``library_name: rowsft_nb`` line) is the
    user's: it is kept as it is, with a warning, and no card is written.

    >>> write_model_card("out/adapter", model, config)
    """
    import warnings

    from .._io import atomic_path

    path = Path(directory) / CARD_NAME
    if path.exists():
        try:
            ours = "library_name: rowsft_nb" in path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            ours = False
        if not ours:
            warnings.warn(f"{path} exists and was not written by rowsft_nb: kept as it is, so the "
                          "adapter has no model card (move it away and save again for one)",
                          stacklevel=3)
            return path
    text = model_card(model, config)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
