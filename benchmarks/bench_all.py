"""The rowsft-nb benchmark runner: memory by component, interleaved step time, scoring cost,
interactive cost and accuracy of row-sparse fine-tuning vs LoRA, full fine-tuning,
dense-mask and one-hot baselines, at one trainable-parameter budget.

This runner lives in the source repository, not in the installed package; the measurement
helpers and baselines it uses are ``rowsft_nb.bench``. ``rowsft-nb bench`` runs this file
from a checkout. Results go to ``--out-dir`` (default ``./rowsft-bench-results`` under the
current directory): ``bench.json`` (``bench_quick.json`` with ``--quick``) and the same
tables as markdown (``.md``). LoRA baselines need peft: ``pip install 'rowsft-nb[bench]'``.

Usage::

    rowsft-nb bench --quick                                  # a few minutes
    python benchmarks/bench_all.py --parts memory,scoring,interactive --out-dir benchmarks/results
    python benchmarks/bench_all.py --parts accuracy --out benchmarks/results/bench_accuracy.json
    python benchmarks/bench_all.py --quick --parts quant --out-dir /tmp/bench   # tiny LLaMA
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the sibling scripts (bench_methods, bench_goals, ...)
    sys.path.insert(0, str(HERE))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from bench_goals import goals  # noqa: E402
from bench_report import print_summary, to_markdown  # noqa: E402
from rowsft_nb.bench import machine_info, require_peft  # noqa: E402

PARTS = ("memory", "scoring", "interactive", "accuracy", "quant")
DEFAULT_OUT_DIR = Path("rowsft-bench-results")


@dataclass
class BenchConfig:
    """Sizes of one benchmark run (``quick()`` is what ``--quick`` uses)."""

    lora_rank: int = 4
    mem_batch: int = 8
    mem_seq: int = 64
    smollm_mem_batch: int = 4
    smollm_mem_seq: int = 64
    time_rounds: int = 120          # interleaved rounds (every method once per round)
    smollm_time_rounds: int = 100
    calib_samples: int = 32
    acc_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    acc_steps: int = 100
    acc_batch: int = 16
    acc_max_length: int = 48
    acc_n_train: int = 1000
    acc_n_eval: int | None = None   # None: the whole validation split (1,007 examples)
    # run in this order, each over every seed (bench_accuracy.ACC_METHODS lists all)
    acc_methods: tuple[str, ...] = ("rowsft_taylor", "lora", "rowsft_random",
                                    "rowsft_taylor_multivariable", "rowsft_class_taylor",
                                    "rowsft_neurons", "rowsft_l2", "full")
    lm_task: str = "chat_qa"
    lm_steps: int = 10
    lm_batch: int = 4
    lm_max_length: int = 64
    lm_n_train: int = 200
    lm_n_eval: int = 32
    smollm: bool = True
    scoring: bool = True
    interactive: bool = True
    interactive_repeats: int = 7
    lr_adapter: float = 2e-3
    lr_full: float = 1e-4
    lm_lr: float = 5e-4
    quant_time_rounds: int = 10     # quantized bases (bench_quant): SmolLM2 rounds

    @classmethod
    def quick(cls) -> "BenchConfig":
        return cls(time_rounds=12, calib_samples=16, acc_seeds=(0,), acc_steps=25,
                   acc_n_train=300, acc_n_eval=100,
                   acc_methods=("rowsft_taylor", "rowsft_random", "lora", "head"),
                   smollm=False, interactive_repeats=3)


def _scoring_cost(cfg: BenchConfig, quick: bool) -> dict[str, Any]:
    import contextlib
    import io
    import tempfile

    import bench_scoring

    argv = ["--threads", str(torch.get_num_threads())]
    if quick or not cfg.smollm:
        argv += ["--skip-smollm", "--minilm-batches", "1"]
    else:
        argv += ["--batches", "1"]
    # bench_scoring writes its own JSON atomically (a rename): give it a scratch file
    with tempfile.TemporaryDirectory(prefix="rowsft-bench-") as tmp:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            res = bench_scoring.main(argv + ["--out", str(Path(tmp) / "scoring.json")])
    res["command"] = "benchmarks/bench_scoring.py " + " ".join(argv)
    return res


def _interactive_cost(cfg: BenchConfig, threads: int) -> dict[str, Any]:
    import bench_selection
    import bench_widgets

    from rowsft_nb.testing import llama2_7b_report

    r = bench_selection.run(cfg.interactive_repeats)
    torch.set_num_threads(threads)
    return {"select": {"goal": r["goal"], "results": r["results"],
                       "all_warm_within_goal": r["all_warm_within_goal"]},
            "budget_explorer": bench_widgets.bench_budget(llama2_7b_report(),
                                                          cfg.interactive_repeats)}


def check_parts(parts: Iterable[str] | None) -> list[str]:
    """The parts to run (default all), or one ValueError naming the unknown ones."""
    parts = list(parts or PARTS)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown benchmark parts {unknown}; choose from {', '.join(PARTS)}")
    return parts


def run(quick: bool = False, threads: int = 1, parts: Iterable[str] | None = None,
        cfg: BenchConfig | None = None, command: str = "",
        partial_out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run the benchmark parts (``memory``, ``scoring``, ``interactive``, ``accuracy``,
    ``quant``: quantized bases, SmolLM2, or the tiny LLaMA with ``--quick``) and
    return one results dict (what ``bench.json`` holds). With ``partial_out``, the results
    so far are written there after every accuracy run.

    >>> res = run(quick=True, parts=["memory"])
    """
    parts = check_parts(parts)
    if int(threads) < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    cfg = cfg or (BenchConfig.quick() if quick else BenchConfig())
    if "memory" in parts or "accuracy" in parts or "quant" in parts:
        require_peft()  # the LoRA baseline: fail before any model loads
    if "quant" in parts:
        from rowsft_nb.quant import require_bitsandbytes

        require_bitsandbytes()  # the quantized-base part: fail before any model loads
    torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    start = time.perf_counter()
    res: dict[str, Any] = {"benchmark": "rowsft-nb bench", "quick": quick,
                           "command": command or f"rowsft-nb bench{' --quick' if quick else ''}",
                           "config": asdict(cfg), "machine_start": machine_info(threads)}
    timings = {}
    if "memory" in parts:
        import bench_methods

        t = time.perf_counter()
        res["memory"] = {"minilm": bench_methods.minilm(cfg)}
        if cfg.smollm:
            res["memory"]["smollm"] = bench_methods.smollm(cfg)
        timings["memory"] = time.perf_counter() - t
    if "scoring" in parts and cfg.scoring:
        t = time.perf_counter()
        res["scoring"] = _scoring_cost(cfg, quick)
        torch.set_num_threads(threads)
        timings["scoring"] = time.perf_counter() - t
    if "interactive" in parts and cfg.interactive:
        t = time.perf_counter()
        res["interactive"] = _interactive_cost(cfg, threads)
        torch.set_num_threads(threads)
        timings["interactive"] = time.perf_counter() - t
    if "accuracy" in parts:
        import bench_accuracy

        from rowsft_nb._io import write_json

        t = time.perf_counter()

        def save_partial(acc: dict) -> None:
            if partial_out is not None:
                write_json(partial_out, {**res, "accuracy": acc, "partial": True})

        res["accuracy"] = bench_accuracy.accuracy_minilm(cfg, save_partial)
        if cfg.smollm:
            res["causal_lm"] = bench_accuracy.loss_smollm(cfg)
        timings["accuracy"] = time.perf_counter() - t
    if "quant" in parts:
        import bench_quant

        t = time.perf_counter()
        qcfg = bench_quant.QuantConfig() if cfg.smollm else bench_quant.QuantConfig.tiny()
        qcfg.threads = int(threads)
        if cfg.smollm:
            qcfg.time_rounds = cfg.quant_time_rounds
        res["quant"] = bench_quant.run(qcfg)
        timings["quant"] = time.perf_counter() - t
    res["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    res["seconds"]["total"] = round(time.perf_counter() - start, 1)
    res["machine_end"] = machine_info(threads)
    res["goals"] = goals(res)
    return res


def output_path(out: str | os.PathLike | None, out_dir: str | os.PathLike | None,
                quick: bool) -> Path:
    """Where the results JSON goes: ``out`` when given, else ``out_dir`` (default
    ``./rowsft-bench-results``) / ``bench[_quick].json``; never inside site-packages."""
    path = Path(out) if out else Path(out_dir or DEFAULT_OUT_DIR) / (
        "bench_quick.json" if quick else "bench.json")
    resolved = path.resolve()
    if {"site-packages", "dist-packages"} & set(resolved.parts):
        raise ValueError(f"refusing to write benchmark results into an installed package "
                         f"({resolved}); pass --out-dir with a folder of your own")
    if path.suffix != ".json":
        raise ValueError(f"--out must name a .json file, got {path}")
    return path


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``bench`` options (``--quick``, ``--threads``, ``--parts``, ``--out-dir``,
    ``--out``, ``--rounds``)."""
    p = parser or argparse.ArgumentParser(
        prog="rowsft-nb bench", description="rowsft-nb benchmarks: exact memory by component, "
        "interleaved step time, scoring cost, interactive cost, accuracy; vs LoRA, full, "
        "dense-mask and one-hot baselines at equal trainable parameters.")
    p.add_argument("--quick", action="store_true", help="a few minutes: MiniLM only, 1 seed")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (default 1: stable timings on a shared machine)")
    p.add_argument("--parts", default=None,
                   help=f"comma list of {','.join(PARTS)} (default all)")
    p.add_argument("--out-dir", default=None,
                   help=f"folder for the results (default ./{DEFAULT_OUT_DIR})")
    p.add_argument("--out", default=None,
                   help="results JSON file (overrides --out-dir; the .md goes next to it)")
    p.add_argument("--skip-smollm", action="store_true",
                   help="leave SmolLM2 out (its memory rows and the causal-LM loss check)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved timing rounds (default 120 MiniLM / 100 SmolLM2, "
                        "--quick 12)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, check it before any work, run, write ``<out>.json`` and ``<out>.md``,
    print the tables; returns the exit code.

    >>> main(["--quick", "--parts", "memory", "--out-dir", "/tmp/bench"])
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        parts = check_parts([p for p in (args.parts or "").split(",") if p] or None)
        out = output_path(args.out, args.out_dir, args.quick)
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        if args.rounds is not None and args.rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
        if "memory" in parts or "accuracy" in parts or "quant" in parts:
            require_peft()
    except (ValueError, ImportError) as err:
        parser.error(str(err))
    cfg = BenchConfig.quick() if args.quick else BenchConfig()
    if args.skip_smollm:
        cfg.smollm = False
    if args.rounds is not None:
        cfg.time_rounds = cfg.smollm_time_rounds = cfg.quant_time_rounds = int(args.rounds)
    command = " ".join(["rowsft-nb bench", *(argv if argv is not None else sys.argv[1:])])
    res = run(quick=args.quick, threads=args.threads, parts=parts, cfg=cfg, command=command,
              partial_out=out)
    from rowsft_nb._io import write_json

    write_json(out, res)
    out.with_suffix(".md").write_text(to_markdown(res) + "\n")
    print_summary(res)
    print(f"\nwrote {out} and {out.with_suffix('.md')} ({res['seconds']['total']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
