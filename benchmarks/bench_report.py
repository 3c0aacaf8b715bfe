"""Readable tables of a benchmark results dict: :func:`print_summary` for the console and
:func:`to_markdown` for docs/benchmarks.md. Step times show the wall-time median per step
with its interquartile range, the CPU time per step, and the ratios to LoRA and to the
frozen floor (median of per-round ratios with its confidence interval); a ratio whose
timing was physically impossible reads ``rejected: impossible, machine too noisy``.

Usage::

    print(to_markdown(json.load(open("rowsft-bench-results/bench.json"))))
"""
from __future__ import annotations

from typing import Any

from rowsft_nb.bench import IMPOSSIBLE

MiB = 1 << 20


def ratio_text(r: dict[str, Any], against: str, ci: bool = True) -> str:
    """``1.04 [1.02-1.06]`` (median of per-round wall-time ratios [CI]), the rejection
    message, or the plain ratio of an older results file."""
    t = r.get("time")
    if t is None:  # results written before interleaved timing
        v = r.get(f"step_ratio_{against}")
        return "-" if v is None else f"{v:.2f}"
    if t.get("verdict", "ok") != "ok":
        return IMPOSSIBLE
    s = t.get(f"ratio_{against}", {}).get("wall")
    if s is None or r.get(f"step_ratio_{against}") is None:
        return "-" if s is None else f"{IMPOSSIBLE} ({against})"
    return f"{s['median']:.2f} [{s['ci_low']:.2f}-{s['ci_high']:.2f}]" if ci else f"{s['median']:.2f}"


def step_text(r: dict[str, Any]) -> tuple[str, str]:
    """(wall ms ``median [q1-q3]``, CPU ms median) of a method row."""
    step = r["step"]
    wall = f"{step['median_s'] * 1e3:.0f}"
    if "q1_s" in step:
        wall += f" [{step['q1_s'] * 1e3:.0f}-{step['q3_s'] * 1e3:.0f}]"
    cpu = f"{step['cpu_median_s'] * 1e3:.0f}" if "cpu_median_s" in step else "-"
    return wall, cpu


def _timing_caption(m: dict[str, Any]) -> str:
    t = m.get("timing")
    if not t:
        return ""
    level = 100 * t.get("ci_level_achieved", t.get("level", 0.95))
    text = (f" Step time: {t['rounds']} rounds, every method once per round in rotating order "
            f"after {t['warmup']} warm-up step each, {t.get('torch_threads', '?')} torch "
            f"thread(s); ms = wall-time median [IQR] per step; ratios = median of per-round "
            f"wall-time ratios [{level:.0f}% CI].")
    if t.get("rejected"):
        text += (f" Rejected as impossible (faster than the frozen floor beyond the noise): "
                 f"{', '.join(t['rejected'])}.")
    return text


def accuracy_pairs_markdown(acc: dict[str, Any]) -> list[str]:
    """The paired comparisons over seeds (``acc["paired"]``) as markdown lines: a - b in
    points per seed, mean ± std, wins, exact sign-flip p-values. ``>>> accuracy_pairs_markdown(acc)``"""
    paired = acc.get("paired") or {}
    if not paired:
        return []
    n = max(p["n"] for p in paired.values())
    lines = [f"Paired over seeds (a - b, accuracy points; exact sign-flip test over seeds; with "
             f"n seeds the smallest possible p is 2/2^n two-sided, 1/2^n one-sided: "
             f"{2 / 2 ** n:.4g} and {1 / 2 ** n:.4g} for {n} seeds):", "",
             "| a vs b | per-seed a - b | mean ± std | min / max | wins / ties / losses "
             "| p two-sided | p one-sided (a > b) |", "|---|---|---:|---:|---:|---:|---:|"]
    for key, p in paired.items():
        per_seed = ", ".join(f"{q['seed']}: {q['diff_points']:+.2f}" for q in p["pairs"])
        lines.append(f"| {key} | {per_seed} | {p['mean_diff_points']:+.2f} ± "
                     f"{p['std_diff_points']:.2f} | {p['min_diff_points']:+.2f} / "
                     f"{p['max_diff_points']:+.2f} | {p['wins']} / {p['ties']} / {p['losses']} | "
                     f"{p['p_two_sided']:.4g} | {p['p_a_greater']:.4g} |")
    lines.append("")
    return lines


