"""Fused rows and activation sharing (issue 14), per model family: exact CPU memory above the
frozen floor of LoRA, delta rows, fused rows and fused rows + activation sharing, which
producers share and which fused layers really recompute their input, and a correctness guard.

For every family the sharing code supports (``rowsft_nb.adapter.sharing.FAMILIES``: LLaMA,
Mistral, Qwen2/3, Gemma 1-3 gated MLPs; BERT, RoBERTa, XLM-R, ELECTRA; ViT) and three it does
not (GPT-2: LayerNorm only, Conv1D; OPT: LayerNorm only, no MLP module; Phi-3: fused
gate_up_proj, its own RMSNorm) as controls: a small random model from a config (seeded, fp32,
CPU; hidden 128, 2 layers), one batch of the same shape for all (4 x 64 tokens; 4 images of
64 patches + CLS for ViT), a row plan at the LoRA rank-4 parameter budget
(``matched_plans`` on a random-score report), and per method the exact memory of one training
step (``rowsft_nb.bench.measure_memory``: saved-for-backward bytes, parameters, gradients,
AdamW state, step peak) minus the frozen floor's.

- ``lora``: PEFT LoRA at the plan's equivalent rank, on the plan's modules;
- ``delta``: ``inject(mode="delta")`` (each layer saves its input);
- ``fused``: ``inject(sharing=False)`` (fused layers saving their input);
- ``fused_shared``: ``inject()`` (the default: fused where exact + activation sharing).

"recomputed" lists the fused layers whose input was really recomputed in backward on the
measured batch (observed by wrapping the fused autograd function's ``apply`` during one
forward: what the code did, not what it should do). The drop in saved bytes from ``delta`` to
``fused_shared`` is checked against a lower bound computed from the shapes alone: every
down-projection input (``[batch, seq, intermediate]`` fp32 per layer) of a supported family.
Correctness: ``fused_shared`` and ``fused`` against ``delta`` on one batch (same non-zero
deltas, ``init="kaiming"``): loss and every row gradient within ``atol``.

Exact accounting: the numbers do not depend on machine load.

Usage::

    nice -n 10 python benchmarks/bench_sharing.py --out benchmarks/results/bench_sharing.json
    python benchmarks/bench_sharing.py --families llama bert gpt2 --out /tmp/sharing.json
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from rowsft_nb._io import atomic_path, write_json  # noqa: E402
from rowsft_nb.adapter import adapted_modules, adapter_modes, adapter_state, inject  # noqa: E402
from rowsft_nb.adapter import fused as fused_mod  # noqa: E402
from rowsft_nb.bench import apply_lora, forward_loss, matched_plans, measure_memory  # noqa: E402
from rowsft_nb.plan import RowPlan  # noqa: E402
from rowsft_nb.targets import find_targets, linear_shape, model_fingerprint  # noqa: E402
from rowsft_nb.testing import _tiny_from_config, random_batches, synthetic_report  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "bench_sharing.json"
MiB = 1 << 20
METHODS = ("lora", "delta", "fused", "fused_shared")

VOCAB = 256
_GATED = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              tie_word_embeddings=False)
_GEMMA = dict(_GATED, head_dim=32, pad_token_id=0, bos_token_id=2, eos_token_id=1)
_ENCODER = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=128, num_labels=2,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

#: family -> (model class, config class, config kwargs, what the sharing code supports there).
#: Dropout is off everywhere (deterministic losses for the correctness guard).
FAMILIES: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", _GATED, "gated MLP + RMSNorm"),
    "mistral": ("MistralForCausalLM", "MistralConfig", _GATED, "gated MLP + RMSNorm"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", _GATED, "gated MLP + RMSNorm"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(_GATED, head_dim=32),
              "gated MLP + RMSNorm"),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", _GEMMA, "gated MLP + Gemma RMSNorm"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", _GEMMA, "gated MLP + Gemma RMSNorm"),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", _GEMMA, "gated MLP + Gemma RMSNorm"),
    "bert": ("BertForSequenceClassification", "BertConfig", _ENCODER,
             "GELU intermediate + LayerNorm"),
    "roberta": ("RobertaForSequenceClassification", "RobertaConfig",
                dict(_ENCODER, pad_token_id=1), "GELU intermediate + LayerNorm"),
    "xlm-roberta": ("XLMRobertaForSequenceClassification", "XLMRobertaConfig",
                    dict(_ENCODER, pad_token_id=1), "GELU intermediate + LayerNorm"),
    "electra": ("ElectraForSequenceClassification", "ElectraConfig",
                dict(_ENCODER, embedding_size=128), "GELU intermediate + LayerNorm"),
    "vit": ("ViTForImageClassification", "ViTConfig",
            dict(image_size=32, patch_size=4, num_channels=3, hidden_size=128,
                 intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_labels=3,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
            "GELU MLP + LayerNorm"),
    # controls: families whose MLP the sharing code does not know
    "gpt2": ("GPT2LMHeadModel", "GPT2Config",
             dict(vocab_size=VOCAB, n_embd=128, n_layer=2, n_head=4, n_positions=128,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                  eos_token_id=0), "control: nn.LayerNorm only (Conv1D MLP)"),
    "opt": ("OPTForCausalLM", "OPTConfig",
            dict(vocab_size=VOCAB, hidden_size=128, ffn_dim=512, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=128,
                 dropout=0.0, attention_dropout=0.0, pad_token_id=1, bos_token_id=2,
                 eos_token_id=2), "control: nn.LayerNorm only (fc1/fc2 in the layer)"),
    "phi3": ("Phi3ForCausalLM", "Phi3Config",
             dict(_GATED, pad_token_id=0, bos_token_id=1, eos_token_id=2),
             "control: nothing (fused gate_up_proj, Phi3RMSNorm)"),
}
SUPPORTED = tuple(f for f, spec in FAMILIES.items() if not spec[3].startswith("control"))
CONTROLS = tuple(f for f in FAMILIES if f not in SUPPORTED)


def log(msg: str) -> None:
    print(f"[bench-sharing {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------ setup
def build_model(family: str, seed: int = 0) -> nn.Module:
    """A small random model of ``family`` (one of :data:`FAMILIES`), fp32, eval mode.

    >>> model = build_model("llama")
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {sorted(FAMILIES)}")
    model_cls, config_cls, kwargs, _ = FAMILIES[family]
    return _tiny_from_config(model_cls, config_cls, seed, **kwargs)


