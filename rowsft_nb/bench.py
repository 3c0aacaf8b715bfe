"""Side-by-side training cost of row-sparse fine-tuning and its baselines, measured exactly.

Every method trains the same model at one trainable-parameter budget (a :class:`RowPlan`):

- ``floor``: nothing trains; forward + backward through the frozen model with
  ``inputs_embeds`` requiring grad. The memory and time no adapter can avoid.
- ``rowsft``: this library's row-sparse adapter (``inject(model, plan)``).
- ``columns``: the input-column (neuron-centric) mode, ``inject`` with a column plan.
- ``lora``: PEFT LoRA on the plan's modules at ``round(plan.equivalent_lora_rank())``.
- ``full``: every parameter trains.
- ``dense_mask``: the plan's weights train in full size, their gradient multiplied by a
  row mask in a hook (mask-based sparse fine-tuning): full-size gradients and optimizer state.
- ``onehot``: the same row update computed as the paper's public code does it,
  ``y = base(x) + (x @ dW^T) @ onehot[r, d_out]``.

Memory by component (bytes, exact and repeatable on CPU, see ../shared/TESTING.md):
``weights`` (frozen parameters + buffers), ``trainable``, ``gradients``, ``optimizer``
(AdamW state), ``saved`` (tensors saved for backward, each storage once, parameters and
buffers skipped) and ``step_peak`` (allocation peak of forward + backward + optimizer step
above what existed before: ``rowsft_nb.profiling.peak_memory``, ``max_memory_allocated``
on CUDA). ``total = weights + trainable + optimizer + step_peak``; ``overhead`` is
``total`` minus the floor's total.

Usage::

    from rowsft_nb import bench
    models = bench.build_methods(lambda: tiny_llama(), plan, column_plan)   # {method: model}
    rows = [bench.measure_memory(m, batch, method=k) for k, m in models.items()]
    bench.step_time(models["rowsft"], batch)                                 # median seconds

The full benchmark (memory, speed, scoring cost, interactive cost, accuracy) is
:func:`run` / ``rowsft-nb bench [--quick]``; results go to ``benchmarks/results/``.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from .plan import RowPlan
from .profiling import measure_peak, saved_tensor_bytes, tensor_bytes
from .targets import is_conv1d, linear_shape

__all__ = ["METHODS", "OneHotRowLinear", "apply_onehot", "apply_dense_mask", "apply_lora",
           "apply_full", "apply_floor", "prepare_method", "build_methods", "MemoryBreakdown",
           "measure_memory", "step_time", "matched_plans", "machine_info", "run", "main",
           "goals", "to_markdown", "BenchConfig", "memory_and_speed"]

METHODS = ("floor", "rowsft", "columns", "lora", "full", "dense_mask", "onehot")
MiB = 1 << 20
REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"


# ---------------------------------------------------------------------------- baselines
class OneHotRowLinear(nn.Module):
    """The paper's public-code form of a row update: ``base(x) + (x @ dW^T) @ onehot``,
    with ``onehot`` a dense [r, d_out] buffer (``onehot[i, rows[i]] = 1``). A benchmark
    baseline, numerically the same as :class:`rowsft_nb.RowSparseLinear` rows.

    >>> layer = OneHotRowLinear(nn.Linear(8, 6), rows=[1, 4])   # layer(x) == base(x) at init
    """

    def __init__(self, base_layer: nn.Module, rows: Iterable[int] | torch.Tensor) -> None:
        super().__init__()
        d_out, d_in = linear_shape(base_layer)
        weight = base_layer.weight
        rows = torch.as_tensor(rows, dtype=torch.int64).flatten()
        if rows.numel() == 0:
            raise ValueError("OneHotRowLinear needs at least one row")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        onehot = torch.zeros(rows.numel(), d_out, dtype=weight.dtype, device=weight.device)
        onehot[torch.arange(rows.numel()), rows.to(weight.device)] = 1.0
        self.register_buffer("onehot", onehot, persistent=False)
        self.delta = nn.Parameter(torch.zeros(rows.numel(), d_in, dtype=weight.dtype,
                                              device=weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + (x @ self.delta.t()) @ self.onehot


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def apply_onehot(model: nn.Module, plan: RowPlan) -> nn.Module:
    """Freeze ``model`` and wrap each planned module in :class:`OneHotRowLinear` (in place).

    >>> apply_onehot(model, plan)
    """
    plan.validate(model)
    _freeze(model)
    modules = dict(model.named_modules())
    for name, rows in plan.rows.items():
        if rows.numel():
            _set_module(model, name, OneHotRowLinear(modules[name], rows))
    return model


def apply_dense_mask(model: nn.Module, plan: RowPlan) -> nn.Module:
    """Freeze ``model``, make every planned module's full weight trainable and mask its
    gradient to the planned rows with a hook (mask-based sparse fine-tuning; in place).
    Use with ``weight_decay=0`` so masked entries never move.

    >>> apply_dense_mask(model, plan); model(**batch).loss.backward()   # grads 0 off the rows
    """
    plan.validate(model)
    _freeze(model)
    modules = dict(model.named_modules())
    handles = []
    for name, rows in plan.rows.items():
        if not rows.numel():
            continue
        m = modules[name]
        d_out, _ = linear_shape(m)
        mask = torch.zeros(d_out, dtype=m.weight.dtype, device=m.weight.device)
        mask[rows.to(mask.device)] = 1.0
        mask = mask.view(1, d_out) if is_conv1d(m) else mask.view(d_out, 1)
        m.register_buffer("row_mask", mask, persistent=False)
        m.weight.requires_grad_(True)
        handles.append(m.weight.register_hook(lambda g, mask=mask: g * mask))
    model._dense_mask_hooks = handles
    return model


def apply_lora(model: nn.Module, plan: RowPlan, rank: int | None = None,
               heads: Iterable[str] = ()) -> nn.Module:
    """PEFT LoRA (``lora_alpha = 2 * rank``, no dropout) on the plan's modules; ``rank``
    defaults to ``round(plan.equivalent_lora_rank())`` (at least 1). ``heads`` train fully
    (``modules_to_save``). Returns the ``PeftModel``.

    >>> lora = apply_lora(model, plan)          # ~ plan.trainable_parameters() parameters
    """
    from peft import LoraConfig, get_peft_model

    k = int(rank) if rank is not None else max(1, round(plan.equivalent_lora_rank()))
    if k < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {k}")
    cfg = LoraConfig(r=k, lora_alpha=2 * k, lora_dropout=0.0, target_modules=list(plan.modules),
                     modules_to_save=list(heads) or None)
    return get_peft_model(model, cfg)


def apply_full(model: nn.Module) -> nn.Module:
    """Every parameter trainable. ``>>> apply_full(model)``"""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def apply_floor(model: nn.Module) -> nn.Module:
    """Nothing trainable (the frozen floor). ``>>> apply_floor(model)``"""
    _freeze(model)
    return model


def _head_names(model: nn.Module, plan: RowPlan) -> list[str]:
    from .adapter.model import trainable_head_names

    return trainable_head_names(model, plan)


def prepare_method(model: nn.Module, method: str, plan: RowPlan,
                   column_plan: RowPlan | None = None, *, train_heads: bool = False,
                   lora_rank: int | None = None) -> nn.Module:
    """Make ``model`` (in place, or wrapped for LoRA) train as ``method`` (one of
    :data:`METHODS`, plus ``"head"``: only the classifier head) at the budget of ``plan``.
    ``train_heads``: also train classifier heads fully (never lm_head). Returns the model to
    train.

    >>> lora = prepare_method(model, "lora", plan)
    """
    from .adapter import inject

    heads = _head_names(model, plan) if train_heads or method == "head" else []
    if method == "floor":
        return apply_floor(model)
    if method == "rowsft":
        return inject(model, plan, train_heads=train_heads)
    if method == "columns":
        if column_plan is None or not column_plan.columns:
            raise ValueError("method 'columns' needs a column_plan (select(..., columns=True))")
        return inject(model, column_plan, train_heads=train_heads)
    if method == "lora":
        return apply_lora(model, plan, lora_rank, heads=[h.rsplit(".", 1)[-1] for h in heads])
    if method == "full":
        return apply_full(model)
    if method in ("dense_mask", "onehot", "head"):
        if method == "dense_mask":
            apply_dense_mask(model, plan)
        elif method == "onehot":
            apply_onehot(model, plan)
        else:
            _freeze(model)
        if not heads and method == "head":
            raise ValueError("method 'head' needs a model with a classifier head")
        modules = dict(model.named_modules())
        for h in heads:
            for p in modules[h].parameters():
                p.requires_grad_(True)
        return model
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS + ('head',)}")


def build_methods(make_model: Callable[[], nn.Module], plan: RowPlan,
                  column_plan: RowPlan | None = None, methods: Iterable[str] = METHODS,
                  **kw: Any) -> dict[str, nn.Module]:
    """``{method: model prepared for it}``, each from a fresh ``make_model()``.

    >>> models = build_methods(lambda: copy.deepcopy(base), plan, column_plan)
    """
    return {m: prepare_method(make_model(), m, plan, column_plan, **kw) for m in methods}


def matched_plans(report, lora_rank: int, *, min_rows: int = 1) -> tuple[RowPlan, RowPlan]:
    """A row plan and a column plan from ``report`` whose trainable parameters are (at
    most) those of LoRA at ``lora_rank`` on every module of the report, every module getting
    at least ``min_rows`` rows/columns (so the equivalent LoRA rank is ``~lora_rank``).

    >>> plan, column_plan = matched_plans(report, lora_rank=4)
    """
    from .selection import ParamBudget, select

    budget = lora_rank * sum(d_out + d_in for d_out, d_in in report.shapes.values())
    plan = select(report, ParamBudget(int(budget)), min_rows=min_rows)
    column_plan = select(report, ParamBudget(int(budget)), min_rows=min_rows, columns=True)
    return plan, column_plan


# ---------------------------------------------------------------------------- measuring
def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _forward_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], floor: bool) -> torch.Tensor:
    if not floor:
        return model(**batch).loss
    emb = model.get_input_embeddings()
    inputs = {k: v for k, v in batch.items() if k != "input_ids"}
    inputs["inputs_embeds"] = emb(batch["input_ids"]).detach().requires_grad_(True)
    return model(**inputs).loss


def make_optimizer(model: nn.Module, lr: float = 1e-4) -> torch.optim.Optimizer | None:
    """AdamW (weight_decay 0: masked entries stay put) over the trainable parameters, or
    None when nothing trains (the floor)."""
    params = _trainable(model)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if params else None


def _step_fn(model: nn.Module, batch, opt) -> Callable[[], None]:
    floor = opt is None

    def step() -> None:
        loss = _forward_loss(model, batch, floor)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


@dataclass
class MemoryBreakdown:
    """Bytes by component of one training step (see the module docstring)."""

    method: str
    weights: int
    trainable: int
    gradients: int
    optimizer: int
    saved: int
    step_peak: int
    trainable_parameters: int
    peak_kind: str = "cpu_profiler"
    cuda_max_allocated: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.weights + self.trainable + self.optimizer + self.step_peak

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


def measure_memory(model: nn.Module, batch: Mapping[str, torch.Tensor], method: str = "",
                   lr: float = 1e-4) -> MemoryBreakdown:
    """Exact memory by component of a training step of ``model`` on ``batch`` (one warm-up
    step first, so AdamW state exists). ``method="floor"`` measures the frozen floor.

    >>> measure_memory(inject(model, plan), batch, "rowsft").total
    """
    floor = method == "floor"
    if floor:
        _freeze(model)
    model.train()
    device = _device_of(model)
    opt = make_optimizer(model, lr)
    if opt is None and not floor:
        raise ValueError(f"method {method!r}: the model has no trainable parameters")
    step = _step_fn(model, batch, opt)
    step()  # warm-up: optimizer state now exists
    params = _trainable(model)
    trainable = tensor_bytes(params) if params else 0
    trainable_keys = {p.untyped_storage().data_ptr() for p in params}
    frozen = [t for t in [*model.parameters(), *model.buffers()]
              if t.untyped_storage().data_ptr() not in trainable_keys]
    weights = tensor_bytes(frozen) if frozen else 0
    opt_tensors = [v for s in (opt.state.values() if opt else ()) for v in s.values()
                   if isinstance(v, torch.Tensor)]
    optimizer = tensor_bytes(opt_tensors) if opt_tensors else 0
    saved = saved_tensor_bytes(lambda: _forward_loss(model, batch, floor),
                               [*model.parameters(), *model.buffers()])
    _forward_loss(model, batch, floor).backward()
    grads = [p.grad for p in params if p.grad is not None]
    gradients = tensor_bytes(grads) if grads else 0
    model.zero_grad(set_to_none=True)
    _, peak = measure_peak(step, device)
    kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_profiler"
    n_trainable = sum(p.numel() for p in params)
    return MemoryBreakdown(method=method, weights=weights, trainable=trainable,
                           gradients=gradients, optimizer=optimizer, saved=saved,
                           step_peak=peak, trainable_parameters=n_trainable, peak_kind=kind,
                           cuda_max_allocated=peak if device.type == "cuda" else None)


def step_time(model: nn.Module, batch: Mapping[str, torch.Tensor], *, method: str = "",
              warmup: int = 2, repeats: int = 7, lr: float = 1e-4) -> dict[str, float]:
    """Median (and min/max) seconds of a training step (forward + backward + AdamW step;
    the floor: forward + backward) after ``warmup`` steps.

    >>> step_time(model, batch, repeats=7)["median_s"]
    """
    model.train()
    device = _device_of(model)
    opt = None if method == "floor" else make_optimizer(model, lr)
    step = _step_fn(model, batch, opt)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "repeats": repeats, "warmup": warmup}


# ---------------------------------------------------------------------------- machine
def machine_info(threads: int | None = None) -> dict[str, Any]:
    """Machine, versions, threads and current load (the machine may be shared)."""
    import transformers

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": threads or torch.get_num_threads(),
            "load_average_1m_5m_15m": list(os.getloadavg()),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:  # pragma: no cover
        pass
    return info


# ---------------------------------------------------------------------------- benchmark parts
@dataclass
class BenchConfig:
    """Sizes of one benchmark run (``quick()`` is what ``--quick`` uses)."""

    lora_rank: int = 4
    mem_batch: int = 8
    mem_seq: int = 64
    smollm_mem_batch: int = 4
    smollm_mem_seq: int = 64
    time_repeats: int = 5
    smollm_time_repeats: int = 3
    calib_samples: int = 32
    acc_seeds: tuple[int, ...] = (0, 1, 2)
    acc_steps: int = 100
    acc_batch: int = 16
    acc_max_length: int = 48
    acc_n_train: int = 1000
    acc_n_eval: int = 200
    acc_methods: tuple[str, ...] = ("rowsft_taylor", "rowsft_l2", "rowsft_random", "columns",
                                    "lora", "full", "head")
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

    @classmethod
    def quick(cls) -> "BenchConfig":
        return cls(time_repeats=3, calib_samples=16, acc_seeds=(0,), acc_steps=25,
                   acc_n_train=300, acc_n_eval=100,
                   acc_methods=("rowsft_taylor", "rowsft_random", "lora", "head"),
                   smollm=False, interactive_repeats=3)


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _fixed_batch(data, n: int, collator) -> dict[str, torch.Tensor]:
    from .data import calibration_batches

    return calibration_batches(data, batch_size=n, n_samples=n, collator=collator, seed=0)[0]


def _pad_batch(batch: dict[str, torch.Tensor], seq: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Cut or pad every row to exactly ``seq`` tokens, so batch x seq is what is stated."""
    out = {}
    for k, v in batch.items():
        if v.dim() == 2:
            fill = {"input_ids": pad_id, "attention_mask": 0, "labels": -100}.get(k, 0)
            v = v[:, :seq]
            if v.shape[1] < seq:
                v = torch.cat([v, v.new_full((v.shape[0], seq - v.shape[1]), fill)], 1)
        out[k] = v
    return out


