"""The goals a benchmark run is judged by, each with the measured value, its spread, the
limit and a status: ``met``, ``not met`` (``, CI crosses the limit`` when the confidence
interval of a timing ratio straddles the limit) or ``rejected: impossible, machine too
noisy`` when the timing was physically impossible (faster than the frozen floor).

Issue 14 (step time and memory near the frozen floor, at equal trainable parameters):
row step time <= 0.85x LoRA and <= 1.06x the frozen floor; row memory above the floor
<= 0.5x LoRA's; column memory above the floor <= 0.2x LoRA's. Issue 8: row total <= 0.5x
dense-mask total. Issue 12: paper-Taylor rows within 1 point of LoRA's accuracy and above
random rows (means over seeds, with an exact paired sign-flip test over seeds). Issue 16
(quantized bases): :func:`quant_goals`.

Usage::

    res["goals"] = goals(res)
"""
from __future__ import annotations

from typing import Any

from rowsft_nb.bench import IMPOSSIBLE

# (method, against, limit, text): timing goals on the wall-time median of per-round ratios
TIME_GOALS = [("rowsft", "lora", 0.85, "row step time <= 0.85x LoRA"),
              ("rowsft", "floor", 1.06, "row step time <= 1.06x frozen floor")]
# (ratio key, limit, text): exact memory goals
MEMORY_GOALS = [("rowsft_overhead_over_lora", 0.5, "row memory above floor <= 0.5x LoRA's"),
                ("columns_overhead_over_lora", 0.2, "column memory above floor <= 0.2x LoRA's"),
                ("rowsft_total_over_dense_mask", 0.5, "row total <= 0.5x dense-mask total")]


def _goal(goal: str, where: str, value: float | None, limit: float, below: bool = True,
          spread: tuple[float, float] | None = None, rejected: str | None = None
          ) -> dict[str, Any]:
    if rejected:
        return {"goal": goal, "where": where, "measured": None, "limit": limit, "met": None,
                "spread": None, "status": IMPOSSIBLE, "why": rejected}
    met = value <= limit if below else value >= limit
    status = "met" if met else "not met"
    if spread is not None and spread[0] <= limit <= spread[1]:
        status += ", CI crosses the limit"
    return {"goal": goal, "where": where, "measured": round(value, 3), "limit": limit,
            "met": bool(met), "spread": None if spread is None else
            [round(spread[0], 3), round(spread[1], 3)], "status": status}


def time_goal(block: dict[str, Any], method: str, against: str, limit: float, text: str,
              where: str) -> dict[str, Any] | None:
    """One timing goal from a memory/speed block, or None when the block has no timing."""
    rows = block.get("methods", {})
    if method not in rows or "time" not in rows[method]:
        return None
    t = rows[method]["time"]
    key = f"ratio_{against}"
    if key not in t:
        return None
    for name in (method, against):
        v = rows.get(name, {}).get("time", {})
        if v.get("verdict", "ok") != "ok":
            return _goal(text, where, None, limit,
                         rejected=f"{name}: {v.get('rejected_because', IMPOSSIBLE)}")
    s = t[key]["wall"]
    if s is None:
        return None
    g = _goal(text, where, s["median"], limit, spread=(s["ci_low"], s["ci_high"]))
    # a goal relative to LoRA that would need the method faster than the frozen floor
    lora_floor = rows.get(against, {}).get("time", {}).get("ratio_floor", {}).get("wall")
    if against != "floor" and lora_floor and limit * lora_floor["median"] < 1.0 and not g["met"]:
        g["status"] += (f" (infeasible here: {against} is only {lora_floor['median']:.3f}x the "
                        f"frozen floor, so {limit}x {against} means "
                        f"{limit * lora_floor['median']:.3f}x the floor, faster than the frozen "
                        "model)")
    return g