def to_markdown(res: dict[str, Any]) -> str:
    """Markdown tables of a results dict (memory/speed, accuracy, causal LM, scoring,
    interactive cost, goals), as pasted into docs/benchmarks.md. ``>>> print(to_markdown(res))``"""
    lines: list[str] = []
    for key, m in res.get("memory", {}).items():
        lines += [f"**{m['model']}**, batch {m['batch_size']} x {m['seq_len']} tokens, fp32, "
                  f"AdamW; budget = LoRA rank {m['lora_rank']} on {m['plan']['modules']} modules "
                  f"({m['plan']['rows']} rows, {m['plan']['trainable']:,} parameters; column plan "
                  f"{m['plan']['columns']} columns, {m['plan']['column_trainable']:,}). MiB."
                  + _timing_caption(m), "",
                  "| method | trainable params | weights | trainable | grads | AdamW | saved for bwd "
                  "| step peak | total | overhead | step ms | CPU ms | x LoRA | x floor |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in m["methods"].items():
            wall, cpu = step_text(r)
            lines.append(
                f"| {name} | {r['trainable_parameters']:,} | {r['weights'] / MiB:.1f} | "
                f"{r['trainable'] / MiB:.2f} | {r['gradients'] / MiB:.2f} | "
                f"{r['optimizer'] / MiB:.2f} | {r['saved'] / MiB:.1f} | {r['step_peak'] / MiB:.1f} | "
                f"{r['total'] / MiB:.1f} | {r['overhead'] / MiB:.1f} | {wall} | {cpu} | "
                f"{ratio_text(r, 'lora')} | {ratio_text(r, 'floor')} |")
        lines.append("")
    acc = res.get("accuracy")
    if acc:
        lines += [f"**Accuracy**, {acc['task']} ({acc['n_eval']} {acc['split']} examples), "
                  f"{acc['model']}, {acc['n_train']} train examples, max_length {acc['max_length']}, "
                  f"{acc['steps']} steps x batch {acc['batch_size']}, seeds {acc['seeds']}:", "",
                  "| method | accuracy % (mean ± std) | min - max | seeds | trainable params |",
                  "|---|---:|---:|---:|---:|"]
        for name, s in acc["summary"].items():
            span = f"{100 * s['min']:.2f} - {100 * s['max']:.2f}" if "min" in s else "-"
            lines.append(f"| {name} | {100 * s['mean']:.2f} ± {100 * s['std']:.2f} | {span} | "
                         f"{s['n']} | {s['trainable_parameters']:,} |")
        lines.append("")
        lines += accuracy_pairs_markdown(acc)
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
    if res.get("quant"):
        lines += [quant_markdown(res["quant"], goals=False), ""]
    if res.get("goals"):
        lines += ["| goal | where | measured | CI | limit | status |",
                  "|---|---|---:|---:|---:|---|"]
        for g in res["goals"]:
            lines.append(f"| {g['goal']} | {g['where']} | {_value(g['measured'])} | "
                         f"{_goal_spread(g)} | {g['limit']} | {goal_status(g)} |")
    return "\n".join(lines)


def _value(v: float | None) -> str:
    return "-" if v is None else f"{v}"


def _spread(s: list[float] | None) -> str:
    return "-" if not s else f"{s[0]}-{s[1]}"


def _goal_spread(g: dict[str, Any]) -> str:
    """A goal's CI (timing) or its ``spread_kind`` (accuracy: min/max over seeds)."""
    s = g.get("spread")
    if s and g.get("spread_kind"):
        return f"{s[0]} to {s[1]} ({g['spread_kind']})"
    return _spread(s)


def goal_status(g: dict[str, Any]) -> str:
    """``met`` / ``**not met**`` / the rejection, from a goal dict (older files: ``met``)."""
    status = g.get("status") or ("met" if g["met"] else "not met")
    return status if g.get("met") is not False else f"**{status}**"


def print_summary(res: dict[str, Any]) -> None:
    """Readable console tables of a results dict. ``>>> print_summary(res)``"""
    for m in res.get("memory", {}).values():
        print(f"\n{m['model']}: batch {m['batch_size']} x {m['seq_len']}, LoRA rank "
              f"{m['lora_rank']}, plan {m['plan']['rows']} rows / {m['plan']['trainable']:,} "
              f"params.{_timing_caption(m)}")
        print(f"{'method':<11}{'trainable':>11}{'total':>9}{'overhd':>8}{'step ms [IQR]':>16}"
              f"{'CPU ms':>8}  {'x LoRA [CI]':<20}{'x floor [CI]':<20}")
        for name, r in m["methods"].items():
            wall, cpu = step_text(r)
            print(f"{name:<11}{r['trainable_parameters']:>11,}{r['total'] / MiB:>9.1f}"
                  f"{r['overhead'] / MiB:>8.1f}{wall:>16}{cpu:>8}  "
                  f"{ratio_text(r, 'lora'):<20}{ratio_text(r, 'floor'):<20}")
    acc = res.get("accuracy")
    if acc:
        print(f"\naccuracy, {acc['task']} ({acc['n_eval']} validation), {acc['steps']} steps, "
              f"seeds {acc['seeds']}")
        for name, s in acc["summary"].items():
            print(f"  {name:<28} {100 * s['mean']:6.2f} ± {100 * s['std']:4.2f}  "
                  f"({s['trainable_parameters']:,} trainable)")
    lm = res.get("causal_lm")
    if lm:
        for name, s in lm["methods"].items():
            print(f"  causal LM {name:<7} loss {s['loss_before']:.4f} -> {s['loss_after']:.4f}")
    for g in res.get("goals", []):
        spread = (f" ({_goal_spread(g)})" if g.get("spread_kind") else
                  f" (CI {_spread(g.get('spread'))})" if g.get("spread") else "")
        print(f"  [{g.get('status') or ('met' if g['met'] else 'not met')}] {g['where']}: "
              f"{g['goal']}: {_value(g['measured'])}{spread}")


def _mib(b: float) -> str:
    return f"{b / MiB:.1f}"


def quant_markdown(q: dict[str, Any], goals: bool = True) -> str:
    """Markdown tables of a ``bench_quant`` results dict: step 0, training, merges, update
    survival, memory and step time (and its goals). ``>>> print(quant_markdown(res["quant"]))``"""
    p, c = q["plan"], q["config"]
    lines = [f"**Quantized base**, {q['model']}, {q.get('quant_settings')}; rows: "
             f"{p['rows_per_module']} per module ({c['metric']} on the float copy), "
             f"{p['modules']} modules, {p['trainable']:,} parameters; LoRA rank {p['lora_rank']}."
             f" Task loss: float {q['task_loss_float']:.4f}, plain 4-bit "
             f"{q['task_loss_4bit']:.4f}.",
             "", f"Step 0, output error vs the float model ({q.get('step0_tokens', '?')} tokens):",
             "", "| start | trainable | KL | logit MSE | nuclear-norm ratio |",
             "|---|---:|---:|---:|---:|"]
    for name, e in q["step0"].items():
        nr = "-" if e.get("nuclear_ratio") is None else f"{e['nuclear_ratio']:.4f}"
        lines.append(f"| {name} | {e['trainable']:,} | {e['kl']:.4g} | {e['logit_mse']:.4g} "
                     f"| {nr} |")
    lines += ["", f"Training ({c['steps']} steps x batch {c['batch_size']}) and merges "
              "(output error of the merged model vs its unmerged adapted model; task loss on "
              "the eval batches):", "",
              "| method | lr | train s | merge | KL vs unmerged | logit MSE | task loss "
              "| unmerged loss |", "|---|---:|---:|---|---:|---:|---:|---:|"]
    for name, m in q["merges"].items():
        t = q["training"][name]
        for into, v in m.items():
            if isinstance(v, dict):
                lines.append(f"| {name} | {t['lr']:g} | {t['seconds']:.0f} | {into} | "
                             f"{v['kl']:.3g} | {v['logit_mse']:.3g} | {v['task_loss']:.4f} | "
                             f"{m['unmerged_task_loss']:.4f} |")
    lines += ["", "Update survival in the 4-bit merges (U = the trained update: rows' deltas "
              "minus their residual start, QLoRA's scaling B A; kept = <D, U> / <U, U> with "
              "D = deq(merged) - deq(Q0); half step = half the NF4 code gap at the entry's "
              "code times its block absmax; counterfactuals re-quantize the same U from the "
              "other start):", "",
              "| method | merge | kept | ‖D-U‖/‖U‖ | codes changed (support) "
              "| median \\|U\\|/half step | share > half step | blocks changed in / out |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, block in q["survival"].items():
        for into, v in block.items():
            s, b = v["survival"], v["blocks_changed"]
            lines.append(f"| {name} | {into} | {s['kept']:.3f} | {s['rel_error']:.3f} | "
                         f"{s['codes_changed_support']:.4f} | {s['step_ratio_median']:.3f} | "
                         f"{s['above_half_step']:.4f} | {b['inside']} / {b['outside']} |")
    mem = q["memory"]
    t = mem["timing"]
    lines += ["", f"Memory (exact CPU accounting, batch {mem['batch']}, AdamW; MiB) and step time "
              f"({t['rounds']} interleaved rounds after {t['warmup']} warm-up step each, "
              f"{t.get('torch_threads', '?')} torch thread(s); ratio = median of per-round "
              f"wall-time ratios [CI]); float + rows mode {mem['float_rows_mode']}:", "",
              "| method | trainable params | weights | trainable | grads | AdamW | saved for bwd "
              "| step peak | total | above 4-bit floor | step ms | x 4-bit floor | x QLoRA |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def ratio(e: dict[str, Any], key: str) -> str:
        s = (e.get(key) or {}).get("wall")
        return "-" if not s else f"{s['median']:.2f} [{s['ci_low']:.2f}-{s['ci_high']:.2f}]"

    for name, r in mem["methods"].items():
        e = t["methods"][name]
        lines.append(f"| {name} | {r['trainable_parameters']:,} | {_mib(r['weights'])} | "
                     f"{_mib(r['trainable'])} | {_mib(r['gradients'])} | {_mib(r['optimizer'])} | "
                     f"{_mib(r['saved'])} | {_mib(r['step_peak'])} | {_mib(r['total'])} | "
                     f"{_mib(r['overhead'])} | {e['wall_s']['median'] * 1e3:.0f} | "
                     f"{ratio(e, 'ratio_floor')} | {ratio(e, 'ratio_lora')} |")
    if goals and q.get("goals"):
        lines += ["", "| goal | where | measured | limit | status |", "|---|---|---:|---:|---|"]
        for g in q["goals"]:
            lines.append(f"| {g['goal']} | {g['where']} | {_value(g['measured'])} | "
                         f"{g['limit']} | {goal_status(g)} |")
    return "\n".join(lines)