def memory_and_speed(name: str, base: nn.Module, batch: dict[str, torch.Tensor],
                     plan: RowPlan, column_plan: RowPlan, cfg: BenchConfig,
                     repeats: int | None = None) -> dict[str, Any]:
    """Memory by component and step time of every method on copies of ``base``."""
    rows: dict[str, Any] = {}
    lora_rank = max(1, round(plan.equivalent_lora_rank()))
    for method in METHODS:
        model = prepare_method(copy.deepcopy(base), method, plan, column_plan,
                               lora_rank=lora_rank)
        mem = measure_memory(model, batch, method)
        timing = step_time(model, batch, method=method, repeats=repeats or cfg.time_repeats)
        rows[method] = {**mem.to_dict(), "step": timing}
        _log(f"{name} {method:10s} total {mem.total / MiB:8.1f} MiB  saved {mem.saved / MiB:7.1f}"
             f"  peak {mem.step_peak / MiB:7.1f}  step {timing['median_s'] * 1e3:7.1f} ms  "
             f"trainable {mem.trainable_parameters:,}")
        del model
    floor = rows["floor"]
    for r in rows.values():
        r["overhead"] = r["total"] - floor["total"]
        r["step_ratio_floor"] = r["step"]["median_s"] / floor["step"]["median_s"]
        r["step_ratio_lora"] = r["step"]["median_s"] / rows["lora"]["step"]["median_s"]
    lora_over = rows["lora"]["overhead"]
    ratios = {
        "rowsft_overhead_over_lora": rows["rowsft"]["overhead"] / lora_over,
        "columns_overhead_over_lora": rows["columns"]["overhead"] / lora_over,
        "rowsft_total_over_dense_mask": rows["rowsft"]["total"] / rows["dense_mask"]["total"],
        "rowsft_total_over_onehot": rows["rowsft"]["total"] / rows["onehot"]["total"],
        "rowsft_total_over_lora": rows["rowsft"]["total"] / rows["lora"]["total"],
        "rowsft_step_over_lora": rows["rowsft"]["step_ratio_lora"],
        "rowsft_step_over_floor": rows["rowsft"]["step_ratio_floor"],
        "columns_step_over_lora": rows["columns"]["step_ratio_lora"],
        "columns_step_over_floor": rows["columns"]["step_ratio_floor"],
        "onehot_step_over_rowsft": rows["onehot"]["step"]["median_s"]
        / rows["rowsft"]["step"]["median_s"],
    }
    shape = list(batch["input_ids"].shape)
    return {"model": name, "batch_size": shape[0], "seq_len": shape[1], "dtype": "float32",
            "optimizer": "AdamW (weight_decay 0)", "lora_rank": lora_rank,
            "plan": {"metric": plan.meta.get("metric"), "modules": len(plan.modules),
                     "rows": plan.num_rows(), "trainable": plan.trainable_parameters(),
                     "columns": sum(v.numel() for v in column_plan.columns.values()),
                     "column_trainable": column_plan.trainable_parameters(),
                     "equivalent_lora_rank": plan.equivalent_lora_rank()},
            "methods": rows, "ratios": ratios}


