"""Bring your own model and data: a local transformers checkpoint folder (or a hub id:
downloaded when online, only from the local cache with ``HF_HUB_OFFLINE=1``) and a data
file or DataFrame.

Usage::

    raw = load_data("reviews.csv", text_column="review", label_column="sentiment")
    kind = infer_model_kind("./my-bert", raw)        # "classification" | "causal_lm" | "seq2seq"
    model, tok = load_model("./my-bert", kind, id2label=dict(enumerate(label_names(raw))))
    data = prepare_task(raw, tok, kind=kind)          # tokenised, string labels -> ids

Data: CSV, JSON Lines (``.jsonl``/``.json``), Parquet, a ``datasets`` ``save_to_disk``
folder, a pandas DataFrame or a ``datasets`` Dataset/DatasetDict. Columns are renamed to
the names :func:`rowsft_nb.prepare_task` reads (``text``/``label`` for classification,
``prompt``/``response`` for instruction tuning, ``text`` alone for plain language
modelling) and the others dropped. Without a validation split (or ``validation=``), a seeded
``validation_fraction`` of the rows is held out. Models load with
``trust_remote_code=False`` always.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from .data import CAUSAL_LM, CLASSIFICATION, SEQ2SEQ

__all__ = ["load_data", "load_model", "load_tokenizer", "infer_model_kind", "kind_from_config",
           "data_kind", "label_names", "model_source_problem", "data_source_problem",
           "DATA_SUFFIXES", "KINDS"]

_log = logging.getLogger(__name__)

KINDS = (CLASSIFICATION, CAUSAL_LM, SEQ2SEQ)
#: file suffixes :func:`load_data` reads (a folder is a ``datasets.save_to_disk`` folder)
DATA_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
_COLUMNS = ("text", "label", "prompt", "response")
_FLAG = {"text": "text_column (--text-column)", "label": "label_column (--label-column)",
         "prompt": "prompt_column (--prompt-column)",
         "response": "response_column (--response-column)"}


# ---------------------------------------------------------------------------- checks
def _looks_like_path(source: str) -> bool:
    """A local path (``./x``, ``/x``, ``~/x``, ``a/b/c``) rather than a hub id (``org/name``)."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source


def model_source_problem(source: str) -> str | None:
    """Why ``source`` is not a loadable model folder, or None (also for a hub id ``org/name``,
    which is checked when it loads). Cheap: reads no weights.

    >>> model_source_problem("./my-bert")   # None when ./my-bert/config.json exists
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            return (f"{path} has no config.json: give a folder written by "
                    "model.save_pretrained(...)")
        return None
    if path.exists():
        return f"{path} is a file; give the checkpoint folder (with config.json)"
    if _looks_like_path(source):
        return f"{path}: no such folder"
    return None  # a hub id


def data_source_problem(source: str) -> str | None:
    """Why ``source`` cannot be read by :func:`load_data`, or None. Cheap: reads no rows.

    >>> data_source_problem("reviews.csv")   # None when the file exists
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if not any((path / n).is_file() for n in ("dataset_dict.json", "state.json",
                                                  "dataset_info.json")):
            return (f"{path} is a folder but not a datasets save_to_disk folder (no "
                    "dataset_dict.json or state.json); give a CSV/JSONL/Parquet file")
        return None
    if not path.exists():
        return f"{path}: no such file"
    if path.suffix.lower() not in DATA_SUFFIXES:
        return (f"{path}: unknown data format {path.suffix or '(no suffix)'!r}; use one of "
                f"{', '.join(DATA_SUFFIXES)} or a datasets save_to_disk folder")
    return None


# ---------------------------------------------------------------------------- data
def _read_table(source: Any):
    """A ``datasets.Dataset`` or ``DatasetDict`` from a path, DataFrame or Dataset."""
    import datasets

    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        return source
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas is a dependency
        pd = None
    if pd is not None and isinstance(source, pd.DataFrame):
        return datasets.Dataset.from_pandas(source, preserve_index=False)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"data must be a file path, a save_to_disk folder, a pandas DataFrame "
                        f"or a datasets Dataset/DatasetDict, got {type(source).__name__}")
    problem = data_source_problem(str(source))
    if problem:
        raise ValueError(problem)
    path = Path(source).expanduser()
    if path.is_dir():
        return datasets.load_from_disk(str(path))
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            frame = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            try:
                frame = pd.read_json(path, lines=True)
            except ValueError:
                if suffix == ".jsonl":
                    raise
                frame = pd.read_json(path)  # a .json array of objects
    except Exception as err:  # a malformed file: name it and the parser's reason
        raise ValueError(f"cannot read {path} as {suffix[1:]}: "
                         f"{str(err).strip().splitlines()[0] if str(err).strip() else err!r}"
                         ) from err
    return datasets.Dataset.from_pandas(frame, preserve_index=False)