def make_batch(model: nn.Module, batch_size: int = 4, seq_len: int = 64, seed: int = 0
               ) -> dict[str, torch.Tensor]:
    """One random batch: ``batch_size x seq_len`` tokens (images for ViT) with labels."""
    return random_batches(model, n=1, batch_size=batch_size, seq_len=seq_len, seed=seed)[0]


def make_plan(model: nn.Module, lora_rank: int = 4, seed: int = 0) -> RowPlan:
    """Rows at LoRA ``lora_rank``'s parameter budget over every target (random scores, the
    model's own fingerprint), at least one row per module. ``>>> plan = make_plan(model)``"""
    modules = dict(model.named_modules())
    shapes = {n: linear_shape(modules[n]) for n in find_targets(model)}
    report = synthetic_report(shapes, seed=seed, model_class=type(model).__name__,
                              model_parameters=sum(p.numel() for p in model.parameters()))
    report.meta["model_hash"] = model_fingerprint(model)
    plan, _ = matched_plans(report, lora_rank=lora_rank)
    return plan


def prepare(model: nn.Module, method: str, plan: RowPlan, lora_rank: int,
            init: str = "zeros") -> nn.Module:
    """``model`` (in place; the PEFT wrapper for LoRA) set up to train as ``method`` (one of
    :data:`METHODS`); no classifier head trains in any method.

    >>> model = prepare(build_model("bert"), "fused_shared", plan, 4)
    """
    if method == "lora":
        return apply_lora(model, plan, lora_rank)
    if method == "delta":
        return inject(model, plan, mode="delta", modules_to_save=None, init=init)
    if method in ("fused", "fused_shared"):  # "fused": each fused layer saves its own input
        return inject(model, plan, modules_to_save=None, init=init,
                      sharing=method == "fused_shared")
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


