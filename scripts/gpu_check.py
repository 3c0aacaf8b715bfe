"""GPU check: peak CUDA memory and interleaved step time of row-sparse fine-tuning vs LoRA vs
full fine-tuning at equal trainable parameters, on SmolLM2-135M and a random Llama-3.2-1B-shaped
model, in bf16 (issue 14 item 5, issue 16 item 5).

    scripts/gpu_check.sh                # CUDA: smollm2 then llama1b, bf16, ~2-4 min on an H200
    scripts/gpu_check.sh --quant        # + 4-bit NF4 floor, 4-bit + rows, QLoRA (bitsandbytes)
    scripts/gpu_check.sh --model llama1b --rounds 40
    python scripts/gpu_check.py --tiny --quant --json /tmp/g.json   # CPU dry run, tiny random LLaMA

Per model, one after the other (llama1b: random init from Llama-3.2-1B's shapes, seeded;
smollm2: the embedded checkpoint when its asset package and ``gguf`` are installed, else random
weights with its config, said in the output and the JSON's ``weights``: a step's cost does not
depend on the weights; ``--random-weights`` forces that):

1. score: Taylor importance (bf16 autocast on CUDA) on ``--calib-batches`` random-token batches;
   its seconds and peak memory. A row plan at the parameter budget of LoRA rank
   ``--lora-rank`` (``rowsft_nb.bench.matched_plans``) or ``--rows`` rows per Linear; LoRA then
   takes ``round(plan.equivalent_lora_rank())`` (same trainable count up to the rank's rounding).
2. memory: each method on a freshly built model (``torch.cuda.reset_peak_memory_stats`` first),
   ``rowsft_nb.bench.measure_memory`` (warm-up step, then components and the peak of one
   steady training step: forward + backward + AdamW). ``peak`` = ``max_memory_allocated`` of that
   step minus what was allocated before the model was built (weights + adapter + optimizer
   state + the step's activations and gradients). ``above floor`` = peak minus the frozen
   floor's. On CPU (``--tiny``) the same figures come from the profiler (``total``).
3. time: all methods of a group alive at once, ``rowsft_nb.bench.time_interleaved`` over
   ``--rounds`` rounds in rotating order, each step timed with CUDA events (a clock reading
   ``torch.cuda.Event`` elapsed time; host wall and CPU time on CPU); per-round ratios vs the
   floor and vs LoRA, their median with a distribution-free 95% CI
   (``rowsft_nb.bench.summarize_times``), and a verdict that rejects impossible results
   (faster than the frozen floor).

Methods (equal trainable parameters): ``floor`` (frozen; forward + backward to the input
embeddings), ``rows_delta`` (``inject(mode="delta")``: RowSparseLinear), ``rows_fused``
(``inject(sharing=False)``: fused rows saving their inputs), ``rows_fused_shared`` (the default
``inject``: fused rows + activation sharing), ``lora`` (PEFT), ``full``; with ``--quant`` a
second group: ``nf4_floor``, ``nf4_rows`` (rows over bitsandbytes NF4, delta path), ``qlora``
(PEFT LoRA over the same NF4 base); its ratios are taken against ``nf4_floor`` and ``qlora``.
Weights are bf16 on CUDA (``--weights-dtype``), row deltas fp32 masters (inject's default),
PEFT LoRA weights fp32 (PEFT's default autocast), full fine-tuning pure bf16 AdamW.

Budget (default sizes, one H200; an estimate from FLOPs and launch counts, not yet measured):
llama1b (1.24e9 parameters, batch 8 x 512 = 4096 tokens): the frozen floor is ~4 x 1.24e9 x
4096 = 2.0e13 FLOP, ~50 ms at half the ~790 TFLOP/s bf16 an H200 reaches on large products;
full fine-tuning ~6 x ... = 3.0e13 FLOP + AdamW over 1.24e9 bf16 weights, ~90 ms; rows and
LoRA ~floor + a few ms. So ~0.4 s a round of six methods, 30 rounds ~15 s; the memory phase
~6 x (build ~2 s + 5 steps) ~20 s; scoring a few seconds. SmolLM2 (135M) is launch-bound at
this size (~2000 kernels a step, ~20 ms): 60 rounds ~10 s. ``--quant`` adds three methods per
model (~30 s). With imports and CUDA start-up ~2-4 min in all; every phase prints its seconds,
and each timing phase caps its rounds so the run stays inside ``--time-budget`` (default 420 s).

Results: a table per model, and JSON (``--json``, default ``$OUT/gpu_check.json``, else
``./gpu_check.json``).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rowsft_nb import testing  # noqa: E402
from rowsft_nb._io import write_json  # noqa: E402
from rowsft_nb.adapter import adapter_modes, inject  # noqa: E402
from rowsft_nb.adapter.model import adapter_state  # noqa: E402
from rowsft_nb.bench import (apply_floor, apply_full, apply_lora, make_optimizer,  # noqa: E402
                             matched_plans, measure_memory, require_peft, summarize_times,
                             time_interleaved, training_step)
from rowsft_nb.scoring import score  # noqa: E402
from rowsft_nb.selection import FixedRows, select  # noqa: E402

#: the float group, timed together; ratios against "floor" and "lora"
FLOAT_METHODS = ("floor", "rows_delta", "rows_fused", "rows_fused_shared", "lora", "full")
#: the 4-bit group (--quant), timed together; ratios against "nf4_floor" and "qlora"
QUANT_METHODS = ("nf4_floor", "nf4_rows", "qlora")
MODELS = ("smollm2", "llama1b")

#: LlamaConfig fields of each model (random init; smollm2 loads the embedded checkpoint when
#: its asset package is installed and falls back to these shapes otherwise)
CONFIGS: dict[str, dict[str, Any]] = {
    # SmolLM2-135M-Instruct (the embedded checkpoint's config.json)
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    rope_theta=100000.0, tie_word_embeddings=True),
    # Llama-3.2-1B's shapes (rope scaling left out: it does not change the cost of a step)
    "llama1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
                    rope_theta=500000.0, tie_word_embeddings=True),
    # CPU dry run: d_in multiples of 64 so bitsandbytes' CPU NF4 kernel decodes every layer
    "tiny": dict(vocab_size=testing.VOCAB, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=128, tie_word_embeddings=True),
}
#: per model: batch size, sequence length, timing rounds (defaults; flags override)
SIZES = {"smollm2": (8, 512, 60), "llama1b": (8, 512, 30), "tiny": (2, 16, 3)}


# ------------------------------------------------------------------------------ models
def random_llama(name: str, seed: int, device: str, dtype: torch.dtype) -> nn.Module:
    """A seeded random LlamaForCausalLM with the shapes of ``CONFIGS[name]``, built on
    ``device`` (no download). ``>>> random_llama("llama1b", 0, "cuda", torch.bfloat16)``"""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**CONFIGS[name])
    torch.manual_seed(seed)  # seeds the CPU and every CUDA generator
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).train()


def model_factory(name: str, args: argparse.Namespace) -> tuple[Callable[[], nn.Module], str]:
    """``(make, description)``: ``make()`` returns a fresh copy of model ``name`` on the
    device in the weights dtype, every call the same weights."""
    dtype = getattr(torch, args.weights_dtype)
    if name == "smollm2" and not args.random_weights:
        from rowsft_nb.assets import AssetMissingError, load_causal_lm

        try:
            base, _ = load_causal_lm(dtype=dtype)
        except AssetMissingError as err:
            why = str(err).splitlines()[0]
            print(f"  SmolLM2 checkpoint not available here ({why}); using random weights with "
                  "its config (the cost of a step does not depend on the weights)")
        else:
            base.train()
            return (lambda: copy.deepcopy(base).to(args.device)), "embedded checkpoint"
    return ((lambda: random_llama(name, args.seed, args.device, dtype)),
            f"random init (seed {args.seed})")


def prepare(model: nn.Module, method: str, plan, lora_rank: int, args: argparse.Namespace
            ) -> nn.Module:
    """``model`` made to train as ``method`` at the budget of ``plan`` (in place, or the PEFT
    wrapper for LoRA). ``>>> prepare(make(), "rows_fused", plan, 4, args)``"""
    if method.startswith("nf4_") or method == "qlora":
        from rowsft_nb.quant import quantize

        compute = torch.bfloat16 if args.device == "cuda" else getattr(torch, args.weights_dtype)
        quantize(model, "nf4", blocksize=64, double_quant=True, compute_dtype=compute)
    if method in ("floor", "nf4_floor"):
        return apply_floor(model)
    if method == "rows_delta":
        return inject(model, plan, mode="delta")
    if method == "nf4_rows":
        with warnings.catch_warnings():  # rows are selected on the float model, as the authors
            warnings.filterwarnings("ignore", message="the plan was selected on weights")
            return inject(model, plan)
    if method in ("rows_fused", "rows_fused_shared"):  # rows_fused: each layer saves its input
        return inject(model, plan, sharing=method == "rows_fused_shared")
    if method in ("lora", "qlora"):
        return apply_lora(model, plan, lora_rank)
    if method == "full":
        return apply_full(model)
    raise ValueError(f"unknown method {method!r}")


def describe(model: nn.Module) -> dict[str, Any]:
    """Trainable/total parameter counts, the trainable dtypes and (row methods) the layer
    modes and the producers sharing activations."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    out: dict[str, Any] = {"trainable": sum(p.numel() for p in trainable),
                           "total": sum(p.numel() for p in params),
                           "trainable_dtypes": sorted({str(p.dtype).replace("torch.", "")
                                                       for p in trainable})}
    state = adapter_state(model)
    if state is not None:
        modes = list(adapter_modes(model).values())  # "fused" or "delta: <why>"
        kinds = [m.split(":")[0] for m in modes]
        out["layer_modes"] = {k: kinds.count(k) for k in sorted(set(kinds))}
        out["delta_reasons"] = {m.split(": ", 1)[1]: modes.count(m)
                                for m in sorted(set(modes)) if ": " in m}
        out["shared_producers"] = len(state.shared)
    return out


