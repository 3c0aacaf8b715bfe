"""Tokenised tasks and collators for training and scoring.

Usage::

    data = prepare_task("movie_sentiment", tokenizer, max_length=64, n_train=800)
    data.kind, data.train, data.validation, data.collator   # "classification", Datasets, ...
    batches = calibration_batches(data.train, batch_size=8, n_samples=64, collator=data.collator)

Classification tasks (columns ``text``/``label``) become ``input_ids``/``attention_mask``/
``labels``. Instruction tasks (``prompt``/``response``) become causal-LM examples: the
prompt is wrapped in the tokenizer's chat template when it has one, and ``labels`` are -100
on the prompt tokens, so the loss is on the response only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

CLASSIFICATION = "classification"
CAUSAL_LM = "causal_lm"
SEQ2SEQ = "seq2seq"  # encoder-decoder (T5-style): labels are the decoder targets, no shift
IGNORE_INDEX = -100


@dataclass
class CausalLMCollator:
    """Pads ``input_ids`` (with ``pad_token_id``), ``attention_mask`` (0) and ``labels``
    (-100) on the right to the longest example of the batch.

    >>> collate = CausalLMCollator(pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    """

    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("CausalLMCollator got an empty batch")
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = (length + m - 1) // m * m
        out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            ids = list(f["input_ids"])
            pad = length - len(ids)
            mask = list(f.get("attention_mask", [1] * len(ids)))
            labels = list(f["labels"]) if "labels" in f else list(ids)
            out["input_ids"].append(ids + [self.pad_token_id] * pad)
            out["attention_mask"].append(mask + [0] * pad)
            out["labels"].append(labels + [IGNORE_INDEX] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


@dataclass
class TaskData:
    """A tokenised task: splits ready for :func:`rowsft_nb.train`, the task kind
    (``"classification"`` or ``"causal_lm"``) and the collator that batches it.
    Classification: ``labels`` are the ids ``0..num_labels-1``; ``label_names[i]`` names id
    ``i`` (a ClassLabel's names, else the original label values, sorted, as strings: labels
    {0, 5, 9} become ids 0, 1, 2 with ``label2id == {"0": 0, "5": 1, "9": 2}``).

    >>> model, tok = load_encoder(num_labels=data.num_labels)  # id2label=data.id2label too
    """

    name: str
    kind: str
    train: Any
    validation: Any
    test: Any
    collator: Any
    label_names: list[str] = field(default_factory=list)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def id2label(self) -> dict[int, str]:
        """``{id: name}`` (the format of ``PretrainedConfig.id2label``)."""
        return dict(enumerate(self.label_names))

    @property
    def label2id(self) -> dict[str, int]:
        """``{name: id}``: how the original labels were mapped to ids."""
        return {name: i for i, name in enumerate(self.label_names)}


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


@dataclass
class Seq2SeqCollator:
    """Pads ``input_ids``/``attention_mask`` (encoder side) and ``labels`` (decoder
    targets, -100) separately on the right; the model builds its decoder inputs from labels.

    >>> collate = Seq2SeqCollator(pad_token_id=tokenizer.pad_token_id)
    """

    pad_token_id: int = 0

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("Seq2SeqCollator got an empty batch")
        n_in = max(len(f["input_ids"]) for f in features)
        n_lab = max(len(f["labels"]) for f in features)
        out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            ids, labels = list(f["input_ids"]), list(f["labels"])
            mask = list(f.get("attention_mask", [1] * len(ids)))
            out["input_ids"].append(ids + [self.pad_token_id] * (n_in - len(ids)))
            out["attention_mask"].append(mask + [0] * (n_in - len(ids)))
            out["labels"].append(labels + [IGNORE_INDEX] * (n_lab - len(labels)))
        return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def make_collator(kind: str, tokenizer=None):
    """The collator for a task kind: ``DataCollatorWithPadding`` for classification (or
    ``default_data_collator`` without a tokenizer), :class:`CausalLMCollator` for causal LM,
    :class:`Seq2SeqCollator` for seq2seq.

    >>> collate = make_collator("classification", tokenizer)
    """
    from transformers import DataCollatorWithPadding, default_data_collator

    if kind == CLASSIFICATION:
        return DataCollatorWithPadding(tokenizer) if tokenizer is not None else default_data_collator
    if kind == CAUSAL_LM:
        return CausalLMCollator(pad_token_id=_pad_id(tokenizer) if tokenizer is not None else 0)
    if kind == SEQ2SEQ:
        return Seq2SeqCollator(pad_token_id=_pad_id(tokenizer) if tokenizer is not None else 0)
    raise ValueError(f"Unknown task kind {kind!r}; use 'classification', 'causal_lm' or "
                     "'seq2seq'")


_TOKENIZE_HINT = ("tokenise it first: data = rowsft_nb.prepare_task(DatasetDict({'train': ds}), "
                  "tokenizer), then train(model, data.train, data_collator=data.collator)")


def _known_collator(collator) -> bool:
    """True for the collators this module makes (they need tokenised columns); a custom
    collator may build its inputs from any columns, so those are not checked."""
    from transformers import DataCollatorWithPadding, default_data_collator

    return collator is None or collator is default_data_collator or isinstance(
        collator, (DataCollatorWithPadding, CausalLMCollator, Seq2SeqCollator))


def check_tokenized(dataset, kind: str, *, main_input: str = "input_ids", split: str = "train",
                    collator=None) -> None:
    """Raise a ValueError naming the expected columns (and how to tokenise) when a
    ``datasets.Dataset`` cannot feed ``kind`` through ``collator``; nothing to check for other
    datasets or custom collators.

    >>> check_tokenized(data.train, "classification")
    """
    columns = getattr(dataset, "column_names", None)
    if columns is None or not _known_collator(collator):
        return
    needed = [main_input] + (["labels"] if kind != CAUSAL_LM else [])
    have = set(columns) | ({"labels"} if {"label", "label_ids"} & set(columns) else set())
    missing = [c for c in needed if c not in have]
    raw = sorted(set(columns) & {"text", "label", "prompt", "response", "sentence"})
    if missing:
        what = (f"untokenised columns {raw}" if raw and main_input == "input_ids"
                else f"columns {sorted(columns)}")
        raise ValueError(f"The {split} dataset has {what} but a {kind} model trains on "
                         f"{' + '.join(needed)} (missing {', '.join(missing)}): "
                         + (_TOKENIZE_HINT if main_input == "input_ids" else
                            f"add a {main_input!r} column (the model's main input)"))
    from transformers import DataCollatorWithPadding, default_data_collator

    batches_every_column = (collator is None and kind == CLASSIFICATION) or \
        collator is default_data_collator or isinstance(collator, DataCollatorWithPadding)
    features = getattr(dataset, "features", None) or {}
    strings = sorted(c for c, f in features.items()
                     if getattr(f, "dtype", None) in ("string", "large_string"))
    if strings and batches_every_column:
        raise ValueError(f"The {split} dataset still has text columns {strings}, which the "
                         f"collator cannot batch: drop them with ds.remove_columns({strings})")


def label_values(dataset) -> list | None:
    """The distinct classification labels of a ``datasets.Dataset`` (``labels``, ``label`` or
    ``label_ids`` column), None when there is no such column or the labels are not integers.

    >>> label_values(data.train)   # [0, 1]
    """
    columns = getattr(dataset, "column_names", None) or []
    name = next((c for c in ("labels", "label", "label_ids") if c in columns), None)
    if name is None or not hasattr(dataset, "unique"):
        return None
    values = dataset.unique(name)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return None
    return sorted(values)


def check_label_range(dataset, num_labels: int, *, split: str = "train") -> None:
    """Raise a ValueError naming the labels outside ``[0, num_labels)`` (-100, ignored by the
    loss, is allowed) before any training step.

    >>> check_label_range(data.train, model.config.num_labels)
    """
    values = label_values(dataset)
    if values is None:
        return
    bad = [v for v in values if not (0 <= v < num_labels or v == IGNORE_INDEX)]
    if bad:
        bigger = f"load the model with num_labels={max(values) + 1}, or " if min(bad) >= 0 else ""
        raise ValueError(
            f"The {split} dataset has labels {bad[:10]}{' ...' if len(bad) > 10 else ''} outside "
            f"[0, {num_labels}) (the model has num_labels={num_labels}): {bigger}map the labels "
            f"to 0..{num_labels - 1} (rowsft_nb.prepare_task maps raw labels to ids and records "
            "data.label2id)")


def _subsample(ds, n: int | None, seed: int):
    if n is None or n >= len(ds):
        return ds
    if n <= 0:
        raise ValueError(f"n_train/n_eval must be positive (got {n}); use None for the whole split")
    return ds.shuffle(seed=seed).select(range(n))


def _prompt_and_completion(tokenizer, prompt: str, response: str) -> tuple[str, str]:
    """The prompt text (ending where the answer starts) and the completion text."""
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}],
                                             tokenize=False)
        if full.startswith(head):
            return head, full[len(head):]
        eos = tokenizer.eos_token or ""
        return head, response + eos
    return prompt + "\n", response + (tokenizer.eos_token or "")


def tokenize_instruction(tokenizer, prompt: str, response: str, max_length: int) -> dict[str, list[int]]:
    """One causal-LM example: prompt tokens (labels -100) then response tokens (labels =
    ids). Too long: the start of the prompt is cut first, then the end of the response.

    >>> ex = tokenize_instruction(tok, "Capital of France?", "Paris", max_length=64)
    """
    head, tail = _prompt_and_completion(tokenizer, prompt, response)
    p = tokenizer(head, add_special_tokens=False)["input_ids"]
    c = tokenizer(tail, add_special_tokens=False)["input_ids"]
    if len(p) + len(c) > max_length:
        keep_prompt = max(max_length - len(c), max_length // 2)
        p = p[len(p) - min(len(p), keep_prompt):]
        c = c[:max_length - len(p)]
    ids = p + c
    return {"input_ids": ids, "attention_mask": [1] * len(ids),
            "labels": [IGNORE_INDEX] * len(p) + list(c)}


def _label_ids(ds) -> tuple[list[str], dict[Any, int] | None]:
    """``(label_names, {original label: id} or None)`` for the ``label`` column of every
    split: a ClassLabel keeps its ids (None); other labels (ints such as {0, 5, 9}, or
    strings) are mapped to 0..n-1 in sorted order. Refuses labels it cannot map."""
    feature = ds["train"].features["label"]
    values: set = set()
    for split in ds.values():
        values.update(split.unique("label"))
    if getattr(feature, "names", None):
        bad = sorted(v for v in values if not 0 <= v < len(feature.names))
        if bad:
            raise ValueError(f"label values {bad[:10]} are not ids of the ClassLabel "
                             f"{feature.names} (-1 marks an unlabeled example): drop those rows "
                             "first, e.g. ds = ds.filter(lambda r: r['label'] >= 0)")
        return list(feature.names), None
    if None in values:
        raise ValueError("the label column has missing values (None): drop those rows first")
    kinds = {type(v) for v in values}
    if len(kinds) > 1 or not (kinds <= {int, str, bool}):
        raise ValueError(f"labels must be all integers or all strings, got "
                         f"{sorted(map(repr, values))[:10]}")
    ordered = sorted(values)
    return [str(v) for v in ordered], {v: i for i, v in enumerate(ordered)}


def tokenize_seq2seq(tokenizer, prompt: str, response: str, max_length: int) -> dict[str, list[int]]:
    """One encoder-decoder example: the prompt as encoder input, the response as decoder
    targets (``labels``), each cut to ``max_length`` tokens (with the tokenizer's special
    tokens, e.g. T5's end-of-sequence; the targets always end with it, so the model learns
    to stop).

    >>> ex = tokenize_seq2seq(tok, "translate: hello", "bonjour", max_length=64)
    """
    enc = tokenizer(prompt, truncation=True, max_length=max_length)
    labels = list(tokenizer(text_target=response, truncation=True,
                            max_length=max_length)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and (not labels or labels[-1] != eos):
        labels = labels[:max_length - 1] + [eos]
    return {"input_ids": list(enc["input_ids"]),
            "attention_mask": list(enc.get("attention_mask", [1] * len(enc["input_ids"]))),
            "labels": list(labels)}


def tokenize_text(tokenizer, text: str, max_length: int) -> dict[str, list[int]]:
    """One plain language-modelling example: the text's tokens (plus end-of-sequence) are
    both input and labels.

    >>> ex = tokenize_text(tok, "Once upon a time", max_length=64)
    """
    ids = tokenizer(text + (tokenizer.eos_token or ""), add_special_tokens=False,
                    truncation=True, max_length=max_length)["input_ids"]
    return {"input_ids": list(ids), "attention_mask": [1] * len(ids), "labels": list(ids)}


def prepare_task(task, tokenizer, *, max_length: int = 128, n_train: int | None = None,
                 n_eval: int | None = None, seed: int = 0, kind: str | None = None) -> TaskData:
    """Tokenise an embedded task (by name) or a ``DatasetDict`` with ``text``/``label`` or
    ``prompt``/``response`` columns. ``n_train``/``n_eval`` subsample (seeded) the train and
    the validation/test splits for fast runs. Labels that are not a ClassLabel (e.g. {0, 5,
    9} or strings) become ids 0..n-1 in sorted order; ``data.label2id`` records the mapping.
    ``kind``: ``"seq2seq"`` tokenises prompt/response for an encoder-decoder model (prompt
    -> encoder, response -> ``labels``); ``"causal_lm"`` also takes a lone ``text`` column
    (plain language modelling); default: from the columns (text+label: classification,
    prompt+response: causal LM). Loading files/DataFrames: :func:`rowsft_nb.sources.load_data`.

    >>> data = prepare_task("movie_sentiment", tok, max_length=64, n_train=800, n_eval=200)
    """
    from datasets import DatasetDict

    from .assets import load_task

    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (got {max_length})")
    if tokenizer is None:
        raise ValueError("prepare_task needs a tokenizer (e.g. the one load_encoder() returns)")
    if isinstance(task, str):
        name, ds = task, load_task(task, seed=seed)
    elif isinstance(task, DatasetDict):
        name, ds = "custom", task
    else:
        raise TypeError(f"task must be a task name or a datasets.DatasetDict, got {type(task).__name__}")
    if "train" not in ds:
        raise ValueError(f"The DatasetDict has no 'train' split (splits: {list(ds)})")
    columns = set(ds["train"].column_names)
    splits = {"train": _subsample(ds["train"], n_train, seed)}
    for split in ("validation", "test"):
        splits[split] = _subsample(ds[split], n_eval, seed) if split in ds else None

    if kind not in (None, CLASSIFICATION, CAUSAL_LM, SEQ2SEQ):
        raise ValueError(f"kind must be 'classification', 'causal_lm' or 'seq2seq', got {kind!r}")
    if kind == SEQ2SEQ and {"prompt", "response"} <= columns:
        label_names = []

        def encode(batch):
            rows = [tokenize_seq2seq(tokenizer, p, r, max_length)
                    for p, r in zip(batch["prompt"], batch["response"])]
            return {k: [row[k] for row in rows] for k in ("input_ids", "attention_mask", "labels")}
    elif kind == CAUSAL_LM and "text" in columns and not {"prompt", "response"} <= columns:
        label_names = []

        def encode(batch):
            rows = [tokenize_text(tokenizer, t, max_length) for t in batch["text"]]
            return {k: [row[k] for row in rows] for k in ("input_ids", "attention_mask", "labels")}
    elif kind in (SEQ2SEQ, CAUSAL_LM) and {"text", "label"} <= columns:
        raise ValueError(f"a {kind} model trains on prompt + response columns, but the data "
                         "has text + label (classification): load a classification model, or "
                         "rename the columns to prompt/response")
    elif kind == CLASSIFICATION and not {"text", "label"} <= columns:
        raise ValueError(f"a classification model trains on text + label columns; the data has "
                         f"{sorted(columns)}: rename yours first, e.g. "
                         "ds = ds.rename_column('sentence', 'text')")
    elif {"text", "label"} <= columns:
        kind = CLASSIFICATION
        label_names, to_id = _label_ids(ds)

        def encode(batch):
            enc = tokenizer(batch["text"], truncation=True, max_length=max_length)
            enc["labels"] = [to_id[v] for v in batch["label"]] if to_id else batch["label"]
            return enc
    elif {"prompt", "response"} <= columns and kind in (None, CAUSAL_LM):
        kind, label_names = CAUSAL_LM, []

        def encode(batch):
            rows = [tokenize_instruction(tokenizer, p, r, max_length)
                    for p, r in zip(batch["prompt"], batch["response"])]
            return {k: [row[k] for row in rows] for k in ("input_ids", "attention_mask", "labels")}
    elif "input_ids" in columns:
        raise ValueError(f"The dataset is already tokenised (columns {sorted(columns)}): pass its "
                         "splits to rowsft_nb.train() directly; prepare_task tokenises raw "
                         "text+label or prompt+response columns")
    else:
        raise ValueError(f"Cannot tell the task kind from columns {sorted(columns)}: expected "
                         "text+label (classification) or prompt+response (instruction); rename "
                         "yours first, e.g. ds = ds.rename_column('sentence', 'text')")

    tokenized = {k: (v.map(encode, batched=True, remove_columns=v.column_names)
                     if v is not None else None) for k, v in splits.items()}
    return TaskData(name=name, kind=kind, train=tokenized["train"],
                    validation=tokenized["validation"], test=tokenized["test"],
                    collator=make_collator(kind, tokenizer), label_names=label_names)


def calibration_batches(tokenized, batch_size: int, n_samples: int, collator=None,
                        seed: int | None = None) -> list[dict[str, torch.Tensor]]:
    """The first ``n_samples`` examples (a seeded shuffle first when ``seed`` is given)
    collated into batches of ``batch_size``: the calibration data for scoring.

    >>> batches = calibration_batches(data.train, 8, 64, data.collator)
    """
    from transformers import default_data_collator

    if batch_size <= 0 or n_samples <= 0:
        raise ValueError(f"batch_size and n_samples must be positive (got {batch_size}, {n_samples})")
    ds = tokenized.shuffle(seed=seed) if seed is not None else tokenized
    ds = ds.select(range(min(n_samples, len(ds))))
    collate = collator or default_data_collator
    return [collate([ds[j] for j in range(i, min(i + batch_size, len(ds)))])
            for i in range(0, len(ds), batch_size)]
