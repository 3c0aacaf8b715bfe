"""Memory by component and interleaved step time of every method (floor, rows, columns,
LoRA, full, dense-mask, one-hot) at one trainable-parameter budget, on MiniLM and SmolLM2.

Every method is built once from a copy of the base model; memory is measured exactly per
method (``rowsft_nb.bench.measure_memory``); then all methods are timed together in
rotating rounds (``rowsft_nb.bench.time_methods``: one warm-up step each, round ``k``
starts at method ``k mod M``), and each ratio is the median of per-round ratios with its
quartiles and a confidence interval. Results faster than the frozen floor beyond the noise
are rejected, not reported. Part of ``benchmarks/bench_all.py`` (``--parts memory``).

Usage (from bench_all)::

    block = memory_and_speed("tiny", model, batch, plan, column_plan, cfg)
"""
from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

from rowsft_nb.bench import (METHODS, matched_plans, measure_memory, median_ci_ranks,
                             prepare_method, ratio_stats, time_methods)
from rowsft_nb.plan import RowPlan

MiB = 1 << 20


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def memory_and_speed(name: str, base: nn.Module, batch: dict[str, torch.Tensor],
                     plan: RowPlan, column_plan: RowPlan, cfg: Any,
                     rounds: int | None = None) -> dict[str, Any]:
    """Memory by component of every method on copies of ``base``, then their interleaved
    step times (``rounds``, default ``cfg.time_rounds``)."""
    rounds = int(rounds or cfg.time_rounds)
    lora_rank = max(1, round(plan.equivalent_lora_rank()))
    rows: dict[str, Any] = {}
    models: dict[str, nn.Module] = {}
    for method in METHODS:  # every method built once, all alive while timing
        model = prepare_method(copy.deepcopy(base), method, plan, column_plan,
                               lora_rank=lora_rank)
        mem = measure_memory(model, batch, method)
        rows[method] = mem.to_dict()
        models[method] = model
        log(f"{name} {method:10s} total {mem.total / MiB:8.1f} MiB  saved "
            f"{mem.saved / MiB:7.1f}  peak {mem.step_peak / MiB:7.1f}  trainable "
            f"{mem.trainable_parameters:,}")
    log(f"{name}: timing {len(models)} methods x {rounds} interleaved rounds, "
        f"{torch.get_num_threads()} thread(s)")
    timing = time_methods(models, batch, rounds=rounds, warmup=1, threads=None)  # run() set them
    del models
    floor = rows["floor"]
    for method, r in rows.items():
        t = timing["methods"][method]
        r["overhead"] = r["total"] - floor["total"]
        r["step"] = {"median_s": t["wall_s"]["median"], "q1_s": t["wall_s"]["q1"],
                     "q3_s": t["wall_s"]["q3"], "cpu_median_s": t["cpu_s"]["median"],
                     "rounds": t["rounds"], "verdict": t["verdict"]}
        r["time"] = {k: v for k, v in t.items() if k != "samples"}
        r["step_ratio_floor"] = t["step_ratio_floor"]
        r["step_ratio_lora"] = t["step_ratio_lora"]
        log(f"{name} {method:10s} step {1e3 * t['wall_s']['median']:8.1f} ms wall, "
            f"{1e3 * t['cpu_s']['median']:8.1f} ms CPU, x floor "
            f"{_fmt(t['step_ratio_floor'])}, x LoRA {_fmt(t['step_ratio_lora'])}  {t['verdict']}")
    samples = timing.pop("samples")
    timing.pop("methods")  # per method under methods[name]["time"]
    timing["ci_level_achieved"] = median_ci_ranks(rounds, timing["level"])[2]
    lora_over = rows["lora"]["overhead"]
    onehot_vs_rows = None
    if not {"onehot", "rowsft"} & set(timing["rejected"]):
        onehot_vs_rows = ratio_stats(samples["onehot"]["wall"], samples["rowsft"]["wall"])["median"]
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
        "onehot_step_over_rowsft": onehot_vs_rows,
    }
    shape = list(batch["input_ids"].shape)
    return {"model": name, "batch_size": shape[0], "seq_len": shape[1], "dtype": "float32",
            "optimizer": "AdamW (weight_decay 0)", "lora_rank": lora_rank,
            "plan": {"metric": plan.meta.get("metric"), "modules": len(plan.modules),
                     "rows": plan.num_rows(), "trainable": plan.trainable_parameters(),
                     "columns": sum(v.numel() for v in column_plan.columns.values()),
                     "column_trainable": column_plan.trainable_parameters(),
                     "equivalent_lora_rank": plan.equivalent_lora_rank()},
            "timing": timing, "samples": _rounded(samples), "methods": rows, "ratios": ratios}


def _fmt(x: float | None) -> str:
    return "rejected" if x is None else f"{x:.3f}"


def _rounded(samples: dict[str, dict[str, list]]) -> dict[str, dict[str, list]]:
    """Raw per-round samples for the JSON (microseconds are enough)."""
    return {m: {k: [round(v, 6) if isinstance(v, float) else v for v in vs]
                for k, vs in s.items()} for m, s in samples.items()}


def _fixed_batch(data, n: int, collator) -> dict[str, torch.Tensor]:
    from rowsft_nb.data import calibration_batches

    return calibration_batches(data, batch_size=n, n_samples=n, collator=collator, seed=0)[0]


def pad_batch(batch: dict[str, torch.Tensor], seq: int, pad_id: int) -> dict[str, torch.Tensor]:
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


def minilm(cfg: Any) -> dict[str, Any]:
    """MiniLM classifier (head frozen), ``cfg.mem_batch x cfg.mem_seq`` tokens."""
    from rowsft_nb import assets
    from rowsft_nb.data import calibration_batches, prepare_task
    from rowsft_nb.scoring import score

    base, tok = assets.load_encoder(num_labels=2, seed=0)
    data = prepare_task("movie_sentiment", tok, max_length=cfg.mem_seq, n_train=256, n_eval=16)
    batch = pad_batch(_fixed_batch(data.train, cfg.mem_batch, data.collator), cfg.mem_seq,
                      tok.pad_token_id)
    calib = calibration_batches(data.train, 16, cfg.calib_samples, data.collator, seed=0)
    report = score(base, calib, metric="taylor", progress=False)
    plan, column_plan = matched_plans(report, cfg.lora_rank)
    return memory_and_speed("all-MiniLM-L6-v2 (classifier, head frozen)", base, batch, plan,
                            column_plan, cfg)


def smollm(cfg: Any) -> dict[str, Any]:
    """SmolLM2-135M-Instruct, fp32, ``cfg.smollm_mem_batch x cfg.smollm_mem_seq`` tokens."""
    from rowsft_nb import assets
    from rowsft_nb.data import prepare_task
    from rowsft_nb.scoring import score

    base, tok = assets.load_causal_lm()
    data = prepare_task(cfg.lm_task, tok, max_length=cfg.smollm_mem_seq, n_train=64, n_eval=8)
    batch = _fixed_batch(data.train, cfg.smollm_mem_batch, data.collator)
    batch = pad_batch(batch, cfg.smollm_mem_seq, tok.pad_token_id or tok.eos_token_id)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    report = score(base, [batch], metric="taylor", progress=False)
    plan, column_plan = matched_plans(report, cfg.lora_rank)
    return memory_and_speed("SmolLM2-135M-Instruct (fp32)", base, batch, plan, column_plan, cfg,
                            rounds=cfg.smollm_time_rounds)