def goals(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal with the measured value, spread, limit and status (see the module doc).
    ``>>> goals(json.load(open("rowsft-bench-results/bench.json")))``"""
    out: list[dict[str, Any]] = []
    for key, block in res.get("memory", {}).items():
        r = block.get("ratios", {})
        for ratio, limit, text in MEMORY_GOALS:
            if r.get(ratio) is not None:
                out.append(_goal(text, key, r[ratio], limit))
        for method, against, limit, text in TIME_GOALS:
            g = time_goal(block, method, against, limit, text, key)
            if g is not None:
                out.append(g)
    out += accuracy_goals(res.get("accuracy", {}))
    out += quant_goals(res.get("quant", {}))
    return out


def quant_goals(q: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 16's goals from a ``bench_quant`` results dict: rows->4bit merge KL (vs the
    unmerged model) <= 0.2x QLoRA's requantized merge KL, and the same for the task-loss
    increase the merge causes (one pair per QLoRA lr), NF4 blocks changed outside the
    selected rows = 0, 4-bit + rows memory above the 4-bit floor <= QLoRA's.

    >>> quant_goals(json.load(open("benchmarks/results/bench_quant.json")))
    """
    if not q:
        return []
    out: list[dict[str, Any]] = []
    where = q.get("config", {}).get("model", "quant")
    merges = q.get("merges", {})
    rows = merges.get("rows", {})
    rows_kl = rows.get("4bit", {}).get("kl")
    for label, m in merges.items():
        if label.startswith("qlora") and rows_kl is not None and m.get("requantize"):
            lr = q.get("training", {}).get(label, {}).get("lr")
            at = f"{where}, QLoRA lr {lr:g}" if lr else where
            out.append(_goal("rows->4bit merge KL <= 0.2x QLoRA's requantized merge KL "
                             "(ratio)", at, rows_kl / max(m["requantize"]["kl"], 1e-30), 0.2))
            lost_q = m["requantize"]["task_loss"] - m["unmerged_task_loss"]
            lost_r = rows["4bit"]["task_loss"] - rows["unmerged_task_loss"]
            out.append(_goal("rows->4bit merge task-loss increase <= 0.2x QLoRA's requantized "
                             "merge's (ratio)", at, lost_r / max(lost_q, 1e-30), 0.2))
    blocks = q.get("survival", {}).get("rows", {}).get("4bit", {}).get("blocks_changed")
    if blocks is not None:
        out.append(_goal("NF4 blocks changed outside the selected rows (rows->4bit merge)",
                         where, blocks["outside"], 0))
    mem = q.get("memory", {})
    if mem.get("overhead_ratio_rows_over_qlora") is not None:
        out.append(_goal("4-bit + rows memory above the 4-bit floor <= QLoRA's (ratio)", where,
                         mem["overhead_ratio_rows_over_qlora"], 1.0))
    return out


def _with_test(g: dict[str, Any], pair: dict[str, Any] | None, p_key: str,
               sign: float, claim: str) -> dict[str, Any]:
    """Add the paired test over seeds to an accuracy goal (spread = min/max of the per-seed
    differences in the goal's direction)."""
    if pair is None:
        return g
    lo, hi = sorted((sign * pair["min_diff_points"], sign * pair["max_diff_points"]))
    g.update({"spread": [round(lo, 3), round(hi, 3)], "spread_kind": "min/max over seeds",
              "n_seeds": pair["n"], "test": pair["test"], "p_value": pair[p_key],
              "p_claim": claim,
              "smallest_possible_p": pair["smallest_possible_p_two_sided"] / 2})
    g["status"] += f", paired one-sided p ({claim}) = {pair[p_key]:.4g} over {pair['n']} seeds"
    return g


def accuracy_goals(acc: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 12's accuracy goals: paper-Taylor rows within 1 point of LoRA, and ahead of random
    rows, on the mean paired difference over seeds (unpaired means without pairs), each with the paired sign-flip test when ``acc["paired"]``
    has it (``p_value``: one-sided, for the LoRA goal that the gap is below 1 point).

    >>> accuracy_goals(res["accuracy"])
    """
    s, paired, out = acc.get("summary", {}), acc.get("paired", {}), []

    def diff(a: str, b: str) -> float:  # a - b in points: paired mean when the pair exists
        p = paired.get(f"{b} vs {a}")
        return -p["mean_diff_points"] if p else 100 * (s[a]["mean"] - s[b]["mean"])

    if "rowsft_taylor" in s and "lora" in s:
        g = _goal("row (Taylor) accuracy within 1 point of LoRA (LoRA - row, points)",
                  "minilm", diff("lora", "rowsft_taylor"), 1.0)
        out.append(_with_test(g, paired.get("rowsft_taylor vs lora"), "p_within_margin", -1.0,
                              "gap < 1 point"))
    if "rowsft_taylor" in s and "rowsft_random" in s:
        g = _goal("importance rows above random rows (Taylor - random, points)", "minilm",
                  -diff("rowsft_random", "rowsft_taylor"), 0.0, below=False)
        out.append(_with_test(g, paired.get("rowsft_taylor vs rowsft_random"), "p_a_greater",
                              1.0, "Taylor > random"))
    return out