# ------------------------------------------------------------------------------ clocks
def cuda_event_clock() -> Callable[[], float]:
    """A clock in seconds read from CUDA events (elapsed GPU time since the clock was made);
    each reading records an event and waits for it. ``>>> clock = cuda_event_clock(); clock()``"""
    ref = torch.cuda.Event(enable_timing=True)
    ref.record()

    def clock() -> float:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        ev.synchronize()
        return ref.elapsed_time(ev) / 1e3

    return clock


class Phases:
    """Prints and records the seconds of each phase. ``>>> with phases("score"): ...``"""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.log: list[dict[str, Any]] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        print(f"[{self.elapsed():6.1f} s] {name} ...", flush=True)
        try:
            yield
        finally:  # recorded even when the phase fails
            s = time.perf_counter() - t
            self.log.append({"phase": name, "seconds": round(s, 3)})
            print(f"[{self.elapsed():6.1f} s] {name}: {s:.1f} s", flush=True)


# ------------------------------------------------------------------------------ steps
def _sync(args: argparse.Namespace) -> Callable[[], None] | None:
    return torch.cuda.synchronize if args.device == "cuda" else None


def _clock(args: argparse.Namespace) -> Callable[[], float]:
    return cuda_event_clock() if args.device == "cuda" else time.perf_counter


