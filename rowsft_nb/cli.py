"""Command line: ``rowsft-nb demo | doctor | score | select | train | merge | export | bench``.

Usage::

    rowsft-nb demo                        # MiniLM + movie reviews: score, select 5%, train, save
    # your own checkpoint folder (save_pretrained) and data file, one step at a time:
    rowsft-nb score  --model ./my-bert --data reviews.csv --text-column review \\
                     --label-column stars --out report.safetensors
    rowsft-nb select --report report.safetensors --ratio 0.05 --out plan.json
    rowsft-nb train  --model ./my-bert --data reviews.csv --text-column review \\
                     --label-column stars --plan plan.json --out adapter/
    rowsft-nb merge  --model ./my-bert --adapter adapter/ --out merged/     # a plain model
    rowsft-nb export --model ./my-bert --adapter adapter/ --out peft/       # PEFT LoRA
    rowsft-nb train --task sms_spam --ratio 0.05 --out outputs/sms-adapter  # embedded task
    rowsft-nb doctor

``--model`` is a checkpoint folder, a hub id (downloaded when online; with
``HF_HUB_OFFLINE=1`` only from the local cache) or an embedded model (``encoder``, ``causal_lm``); the task
kind (classification, causal_lm, seq2seq) comes from its config (``--task-kind`` overrides).
Every command checks its flags before it loads a model: a bad one exits with status 2 and
one line naming it.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

MODELS = ("encoder", "causal_lm")  # embedded models; anything else is a folder or hub id
KINDS = ("classification", "causal_lm", "seq2seq")
DTYPES = ("float32", "bfloat16", "float16")


class UsageError(Exception):
    """Bad input found while loading (a missing column, labels that do not fit): printed as
    one line, exit status 2."""


def _quiet() -> None:
    """Offline and without per-map progress bars or advisory warnings; library messages
    (logging, INFO and up) go to stderr."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    log = logging.getLogger("rowsft_nb")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def _threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def _task_names() -> list[str]:
    from .assets import TASKS

    return list(TASKS)


def _fmt_metrics(metrics: dict) -> str:
    keys = [k for k in ("accuracy", "loss", "perplexity") if k in metrics]
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys) or "-"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---------------------------------------------------------------------------- loading
def _embedded(args) -> bool:
    return args.model in MODELS


def _raw_data(args, seed: int):
    """``(DatasetDict, name)``: the embedded ``--task`` or ``--data`` with the column flags."""
    if args.data is None:
        from .assets import load_task

        task = args.task or "movie_sentiment"
        return load_task(task, seed=seed), task
    from .sources import load_data

    raw = load_data(args.data, text_column=args.text_column, label_column=args.label_column,
                    prompt_column=args.prompt_column, response_column=args.response_column,
                    validation=args.validation_data,
                    validation_fraction=args.validation_fraction, seed=seed)
    return raw, Path(args.data).name


def _kind(args, raw) -> str:
    from .sources import check_layout, data_kind, infer_model_kind

    if _embedded(args):
        kind = args.task_kind or ("classification" if args.model == "encoder" else "causal_lm")
        check_layout(kind, data_kind(raw), explicit=True)
        return kind
    return infer_model_kind(args.model, raw, task_kind=args.task_kind)


def _load(args, kind: str, id2label: dict[int, str] | None):
    """``(model, tokenizer)``: an embedded model or ``--model`` as a ``kind`` model."""
    import torch

    if args.model == "encoder":
        from .assets import load_encoder

        model, tok = load_encoder(num_labels=len(id2label) if id2label else 2, seed=args.seed,
                                  dtype=getattr(torch, args.dtype))
        if id2label:
            model.config.id2label = dict(id2label)
            model.config.label2id = {n: i for i, n in id2label.items()}
        return model, tok
    if args.model == "causal_lm":
        from .assets import load_causal_lm

        return load_causal_lm(dtype=getattr(torch, args.dtype))
    from .sources import load_model

    return load_model(args.model, kind, id2label=id2label, tokenizer=args.tokenizer,
                      dtype=args.dtype, seed=args.seed)