def _map_columns(ds, mapping: Mapping[str, str | None], where: str):
    """Rename the mapped columns to text/label/prompt/response, drop the rest."""
    columns = list(ds.column_names)
    renames: dict[str, str] = {}
    for canonical, given in mapping.items():
        if given is None:
            continue
        if given not in columns:
            raise ValueError(f"{where} has no column {given!r} ({_FLAG[canonical]}); its "
                             f"columns are {columns}")
        renames[given] = canonical
    for canonical in _COLUMNS:  # an unmapped column with a canonical name stays, unless taken
        if canonical in columns and canonical not in renames and canonical not in renames.values():
            renames[canonical] = canonical
    keep = [c for c in columns if c in renames]
    ds = ds.select_columns(keep)
    real = {k: v for k, v in renames.items() if k != v}
    if real:
        # two-step rename so that swaps (text <-> label) do not collide
        ds = ds.rename_columns({k: f"__rowsft_{v}" for k, v in real.items()})
        ds = ds.rename_columns({f"__rowsft_{v}": v for v in real.values()})
    present = set(ds.column_names)
    if not ({"text", "label"} <= present or {"prompt", "response"} <= present
            or "text" in present):
        raise ValueError(
            f"{where} has columns {columns} but none of the layouts rowsft_nb trains on: "
            "text + label (classification), prompt + response (instruction tuning) or text "
            "(language modelling). Name yours with text_column=/label_column= "
            "(--text-column/--label-column) or prompt_column=/response_column= "
            "(--prompt-column/--response-column)")
    if {"text", "label"} <= present and {"prompt", "response"} <= present:
        raise ValueError(f"{where} maps both text + label and prompt + response: choose one "
                         "layout (leave out the other column flags)")
    for name in ds.column_names:
        missing = sum(1 for v in ds[name] if v is None or (isinstance(v, float) and v != v))
        if missing:
            raise ValueError(f"{where}: column {name!r} has {missing} missing values; drop "
                             "those rows first (e.g. frame.dropna())")
    return ds


def load_data(source: Any, *, text_column: str | None = None, label_column: str | None = None,
              prompt_column: str | None = None, response_column: str | None = None,
              validation: Any = None, validation_fraction: float = 0.1, seed: int = 0):
    """A ``DatasetDict`` with ``train`` and ``validation`` splits and the columns
    :func:`rowsft_nb.prepare_task` reads, from a file, folder, DataFrame or Dataset.
    ``*_column`` name your columns; ``validation``: a second source for the held-out split;
    without one (and without a ``validation``/``test`` split in a saved DatasetDict) a seeded
    ``validation_fraction`` of the rows is held out. Raises one ValueError naming the file,
    the column and the flag on bad input.

    >>> raw = load_data("reviews.csv", text_column="review", label_column="stars")
    """
    import datasets

    if not (isinstance(validation_fraction, (int, float)) and 0 < validation_fraction < 1):
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}")
    mapping = {"text": text_column, "label": label_column, "prompt": prompt_column,
               "response": response_column}
    where = str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
    table = _read_table(source)
    splits: dict[str, Any] = {}
    if isinstance(table, datasets.DatasetDict):
        if "train" not in table:
            raise ValueError(f"{where} has no 'train' split (splits: {list(table)})")
        splits["train"] = table["train"]
        held = next((s for s in ("validation", "test") if s in table), None)
        if held is not None and validation is None:
            splits["validation"] = table[held]
    else:
        splits["train"] = table
    splits = {k: _map_columns(v, mapping, where if k == "train" else f"{where} [{k}]")
              for k, v in splits.items()}
    if validation is not None:
        vwhere = str(validation) if isinstance(validation, (str, os.PathLike)) else "validation"
        vtable = _read_table(validation)
        if isinstance(vtable, datasets.DatasetDict):
            vtable = vtable[next(iter(vtable))]
        splits["validation"] = _map_columns(vtable, mapping, vwhere)
    if "validation" not in splits:
        train = splits["train"]
        if len(train) < 2:
            raise ValueError(f"{where} has {len(train)} rows; need at least 2 to hold out a "
                             "validation split (or pass validation=/--validation-data)")
        parts = train.train_test_split(test_size=validation_fraction, seed=seed, shuffle=True)
        splits = {"train": parts["train"], "validation": parts["test"]}
    if len(splits["train"]) == 0:
        raise ValueError(f"{where} has no training rows")
    return datasets.DatasetDict(splits)