def _minilm_memory(cfg: BenchConfig) -> tuple[dict[str, Any], Any]:
    from . import assets
    from .data import calibration_batches, prepare_task
    from .scoring import score

    base, tok = assets.load_encoder(num_labels=2, seed=0)
    data = prepare_task("movie_sentiment", tok, max_length=cfg.mem_seq, n_train=256, n_eval=16)
    batch = _pad_batch(_fixed_batch(data.train, cfg.mem_batch, data.collator), cfg.mem_seq,
                       tok.pad_token_id)
    calib = calibration_batches(data.train, 16, cfg.calib_samples, data.collator, seed=0)
    report = score(base, calib, metric="taylor", progress=False)
    plan, column_plan = matched_plans(report, cfg.lora_rank)
    return memory_and_speed("all-MiniLM-L6-v2 (classifier, head frozen)", base, batch, plan,
                            column_plan, cfg), report


def _smollm_memory(cfg: BenchConfig) -> dict[str, Any]:
    from . import assets
    from .data import prepare_task
    from .scoring import score

    base, tok = assets.load_causal_lm()
    data = prepare_task(cfg.lm_task, tok, max_length=cfg.smollm_mem_seq, n_train=64, n_eval=8)
    batch = _fixed_batch(data.train, cfg.smollm_mem_batch, data.collator)
    batch = _pad_batch(batch, cfg.smollm_mem_seq, tok.pad_token_id or tok.eos_token_id)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    report = score(base, [batch], metric="taylor", progress=False)
    plan, column_plan = matched_plans(report, cfg.lora_rank)
    return memory_and_speed("SmolLM2-135M-Instruct (fp32)", base, batch, plan, column_plan, cfg,
                            repeats=cfg.smollm_time_repeats)