def _inputs(args, *, n_train: int | None, n_eval: int | None):
    """``(model, tokenizer, TaskData, held-out split)`` for score/train: data first (cheap,
    and its labels size the classifier), then the model."""
    from .data import prepare_task
    from .sources import label_names

    try:
        raw, name = _raw_data(args, args.seed)
        kind = _kind(args, raw)
        id2label = dict(enumerate(label_names(raw))) if kind == "classification" else None
        model, tok = _load(args, kind, id2label)
        data = prepare_task(raw, tok, kind=kind, max_length=args.max_length, n_train=n_train,
                            n_eval=n_eval, seed=args.seed)
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise UsageError(_first_line(err)) from err
    data.name = name
    held_out = data.test if data.test is not None else data.validation
    return model, tok, data, held_out


def _describe(model, data, held_out, max_length: int) -> str:
    return (f"model: {type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} "
            f"parameters, {data.kind}); data {data.name}: {len(data.train)} train / "
            f"{len(held_out) if held_out is not None else 0} held-out examples, max_length "
            f"{max_length}" + (f", {data.num_labels} labels" if data.num_labels else ""))


def _score_and_select(model, data, args):
    """Score on ``args.calib_samples`` training examples, keep ``args.ratio`` of rows."""
    from .data import calibration_batches
    from .scoring import score
    from .selection import Ratio, select

    batches = calibration_batches(data.train, args.batch_size, args.calib_samples,
                                  data.collator, seed=args.seed)
    report = score(model, batches, metric=args.metric, seed=args.seed,
                   progress=not args.no_progress)
    return report, select(report, Ratio(args.ratio))


def _run_pipeline(args, *, title: str) -> int:
    """Load -> tokenise -> (score -> select | --plan) -> inject -> train -> save."""
    from .adapter import inject, save_adapter, trainable_parameters
    from .adapter.card import note_training
    from .plan import RowPlan
    from .train import train

    t0 = time.perf_counter()
    print(f"== {title} ==")
    model, tok, data, held_out = _inputs(args, n_train=args.n_train, n_eval=args.n_eval)
    print(_describe(model, data, held_out, args.max_length))

    if getattr(args, "plan", None):
        plan = RowPlan.load(args.plan)
        try:
            plan.validate(model)
        except ValueError as err:
            raise UsageError(f"--plan {args.plan} does not fit {type(model).__name__}: "
                             f"{_first_line(err)}") from err
        print(f"plan: {args.plan} ({plan.num_rows():,} rows in {len(plan.modules)} layers)")
    else:
        t = time.perf_counter()
        report, plan = _score_and_select(model, data, args)
        print(f"scored {len(report.scores)} Linear layers with {args.metric!r} on "
              f"{args.calib_samples} examples in {time.perf_counter() - t:.1f} s; selected "
              f"{args.ratio:.0%} of rows per layer: {plan.num_rows():,} rows in "
              f"{len(plan.modules)} layers")
    inject(model, plan)
    trainable, total = trainable_parameters(model)
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%"
          + ("; row deltas + the classifier head)" if data.kind == "classification" else ")"))

    result = train(model, data.train, eval_dataset=held_out, tokenizer=tok, task=data.kind,
                   data_collator=data.collator, lr=args.lr, epochs=args.epochs,
                   max_steps=args.max_steps, batch_size=args.batch_size, device=args.device,
                   seed=args.seed, logging_steps=max(1, args.logging_steps),
                   progress_bar=not args.no_progress)
    print(f"trained {result.steps} steps on {result.device} in {result.seconds:.1f} s"
          + (f" ({result.stop_reason})" if result.stop_reason else ""))
    print(f"held-out before: {_fmt_metrics(result.metrics_before)}")
    print(f"held-out after:  {_fmt_metrics(result.metrics_after)}")
    note_training(model, result, data=data.name)
    out = save_adapter(model, args.out)
    print(f"adapter saved to {Path(out).resolve()}")
    print(f"total time {time.perf_counter() - t0:.0f} s")
    return 0


