"""Accuracy at equal trainable parameters (MiniLM on movie_sentiment, every method through
``rowsft_nb.train``, several seeds) and the causal-LM loss of rows vs LoRA on SmolLM2.
Part of ``benchmarks/bench_all.py`` (``--parts accuracy``); not timing-sensitive.

Usage (from bench_all)::

    acc = accuracy_minilm(cfg, on_partial=save)
    lm = loss_smollm(cfg)
"""
from __future__ import annotations

import statistics
from typing import Any, Callable

from bench_methods import log
from rowsft_nb.bench import matched_plans, prepare_method


def _accuracy_summary(cfg: Any, data, runs: dict[str, list[dict[str, Any]]]
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


def accuracy_minilm(cfg: Any, on_partial: Callable[[dict], None] | None = None
                     ) -> dict[str, Any]:
    """movie_sentiment with MiniLM: every method through rowsft_nb.train, equal budgets.
    ``on_partial(result so far)`` is called after every run (seeds are the outer loop)."""
    from rowsft_nb import assets
    from rowsft_nb.data import calibration_batches, prepare_task
    from rowsft_nb.scoring import score
    from rowsft_nb.train import train

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
            log(f"accuracy {method:14s} seed {seed}: {row['accuracy']:.4f} "
                f"({row['trainable_parameters']:,} trainable, {res.seconds:.0f} s)")
            del model
            if on_partial is not None:
                on_partial({**_accuracy_summary(cfg, data, runs), "partial": True})
    return _accuracy_summary(cfg, data, runs)


def loss_smollm(cfg: Any) -> dict[str, Any]:
    from rowsft_nb import assets
    from rowsft_nb.data import calibration_batches, prepare_task
    from rowsft_nb.scoring import score
    from rowsft_nb.train import train

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
        log(f"causal LM {method}: loss {out[method]['loss_before']:.4f} -> "
            f"{out[method]['loss_after']:.4f} ({res.seconds:.0f} s)")
        del model
    return {"task": cfg.lm_task, "model": "SmolLM2-135M-Instruct", "steps": cfg.lm_steps,
            "batch_size": cfg.lm_batch, "max_length": cfg.lm_max_length,
            "n_train": len(data.train), "n_eval": len(data.validation), "lr": cfg.lm_lr,
            "lora_rank": cfg.lora_rank, "seed": 0, "methods": out}