def data_kind(raw) -> str:
    """The layout of mapped data: ``"classification"`` (text + label), ``"instruction"``
    (prompt + response) or ``"text"`` (text only).

    >>> data_kind(load_data("reviews.csv"))   # 'classification'
    """
    columns = set(raw["train"].column_names)
    if {"text", "label"} <= columns:
        return "classification"
    if {"prompt", "response"} <= columns:
        return "instruction"
    return "text"


def label_names(raw) -> list[str]:
    """The class names of text + label data as :func:`rowsft_nb.prepare_task` numbers them
    (id ``i`` is ``label_names(raw)[i]``; strings and other labels in sorted order).

    >>> id2label = dict(enumerate(label_names(raw)))
    """
    from .data import _label_ids

    return _label_ids(raw)[0]


# ---------------------------------------------------------------------------- models
def _seq2seq_names() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values())


def kind_from_class_name(name: str, *, encoder_decoder: bool = False) -> str | None:
    """The task kind a model class name implies, or None (a bare or masked-LM encoder).

    >>> kind_from_class_name("BertForSequenceClassification")   # 'classification'
    """
    if name.endswith("ForSequenceClassification"):
        return CLASSIFICATION
    if name in _seq2seq_names() or (encoder_decoder and name.endswith(
            ("ForConditionalGeneration", "ForSeq2SeqLM"))):
        return SEQ2SEQ
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return CAUSAL_LM
    return None


def kind_from_config(config) -> str | None:
    """The task kind a ``PretrainedConfig`` names through ``architectures`` (then
    ``is_encoder_decoder`` for seq2seq model types), or None when it does not say.

    >>> kind_from_config(AutoConfig.from_pretrained("./my-t5"))   # 'seq2seq'
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

    enc_dec = bool(getattr(config, "is_encoder_decoder", False))
    for arch in getattr(config, "architectures", None) or []:
        kind = kind_from_class_name(arch, encoder_decoder=enc_dec)
        if kind is not None:
            return kind
    seq2seq_types = MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
    if enc_dec and getattr(config, "model_type", None) in seq2seq_types:
        return SEQ2SEQ
    return None


def _config(source: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot read the model config of {source!r}: {first} (a local "
                         "folder needs config.json; a hub id must be in the local cache "
                         "when offline or HF_HUB_OFFLINE=1)") from err


def infer_model_kind(source: str, raw=None, *, task_kind: str | None = None) -> str:
    """``"classification"``, ``"causal_lm"`` or ``"seq2seq"`` for a checkpoint: ``task_kind``
    when given, else from its config (``architectures``, ``is_encoder_decoder``), else from
    the data layout (text + label: classification). Refuses data that does not fit the kind.

    >>> infer_model_kind("./my-gpt2", raw)   # 'causal_lm'
    """
    if task_kind is not None and task_kind not in KINDS:
        raise ValueError(f"task_kind must be one of {', '.join(KINDS)}, got {task_kind!r}")
    config = _config(source)
    layout = data_kind(raw) if raw is not None else None
    kind = task_kind or kind_from_config(config)
    if kind is None:
        if layout == "classification":
            kind = CLASSIFICATION
        elif layout is not None:
            kind = SEQ2SEQ if getattr(config, "is_encoder_decoder", False) else CAUSAL_LM
        else:
            raise ValueError(f"cannot tell the task kind of {source!r} (config architectures "
                             f"{getattr(config, 'architectures', None)}); pass task_kind= "
                             "(--task-kind) classification, causal_lm or seq2seq")
    if layout is not None:
        check_layout(kind, layout, explicit=task_kind is not None)
    return kind


def check_layout(kind: str, layout: str, *, explicit: bool = False) -> None:
    """Raise a ValueError when data of ``layout`` (see :func:`data_kind`) cannot train a
    ``kind`` model, naming the flags that fix it.

    >>> check_layout("classification", "instruction")   # ValueError
    """
    how = "" if explicit else " (inferred from the model config; override with --task-kind)"
    if kind == CLASSIFICATION and layout != "classification":
        raise ValueError(f"a classification model{how} trains on text + label columns, but the "
                         f"data has {layout} columns: map them with --text-column and "
                         "--label-column")
    if kind == SEQ2SEQ and layout != "instruction":
        raise ValueError(f"a seq2seq model{how} trains on prompt + response columns, but the "
                         f"data has {layout} columns: map them with --prompt-column and "
                         "--response-column")
    if kind == CAUSAL_LM and layout == "classification":
        raise ValueError(f"a causal LM{how} trains on prompt + response (or text) columns, but "
                         "the data has text + label: pass --task-kind classification to train "
                         "a classification head on it, or map --prompt-column/--response-column")


def load_tokenizer(source: str):
    """``AutoTokenizer`` of a checkpoint folder (or hub id); a tokenizer without a padding
    token pads with its end-of-sequence token.

    >>> tok = load_tokenizer("./my-gpt2")
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load a tokenizer from {source!r}: {first} (save one with "
                         "tokenizer.save_pretrained into the model folder, or pass "
                         "--tokenizer FOLDER)") from err
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def _auto_class(kind: str):
    import transformers

    return {CLASSIFICATION: transformers.AutoModelForSequenceClassification,
            CAUSAL_LM: transformers.AutoModelForCausalLM,
            SEQ2SEQ: transformers.AutoModelForSeq2SeqLM}[kind]


