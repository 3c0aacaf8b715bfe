"""Command line: ``rowsft-nb demo | doctor | score | train | bench``.

Usage::

    rowsft-nb demo                        # MiniLM + movie reviews: score, select 5%, train, save
    rowsft-nb score --task sms_spam --metric wanda --out report.safetensors
    rowsft-nb train --task sms_spam --ratio 0.05 --out outputs/sms-adapter
    rowsft-nb doctor
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence

MODELS = ("encoder", "causal_lm")


def _quiet() -> None:
    """Offline and without per-map progress bars or advisory warnings."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()


def _threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def _load(model: str, task_name: str, seed: int):
    """(model, tokenizer) for ``--model``: MiniLM classifier sized to the task, or SmolLM2."""
    from .assets import TASKS, load_causal_lm, load_encoder, load_task

    if model == "encoder":
        if TASKS[task_name].kind != "classification":
            raise SystemExit(f"--model encoder needs a classification task; {task_name!r} is "
                             f"{TASKS[task_name].kind}. Use --model causal_lm for it.")
        n_labels = load_task(task_name)["train"].features["label"].num_classes
        return load_encoder(num_labels=n_labels, seed=seed)
    return load_causal_lm()


def _task_names() -> list[str]:
    from .assets import TASKS

    return list(TASKS)


def _score_and_select(model, data, args):
    """Score on ``args.calib_samples`` training examples, keep ``args.ratio`` of rows."""
    from .data import calibration_batches
    from .scoring import score
    from .selection import Ratio, select

    batches = calibration_batches(data.train, args.batch_size, args.calib_samples,
                                  data.collator, seed=args.seed)
    report = score(model, batches, metric=args.metric, seed=args.seed, progress=False)
    return report, select(report, Ratio(args.ratio))


def _fmt_metrics(metrics: dict) -> str:
    keys = [k for k in ("accuracy", "loss", "perplexity") if k in metrics]
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys) or "-"


def _run_pipeline(args, *, title: str) -> int:
    """Load -> tokenise -> score -> select -> inject -> train -> save; prints each stage."""
    from .adapter import inject, save_adapter, trainable_parameters
    from .data import prepare_task
    from .plan import RowPlan
    from .train import train

    t0 = time.perf_counter()
    print(f"== {title} ==")
    model, tok = _load(args.model, args.task, args.seed)
    data = prepare_task(args.task, tok, max_length=args.max_length, n_train=args.n_train,
                        n_eval=args.n_eval, seed=args.seed)
    eval_split = data.test if data.test is not None else data.validation
    print(f"model: {type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} "
          f"parameters); task {data.name}: {len(data.train)} train / {len(eval_split)} held-out "
          f"examples, max_length {args.max_length}")

    if getattr(args, "plan", None):
        plan = RowPlan.load(args.plan)
        print(f"plan: {args.plan} ({plan.num_rows():,} rows)")
    else:
        t = time.perf_counter()
        report, plan = _score_and_select(model, data, args)
        print(f"scored {len(report.scores)} Linear layers with {args.metric!r} on "
              f"{args.calib_samples} examples in {time.perf_counter() - t:.1f} s; selected "
              f"{args.ratio:.0%} of rows per layer: {plan.num_rows():,} rows in "
              f"{len(plan.modules)} layers")
    inject(model, plan)
    trainable, total = trainable_parameters(model)
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}% "
          "of the model; row deltas + the classifier head)" if args.model == "encoder" else
          f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")

    result = train(model, data.train, eval_dataset=eval_split, tokenizer=tok, task=data.kind,
                   data_collator=data.collator, lr=args.lr, epochs=args.epochs,
                   max_steps=args.max_steps, batch_size=args.batch_size, device=args.device,
                   seed=args.seed, logging_steps=max(1, args.logging_steps),
                   progress_bar=not args.no_progress)
    print(f"trained {result.steps} steps on {result.device} in {result.seconds:.1f} s"
          + (f" ({result.stop_reason})" if result.stop_reason else ""))
    print(f"held-out before: {_fmt_metrics(result.metrics_before)}")
    print(f"held-out after:  {_fmt_metrics(result.metrics_after)}")
    out = save_adapter(model, args.out)
    print(f"adapter saved to {Path(out).resolve()}")
    print(f"total time {time.perf_counter() - t0:.0f} s")
    return 0


