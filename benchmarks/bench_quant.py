"""Quantized bases (issue 16): rows with a residual start vs PEFT QLoRA / LoftQ on a 4-bit NF4
base, at equal trainable parameters.

1. step 0: output error vs the float model (KL, logit MSE), nuclear-norm repair ratio,
   trainable counts (:func:`rowsft_nb.bench.quant.step0_errors`);
2. training rows (residual init) and QLoRA on ``trec_instruct`` for the same steps (QLoRA at
   its usual lr and at the rows' lr: a fair comparison);
3. merges: rows -> float / 4bit / requantize, QLoRA -> float / requantize (PEFT's algorithm):
   output error vs the unmerged model and task loss; NF4 blocks changed outside the selected
   rows; how much of each trained update survives the 4-bit merge, with two counterfactuals
   (the rows' update merged from code points, QLoRA's update merged from the float weights);
4. exact CPU memory by component and interleaved step time (median of per-round ratios with
   a CI) of the 4-bit floor, 4-bit + rows, QLoRA and float + rows.

Goals (``bench_goals.quant_goals``): rows->4bit merge KL <= 0.2x QLoRA's requantized merge
KL; blocks changed outside the selected rows = 0; 4-bit + rows memory above the 4-bit floor
<= QLoRA's. ``--tiny``: the tiny LLaMA of tests/test_quant.py on random tokens (seconds).
Part of ``rowsft-nb bench`` (``--parts quant``).

Usage::

    python benchmarks/bench_quant.py --tiny --out /tmp/bench_quant_tiny.json
    nice -n 10 python benchmarks/bench_quant.py --threads 1 --rounds 10   # SmolLM2, ~15 min
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

DEFAULT_OUT = HERE / "results" / "bench_quant.json"


def log(msg: str) -> None:
    print(f"[bench-quant {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class QuantConfig:
    """Sizes of one quantized-base run (``tiny()``: the tiny LLaMA, seconds)."""

    model: str = "smollm2"
    rows_per_module: int = 32
    metric: str = "l2"              # rows ranked on the float copy, as the authors do
    steps: int = 20
    batch_size: int = 4
    rows_lr: float = 1e-4
    qlora_lrs: tuple[float, ...] = (2e-4, 1e-4)   # QLoRA's usual lr, then the rows' lr
    max_length: int = 64
    n_train: int = 256
    n_eval: int = 64
    calib_samples: int = 32         # step-0 error batches (x 8)
    eval_samples: int = 64          # merge / task-loss batches (x 8)
    mem_batch: int = 4
    mem_seq: int = 64
    time_rounds: int = 10
    threads: int = 1

    @classmethod
    def tiny(cls) -> "QuantConfig":
        return cls(model="tiny", rows_per_module=8, steps=6, rows_lr=1e-3, qlora_lrs=(2e-3, 1e-3),
                   n_train=32, n_eval=16, calib_samples=8, eval_samples=8, mem_batch=2,
                   mem_seq=16, time_rounds=3)


def llama64(seed: int = 0) -> nn.Module:
    """The tiny LLaMA of tests/test_quant.py: every d_in (64, 128) a multiple of the NF4 block."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rowsft_nb.testing import _seeded

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return _seeded(lambda: LlamaForCausalLM(cfg), seed)