def _adapted_base(args):
    """``(model with the adapter loaded, tokenizer, adapter config)`` for merge/export: the
    base built as the class the adapter was trained on, with its labels."""
    from .adapter import load_adapter, read_adapter_config
    from .sources import kind_from_class_name

    try:
        config = read_adapter_config(args.adapter)
        kind = args.task_kind or kind_from_class_name(config.get("base_model_class") or "")
        if kind is None and not _embedded(args):
            from .sources import infer_model_kind

            kind = infer_model_kind(args.model)
        kind = kind or ("classification" if args.model == "encoder" else "causal_lm")
        labels = config.get("id2label")
        id2label = {int(i): n for i, n in labels.items()} if labels else None
        model, tok = _load(args, kind, id2label)
        load_adapter(model, args.adapter)
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise UsageError(_first_line(err)) from err
    return model, tok, config


# ---------------------------------------------------------------------------- commands
def cmd_demo(args) -> int:
    """The whole pipeline on the embedded default (MiniLM + movie-review sentiment)."""
    return _run_pipeline(args, title="rowsft-nb demo: row-sparse fine-tuning of all-MiniLM-L6-v2 "
                                     "on Rotten Tomatoes snippets")


def cmd_train(args) -> int:
    return _run_pipeline(args, title=f"rowsft-nb train: {args.model} on "
                                     f"{args.data or args.task or 'movie_sentiment'}")


def cmd_score(args) -> int:
    """Score a task with a metric and save the ImportanceReport (safetensors)."""
    from .data import calibration_batches
    from .scoring import score

    model, _, data, _ = _inputs(args, n_train=args.n_samples, n_eval=1)
    batches = calibration_batches(data.train, args.batch_size, args.n_samples, data.collator,
                                  seed=args.seed)
    report = score(model, batches, metric=args.metric, seed=args.seed, device=(
        None if args.device == "auto" else args.device), progress=not args.no_progress)
    report.save(args.out)
    print(f"scored {len(report.scores)} layers of {type(model).__name__} with {args.metric!r} "
          f"on {min(args.n_samples, len(data.train))} examples of {data.name}; report saved to "
          f"{Path(args.out).resolve()}")
    return 0


def _budget(args):
    from .selection import FixedRows, ParamBudget, Ratio

    if args.rows is not None:
        return FixedRows(args.rows)
    if args.params is not None:
        value = float(args.params)
        params = int(value) if value > 1 else value
        return ParamBudget(params, allocator=args.allocator)
    return Ratio(args.ratio if args.ratio is not None else 0.05)


def cmd_select(args) -> int:
    """Report -> plan: pick rows under a budget and save the RowPlan (JSON); loads no model."""
    from .scoring import ImportanceReport
    from .selection import select

    try:
        report = ImportanceReport.load(args.report)
        plan = select(report, _budget(args), min_rows=args.min_rows, max_rows=args.max_rows,
                      include=args.include, exclude=args.exclude,
                      head_aligned=args.head_aligned, multiple_of=args.multiple_of)
    except (ValueError, TypeError) as err:
        raise UsageError(_first_line(err)) from err
    plan.save(args.out)
    total = sum(d_out for d_out, _ in plan.shapes.values()) or 1
    print(f"selected {plan.num_rows():,} of {total:,} rows ({plan.num_rows() / total:.2%}) in "
          f"{len(plan.modules)} layers with {plan.meta.get('budget')}; plan saved to "
          f"{Path(args.out).resolve()}")
    return 0


def cmd_merge(args) -> int:
    """Base + adapter -> a plain transformers checkpoint folder (weights merged)."""
    from ._io import publish_dir, staging_dir
    from .adapter import merge_and_unload

    model, tok, _ = _adapted_base(args)
    merged = merge_and_unload(model)
    out = Path(args.out)
    with staging_dir(out) as staging:
        merged.save_pretrained(staging / "model")
        tok.save_pretrained(staging / "model")
        publish_dir(staging / "model", out)
    print(f"merged {args.adapter} into {type(merged).__name__}; saved to {out.resolve()} "
          "(load it with from_pretrained; no rowsft_nb needed)")
    return 0