@contextlib.contextmanager
def record_recompute(model: nn.Module) -> Iterator[dict[str, dict[str, Any]]]:
    """While active, ``{fused layer name: {"recomputed": bool, "input_storage": int,
    "input_bytes": int}}`` for every fused forward: whether the layer got a recipe and saved
    the recipe's sources instead of its input (the fused autograd function's ``apply`` is
    wrapped; restored on exit).

    >>> with record_recompute(model) as calls: forward_loss(model, batch)
    """
    names = {id(m.base_layer.weight): n for n, m in adapted_modules(model).items()
             if m.mode == "fused"}
    calls: dict[str, dict[str, Any]] = {}
    alive: list[Any] = []  # inputs that are not saved are freed: keep their addresses unique
    fn = fused_mod._FusedRows
    had_own = "apply" in vars(fn)
    original = vars(fn).get("apply")
    bound = fn.apply

    def apply(x, weight, bias, delta, rows, conv1d, recompute, *sources):
        storage = x.untyped_storage()
        alive.append(storage)
        calls[names.get(id(weight), f"<unknown {tuple(weight.shape)}>")] = {
            "recomputed": recompute is not None, "input_storage": storage.data_ptr(),
            "input_bytes": storage.nbytes()}
        return bound(x, weight, bias, delta, rows, conv1d, recompute, *sources)

    fn.apply = apply
    try:
        yield calls
    finally:
        alive.clear()
        if had_own:
            fn.apply = original
        else:
            del fn.apply


def recomputed_input_bytes(calls: dict[str, dict[str, Any]]) -> int:
    """Bytes of the distinct inputs that fused layers recomputed and no fused layer saved."""
    kept = {c["input_storage"] for c in calls.values() if not c["recomputed"]}
    sizes = {c["input_storage"]: c["input_bytes"] for c in calls.values()
             if c["recomputed"] and c["input_storage"] not in kept}
    return sum(sizes.values())