def _data(cfg: QuantConfig) -> dict[str, Any]:
    """Float model, train/eval datasets, collator, calibration / eval / memory batches."""
    from rowsft_nb.data import calibration_batches

    if cfg.model == "tiny":
        from datasets import Dataset

        from rowsft_nb.testing import random_batches

        fm = llama64()
        calib = random_batches(fm, n=max(1, cfg.calib_samples // 8), batch_size=8, seq_len=32)
        evalb = random_batches(fm, n=max(1, cfg.eval_samples // 8), batch_size=8, seq_len=32,
                               seed=1)
        train = random_batches(fm, n=max(1, cfg.n_train // 8), batch_size=8, seq_len=32, seed=2)
        rows = [{k: v[i].tolist() for k, v in b.items()} for b in train
                for i in range(len(b["input_ids"]))]
        mem = random_batches(fm, n=1, batch_size=cfg.mem_batch, seq_len=cfg.mem_seq, seed=3)[0]
        return {"float": fm, "train": Dataset.from_list(rows), "collator": None, "calib": calib,
                "eval": evalb, "mem": mem, "name": "tiny LLaMA (llama64, random tokens)"}
    if cfg.model != "smollm2":
        raise ValueError(f"model must be 'smollm2' or 'tiny', got {cfg.model!r}")
    from rowsft_nb.assets import load_causal_lm
    from rowsft_nb.data import prepare_task

    fm, tok = load_causal_lm()
    data = prepare_task("trec_instruct", tok, max_length=cfg.max_length, n_train=cfg.n_train,
                        n_eval=cfg.n_eval, seed=0)
    calib = calibration_batches(data.train, 8, cfg.calib_samples, data.collator, seed=0)
    evalb = calibration_batches(data.validation, 8, min(cfg.eval_samples, len(data.validation)),
                                data.collator)
    mem = calibration_batches(data.train, cfg.mem_batch, cfg.mem_batch, data.collator)[0]
    return {"float": fm.eval(), "train": data.train, "collator": data.collator, "calib": calib,
            "eval": evalb, "mem": mem, "name": "SmolLM2-135M-Instruct (fp32 compute, NF4 base)"}


def _train(model: nn.Module, d: dict[str, Any], cfg: QuantConfig, lr: float) -> dict[str, Any]:
    from rowsft_nb.train import train

    kw = {"data_collator": d["collator"]} if d["collator"] is not None else {}
    res = train(model, d["train"], lr=lr, max_steps=cfg.steps, batch_size=cfg.batch_size,
                device="cpu", progress_bar=False, seed=0, evaluate_before=False,
                logging_steps=max(1, cfg.steps // 4), **kw)
    model.eval()
    losses = [h["loss"] for h in res.history if "loss" in h]
    return {"lr": lr, "steps": res.steps, "seconds": round(res.seconds, 1),
            "trainable": res.trainable_parameters, "train_loss_logged": losses}


@torch.no_grad()
def _counterfactual(q0: nn.Module, float_model: nn.Module, updates: dict[str, torch.Tensor],
                    start: str, rows: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A copy of the 4-bit base ``q0`` with ``updates`` merged from another start:
    ``start="codes"`` re-quantizes ``deq(Q0) + U`` (QLoRA's situation; only ``rows`` when
    given, as the 4-bit row merge does), ``start="float"`` re-quantizes ``W + U`` whole
    (W: the float weights; the rows' situation after a residual start)."""
    from rowsft_nb import quant as Q
    from rowsft_nb.adapter.model import _set_module

    m = copy.deepcopy(q0)
    for name, U in updates.items():
        layer = m.get_submodule(name)
        if start == "codes" and rows is not None:
            r = rows[name]
            Q.requantize_rows_(layer, r, Q.dequantize_weight(layer)[r] + U[r])
        else:
            W = (Q.dequantize_weight(layer) if start == "codes" else
                 float_model.get_submodule(name).weight.detach().float())
            _set_module(m, name, Q.requantize_layer(layer, W + U))
    return m


def _merge_block(label: str, merged_4bit: dict[str, nn.Module], q0: nn.Module,
                 updates: dict[str, torch.Tensor], plan: Any) -> dict[str, Any]:
    """Update survival and changed NF4 blocks of each merged 4-bit model vs the base ``q0``."""
    from rowsft_nb.bench.quant import blocks_changed_outside, update_survival

    out = {}
    for into, mm in merged_4bit.items():
        out[into] = {"survival": update_survival(q0, mm, updates)["overall"],
                     "blocks_changed": blocks_changed_outside(q0, mm, plan)}
        s = out[into]["survival"]
        log(f"{label} -> {into}: kept {s['kept']:.3f}, codes changed on support "
            f"{s['codes_changed_support']:.4f}, |U|/half-step median {s['step_ratio_median']:.3f}, "
            f"blocks changed {out[into]['blocks_changed']}")
    return out


def memory_and_time(d: dict[str, Any], q0: nn.Module, plan: Any, k: int, cfg: QuantConfig
                    ) -> dict[str, Any]:
    """Exact memory by component and interleaved step time: 4-bit floor, 4-bit + rows,
    QLoRA (rank ``k``), float + rows, on ``d["mem"]``."""
    from rowsft_nb.adapter.model import adapter_modes, inject
    from rowsft_nb.bench import apply_lora, measure_memory, time_methods

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the plan was selected on weights")
        models = {"4bit_floor": copy.deepcopy(q0),
                  "4bit_rows": inject(copy.deepcopy(q0), plan, modules_to_save=None),
                  "qlora": apply_lora(copy.deepcopy(q0), plan, rank=k),
                  "float_rows": inject(copy.deepcopy(d["float"]), plan, modules_to_save=None)}
    modes = sorted(set(adapter_modes(models["float_rows"]).values()))
    batch = d["mem"]
    mem = {}
    for name, m in models.items():
        b = measure_memory(m, batch, "floor" if name == "4bit_floor" else name).to_dict()
        mem[name] = b
    floor = mem["4bit_floor"]["total"]
    for b in mem.values():
        b["overhead"] = b["total"] - floor
    log("memory MiB (total / above 4-bit floor): " + ", ".join(
        f"{n} {b['total'] / 2**20:.1f} / {b['overhead'] / 2**20:.1f}" for n, b in mem.items()))
    timing = time_methods(models, batch, rounds=cfg.time_rounds, floor="4bit_floor",
                          lora="qlora", threads=cfg.threads)
    timing.pop("samples", None)
    log("step time x 4-bit floor: " + ", ".join(
        f"{n} {e['ratio_floor']['wall']['median']:.3f}" for n, e in timing["methods"].items()))
    return {"batch": list(batch["input_ids"].shape), "float_rows_mode": modes, "methods": mem,
            "timing": timing,
            "overhead_ratio_rows_over_qlora": (mem["4bit_rows"]["overhead"]
                                               / max(mem["qlora"]["overhead"], 1))}


def run(cfg: QuantConfig | None = None) -> dict[str, Any]:
    """Run the quantized-base benchmark (see the module doc) and return its results dict.
    ``>>> res = run(QuantConfig.tiny())``"""
    import rowsft_nb as rs
    from bench_goals import quant_goals
    from rowsft_nb import quant as Q
    from rowsft_nb.bench import apply_lora, machine_info, require_peft
    from rowsft_nb.bench.quant import (lora_updates, merge_errors, qlora_merge, row_updates,
                                       step0_errors, task_loss)

    cfg = cfg or QuantConfig()
    require_peft()
    Q.require_bitsandbytes()
    before_threads = torch.get_num_threads()
    torch.set_num_threads(int(cfg.threads))
    t_start = time.perf_counter()
    try:
        d = _data(cfg)
        fm = d["float"]
        q0 = Q.quantize(copy.deepcopy(fm), "nf4", blocksize=64, double_quant=True,
                        compute_dtype=torch.float32)
        plan = rs.select(rs.score(fm, None, metric=cfg.metric, progress=False),
                         rs.FixedRows(cfg.rows_per_module))
        k = max(1, round(plan.equivalent_lora_rank()))
        res: dict[str, Any] = {
            "benchmark": "quantized bases (issue 16)", "model": d["name"], "config": asdict(cfg),
            "quant_settings": Q.quant_settings(q0), "machine": machine_info(cfg.threads),
            "plan": {"rows_per_module": cfg.rows_per_module, "modules": len(plan.modules),
                     "trainable": plan.trainable_parameters(), "lora_rank": k,
                     "equivalent_lora_rank": plan.equivalent_lora_rank()}}
        log(f"{d['name']}: {len(plan.modules)} modules, {plan.trainable_parameters():,} row "
            f"parameters, LoRA rank {k}")
        t = time.perf_counter()
        res["step0"] = step0_errors(fm, q0, plan, d["calib"], lora_rank=k)
        res["step0_tokens"] = sum(int(b["attention_mask"].sum()) for b in d["calib"])
        res["task_loss_float"] = task_loss(fm, d["eval"])
        res["task_loss_4bit"] = task_loss(q0, d["eval"])
        log("step 0: " + ", ".join(f"{n} KL {e['kl']:.4f}" for n, e in res["step0"].items())
            + f" ({time.perf_counter() - t:.0f} s)")

        # ------------------------------------------------------------ train, merge
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="the plan was selected on weights")
            rows = rs.inject(copy.deepcopy(q0), plan, init="residual", reference=fm,
                             modules_to_save=None)
        init = Q.residual_deltas(rows, fm, plan.modules, plan.rows)
        res["training"] = {"rows": _train(rows, d, cfg, cfg.rows_lr)}
        log(f"rows trained: {res['training']['rows']}")
        res["merges"] = {"rows": merge_errors(rows, None, d["eval"])["rows"]}
        U_rows = row_updates(rows, init)
        merged = {into: rs.merge_and_unload(copy.deepcopy(rows), into=into)
                  for into in ("4bit", "requantize")}
        res["survival"] = {"rows": _merge_block("rows", merged, q0, U_rows, plan)}
        cf = _counterfactual(q0, fm, U_rows, "codes", rows=plan.rows)
        res["survival"]["rows"]["counterfactual_from_codes"] = _merge_block(
            "rows (from code points)", {"4bit": cf}, q0, U_rows, plan)["4bit"]
        del merged, cf
        for lr in cfg.qlora_lrs:
            label = f"qlora_lr{lr:g}"
            lora = apply_lora(copy.deepcopy(q0), plan, rank=k)
            res["training"][label] = _train(lora, d, cfg, lr)
            log(f"{label} trained: {res['training'][label]}")
            res["merges"][label] = merge_errors(None, lora, d["eval"])["qlora"]
            U = lora_updates(lora, plan.modules)
            merged = {"requantize": qlora_merge(copy.deepcopy(lora))}
            res["survival"][label] = _merge_block(label, merged, q0, U, plan)
            cf = _counterfactual(q0, fm, U, "float")
            res["survival"][label]["counterfactual_from_float"] = _merge_block(
                f"{label} (from float weights)", {"requantize": cf}, q0, U,
                plan)["requantize"]
            del lora, merged, cf
        for name, m in res["merges"].items():
            log(f"merge {name}: " + ", ".join(f"{into} KL {v['kl']:.4f} loss {v['task_loss']:.3f}"
                                              for into, v in m.items() if isinstance(v, dict))
                + f" (unmerged loss {m['unmerged_task_loss']:.3f})")
        del rows
        # ------------------------------------------------------------ memory, time
        res["memory"] = memory_and_time(d, q0, plan, k, cfg)
    finally:
        torch.set_num_threads(before_threads)
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    res["goals"] = quant_goals(res)
    return res


def main(argv: list[str] | None = None) -> int:
    """``bench_quant.py [--tiny] [--out PATH] [--threads N] [--rounds N] [--steps N]``:
    run, write ``PATH`` (.json) and its .md, print the goals. ``>>> main(["--tiny"])``"""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny LLaMA on random tokens (seconds)")
    p.add_argument("--out", default=None, help=f"results JSON (default {DEFAULT_OUT}; "
                   "--tiny: bench_quant_tiny.json next to it)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
    p.add_argument("--steps", type=int, default=None, help="training steps per method")
    args = p.parse_args(argv)
    if args.threads < 1 or (args.rounds is not None and args.rounds < 1) or (
            args.steps is not None and args.steps < 1):
        p.error("--threads, --rounds and --steps must be >= 1")
    out = Path(args.out) if args.out else (
        DEFAULT_OUT.with_name("bench_quant_tiny.json") if args.tiny else DEFAULT_OUT)
    if out.suffix != ".json":
        p.error(f"--out must name a .json file, got {out}")
    cfg = QuantConfig.tiny() if args.tiny else QuantConfig()
    cfg.threads = args.threads
    if args.rounds is not None:
        cfg.time_rounds = args.rounds
    if args.steps is not None:
        cfg.steps = args.steps
    res = run(cfg)
    res["command"] = " ".join(["python benchmarks/bench_quant.py",
                               *(argv if argv is not None else sys.argv[1:])])
    from bench_report import goal_status, quant_markdown
    from rowsft_nb._io import write_json

    write_json(out, res)
    out.with_suffix(".md").write_text(quant_markdown(res) + "\n")
    for g in res["goals"]:
        print(f"  [{goal_status(g)}] {g['where']}: {g['goal']}: {g['measured']} "
              f"(limit {g['limit']})")
    print(f"wrote {out} and {out.with_suffix('.md')} ({res['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