def cmd_export(args) -> int:
    """Base + adapter -> a PEFT LoRA adapter folder (exact: rank = rows)."""
    from .adapter.peft_io import export_peft

    model, _, _ = _adapted_base(args)
    name = None if _embedded(args) else args.model
    try:
        out = export_peft(model, args.out, uniform_rank=args.uniform_rank,
                          base_model_name_or_path=name)
    except (ValueError, NotADirectoryError) as err:
        raise UsageError(_first_line(err)) from err
    print(f"exported {args.adapter} as a PEFT LoRA adapter to {Path(out).resolve()} "
          "(peft.PeftModel.from_pretrained(base, folder) loads it)")
    return 0


def cmd_doctor(args) -> int:
    from . import doctor

    text, ok = doctor.report()
    print(text)
    return 0 if ok else 1


def cmd_bench(args) -> int:
    # The runner lives in the source checkout (benchmarks/bench_all.py), not in the package.
    from .bench.locate import RUNNER_MISSING, find_runner, load_runner

    runner = find_runner()
    if runner is None:
        print(f"rowsft-nb bench: {RUNNER_MISSING}", file=sys.stderr)
        return 2
    print(f"rowsft-nb bench: running {runner}", file=sys.stderr)
    return int(load_runner(runner).main(args.bench_args) or 0)


# ---------------------------------------------------------------------------- flags
def _add_model_args(p: argparse.ArgumentParser, *, default: str | None = "encoder") -> None:
    p.add_argument("--model", default=default, required=default is None,
                   help="a checkpoint folder (save_pretrained), a hub id (downloaded when "
                        "online unless HF_HUB_OFFLINE=1), or an embedded model: encoder "
                        "(all-MiniLM-L6-v2 classifier), causal_lm (SmolLM2-135M)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: --model)")
    p.add_argument("--task-kind", choices=KINDS, default=None,
                   help="override the kind inferred from the model config")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default=None, choices=_task_names(),
                   help="an embedded task (default movie_sentiment unless --data is given)")
    p.add_argument("--data", default=None, help="your data: CSV, JSON Lines, Parquet or a "
                   "datasets save_to_disk folder")
    p.add_argument("--validation-data", default=None,
                   help="held-out data (default: a seeded --validation-fraction of --data)")
    p.add_argument("--validation-fraction", type=float, default=0.1)
    for col in ("text", "label", "prompt", "response"):
        p.add_argument(f"--{col}-column", default=None,
                       help=f"the column of --data holding the {col} (default: {col!r})")


def _add_common_args(p: argparse.ArgumentParser, *, max_length: int, batch_size: int) -> None:
    p.add_argument("--max-length", type=int, default=max_length)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--device", default="auto",
                   help="auto (CUDA, then MPS, then CPU), cuda, mps, cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_pipeline_args(p: argparse.ArgumentParser, *, out: str, n_train: int | None,
                       n_eval: int | None, max_length: int, lr: float, epochs: float,
                       batch_size: int, calib: int) -> None:
    _add_model_args(p)
    _add_data_args(p)
    _add_common_args(p, max_length=max_length, batch_size=batch_size)
    p.add_argument("--metric", default="taylor", help="importance metric (see rowsft_nb.METRICS)")
    p.add_argument("--ratio", type=float, default=0.05, help="fraction of rows per layer")
    p.add_argument("--calib-samples", type=int, default=calib, help="examples for scoring")
    p.add_argument("--n-train", type=int, default=n_train, help="training examples (default: all)")
    p.add_argument("--n-eval", type=int, default=n_eval, help="held-out examples (default: all)")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--epochs", type=float, default=epochs)
    p.add_argument("--max-steps", type=int, default=None, help="overrides --epochs")
    p.add_argument("--logging-steps", type=int, default=20)
    p.add_argument("--out", default=out, help="adapter folder")