def _add_pipeline_args(p: argparse.ArgumentParser, *, out: str, n_train: int | None,
                       n_eval: int | None, max_length: int, lr: float, epochs: float,
                       batch_size: int, calib: int) -> None:
    p.add_argument("--model", choices=MODELS, default="encoder",
                   help="encoder: all-MiniLM-L6-v2 classifier; causal_lm: SmolLM2-135M")
    p.add_argument("--task", default="movie_sentiment", choices=_task_names())
    p.add_argument("--metric", default="taylor", help="importance metric (see rowsft_nb.METRICS)")
    p.add_argument("--ratio", type=float, default=0.05, help="fraction of rows per layer")
    p.add_argument("--calib-samples", type=int, default=calib, help="examples for scoring")
    p.add_argument("--n-train", type=int, default=n_train, help="training examples (default: all)")
    p.add_argument("--n-eval", type=int, default=n_eval, help="held-out examples (default: all)")
    p.add_argument("--max-length", type=int, default=max_length)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--epochs", type=float, default=epochs)
    p.add_argument("--max-steps", type=int, default=None, help="overrides --epochs")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, mps, cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--logging-steps", type=int, default=20)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", default=out, help="adapter folder")


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

    if args.command not in ("demo", "train", "score"):
        return None
    from .assets import TASKS

    kind = TASKS[args.task].kind
    problems = [
        None if args.model != "encoder" or kind == "classification" else
        f"--model encoder needs a classification task; --task {args.task} is {kind} "
        "(use --model causal_lm for it)",
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
            None if (math.isfinite(args.ratio) and 0 < args.ratio <= 1) else
            f"--ratio must be in (0, 1] (a fraction of the rows of each layer), got {args.ratio}",
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


def _plan_problem(path: str) -> str | None:
    """Why ``--plan`` cannot be read as a RowPlan, or None."""
    from .plan import RowPlan

    if not os.path.isfile(path):
        return f"--plan {path}: no such file" if not os.path.exists(path) else \
            f"--plan {path}: not a file"
    try:
        RowPlan.load(path)
    except Exception as err:  # any malformed plan: report it on one line, before loading a model
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"--plan {path}: {first}"
    return None


def cmd_demo(args) -> int:
    """The whole pipeline on the embedded default (MiniLM + movie-review sentiment)."""
    return _run_pipeline(args, title="rowsft-nb demo: row-sparse fine-tuning of all-MiniLM-L6-v2 "
                                     "on Rotten Tomatoes snippets")


def cmd_train(args) -> int:
    return _run_pipeline(args, title=f"rowsft-nb train: {args.model} on {args.task}")


def cmd_score(args) -> int:
    """Score a task with a metric and save the ImportanceReport (safetensors)."""
    from .data import calibration_batches, prepare_task
    from .scoring import score

    model, tok = _load(args.model, args.task, args.seed)
    data = prepare_task(args.task, tok, max_length=args.max_length, n_train=args.n_samples,
                        seed=args.seed)
    batches = calibration_batches(data.train, args.batch_size, args.n_samples, data.collator,
                                  seed=args.seed)
    report = score(model, batches, metric=args.metric, seed=args.seed, device=(
        None if args.device == "auto" else args.device), progress=not args.no_progress)
    report.save(args.out)
    print(f"scored {len(report.scores)} layers of {type(model).__name__} with {args.metric!r} "
          f"on {args.n_samples} examples of {args.task}; report saved to {Path(args.out).resolve()}")
    return 0


def cmd_doctor(args) -> int:
    from . import doctor

    return int(doctor.main() or 0)


def cmd_bench(args) -> int:
    # The runner lives in the source checkout (benchmarks/bench_all.py), not in the package.
    from .bench.locate import RUNNER_MISSING, find_runner, load_runner

    runner = find_runner()
    if runner is None:
        print(f"rowsft-nb bench: {RUNNER_MISSING}", file=sys.stderr)
        return 2
    print(f"rowsft-nb bench: running {runner}", file=sys.stderr)
    return int(load_runner(runner).main(args.bench_args) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rowsft-nb", description=(
        "Row-based sparse fine-tuning (SPruFT) for Hugging Face models: score neurons, "
        "select rows, train only those rows."))
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the full pipeline on MiniLM + movie-review sentiment "
                                       "(a few minutes on a laptop CPU)")
    _add_pipeline_args(demo, out="outputs/demo-adapter", n_train=1200, n_eval=400, max_length=48,
                       lr=2e-3, epochs=1, batch_size=16, calib=64)
    demo.set_defaults(func=cmd_demo)

    tr = sub.add_parser("train", help="score, select, inject, train and save an adapter")
    _add_pipeline_args(tr, out="outputs/adapter", n_train=None, n_eval=None, max_length=128,
                       lr=1e-3, epochs=1, batch_size=16, calib=64)
    tr.add_argument("--plan", default=None, help="a saved RowPlan JSON instead of scoring")
    tr.set_defaults(func=cmd_train)

    sc = sub.add_parser("score", help="score the rows of every Linear layer and save the report")
    sc.add_argument("--model", choices=MODELS, default="encoder")
    sc.add_argument("--task", default="movie_sentiment", choices=_task_names())
    sc.add_argument("--metric", default="taylor")
    sc.add_argument("--n-samples", type=int, default=64)
    sc.add_argument("--batch-size", type=int, default=8)
    sc.add_argument("--max-length", type=int, default=128)
    sc.add_argument("--device", default="auto")
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--threads", type=int, default=None)
    sc.add_argument("--no-progress", action="store_true")
    sc.add_argument("--out", default="outputs/report.safetensors")
    sc.set_defaults(func=cmd_score)

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
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
