"""Scoring benchmark: memory and time of hook vs naive Taylor on SmolLM2-135M, and every
metric on MiniLM. Writes ./rowsft-bench-results/scoring.json (``--out``) and prints a table.

Peaks are exact allocation peaks (rowsft_nb.profiling.peak_memory: profiler bytes on CPU,
max_memory_allocated on CUDA) of one score() call, above the memory that existed before
(the model's weights are not part of the peak). Times come from a separate, unprofiled run.

Usage::

    .venv/bin/python benchmarks/bench_scoring.py                 # ~3-4 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_scoring.py --batches 1 --skip-minilm
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

from rowsft_nb import assets
from rowsft_nb.profiling import measure_peak, tensor_bytes
from rowsft_nb.scoring import METRICS, score
from rowsft_nb.targets import find_targets

MiB = 1 << 20
RESULTS = Path("rowsft-bench-results") / "scoring.json"  # under the current directory


def text_batches(tokenizer, texts, n_batches, batch_size, seq_len, labels=None):
    """Tokenised batches of exactly ``batch_size x seq_len`` (padded, truncated)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = []
    for b in range(n_batches):
        chunk = texts[b * batch_size:(b + 1) * batch_size]
        enc = tokenizer(chunk, padding="max_length", truncation=True, max_length=seq_len,
                        return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if labels is None:  # causal LM: next-token labels, padding ignored
            batch["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        else:
            batch["labels"] = torch.tensor(labels[b * batch_size:(b + 1) * batch_size])
        batches.append(batch)
    return batches


def packed_lm_batches(tokenizer, texts, n_batches, batch_size, seq_len):
    """Causal-LM batches with no padding: the texts joined and cut into rows."""
    need = n_batches * batch_size * seq_len
    sep = tokenizer.eos_token or "\n"
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text + sep)["input_ids"])
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise RuntimeError(f"not enough text for {need} tokens")
    rows = torch.tensor(ids[:need]).view(n_batches, batch_size, seq_len)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()}
            for r in rows]


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run_metric(model, batches, metric, device, timed=True, **kw):
    """(report, peak bytes, seconds): one profiled run for the peak, one unprofiled run
    for the time (``None`` when ``timed`` is False)."""
    call = lambda: score(model, batches, metric=metric, device=device, progress=False, **kw)
    report, peak = measure_peak(call, device)
    seconds = _timed(call)[1] if timed else None
    return report, peak, seconds


def bench_smollm(args, device):
    model, tok = assets.load_causal_lm()
    model.to(device)
    qa = assets.load_task("chat_qa")["train"]
    texts = [f"{p}\n{r}" for p, r in zip(qa["prompt"], qa["response"])]
    batches = packed_lm_batches(tok, texts, args.batches, args.batch_size, args.seq_len)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    targets = find_targets(model)
    named = dict(model.named_modules())
    target_bytes = tensor_bytes([named[n].weight for n in targets])
    variants = {"hooks": dict(method="hooks", checkpoint=True),
                "hooks_no_checkpoint": dict(method="hooks", checkpoint=False),
                "naive": dict(method="naive")}
    rows = {}
    reports = {}
    for label, kw in variants.items():
        timed_run = label != "hooks_no_checkpoint"  # its time is ~ hooks minus one forward
        report, peak, seconds = run_metric(model, batches, "taylor", device, timed=timed_run, **kw)
        reports[label] = report
        rows[label] = {"peak_bytes": peak, "peak_mib": round(peak / MiB, 1),
                       "seconds": round(seconds, 2) if seconds is not None else None}
    diff = max(float((reports["hooks"].scores[n] - reports["naive"].scores[n]).abs().max()
                     / (reports["naive"].scores[n].abs().max() + 1e-30)) for n in targets)
    return {
        "model": "SmolLM2-135M-Instruct (fp32)", "batches": args.batches,
        "batch_shape": [args.batch_size, args.seq_len], "tokens": tokens,
        "target_modules": len(targets), "target_weight_mib": round(target_bytes / MiB, 1),
        "hooks": rows["hooks"], "hooks_no_checkpoint": rows["hooks_no_checkpoint"],
        "naive": rows["naive"],
        "peak_ratio_hooks_no_checkpoint_over_naive": round(
            rows["hooks_no_checkpoint"]["peak_bytes"] / rows["naive"]["peak_bytes"], 3),
        "peak_ratio_hooks_over_naive": round(rows["hooks"]["peak_bytes"]
                                             / rows["naive"]["peak_bytes"], 3),
        "time_ratio_hooks_over_naive": round(rows["hooks"]["seconds"]
                                             / rows["naive"]["seconds"], 3),
        "max_relative_score_difference": diff,
    }