def measure(method: str, make: Callable[[], nn.Module], plan, lora_rank: int, batch,
            args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any]]:
    """Build ``method`` on a fresh model, measure its memory and one step's time; returns
    ``(model, row)`` (the model stays alive for the interleaved timing)."""
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    model = prepare(make(), method, plan, lora_rank, args)
    row = {"method": method, **describe(model)}
    floor = method.endswith("floor")
    mem = measure_memory(model, batch, "floor" if floor else method, lr=args.lr)
    if cuda:  # measure_memory's last step ran after a reset of the peak statistics
        row["peak_bytes"] = torch.cuda.max_memory_allocated() - before
        row["resident_bytes"] = torch.cuda.memory_allocated() - before
    else:
        row["peak_bytes"] = mem.total
        row["resident_bytes"] = mem.weights + mem.trainable
    row["peak_kind"] = mem.peak_kind
    row["memory"] = {**mem.to_dict(), "method": method}
    opt = None if floor else make_optimizer(model, args.lr)
    one = time_interleaved({method: training_step(model, batch, opt)}, 1, warmup=0,
                           sync=_sync(args), wall_clock=_clock(args))
    row["first_step_s"] = one[method]["wall"][0]
    del opt
    return model, row


def time_group(models: dict[str, nn.Module], batch, floor: str, lora: str | None, rounds: int,
               args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved rotating rounds of every model's training step; summarize_times' dict
    plus the raw per-round samples."""
    steps = {}
    for name, model in models.items():
        model.train()
        steps[name] = training_step(model, batch,
                                    None if name == floor else make_optimizer(model, args.lr))
    threads = torch.get_num_threads()
    if args.device == "cpu":
        torch.set_num_threads(1)  # stable CPU timings on a shared machine
    try:
        samples = time_interleaved(steps, rounds, warmup=args.warmup, sync=_sync(args),
                                   wall_clock=_clock(args))
    finally:
        torch.set_num_threads(threads)
    summary = summarize_times(samples, floor=floor, lora=lora)
    summary.update(rounds=rounds, warmup=args.warmup, samples=samples,
                   clock="cuda events" if args.device == "cuda" else "time.perf_counter")
    return summary


def _free(args: argparse.Namespace) -> None:
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()


def run_group(methods: list[str], floor: str, lora: str | None, make, plan, lora_rank: int,
              batch, args: argparse.Namespace, phases: Phases, label: str,
              timing_phases_left: int, models_left: int) -> dict[str, Any]:
    """Memory of each method, then interleaved timing of the group; ``{method: row}``."""
    models: dict[str, nn.Module] = {}
    rows: dict[str, dict[str, Any]] = {}
    with phases(f"{label}: memory ({', '.join(methods)})"):
        for m in methods:
            models[m], rows[m] = measure(m, make, plan, lora_rank, batch, args)
    rounds = args.rounds
    est_round = sum(r["first_step_s"] for r in rows.values())
    if args.time_budget:
        left = args.time_budget - phases.elapsed() - 60.0 * models_left
        cap = max(5, int(left / max(timing_phases_left, 1) / max(est_round, 1e-9)))
        if cap < rounds:
            print(f"  {label}: {rounds} rounds of ~{est_round:.2f} s would overrun "
                  f"--time-budget {args.time_budget:.0f} s: running {cap}")
            rounds = cap
    with phases(f"{label}: timing, {rounds} interleaved rounds (~{est_round:.2f} s each)"):
        summary = time_group(models, batch, floor, lora, rounds, args)
    del models
    _free(args)
    floor_peak = rows[floor]["peak_bytes"]
    lora_above = rows[lora]["peak_bytes"] - floor_peak if lora in rows else None
    for m, r in rows.items():
        t = summary["methods"][m]
        r["above_floor_bytes"] = r["peak_bytes"] - floor_peak
        r["above_floor_x_lora"] = (r["above_floor_bytes"] / lora_above
                                   if lora_above else None)
        r["step_s"] = t["wall_s"]["median"]
        r["step_cpu_s"] = t["cpu_s"]["median"]
        r["x_floor"] = t["ratio_floor"]["wall"]
        r["x_lora"] = t.get("ratio_lora", {}).get("wall")
        r["step_ratio_floor"] = t["step_ratio_floor"]
        r["step_ratio_lora"] = t["step_ratio_lora"]
        r["verdict"] = t["verdict"]
        if "rejected_because" in t:
            r["rejected_because"] = t["rejected_because"]
    return {"floor": floor, "lora": lora, "rounds": rounds, "methods": rows, "timing": summary}


# ------------------------------------------------------------------------------ one model
def run_model(name: str, args: argparse.Namespace, phases: Phases, timing_phases_left: int,
              models_left: int) -> dict[str, Any]:
    batch_size, seq_len, rounds = SIZES[name]
    args = copy.copy(args)
    args.batch_size = args.batch_size or batch_size
    args.seq_len = args.seq_len or seq_len
    args.rounds = args.rounds or rounds
    print(f"\n=== {name}: batch {args.batch_size} x {args.seq_len} tokens, "
          f"weights {args.weights_dtype}, {args.rounds} rounds")
    with phases(f"{name}: load"):
        make, weights = model_factory(name, args)
        model = make()
    cfg = model.config
    calib = testing.random_batches(model, n=args.calib_batches, batch_size=args.batch_size,
                                   seq_len=args.seq_len, seed=args.seed)
    batch = testing.random_batches(model, n=1, batch_size=args.batch_size,
                                   seq_len=args.seq_len, seed=args.seed + 1)[0]
    batch = {k: v.to(args.device) for k, v in batch.items()}

    # 1. score (Taylor; bf16 autocast on CUDA) and the row plan
    cuda = args.device == "cuda"
    with phases(f"{name}: score (taylor, {args.calib_batches} batches)"):
        if cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=cuda):
            report = score(model, calib, metric="taylor", device=args.device, progress=False)
        if cuda:
            torch.cuda.synchronize()
        score_s = time.perf_counter() - t
        score_peak = torch.cuda.max_memory_allocated() - before if cuda else None
    del model
    _free(args)
    if args.rows:
        plan = select(report, FixedRows(args.rows))
    else:
        plan, _ = matched_plans(report, lora_rank=args.lora_rank)
    lora_rank = max(1, round(plan.equivalent_lora_rank()))
    per_rank = sum(sum(plan.shapes[m]) for m in plan.modules)
    print(f"  scoring {len(report.scores)} layers: {score_s:.1f} s"
          + (f", peak {score_peak / 2**20:.0f} MiB" if score_peak is not None else "")
          + f"; plan {plan.num_rows():,} rows = {plan.trainable_parameters():,} parameters "
          f"(LoRA rank {plan.equivalent_lora_rank():.2f} -> {lora_rank}: "
          f"{lora_rank * per_rank:,} parameters)")

    # 2.-3. memory, then interleaved time, per group
    groups = {"float": run_group(
        list(args.float_methods), "floor", "lora" if "lora" in args.float_methods else None,
        make, plan, lora_rank, batch, args, phases, f"{name} float", timing_phases_left,
        models_left)}
    if args.quant:
        try:  # never lose the float group's numbers to a 4-bit problem on an untried device
            groups["nf4"] = run_group(
                list(QUANT_METHODS), "nf4_floor", "qlora", make, plan, lora_rank, batch, args,
                phases, f"{name} nf4", timing_phases_left - 1, models_left)
        except Exception as err:  # noqa: BLE001 - reported in the table and the JSON
            if args.tiny:
                raise
            traceback.print_exc()
            print(f"  {name} nf4 group FAILED: {type(err).__name__}: {err}")
            groups["nf4_error"] = f"{type(err).__name__}: {err}"
    _free(args)
    config = {k: getattr(cfg, k, None) for k in CONFIGS["llama1b"]}
    config["attn_implementation"] = getattr(cfg, "_attn_implementation", None)
    return {"weights": weights, "config": config,
            "parameters": report.meta.get("model_parameters"),
            "batch_size": args.batch_size, "seq_len": args.seq_len,
            "score": {"metric": "taylor", "seconds": score_s, "peak_bytes": score_peak,
                      "batches": args.calib_batches, "autocast_bf16": cuda},
            "plan": {"rows": plan.num_rows(), "parameters": plan.trainable_parameters(),
                     "modules": len(plan.modules), "budget": plan.meta.get("budget"),
                     "equivalent_lora_rank": plan.equivalent_lora_rank(),
                     "lora_rank": lora_rank, "lora_parameters_per_rank": per_rank},
            "groups": groups}


# ------------------------------------------------------------------------------ output
def _mib(b: float | None) -> str:
    return f"{b / 2**20:10.1f}" if b is not None else f"{'-':>10}"


def _ratio(r: dict[str, Any] | None, ok: bool) -> str:
    if r is None or not ok:
        return f"{'-':>20}"
    return f"{r['median']:6.3f} [{r['ci_low']:.3f}-{r['ci_high']:.3f}]"


def print_table(name: str, result: dict[str, Any]) -> None:
    """One table per group: memory (peak, above the floor, that x LoRA's) and time (median
    step, per-round ratios vs the floor and vs LoRA with their CI), then the verdict."""
    for label, g in result["groups"].items():
        if isinstance(g, str):  # a group that failed
            print(f"\n{name}, {label}: {g}")
            continue
        floor, lora = g["floor"], g["lora"] or "-"
        level = (g["methods"][floor]["x_floor"] or {}).get("ci_level", float("nan"))
        print(f"\n{name}, {label} group: memory above {floor} and x {lora}'s; step-time "
              f"ratios = median of {g['rounds']} per-round ratios [CI of the median, "
              f"{100 * level:.0f}% coverage]")
        print(f"{'method':18} {'trainable':>11} {'peak MiB':>10} {'>floor MiB':>10} "
              f"{'mem x ' + lora:>11} {'step ms':>9} {'time x ' + floor:>21} "
              f"{'time x ' + lora:>21}  verdict")
        for m, r in g["methods"].items():
            ok = r["verdict"] == "ok"
            xl = r["above_floor_x_lora"]
            print(f"{m:18} {r['trainable']:11,} {_mib(r['peak_bytes'])} "
                  f"{_mib(r['above_floor_bytes'])} "
                  f"{(f'{xl:11.2f}' if xl is not None else f'{chr(45):>11}')} "
                  f"{1e3 * r['step_s']:9.2f} {_ratio(r['x_floor'], ok):>21} "
                  f"{_ratio(r['x_lora'], ok):>21}  {r['verdict']}")


def output_path(arg: str | None) -> Path:
    out = Path(arg or os.environ.get("OUT") or ".")
    return out / "gpu_check.json" if out.is_dir() else out


def versions() -> dict[str, Any]:
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__}
    for mod in ("peft", "bitsandbytes"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


# ------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", "--dry-run", action="store_true",
                   help="a tiny random LLaMA on CPU: checks the script runs, no GPU needed")
    p.add_argument("--model", default=",".join(MODELS),
                   help=f"comma-separated, from {', '.join(MODELS)} (default: both, one after "
                        "the other); ignored with --tiny")
    p.add_argument("--quant", action="store_true",
                   help="also the 4-bit group: NF4 floor, NF4 + rows, QLoRA (bitsandbytes)")
    p.add_argument("--methods", default=",".join(FLOAT_METHODS),
                   help="float-group methods, comma-separated (floor is always included)")
    p.add_argument("--weights-dtype", default=None, choices=["float32", "bfloat16"],
                   help="weights dtype (default bfloat16 on CUDA, float32 on CPU); row deltas "
                        "stay float32 masters either way")
    p.add_argument("--lora-rank", type=int, default=4,
                   help="parameter budget of the row plan: LoRA at this rank (default 4, as "
                        "the CPU benchmarks)")
    p.add_argument("--rows", type=int, default=None,
                   help="instead: this many rows per Linear (FixedRows; paper default 64)")
    p.add_argument("--batch-size", type=int, default=None, help="default per model: 8")
    p.add_argument("--seq-len", type=int, default=None, help="default per model: 512")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved timing rounds (default smollm2 60, llama1b 30)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per method")
    p.add_argument("--calib-batches", type=int, default=4, help="scoring batches")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole run; timing rounds are capped to fit "
                        "(default 420 on CUDA, none on CPU)")
    p.add_argument("--random-weights", action="store_true",
                   help="smollm2 with random weights (its config) even if the checkpoint is here")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None,
                   help="results file (default: $OUT/gpu_check.json, else ./gpu_check.json)")
    args = p.parse_args(argv)

    models = [m.strip() for m in args.model.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        p.error(f"--model: unknown model {', '.join(map(repr, bad)) or repr(args.model)}; "
                f"choose from {', '.join(MODELS)} (comma-separated), or --tiny for a CPU dry run")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in FLOAT_METHODS]
    if bad:
        p.error(f"--methods: unknown method {', '.join(map(repr, bad))}; choose from "
                f"{', '.join(FLOAT_METHODS)}")
    args.float_methods = tuple(m for m in FLOAT_METHODS if m in methods or m == "floor")
    args.models = ["tiny"] if args.tiny else models
    for flag in ("batch_size", "seq_len", "rounds", "rows", "calib_batches", "lora_rank"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the check; returns the exit code. ``>>> main(["--tiny", "--json", "/tmp/g.json"])``"""
    args = parse_args(argv)
    if args.tiny:
        args.device = "cpu"
    elif torch.cuda.is_available():
        args.device = "cuda"
    else:
        print("gpu_check: CUDA is not available; run with --tiny for a CPU dry run.",
              file=sys.stderr)
        return 2
    args.weights_dtype = args.weights_dtype or ("bfloat16" if args.device == "cuda"
                                                else "float32")
    if args.time_budget is None and args.device == "cuda":
        args.time_budget = 420.0
    # every optional dependency checked before anything expensive
    if "lora" in args.float_methods or args.quant:
        require_peft()
    if args.quant:
        from rowsft_nb.quant import require_bitsandbytes
        require_bitsandbytes()
    out = output_path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)

    phases = Phases()
    info = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
            **versions(), "args": {k: v for k, v in vars(args).items()}}
    print(f"device: {info['device']}, torch {info['torch']}, transformers "
          f"{info['transformers']}, weights {args.weights_dtype}, models {args.models}"
          + (", --quant" if args.quant else ""))
    threads = torch.get_num_threads()
    if args.tiny:
        torch.set_num_threads(min(2, threads))
    results: dict[str, Any] = {}
    try:
        n_groups = 2 if args.quant else 1
        for i, name in enumerate(args.models):
            try:
                results[name] = run_model(name, args, phases,
                                          timing_phases_left=n_groups * (len(args.models) - i),
                                          models_left=len(args.models) - i - 1)
            except Exception as err:  # noqa: BLE001 - keep the other model's numbers
                if args.tiny:
                    raise
                traceback.print_exc()
                print(f"\n{name} FAILED: {type(err).__name__}: {err}")
                results[name] = {"error": f"{type(err).__name__}: {err}"}
                _free(args)
            else:
                print_table(name, results[name])
            # written after every model: a run cut by the time limit keeps what it measured
            write_json(out, {**info, "models": results, "phases": phases.log,
                             "seconds": phases.elapsed(), "complete": False})
    finally:
        torch.set_num_threads(threads)
    info.update(models=results, phases=phases.log, seconds=phases.elapsed(), complete=True)
    write_json(out, info)
    print(f"\ntotal {phases.elapsed():.1f} s; results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