# ---------------------------------------------------------------------------- checks
def _device_problem(device: str, *, indexed_ok: bool) -> str | None:
    """Why ``--device`` cannot be used here, or None. ``indexed_ok``: ``cuda:N`` of an
    existing GPU is fine (scoring moves the model there; Trainer does not)."""
    import torch

    from .train import resolve_device

    if indexed_ok and device.startswith("cuda:") and device[5:].isdigit() and \
            torch.cuda.is_available() and int(device[5:]) < torch.cuda.device_count():
        return None
    try:
        resolve_device(device)
    except ValueError as err:
        return str(err)
    return None


def _file_problem(flag: str, path: str, load) -> str | None:
    """Why ``path`` cannot be read by ``load``, or None."""
    if not os.path.isfile(path):
        return f"{flag} {path}: no such file" if not os.path.exists(path) else \
            f"{flag} {path}: not a file"
    try:
        load(path)
    except Exception as err:  # any malformed file: report it on one line, before loading a model
        return f"{flag} {path}: {_first_line(err)}"
    return None


def _plan_problem(path: str) -> str | None:
    """Why ``--plan`` cannot be read as a RowPlan, or None."""
    from .plan import RowPlan

    return _file_problem("--plan", path, RowPlan.load)


def _model_problems(args) -> list[str | None]:
    from .sources import model_source_problem

    out: list[str | None] = []
    if not _embedded(args):
        problem = model_source_problem(args.model)
        out.append(problem and f"--model {args.model}: {problem}")
    elif args.task_kind and args.task_kind != ("classification" if args.model == "encoder"
                                               else "causal_lm"):
        out.append(f"--task-kind {args.task_kind} does not fit the embedded --model "
                   f"{args.model}; give a checkpoint folder for that kind")
    tok = getattr(args, "tokenizer", None)
    if tok is not None and not os.path.isdir(os.path.expanduser(tok)) and \
            tok.startswith((".", "/", "~")):
        out.append(f"--tokenizer {tok}: no such folder")
    return out


def _data_problems(args) -> list[str | None]:
    import math

    from .sources import data_source_problem

    out: list[str | None] = []
    mapped = [f"--{c}-column" for c in ("text", "label", "prompt", "response")
              if getattr(args, f"{c}_column") is not None]
    if args.data is not None and args.task is not None:
        out.append(f"--task {args.task} and --data {args.data}: give one (an embedded task or "
                   "your data file)")
    if args.data is None:
        if mapped:
            out.append(f"{mapped[0]} maps a column of --data; give --data FILE")
        if args.validation_data is not None:
            out.append("--validation-data needs --data (the training data)")
        from .assets import TASKS

        task = args.task or "movie_sentiment"
        kind = TASKS[task].kind
        if args.model == "encoder" and kind != "classification":
            out.append(f"--model encoder needs a classification task; --task {task} is {kind} "
                       "(use --model causal_lm for it)")
    else:
        problem = data_source_problem(args.data)
        out.append(problem and f"--data {args.data}: {problem}")
    if args.validation_data is not None:
        problem = data_source_problem(args.validation_data)
        out.append(problem and f"--validation-data {args.validation_data}: {problem}")
    f = args.validation_fraction
    out.append(None if (math.isfinite(f) and 0 < f < 1) else
               f"--validation-fraction must be in (0, 1), got {f}")
    return out


def _adapter_problem(path: str) -> str | None:
    from .adapter import read_adapter_config

    if not os.path.isdir(path):
        return f"--adapter {path}: no such folder" if not os.path.exists(path) else \
            f"--adapter {path}: not a folder (give the folder save_adapter wrote)"
    try:
        read_adapter_config(path)
    except Exception as err:  # any unreadable adapter: one line, before loading a model
        return f"--adapter {path}: {_first_line(err)}"
    return None