def bench_minilm(args, device):
    model, tok = assets.load_encoder(num_labels=2)
    model.to(device)
    data = assets.load_task("movie_sentiment")["train"]
    n = args.minilm_batches * args.minilm_batch_size
    batches = text_batches(tok, data["text"][:n], args.minilm_batches, args.minilm_batch_size,
                           args.minilm_seq_len, labels=data["label"][:n])
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    rows = {}
    for metric in METRICS:
        _, peak, seconds = run_metric(model, batches, metric, device)
        rows[metric] = {"peak_mib": round(peak / MiB, 2), "seconds": round(seconds, 3),
                        "seconds_per_1k_tokens": round(seconds / tokens * 1000, 3),
                        "peak_mib_per_1k_tokens": round(peak / MiB / tokens * 1000, 2)}
    naive_peak = measure_peak(lambda: score(model, batches, "taylor", device=device,
                                            progress=False, method="naive"), device)[1]
    return {"model": "all-MiniLM-L6-v2 classifier (fp32)", "tokens": tokens,
            "batch_shape": [args.minilm_batch_size, args.minilm_seq_len],
            "batches": args.minilm_batches, "metrics": rows,
            "naive_taylor_peak_mib": round(naive_peak / MiB, 2)}


def print_table(result):
    s = result.get("smollm")
    if s:
        print(f"\nTaylor scoring, {s['model']}, {s['batches']} x {s['batch_shape']} "
              f"({s['tokens']} tokens), target weights {s['target_weight_mib']} MiB")
        print(f"{'path':<22}{'peak MiB':>10}{'seconds':>10}")
        for k in ("hooks", "hooks_no_checkpoint", "naive"):
            print(f"{k:<22}{s[k]['peak_mib']:>10}{str(s[k]['seconds']):>10}")
        print(f"peak ratio hooks/naive = {s['peak_ratio_hooks_over_naive']} (goal <= 0.6), "
              f"(without checkpointing {s['peak_ratio_hooks_no_checkpoint_over_naive']}), "
              f"time ratio = {s['time_ratio_hooks_over_naive']}, "
              f"max relative score difference = {s['max_relative_score_difference']:.2e}")
    m = result.get("minilm")
    if m:
        print(f"\nEvery metric, {m['model']}, {m['batches']} x {m['batch_shape']} "
              f"({m['tokens']} tokens); naive taylor peak {m['naive_taylor_peak_mib']} MiB")
        print(f"{'metric':<14}{'peak MiB':>10}{'s':>8}{'s/1k tok':>10}{'MiB/1k tok':>12}")
        for name, r in m["metrics"].items():
            print(f"{name:<14}{r['peak_mib']:>10}{r['seconds']:>8}"
                  f"{r['seconds_per_1k_tokens']:>10}{r['peak_mib_per_1k_tokens']:>12}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--minilm-batches", type=int, default=2)
    p.add_argument("--minilm-batch-size", type=int, default=16)
    p.add_argument("--minilm-seq-len", type=int, default=32)
    p.add_argument("--skip-smollm", action="store_true")
    p.add_argument("--skip-minilm", action="store_true")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    result = {"machine": {"device": str(device), "threads": torch.get_num_threads(),
                          "cpu": platform.processor() or platform.machine(),
                          "torch": torch.__version__,
                          "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
                          "gpu": torch.cuda.get_device_name(device) if device.type == "cuda"
                          else None}}
    start = time.perf_counter()
    if not args.skip_smollm:
        result["smollm"] = bench_smollm(args, device)
    if not args.skip_minilm:
        result["minilm"] = bench_minilm(args, device)
    result["bench_seconds"] = round(time.perf_counter() - start, 1)
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from rowsft_nb._io import write_json

    write_json(out, result)
    print_table(result)
    print(f"\nwrote {out} ({result['bench_seconds']} s)")
    return result


if __name__ == "__main__":
    main()
