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
    (``"classification"`` or ``"causal_lm"``) and the collator that batches it."""

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


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def make_collator(kind: str, tokenizer=None):
    """The collator for a task kind: ``DataCollatorWithPadding`` for classification (or
    ``default_data_collator`` without a tokenizer), :class:`CausalLMCollator` for causal LM.

    >>> collate = make_collator("classification", tokenizer)
    """
    from transformers import DataCollatorWithPadding, default_data_collator

    if kind == CLASSIFICATION:
        return DataCollatorWithPadding(tokenizer) if tokenizer is not None else default_data_collator
    if kind == CAUSAL_LM:
        return CausalLMCollator(pad_token_id=_pad_id(tokenizer) if tokenizer is not None else 0)
    raise ValueError(f"Unknown task kind {kind!r}; use 'classification' or 'causal_lm'")


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


def prepare_task(task, tokenizer, *, max_length: int = 128, n_train: int | None = None,
                 n_eval: int | None = None, seed: int = 0) -> TaskData:
    """Tokenise an embedded task (by name) or a ``DatasetDict`` with ``text``/``label`` or
    ``prompt``/``response`` columns. ``n_train``/``n_eval`` subsample (seeded) the train and
    the validation/test splits for fast runs.

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

    if {"text", "label"} <= columns:
        kind = CLASSIFICATION
        feature = ds["train"].features["label"]
        label_names = list(getattr(feature, "names", None) or
                           [str(v) for v in sorted(set(ds["train"]["label"]))])

        def encode(batch):
            enc = tokenizer(batch["text"], truncation=True, max_length=max_length)
            enc["labels"] = batch["label"]
            return enc
    elif {"prompt", "response"} <= columns:
        kind, label_names = CAUSAL_LM, []

        def encode(batch):
            rows = [tokenize_instruction(tokenizer, p, r, max_length)
                    for p, r in zip(batch["prompt"], batch["response"])]
            return {k: [row[k] for row in rows] for k in ("input_ids", "attention_mask", "labels")}
    else:
        raise ValueError(f"Cannot tell the task kind from columns {sorted(columns)}: expected "
                         "text+label (classification) or prompt+response (instruction)")

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