def load_model(source: str, kind: str, *, id2label: Mapping[int, str] | None = None,
               tokenizer: Any = None, dtype: torch.dtype | str | None = None, seed: int = 0):
    """``(model, tokenizer)`` for a checkpoint folder (or hub id) as a ``kind`` model
    (``AutoModelForSequenceClassification`` / ``ForCausalLM`` / ``ForSeq2SeqLM``), in eval
    mode, ``trust_remote_code=False``. Classification: ``id2label`` sets the number of labels
    and the names in ``model.config``; a head of another size (or none) is initialised anew,
    seeded by ``seed``. ``tokenizer``: a folder or a tokenizer object (default: ``source``).

    >>> model, tok = load_model("./my-bert", "classification", id2label={0: "neg", 1: "pos"})
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    tok = load_tokenizer(tokenizer or source) if tokenizer is None or isinstance(
        tokenizer, (str, os.PathLike)) else tokenizer
    config = _config(source)
    kwargs: dict[str, Any] = {"trust_remote_code": False, "output_loading_info": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if kind == CLASSIFICATION and id2label is not None:
        names = {int(i): str(n) for i, n in id2label.items()}
        kwargs.update(num_labels=len(names), id2label=names,
                      label2id={n: i for i, n in names.items()})
        has_head = kind_from_config(config) == CLASSIFICATION
        if has_head and getattr(config, "num_labels", None) != len(names):
            _log.warning("%s has a %d-label classification head; the data has %d labels, so "
                         "the head is initialised anew", source, config.num_labels, len(names))
            kwargs["ignore_mismatched_sizes"] = True
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # our own one-line note below replaces its warning
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # a new head is initialised the same way every time
            model, info = _auto_class(kind).from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load {source!r} as a {kind} model: {first}") from err
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = list(info.get("missing_keys") or []) + [
        m[0] if isinstance(m, tuple) else m for m in info.get("mismatched_keys") or []]
    if missing:
        _log.info("%s: %d weights not in the checkpoint were initialised (seed %d), e.g. %s",
                  source, len(missing), seed, sorted(missing)[0])
    if kind == CLASSIFICATION and getattr(model.config, "pad_token_id", None) is None \
            and tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id  # classifiers pool at the last real token
    return model.eval(), tok