def _load_bench_module(name: str):
    """A script from the repository's benchmarks/ folder, or None outside a checkout."""
    import importlib.util

    path = REPO / "benchmarks" / f"{name}.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(f"_rowsft_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _scoring_cost(cfg: BenchConfig, quick: bool) -> dict[str, Any]:
    mod = _load_bench_module("bench_scoring")
    if mod is None:
        return {"skipped": "benchmarks/bench_scoring.py not found (run from a source checkout)"}
    import contextlib
    import io
    import tempfile

    argv = ["--threads", str(torch.get_num_threads())]
    if quick or not cfg.smollm:
        argv += ["--skip-smollm", "--minilm-batches", "1"]
    else:
        argv += ["--batches", "1"]
    # bench_scoring writes its JSON atomically (a rename): give it a real scratch file,
    # never a device such as os.devnull, which the rename would replace.
    with tempfile.TemporaryDirectory(prefix="rowsft-bench-") as tmp:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            res = mod.main(argv + ["--out", str(Path(tmp) / "scoring.json")])
    res["command"] = "benchmarks/bench_scoring.py " + " ".join(argv)
    return res


def _interactive_cost(cfg: BenchConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    sel = _load_bench_module("bench_selection")
    if sel is not None:
        r = sel.run(cfg.interactive_repeats)
        out["select"] = {"goal": r["goal"], "results": r["results"],
                         "all_warm_within_goal": r["all_warm_within_goal"]}
        torch.set_num_threads(_THREADS[0])
    wid = _load_bench_module("bench_widgets")
    if wid is not None:
        from .testing import llama2_7b_report

        out["budget_explorer"] = wid.bench_budget(llama2_7b_report(), cfg.interactive_repeats)
    if not out:
        out["skipped"] = "benchmarks/bench_selection.py / bench_widgets.py not found"
    return out


_THREADS = [1]


def _accuracy_summary(cfg: BenchConfig, data, runs: dict[str, list[dict[str, Any]]]
                      ) -> dict[str, Any]:
    summary = {}
    for method, rs in runs.items():
        accs = [r["accuracy"] for r in rs]
        if not accs:
            continue
        summary[method] = {"mean": statistics.fmean(accs),
                           "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                           "n": len(accs), "trainable_parameters": rs[0]["trainable_parameters"]}
    return {"task": "movie_sentiment", "model": "all-MiniLM-L6-v2", "max_length": cfg.acc_max_length,
            "n_train": len(data.train), "n_eval": len(data.validation), "split": "validation",
            "steps": cfg.acc_steps, "batch_size": cfg.acc_batch, "seeds": list(cfg.acc_seeds),
            "lr": {"adapters_and_head": cfg.lr_adapter, "full": cfg.lr_full},
            "lora_rank": cfg.lora_rank, "calibration_samples": cfg.calib_samples,
            "note": "classifier head trains fully in every method; 'head' trains only it",
            "runs": runs, "summary": summary}


def _accuracy_minilm(cfg: BenchConfig, on_partial: Callable[[dict], None] | None = None
                     ) -> dict[str, Any]:
    """movie_sentiment with MiniLM: every method through rowsft_nb.train, equal budgets.
    ``on_partial(result so far)`` is called after every run (seeds are the outer loop)."""
    from . import assets
    from .data import calibration_batches, prepare_task
    from .scoring import score
    from .train import train

    _, tok = assets.load_encoder(num_labels=2, seed=0)
    data = prepare_task("movie_sentiment", tok, max_length=cfg.acc_max_length,
                        n_train=cfg.acc_n_train, n_eval=cfg.acc_n_eval, seed=0)
    calib = calibration_batches(data.train, 16, cfg.calib_samples, data.collator, seed=0)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in cfg.acc_methods}
    for seed in cfg.acc_seeds:
        probe, _ = assets.load_encoder(num_labels=2, seed=seed)
        reports = {}
        for metric in ("taylor", "l2", "random"):
            reports[metric] = score(probe, calib, metric=metric, seed=seed, progress=False)
        del probe
        for method in cfg.acc_methods:
            model, _ = assets.load_encoder(num_labels=2, seed=seed)
            metric = {"rowsft_l2": "l2", "rowsft_random": "random"}.get(method, "taylor")
            plan, column_plan = matched_plans(reports[metric], cfg.lora_rank)
            kind = {"rowsft_taylor": "rowsft", "rowsft_l2": "rowsft",
                    "rowsft_random": "rowsft"}.get(method, method)
            model = prepare_method(model, kind, plan, column_plan, train_heads=True,
                                   lora_rank=cfg.lora_rank)
            lr = cfg.lr_full if method == "full" else cfg.lr_adapter
            res = train(model, data.train, eval_dataset=data.validation, tokenizer=tok, lr=lr,
                        max_steps=cfg.acc_steps, batch_size=cfg.acc_batch, eval_batch_size=64,
                        seed=seed, device="cpu", progress_bar=False, logging_steps=10,
                        evaluate_before=seed == cfg.acc_seeds[0])
            row = {"seed": seed, "accuracy": res.metrics_after.get("accuracy"),
                   "accuracy_before": res.metrics_before.get("accuracy"),
                   "trainable_parameters": res.trainable_parameters, "seconds": res.seconds,
                   "steps": res.steps, "lr": lr, "stop_reason": res.stop_reason}
            runs[method].append(row)
            _log(f"accuracy {method:14s} seed {seed}: {row['accuracy']:.4f} "
                 f"({row['trainable_parameters']:,} trainable, {res.seconds:.0f} s)")
            del model
            if on_partial is not None:
                on_partial({**_accuracy_summary(cfg, data, runs), "partial": True})
    return _accuracy_summary(cfg, data, runs)


def _loss_smollm(cfg: BenchConfig) -> dict[str, Any]:
    from . import assets
    from .data import calibration_batches, prepare_task
    from .scoring import score
    from .train import train

    _, tok = assets.load_causal_lm()
    data = prepare_task(cfg.lm_task, tok, max_length=cfg.lm_max_length, n_train=cfg.lm_n_train,
                        n_eval=cfg.lm_n_eval, seed=0)
    out = {}
    for method in ("rowsft", "lora"):
        model, _ = assets.load_causal_lm()
        calib = calibration_batches(data.train, 8, cfg.calib_samples // 2, data.collator, seed=0)
        plan, column_plan = matched_plans(score(model, calib, metric="taylor", progress=False),
                                          cfg.lora_rank)
        model = prepare_method(model, method, plan, column_plan, lora_rank=cfg.lora_rank)
        res = train(model, data.train, eval_dataset=data.validation, tokenizer=tok, lr=cfg.lm_lr,
                    max_steps=cfg.lm_steps, batch_size=cfg.lm_batch, eval_batch_size=16, seed=0,
                    device="cpu", progress_bar=False, logging_steps=5)
        out[method] = {"loss_before": res.metrics_before.get("loss"),
                       "loss_after": res.metrics_after.get("loss"),
                       "trainable_parameters": res.trainable_parameters, "seconds": res.seconds}
        _log(f"causal LM {method}: loss {out[method]['loss_before']:.4f} -> "
             f"{out[method]['loss_after']:.4f} ({res.seconds:.0f} s)")
        del model
    return {"task": cfg.lm_task, "model": "SmolLM2-135M-Instruct", "steps": cfg.lm_steps,
            "batch_size": cfg.lm_batch, "max_length": cfg.lm_max_length,
            "n_train": len(data.train), "n_eval": len(data.validation), "lr": cfg.lm_lr,
            "lora_rank": cfg.lora_rank, "seed": 0, "methods": out}


def run(quick: bool = False, threads: int = 1, parts: Iterable[str] | None = None,
        cfg: BenchConfig | None = None, command: str = "",
        partial_out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run the benchmark parts (``memory``, ``scoring``, ``interactive``, ``accuracy``) and
    return one results dict (what ``benchmarks/results/bench*.json`` holds). With
    ``partial_out``, the results so far are written there after every accuracy run.

    >>> res = run(quick=True, parts=["memory"])
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    torch.set_num_threads(threads)
    _THREADS[0] = threads
    torch.manual_seed(0)
    cfg = cfg or (BenchConfig.quick() if quick else BenchConfig())
    parts = list(parts or ("memory", "scoring", "interactive", "accuracy"))
    unknown = set(parts) - {"memory", "scoring", "interactive", "accuracy"}
    if unknown:
        raise ValueError(f"unknown benchmark parts {sorted(unknown)}; choose from memory, "
                         "scoring, interactive, accuracy")
    start = time.perf_counter()
    res: dict[str, Any] = {"benchmark": "rowsft-nb bench", "quick": quick,
                           "command": command or f"rowsft-nb bench{' --quick' if quick else ''}",
                           "config": asdict(cfg), "machine_start": machine_info(threads)}
    timings = {}
    if "memory" in parts:
        t = time.perf_counter()
        res["memory"] = {"minilm": _minilm_memory(cfg)[0]}
        if cfg.smollm:
            res["memory"]["smollm"] = _smollm_memory(cfg)
        timings["memory"] = time.perf_counter() - t
    if "scoring" in parts and cfg.scoring:
        t = time.perf_counter()
        _log("scoring cost (benchmarks/bench_scoring.py)")
        res["scoring"] = _scoring_cost(cfg, quick)
        torch.set_num_threads(threads)
        timings["scoring"] = time.perf_counter() - t
    if "interactive" in parts and cfg.interactive:
        t = time.perf_counter()
        _log("interactive cost (bench_selection / bench_widgets)")
        res["interactive"] = _interactive_cost(cfg)
        torch.set_num_threads(threads)
        timings["interactive"] = time.perf_counter() - t
    if "accuracy" in parts:
        t = time.perf_counter()
        def save_partial(acc: dict) -> None:
            if partial_out is not None:
                from ._io import write_json

                write_json(partial_out, {**res, "accuracy": acc, "partial": True})

        res["accuracy"] = _accuracy_minilm(cfg, save_partial)
        if cfg.smollm:
            res["causal_lm"] = _loss_smollm(cfg)
        timings["accuracy"] = time.perf_counter() - t
    res["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    res["seconds"]["total"] = round(time.perf_counter() - start, 1)
    res["machine_end"] = machine_info(threads)
    res["goals"] = goals(res)
    return res


def goals(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal of issue 8 with the measured value and whether it is met."""
    out = []

    def add(goal: str, value: float | None, limit: float, where: str, below: bool = True):
        if value is None:
            return
        met = value <= limit if below else value >= limit
        out.append({"goal": goal, "where": where, "measured": round(value, 3), "limit": limit,
                    "met": bool(met)})

    for key, m in res.get("memory", {}).items():
        r = m["ratios"]
        add("row overhead above floor <= 1.0x LoRA's", r["rowsft_overhead_over_lora"], 1.0, key)
        add("column overhead above floor <= 0.5x LoRA's", r["columns_overhead_over_lora"], 0.5, key)
        add("row total <= 0.5x dense-mask total", r["rowsft_total_over_dense_mask"], 0.5, key)
        add("row step time <= 0.9x LoRA", r["rowsft_step_over_lora"], 0.9, key)
        add("row step time <= 1.2x frozen floor", r["rowsft_step_over_floor"], 1.2, key)
    acc = res.get("accuracy", {}).get("summary", {})
    if "rowsft_taylor" in acc and "lora" in acc:
        add("row (Taylor) accuracy within 1 point of LoRA (LoRA - row, points)",
            100 * (acc["lora"]["mean"] - acc["rowsft_taylor"]["mean"]), 1.0, "minilm")
    if "rowsft_taylor" in acc and "rowsft_random" in acc:
        add("importance rows above random rows (Taylor - random, points)",
            100 * (acc["rowsft_taylor"]["mean"] - acc["rowsft_random"]["mean"]), 0.0, "minilm",
            below=False)
    return out


def print_summary(res: dict[str, Any]) -> None:
    """Readable tables of a results dict."""
    for key, m in res.get("memory", {}).items():
        print(f"\n{m['model']}: batch {m['batch_size']} x {m['seq_len']}, LoRA rank "
              f"{m['lora_rank']}, plan {m['plan']['rows']} rows / {m['plan']['trainable']:,} params")
        print(f"{'method':<11}{'trainable':>11}{'weights':>9}{'grads':>8}{'optim':>8}{'saved':>8}"
              f"{'peak':>8}{'total':>9}{'overhd':>8}{'step ms':>9}{'/lora':>7}{'/floor':>7}")
        for name, r in m["methods"].items():
            print(f"{name:<11}{r['trainable_parameters']:>11,}{r['weights'] / MiB:>9.1f}"
                  f"{r['gradients'] / MiB:>8.2f}{r['optimizer'] / MiB:>8.2f}"
                  f"{r['saved'] / MiB:>8.1f}{r['step_peak'] / MiB:>8.1f}{r['total'] / MiB:>9.1f}"
                  f"{r['overhead'] / MiB:>8.1f}{r['step']['median_s'] * 1e3:>9.1f}"
                  f"{r['step_ratio_lora']:>7.2f}{r['step_ratio_floor']:>7.2f}")
    acc = res.get("accuracy")
    if acc:
        print(f"\naccuracy, {acc['task']} ({acc['n_eval']} validation), {acc['steps']} steps, "
              f"seeds {acc['seeds']}")
        for name, s in acc["summary"].items():
            print(f"  {name:<14} {100 * s['mean']:6.2f} ± {100 * s['std']:4.2f}  "
                  f"({s['trainable_parameters']:,} trainable)")
    lm = res.get("causal_lm")
    if lm:
        for name, s in lm["methods"].items():
            print(f"  causal LM {name:<7} loss {s['loss_before']:.4f} -> {s['loss_after']:.4f}")
    for g in res.get("goals", []):
        print(f"  [{'met' if g['met'] else 'NOT met'}] {g['where']}: {g['goal']}: {g['measured']}")


def to_markdown(res: dict[str, Any]) -> str:
    """Markdown tables of a results dict (memory/speed, accuracy, causal LM, goals), as
    pasted into docs/benchmarks.md. ``>>> print(to_markdown(res))``"""
    lines: list[str] = []
    for key, m in res.get("memory", {}).items():
        lines += [f"**{m['model']}**, batch {m['batch_size']} x {m['seq_len']} tokens, fp32, "
                  f"AdamW; budget = LoRA rank {m['lora_rank']} on {m['plan']['modules']} modules "
                  f"({m['plan']['rows']} rows, {m['plan']['trainable']:,} parameters; column plan "
                  f"{m['plan']['columns']} columns, {m['plan']['column_trainable']:,}). MiB:", "",
                  "| method | trainable params | weights | trainable | grads | AdamW | saved for bwd "
                  "| step peak | total | overhead | step ms | x LoRA | x floor |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in m["methods"].items():
            lines.append(
                f"| {name} | {r['trainable_parameters']:,} | {r['weights'] / MiB:.1f} | "
                f"{r['trainable'] / MiB:.2f} | {r['gradients'] / MiB:.2f} | "
                f"{r['optimizer'] / MiB:.2f} | {r['saved'] / MiB:.1f} | {r['step_peak'] / MiB:.1f} | "
                f"{r['total'] / MiB:.1f} | {r['overhead'] / MiB:.1f} | "
                f"{r['step']['median_s'] * 1e3:.0f} | {r['step_ratio_lora']:.2f} | "
                f"{r['step_ratio_floor']:.2f} |")
        lines.append("")
    acc = res.get("accuracy")
    if acc:
        lines += [f"**Accuracy**, {acc['task']} ({acc['n_eval']} {acc['split']} examples), "
                  f"{acc['model']}, {acc['n_train']} train examples, max_length {acc['max_length']}, "
                  f"{acc['steps']} steps x batch {acc['batch_size']}, seeds {acc['seeds']}:", "",
                  "| method | accuracy % (mean ± std) | trainable params |", "|---|---:|---:|"]
        for name, s in acc["summary"].items():
            lines.append(f"| {name} | {100 * s['mean']:.2f} ± {100 * s['std']:.2f} | "
                         f"{s['trainable_parameters']:,} |")
        lines.append("")
    lm = res.get("causal_lm")
    if lm:
        lines += [f"**Causal LM**, {lm['task']} with {lm['model']} ({lm['steps']} steps x batch "
                  f"{lm['batch_size']}, {lm['n_eval']} validation examples, token loss):", "",
                  "| method | loss before | loss after | trainable params |", "|---|---:|---:|---:|"]
        for name, s in lm["methods"].items():
            lines.append(f"| {name} | {s['loss_before']:.4f} | {s['loss_after']:.4f} | "
                         f"{s['trainable_parameters']:,} |")
        lines.append("")
    sc = res.get("scoring", {})
    if sc.get("smollm"):
        s = sc["smollm"]
        lines += [f"**Taylor scoring, hooks vs naive**, {s['model']}, {s['batches']} x "
                  f"{s['batch_shape']} ({s['tokens']} tokens):", "",
                  "| path | peak MiB | seconds |", "|---|---:|---:|",
                  f"| hooks | {s['hooks']['peak_mib']} | {s['hooks']['seconds']} |",
                  f"| naive | {s['naive']['peak_mib']} | {s['naive']['seconds']} |", "",
                  f"hooks / naive: peak {s['peak_ratio_hooks_over_naive']}, time "
                  f"{s['time_ratio_hooks_over_naive']}, max relative score difference "
                  f"{s['max_relative_score_difference']:.1e}.", ""]
    if sc.get("minilm"):
        s = sc["minilm"]
        lines += [f"**Scoring cost per metric**, {s['model']}, {s['batches']} x "
                  f"{s['batch_shape']} ({s['tokens']} tokens); naive Taylor peak "
                  f"{s['naive_taylor_peak_mib']} MiB:", "",
                  "| metric | s / 1k tokens | peak MiB / 1k tokens | peak MiB | seconds |",
                  "|---|---:|---:|---:|---:|"]
        for name, r in s["metrics"].items():
            lines.append(f"| {name} | {r['seconds_per_1k_tokens']} | {r['peak_mib_per_1k_tokens']} "
                         f"| {r['peak_mib']} | {r['seconds']} |")
        lines.append("")
    inter = res.get("interactive", {})
    if inter.get("select"):
        lines += ["**Plan rebuild at Llama-2-7B shapes** (`select()`, 224 modules, 1.36 M rows):",
                  "", "| case | cold ms | warm median ms | warm max ms |", "|---|---:|---:|---:|"]
        for r in inter["select"]["results"]:
            lines.append(f"| {r['case']} | {r['cold_ms']:.1f} | {r['warm_median_ms']:.1f} | "
                         f"{r['warm_max_ms']:.1f} |")
        lines.append("")
    if inter.get("budget_explorer"):
        lines += ["**BudgetExplorer update at Llama-2-7B shapes** (slider move = state + readouts "
                  "+ figures, no browser):", "",
                  "| strategy | slider move ms (median) | state ms | figures ms |",
                  "|---|---:|---:|---:|"]
        for k, r in inter["budget_explorer"].items():
            lines.append(f"| {k} | {r['slider_move_ms_median']} | {r['state_update_ms_median']} "
                         f"| {r['figure_update_ms_median']} |")
        lines.append("")
    if res.get("goals"):
        lines += ["| goal | where | measured | limit | met |", "|---|---|---:|---:|---|"]
        for g in res["goals"]:
            lines.append(f"| {g['goal']} | {g['where']} | {g['measured']} | {g['limit']} | "
                         f"{'yes' if g['met'] else '**no**'} |")
    return "\n".join(lines)


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    """Entry point of ``rowsft-nb bench`` (an argv list from the CLI, or parsed args);
    writes the results JSON, prints the tables, returns the exit code 0.

    >>> main(["--quick", "--parts", "memory"])
    """
    argv = list(args) if isinstance(args, list) else None
    if args is None or isinstance(args, list):
        args = build_parser().parse_args(args)
    quick = bool(getattr(args, "quick", False))
    threads = int(getattr(args, "threads", None) or 1)
    parts = getattr(args, "parts", None)
    if isinstance(parts, str):
        parts = [p for p in parts.split(",") if p]
    out = getattr(args, "out", None)
    out = Path(out) if out else RESULTS_DIR / ("bench_quick.json" if quick else "bench.json")
    shown = argv if argv is not None else (["--quick"] if quick else [])
    command = " ".join(["rowsft-nb bench", *shown])
    res = run(quick=quick, threads=threads, parts=parts, command=command, partial_out=out)
    from ._io import write_json

    write_json(out, res)
    print_summary(res)
    print(f"\nwrote {out} ({res['seconds']['total']} s)")
    return 0


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``bench`` options (``--quick``, ``--threads``, ``--parts``, ``--out``), added to
    ``parser`` when given (the CLI's subparser)."""
    p = parser or argparse.ArgumentParser(prog="rowsft-nb bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few minutes: MiniLM only, 1 seed")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (default 1: stable timings on a shared machine)")
    p.add_argument("--parts", default=None,
                   help="comma list of memory,scoring,interactive,accuracy (default all)")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/)")
    return p


if __name__ == "__main__":  # pragma: no cover
    main()