def _merge_out_problem(path: str) -> str | None:
    """``merge`` replaces its output folder: refuse one that holds something else."""
    from .train import output_path_problem

    problem = output_path_problem(path, folder=True)
    if problem:
        return f"--out {path}: {problem}"
    p = Path(path)
    if p.is_dir() and any(p.iterdir()) and not (p / "config.json").is_file():
        return (f"--out {path}: the folder is not empty and holds no model (config.json); "
                "merge replaces the whole folder, so give a new or empty one")
    return None


def _check_args(args) -> str | None:
    """The first bad flag of a parsed command line as one line naming it, or None. Runs
    before any model or dataset is loaded."""
    import math

    from .scoring import METRICS
    from .train import output_path_problem

    def whole(flag: str, value, minimum: int = 1) -> str | None:
        if value is not None and value < minimum:
            return f"{flag} must be >= {minimum}, got {value}"
        return None

    def positive(flag: str, value) -> str | None:
        if value is not None and not (math.isfinite(value) and value > 0):
            return f"{flag} must be a finite number > 0, got {value}"
        return None

    def ratio(flag: str, value) -> str | None:
        if value is not None and not (math.isfinite(value) and 0 < value <= 1):
            return f"{flag} must be in (0, 1] (a fraction of the rows of each layer), got {value}"
        return None

    if args.command == "select":
        problems = [_file_problem("--report", args.report, _load_report),
                    ratio("--ratio", args.ratio), whole("--rows", args.rows),
                    positive("--params", args.params), whole("--min-rows", args.min_rows, 0),
                    whole("--max-rows", args.max_rows), whole("--multiple-of", args.multiple_of)]
        out = output_path_problem(args.out, folder=False)
        problems.append(out and f"--out {args.out}: {out}")
        return next((p for p in problems if p), None)
    if args.command in ("merge", "export"):
        problems = _model_problems(args) + [_adapter_problem(args.adapter), whole(
            "--threads", args.threads)]
        if args.command == "merge":
            problems.append(_merge_out_problem(args.out))
        else:
            out = output_path_problem(args.out, folder=True)
            problems.append(out and f"--out {args.out}: {out}")
            if not out and _adapter_problem(args.out) is None:
                problems.append(f"--out {args.out} holds a rowsft_nb adapter with the same file "
                                "names as a PEFT one; export into another folder")
        return next((p for p in problems if p), None)
    if args.command not in ("demo", "train", "score"):
        return None
    problems = _model_problems(args) + _data_problems(args) + [
        None if args.metric in METRICS else
        f"--metric {args.metric!r} is not a metric; choose one of {', '.join(METRICS)}",
        whole("--batch-size", args.batch_size),
        whole("--max-length", args.max_length, 2),
        whole("--threads", args.threads),
    ]
    if args.command == "score":
        problems += [whole("--n-samples", args.n_samples)]
        device = _device_problem(args.device, indexed_ok=True)
        out = output_path_problem(args.out, folder=False)
    else:
        problems += [
            ratio("--ratio", args.ratio),
            positive("--lr", args.lr), positive("--epochs", args.epochs),
            whole("--max-steps", args.max_steps), whole("--calib-samples", args.calib_samples),
            whole("--n-train", args.n_train), whole("--n-eval", args.n_eval),
            whole("--logging-steps", args.logging_steps)]
        device = _device_problem(args.device, indexed_ok=False)
        out = output_path_problem(args.out, folder=True)
        plan = getattr(args, "plan", None)
        if plan is not None:
            problems.append(_plan_problem(plan))
    problems += [device and f"--device {args.device}: {device}",
                 out and f"--out {args.out}: {out}"]
    return next((p for p in problems if p), None)