def down_input_lower_bound(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """From the config and batch shape alone: the bytes of every MLP down-projection input
    (``[batch, tokens, intermediate]`` fp32 per layer), what sharing must at least save in a
    supported family. ``>>> down_input_lower_bound(model, batch)``"""
    cfg = model.config
    if "pixel_values" in batch:
        b = batch["pixel_values"].shape[0]
        tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1
    else:
        b, tokens = batch["input_ids"].shape
    return cfg.num_hidden_layers * b * tokens * cfg.intermediate_size * 4


def check_against_delta(base: nn.Module, plan: RowPlan, batch: dict[str, torch.Tensor],
                        atol: float = 1e-5) -> dict[str, Any]:
    """Loss and row gradients of ``fused_shared`` and ``fused`` vs ``delta`` on ``batch``,
    all three with the same non-zero deltas (``init="kaiming"``, seed 0): max abs differences
    and ``ok`` (all within ``atol``). ``>>> check_against_delta(base, plan, batch)["ok"]``"""
    results: dict[str, tuple[float, dict[str, torch.Tensor]]] = {}
    for method in ("delta", "fused", "fused_shared"):
        model = prepare(copy.deepcopy(base), method, plan, lora_rank=1, init="kaiming")
        model.train()
        loss = forward_loss(model, batch)
        loss.backward()
        grads = {n: m.delta.grad.detach().clone() for n, m in adapted_modules(model).items()}
        results[method] = (float(loss), grads)
    ref_loss, ref_grads = results["delta"]
    out: dict[str, Any] = {"atol": atol, "loss_delta": ref_loss}
    ok = True
    for method in ("fused", "fused_shared"):
        loss, grads = results[method]
        if grads.keys() != ref_grads.keys():
            raise AssertionError(f"{method}: adapted modules differ from the delta path's")
        dloss = abs(loss - ref_loss)
        dgrad = max(float((grads[n] - g).abs().max()) for n, g in ref_grads.items())
        ok = ok and dloss <= atol and dgrad <= atol
        out[method] = {"loss_abs_diff": dloss, "grad_max_abs_diff": dgrad}
    out["ok"] = bool(ok)
    return out


# ------------------------------------------------------------------------------ one family
def measure_family(family: str, *, batch_size: int = 4, seq_len: int = 64, lora_rank: int = 4,
                   seed: int = 0, atol: float = 1e-5) -> dict[str, Any]:
    """Memory above the floor of every method, sharing details and the correctness guard for
    one family. ``>>> measure_family("llama")["methods"]["fused_shared"]["over_lora"]``"""
    base = build_model(family, seed)
    batch = make_batch(base, batch_size, seq_len, seed)
    plan = make_plan(base, lora_rank, seed)
    rank = max(1, round(plan.equivalent_lora_rank()))
    floor = measure_memory(copy.deepcopy(base), batch, "floor").to_dict()
    methods: dict[str, dict[str, Any]] = {}
    details: dict[str, Any] = {}
    for method in METHODS:
        model = prepare(copy.deepcopy(base), method, plan, rank)
        mem = measure_memory(model, batch, method).to_dict()
        mem["overhead"] = mem["total"] - floor["total"]
        methods[method] = mem
        if method == "fused_shared":
            state = adapter_state(model)
            modes = adapter_modes(model)
            model.train()
            with record_recompute(model) as calls:
                forward_loss(model, batch)
            details = {
                "shared_producers": list(state.shared),
                "recomputed": sorted(n for n, c in calls.items() if c["recomputed"]),
                "fused_saving_input": sorted(n for n, c in calls.items() if not c["recomputed"]),
                "delta_modules": {n: m for n, m in modes.items() if m != "fused"},
                "fused_modules": sum(m == "fused" for m in modes.values()),
                "recomputed_input_bytes": recomputed_input_bytes(calls),
            }
        del model
    lora_over = methods["lora"]["overhead"]
    for mem in methods.values():
        mem["over_lora"] = mem["overhead"] / lora_over if lora_over > 0 else None
    saved_drop = methods["delta"]["saved"] - methods["fused_shared"]["saved"]
    bound = down_input_lower_bound(base, batch) if family in SUPPORTED else 0
    cfg = base.config
    return {
        "family": family, "model_class": type(base).__name__, "supports": FAMILIES[family][3],
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "batch": {k: list(v.shape) for k, v in batch.items()},
        "parameters": sum(p.numel() for p in base.parameters()),
        "plan": {"modules": len(plan.modules), "rows": plan.num_rows(),
                 "trainable": plan.trainable_parameters(),
                 "equivalent_lora_rank": plan.equivalent_lora_rank(), "lora_rank": rank},
        "floor": floor, "methods": methods, **details,
        "saved_drop_vs_delta": saved_drop,
        "saved_drop_vs_fused": methods["fused"]["saved"] - methods["fused_shared"]["saved"],
        "down_input_lower_bound": bound,
        "check": check_against_delta(base, plan, batch, atol),
    }


# ------------------------------------------------------------------------------ all
def run(families: Sequence[str] = tuple(FAMILIES), *, batch_size: int = 4, seq_len: int = 64,
        lora_rank: int = 4, seed: int = 0, atol: float = 1e-5, threads: int | None = 1
        ) -> dict[str, Any]:
    """Measure every family in ``families`` (see :data:`FAMILIES`); returns the JSON dict.

    >>> result = run(["llama", "bert", "gpt2"])
    """
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown families {unknown}; choose from {sorted(FAMILIES)}")
    if threads:
        torch.set_num_threads(int(threads))
    import transformers

    t0 = time.perf_counter()
    out: dict[str, Any] = {
        "what": "exact CPU memory of one training step above the frozen floor (fp32, AdamW), "
                "LoRA vs delta rows vs fused rows vs fused rows + activation sharing",
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(), "lora_rank_budget": lora_rank,
        "batch_size": batch_size, "seq_len": seq_len, "seed": seed, "families": {}}
    for family in families:
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = measure_family(family, batch_size=batch_size, seq_len=seq_len,
                               lora_rank=lora_rank, seed=seed, atol=atol)
        out["families"][family] = r
        m = r["methods"]
        log(f"{family:12s} MiB above floor: lora {m['lora']['overhead'] / MiB:6.3f}  delta "
            f"{m['delta']['overhead'] / MiB:6.3f}  fused {m['fused']['overhead'] / MiB:6.3f}  "
            f"shared {m['fused_shared']['overhead'] / MiB:6.3f} "
            f"({m['fused_shared']['over_lora']:.3f}x LoRA); recomputed "
            f"{len(r['recomputed'])}/{r['fused_modules']}; check "
            f"{'ok' if r['check']['ok'] else 'FAILED'} ({time.perf_counter() - t:.1f} s)")
    out["seconds"] = time.perf_counter() - t0
    return out


def _fmt(mem: dict[str, Any]) -> str:
    ratio = mem.get("over_lora")
    return f"{mem['overhead'] / MiB:.3f} ({ratio:.3f}x)" if ratio is not None else \
        f"{mem['overhead'] / MiB:.3f}"


def to_markdown(result: dict[str, Any]) -> str:
    """The per-family table (MiB above the frozen floor, x LoRA's) as Markdown."""
    lines = ["| family (supports) | LoRA | delta rows | fused rows | fused + sharing | "
             "shared producers | recomputed / fused | saved drop vs delta (lower bound) | "
             "delta-path modules | loss, grad diff vs delta |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for fam, r in result["families"].items():
        m = r["methods"]
        delta_mods = r["delta_modules"]
        reasons = sorted(set(delta_mods.values()))
        chk = r["check"]["fused_shared"]
        bound = (f" ({r['down_input_lower_bound'] / MiB:.3f})"
                 if r["down_input_lower_bound"] else "")
        lines.append(
            f"| {fam} ({r['supports']}) | {m['lora']['overhead'] / MiB:.3f} | {_fmt(m['delta'])} | "
            f"{_fmt(m['fused'])} | **{_fmt(m['fused_shared'])}** | {len(r['shared_producers'])} | "
            f"{len(r['recomputed'])} / {r['fused_modules']} | "
            f"{r['saved_drop_vs_delta'] / MiB:.3f}{bound} | "
            f"{len(delta_mods)}{': ' + '; '.join(reasons) if reasons else ''} | "
            f"{chk['loss_abs_diff']:.1e}, {chk['grad_max_abs_diff']:.1e}"
            f"{'' if r['check']['ok'] else ' FAILED'} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lora-rank", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="JSON path; the Markdown table goes next to it (.md)")
    args = ap.parse_args(argv)
    result = run(args.families, batch_size=args.batch_size, seq_len=args.seq_len,
                 lora_rank=args.lora_rank, seed=args.seed, threads=args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    md = (f"Command: `python benchmarks/bench_sharing.py --out {args.out}` "
          f"(torch {result['torch']}, transformers {result['transformers']}; "
          f"{result['date']} UTC; {result['seconds']:.0f} s)\n\n"
          "MiB above the frozen floor of one fp32 AdamW training step (x LoRA's)\n\n"
          + to_markdown(result))
    with atomic_path(args.out.with_suffix(".md")) as tmp:
        tmp.write_text(md)
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    failed = [f for f, r in result["families"].items() if not r["check"]["ok"]]
    if failed:
        log(f"correctness guard FAILED for {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
