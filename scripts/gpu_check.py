"""GPU check: scoring + training in bf16 on SmolLM2-135M, peak CUDA memory of the row-sparse
adapter vs PEFT LoRA (same trainable parameter count) vs full fine-tuning.

    python scripts/gpu_check.py                 # CUDA, SmolLM2-135M, bf16 autocast
    python scripts/gpu_check.py --tiny          # CPU dry run on a tiny random LLaMA (checks it executes)

Each method starts from a freshly loaded model, trains the same batches for the same
number of steps through rowsft_nb.train (so one code path), and reports
torch.cuda.max_memory_allocated over training (on CPU: the process peak RSS, which only
shows that the script runs). Results are printed as a table and written as JSON.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rowsft_nb import testing  # noqa: E402
from rowsft_nb.adapter import inject, trainable_parameters  # noqa: E402
from rowsft_nb.data import calibration_batches, prepare_task  # noqa: E402
from rowsft_nb.scoring import score  # noqa: E402
from rowsft_nb.selection import FixedRows, select  # noqa: E402
from rowsft_nb.targets import find_targets, linear_shape  # noqa: E402
from rowsft_nb.train import train  # noqa: E402


def load_model(args):
    dtype = getattr(torch, args.weights_dtype)
    if args.tiny:
        return testing.tiny_llama(hidden=64, layers=2).to(dtype), None
    from rowsft_nb.assets import load_causal_lm

    return load_causal_lm(dtype=dtype)


def dataset(args, tokenizer):
    """Instruction data (real model) or random token sequences (tiny model)."""
    n = args.steps * args.batch_size
    if tokenizer is None:
        from datasets import Dataset

        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, testing.VOCAB, (n, args.seq_len), generator=g)
        return Dataset.from_dict({"input_ids": ids.tolist(),
                                  "attention_mask": torch.ones_like(ids).tolist(),
                                  "labels": ids.tolist()}), None
    data = prepare_task(args.task, tokenizer, max_length=args.seq_len, n_train=n, seed=args.seed)
    return data.train, data.collator


def lora_rank_for(model, params: int, targets: list[str]) -> int:
    """LoRA rank with about ``params`` trainable parameters on ``targets``."""
    per_rank = sum(sum(linear_shape(model.get_submodule(t))) for t in targets)
    return max(1, round(params / per_rank))


def run_method(method: str, args, plan, lora_rank: int, targets: list[str]) -> dict:
    model, tok = load_model(args)
    ds, collator = dataset(args, tok)
    if method == "rowsft":
        inject(model, plan)
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        short = sorted({t.rsplit(".", 1)[-1] for t in targets})
        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank,
                                                 target_modules=short, lora_dropout=0.0))
    else:
        model.requires_grad_(True)
    trainable, total = trainable_parameters(model) if method == "rowsft" else (
        sum(p.numel() for p in model.parameters() if p.requires_grad),
        sum(p.numel() for p in model.parameters()))
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    result = train(model, ds, tokenizer=tok, task="causal_lm", data_collator=collator,
                   lr=args.lr, max_steps=args.steps, batch_size=args.batch_size,
                   device=args.device, bf16=args.bf16, seed=args.seed,
                   logging_steps=max(1, args.steps // 4), progress_bar=False,
                   gradient_checkpointing=args.gradient_checkpointing,
                   train_sampling_strategy="sequential")
    losses = [h["loss"] for h in result.history if "loss" in h]
    row = {"method": method, "trainable": trainable, "total": total,
           "peak_bytes": result.peak_memory_bytes, "peak_kind": result.peak_memory_kind,
           "seconds": result.seconds, "s_per_step": result.seconds / max(result.steps, 1),
           "steps": result.steps, "first_loss": losses[0] if losses else None,
           "last_loss": losses[-1] if losses else None, "stop_reason": result.stop_reason}
    del model
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", "--dry-run", action="store_true",
                   help="tiny random LLaMA on CPU: checks the script runs, no GPU needed")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rows", type=int, default=64, help="rows per Linear (paper default 64)")
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--task", default="chat_qa")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weights-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the loaded weights (bf16 autocast applies either way on GPU)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--methods", default="rowsft,lora,full")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="where to write the results (default: $OUT or .)")
    args = p.parse_args(argv)

    if args.tiny:
        args.device, args.bf16 = "cpu", False
        args.steps, args.batch_size = min(args.steps, 4), min(args.batch_size, 4)
        args.seq_len, args.rows = min(args.seq_len, 32), min(args.rows, 8)
        torch.set_num_threads(min(2, torch.get_num_threads()))
    else:
        if not torch.cuda.is_available():
            print("gpu_check: CUDA is not available; run with --tiny for a CPU dry run.",
                  file=sys.stderr)
            return 2
        args.device = "cuda"
        args.bf16 = torch.cuda.is_bf16_supported()
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
              f"bf16 autocast: {args.bf16}, weights {args.weights_dtype}")

    # 1. score (Taylor, on the GPU in bf16 autocast) and select r rows per Linear
    model, tok = load_model(args)
    ds, collator = dataset(args, tok)
    batches = calibration_batches(ds, args.batch_size, args.batch_size * args.calib_batches,
                                  collator)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    with torch.autocast(args.device, dtype=torch.bfloat16, enabled=bool(args.bf16)):
        report = score(model, batches, metric="taylor", device=args.device, progress=False)
    score_s = time.perf_counter() - t
    score_peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else None
    plan = select(report, FixedRows(args.rows))
    targets = find_targets(model, "all-linear")
    lora_rank = lora_rank_for(model, plan.trainable_parameters(), targets)
    print(f"scoring: {len(report.scores)} layers, {score_s:.1f} s"
          + (f", peak {score_peak / 2**20:.0f} MiB" if score_peak else "")
          + f"; plan {plan.num_rows():,} rows, {plan.trainable_parameters():,} parameters; "
          f"LoRA rank {lora_rank} for the same count")
    del model
    gc.collect()

    # 2. train each method on the same data, same steps
    rows = [run_method(m, args, plan, lora_rank, targets) for m in args.methods.split(",")]
    print(f"\n{'method':8} {'trainable':>12} {'% model':>8} {'peak MiB':>10} {'s/step':>8} "
          f"{'loss first->last':>18}")
    for r in rows:
        peak = f"{r['peak_bytes'] / 2**20:10.1f}" if r["peak_bytes"] is not None else f"{'-':>10}"
        loss = (f"{r['first_loss']:.4f}->{r['last_loss']:.4f}" if r["first_loss"] is not None
                else "-")
        print(f"{r['method']:8} {r['trainable']:12,} {100 * r['trainable'] / r['total']:8.3f} "
              f"{peak} {r['s_per_step']:8.3f} {loss:>18}"
              + (f"  ({r['stop_reason']})" if r["stop_reason"] else ""))
    print(f"(peak = {rows[0]['peak_kind']})")
    out = Path(args.json or os.environ.get("OUT", "."))
    out = out / "gpu_check.json" if out.is_dir() else out
    info = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
            "torch": torch.__version__, "args": vars(args), "score_seconds": score_s,
            "score_peak_bytes": score_peak, "lora_rank": lora_rank, "results": rows}
    out.write_text(json.dumps(info, indent=2, default=str))
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