def _load_report(path: str):
    from .scoring import ImportanceReport

    return ImportanceReport.load(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rowsft-nb", description=(
        "Row-based sparse fine-tuning (SPruFT) for Hugging Face models: score neurons, "
        "select rows, train only those rows. Chain: score -> select -> train -> merge/export."))
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the full pipeline on MiniLM + movie-review sentiment "
                                       "(a few minutes on a laptop CPU)")
    _add_pipeline_args(demo, out="outputs/demo-adapter", n_train=1200, n_eval=400, max_length=48,
                       lr=2e-3, epochs=1, batch_size=16, calib=64)
    demo.set_defaults(func=cmd_demo)

    sc = sub.add_parser("score", help="model + data -> importance report (.safetensors)")
    _add_model_args(sc)
    _add_data_args(sc)
    _add_common_args(sc, max_length=128, batch_size=8)
    sc.add_argument("--metric", default="taylor", help="importance metric (see rowsft_nb.METRICS)")
    sc.add_argument("--n-samples", type=int, default=64, help="training examples to score on")
    sc.add_argument("--out", default="outputs/report.safetensors")
    sc.set_defaults(func=cmd_score)

    se = sub.add_parser("select", help="report -> row plan (.json) under a budget; no model")
    se.add_argument("--report", required=True, help="a report written by `rowsft-nb score`")
    budget = se.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=float, default=None,
                        help="fraction of the rows of every layer (default 0.05)")
    budget.add_argument("--rows", type=int, default=None, help="rows in every layer")
    budget.add_argument("--params", type=float, default=None,
                        help="trainable parameters over all layers: a count, or a fraction <= 1")
    se.add_argument("--allocator", choices=("topk", "coverage"), default="topk",
                    help="how --params is spread over layers")
    se.add_argument("--min-rows", type=int, default=0)
    se.add_argument("--max-rows", type=int, default=None)
    se.add_argument("--include", nargs="+", default=None, help="only modules matching these")
    se.add_argument("--exclude", nargs="+", default=None, help="leave out modules matching these")
    se.add_argument("--head-aligned", action="store_true", help="whole attention heads")
    se.add_argument("--multiple-of", type=int, default=1)
    se.add_argument("--out", default="outputs/plan.json")
    se.set_defaults(func=cmd_select)

    tr = sub.add_parser("train", help="model + data (+ plan) -> trained adapter folder")
    _add_pipeline_args(tr, out="outputs/adapter", n_train=None, n_eval=None, max_length=128,
                       lr=1e-3, epochs=1, batch_size=16, calib=64)
    tr.add_argument("--plan", default=None, help="a RowPlan JSON from `rowsft-nb select` "
                    "instead of scoring here")
    tr.set_defaults(func=cmd_train)

    for name, helptext, func in (
            ("merge", "base model + adapter -> merged checkpoint folder (plain transformers)",
             cmd_merge),
            ("export", "base model + adapter -> PEFT LoRA adapter folder (exact)", cmd_export)):
        p = sub.add_parser(name, help=helptext)
        _add_model_args(p, default=None)
        p.add_argument("--adapter", required=True, help="a folder written by `rowsft-nb train`")
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=None)
        if name == "export":
            p.add_argument("--uniform-rank", action="store_true",
                           help="pad every module to one rank (for servers without rank_pattern)")
        p.set_defaults(func=func)

    doc = sub.add_parser("doctor", help="check the installation, assets and devices")
    doc.set_defaults(func=cmd_doctor)

    bench = sub.add_parser("bench", help="benchmarks (memory, time, accuracy; from a source "
                           "checkout: runs benchmarks/bench_all.py)", add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER,
                       help="passed to benchmarks/bench_all.py")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``rowsft-nb``. Usage: ``main(["demo", "--max-steps", "20"])``."""
    parser = build_parser()
    # `bench` passes its options through to benchmarks/bench_all.py; argparse's REMAINDER does not
    # take leading --options in a subcommand, so collect the unknown ones here.
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "bench":
        args.bench_args = extra + list(args.bench_args)
    problem = _check_args(args)
    if problem:
        print(f"rowsft-nb {args.command}: error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    _quiet()
    _threads(getattr(args, "threads", None))
    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        print(f"rowsft-nb {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    sys.exit(main())
