# %% [markdown]
# # 03 · Budgets: how many rows, where, and what they cost
#
# The importance report ranks rows; the **budget** decides how many of them train and in which
# modules. `rs.select(report, budget, ...)` turns the two into a `RowPlan`. Budgets:
#
# | budget | meaning |
# |---|---|
# | `FixedRows(r)` | the `r` best rows of every module (the paper's LLM default: 64) |
# | `Ratio(p)` | the best `round(p · d_out)` rows of every module (the paper's encoder default: 5%) |
# | `TypeRatios({...}, default=0)` | a ratio per module type; unlisted types get `default` |
# | `ParamBudget(n, "topk")` | a global budget of `n` parameters (or a fraction): the globally best rows, scores made comparable across modules by `normalizer` (rank by default) |
# | `ParamBudget(n, "coverage")` | the same budget spread so that every module covers as much of *its own* importance as possible |
#
# Options of `select`: `head_aligned=True` takes whole attention heads, `multiple_of=8` rounds the
# rows of every module (friendlier kernels), `min_rows`/`max_rows`, `include`/`exclude`.
#
# Cost is measured in trainable parameters (`r · d_in` per module), the **equivalent LoRA rank**
# (the rank whose LoRA on the same modules has as many parameters) and estimated training memory.

# %%
import os
FAST = os.environ.get("ROWSFT_FAST", "0") == "1"   # CI sets ROWSFT_FAST=1: fewer samples and steps
os.environ.setdefault("HF_HUB_OFFLINE", "1")        # everything here is embedded: never download
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path
import numpy as np
import pandas as pd
import torch
import plotly.graph_objects as go
import datasets, transformers
import rowsft_nb as rs

# Figures store plotly JSON (interactive) and a PNG that readers of the saved notebook see
# (nbconvert, GitHub); without kaleido + Chromium only the JSON, with one warning.
from rowsft_nb.widgets import static
static.enable()
datasets.disable_progress_bars()
transformers.logging.disable_progress_bar()
torch.manual_seed(0)
OUT = Path("outputs")                                # notebooks/outputs/, git-ignored
OUT.mkdir(exist_ok=True)
print("fast mode" if FAST else "full mode", "| torch", torch.__version__, "| rowsft_nb", rs.__version__)

# %%
from rowsft_nb.assets import load_encoder
from rowsft_nb.data import prepare_task, calibration_batches

model, tok = load_encoder(num_labels=2, seed=0)
data = prepare_task("movie_sentiment", tok, max_length=64, n_train=256, n_eval=32, seed=0)
batches = calibration_batches(data.train, 16, 32 if FAST else 128, data.collator, seed=0)
report = rs.score(model, batches, metric="taylor", seed=0, progress=False)
target_params = sum(o * i for o, i in report.shapes.values())
print(report, f"| {target_params:,} parameters in the target modules, {report.meta['model_parameters']:,} in the model")

# %% [markdown]
# ## 1. One report, many plans
#
# `TypeRatios` keys are module types: a short name (`"query"`) or a suffix of the type
# (`"intermediate.dense"`). Careful: `"output.dense"` is a suffix of both `attention.output.dense`
# and the MLP's `output.dense`; the longest matching key wins, so list both when they differ.

# %%
strategies = {
    "FixedRows(16)": (rs.FixedRows(16), {}),
    "Ratio(5%)": (rs.Ratio(0.05), {}),
    "Ratio(5%), multiple_of=8": (rs.Ratio(0.05), {"multiple_of": 8}),
    "TypeRatios(q,v 10%, MLP 3%)": (rs.TypeRatios({"query": 0.10, "value": 0.10, "intermediate.dense": 0.03,
                                                   "output.dense": 0.03, "attention.output.dense": 0.0}), {}),
    "ParamBudget(2.5%, topk)": (rs.ParamBudget(0.025, allocator="topk"), {}),
    "ParamBudget(2.5%, coverage)": (rs.ParamBudget(0.025, allocator="coverage"), {}),
    "ParamBudget(2.5%, topk), heads": (rs.ParamBudget(0.025, allocator="topk"), {"head_aligned": True}),
}
plans = {k: rs.select(report, b, **opts) for k, (b, opts) in strategies.items()}

def covered(plan, report):
    """Share of the report's importance (each module's scores divided by their mean) in the plan."""
    num = den = 0.0
    for name, s in report.scores.items():
        s = s.clamp_min(0) / s.clamp_min(0).mean()
        den += float(s.sum())
        if name in plan.rows:
            num += float(s[plan.rows[name]].sum())
    return num / den

table = pd.DataFrame({k: {"modules": len(p.modules), "rows": p.num_rows(),
                          "trainable": p.trainable_parameters(),
                          "% of targets": 100 * p.trainable_parameters() / target_params,
                          "% of model": 100 * p.trainable_parameters() / report.meta["model_parameters"],
                          "LoRA rank equiv.": p.equivalent_lora_rank(),
                          "importance covered %": 100 * covered(p, report)} for k, p in plans.items()}).T
table.astype({"modules": int, "rows": int, "trainable": int}).round(2)

# %% [markdown]
# A fraction in `ParamBudget(0.025)` is a share of the **target modules'** parameters (the
# `% of targets` column, 2.5 % at most); the embeddings and other non-target weights are part of
# the model but never of the budget, so the same plan is a smaller share of the whole model
# (`% of model`).
#
# The per-module budgets (`FixedRows`, `Ratio`, `TypeRatios`) cost the same whatever the scores
# are; `ParamBudget` spends at most its budget wherever the scores say. Both facts are checked here:

# %%
# NBVAL_CHECK_OUTPUT

for k in ["FixedRows(16)", "Ratio(5%)", "Ratio(5%), multiple_of=8", "TypeRatios(q,v 10%, MLP 3%)"]:
    print(f"{k:30s} rows {plans[k].num_rows():6,}  trainable {plans[k].trainable_parameters():9,}")
budget = int(0.025 * target_params)
print("ParamBudget plans stay within", f"{budget:,}", "parameters:",
      all(plans[k].trainable_parameters() <= budget for k in plans if k.startswith("ParamBudget")))
print("multiple_of=8 rows are multiples of 8:",
      all(v.numel() % 8 == 0 for v in plans["Ratio(5%), multiple_of=8"].rows.values()))
print("head-aligned rows come in whole heads of 32:", all(
    v.numel() % 32 == 0 and bool((v.view(-1, 32)[:, 0] % 32 == 0).all())
    for n, v in plans["ParamBudget(2.5%, topk), heads"].rows.items() if n in report.head_dims and v.numel()))

# %% [markdown]
# ## 2. Where does each budget put its rows?
#
# Trainable parameters per layer (the pooler is `other`). Uniform budgets spread evenly; `topk`
# follows the scores wherever they are highest, `coverage` gives each module what it needs to cover
# its own importance.

# %%
from rowsft_nb.targets import layer_index, module_type

def per(plan, key):
    out = {}
    for name, idx in plan.rows.items():
        k = key(name)
        out[k] = out.get(k, 0) + idx.numel() * plan.shapes[name][1]
    return out

layer_of = lambda n: f"layer {layer_index(n)}" if layer_index(n) is not None else "other"
fig = go.Figure()
for k, p in plans.items():
    d = per(p, layer_of)
    x = sorted(d, key=lambda s: (s == "other", s))
    fig.add_bar(name=k, x=x, y=[d[i] for i in x])
fig.update_layout(barmode="group", height=360, margin=dict(l=60, r=10, t=40, b=40),
                  title="trainable parameters per layer", yaxis_title="parameters")
fig.show()

# %%
by_type = pd.DataFrame({k: per(p, module_type) for k, p in plans.items()}).fillna(0).astype(int)
fig = go.Figure([go.Bar(name=t, x=list(by_type.columns), y=by_type.loc[t].values) for t in by_type.index])
fig.update_layout(barmode="stack", height=380, margin=dict(l=60, r=10, t=40, b=120),
                  title="trainable parameters per module type", yaxis_title="parameters")
fig.show()

# %% [markdown]
# ## 3. Memory next to LoRA and full fine-tuning
#
# `plan.memory_estimate(batch_size, seq_len)` is an analytic model (documented in
# `rowsft_nb.memory`): frozen **weights**, **trainable** deltas, their **gradients**, AdamW
# **optimizer** state (two values per trainable parameter) and extra **activations** saved for
# backward. LoRA is sized at the plan's equivalent rank on the same modules, so the parameter
# counts match; full fine-tuning trains everything.

# %%
# NBVAL_CHECK_OUTPUT

est = plans["Ratio(5%)"].memory_estimate(batch_size=16, seq_len=128)
print(f"equivalent LoRA rank {est.lora_rank:.2f}, trainable {est.trainable_parameters:,}")
est.to_frame("MiB").round(2)


# %%
def memory_figure(est, unit=("MiB", 2**20), title=""):
    frame = est.to_frame("B").drop(columns="total")
    fig = go.Figure([go.Bar(name=c, x=list(frame.index), y=frame[c] / unit[1]) for c in frame.columns])
    fig.update_layout(barmode="stack", height=320, width=520, margin=dict(l=60, r=10, t=40, b=40),
                      title=title, yaxis_title=unit[0])
    return fig

memory_figure(est, title="MiniLM, Ratio(5%), batch 16 x 128 tokens, fp32").show()

# %% [markdown]
# For a model this small the frozen weights dominate. At 7B shapes the optimizer state is what
# separates the methods. `rowsft_nb.testing.llama2_7b_report()` is a report with random scores and
# Llama-2-7B's shapes (no weights needed): the paper's LLM default, 64 rows per module, in bf16.

# %%
# NBVAL_CHECK_OUTPUT

from rowsft_nb.testing import llama2_7b_report
big = llama2_7b_report()
plan_7b = rs.select(big, rs.FixedRows(64))
est_7b = plan_7b.memory_estimate(batch_size=8, seq_len=512, dtype=torch.bfloat16)
print(plan_7b, f"| equivalent LoRA rank {plan_7b.equivalent_lora_rank():.1f}")
est_7b.to_frame("GiB").round(2)

# %%
memory_figure(est_7b, unit=("GiB", 2**30), title="Llama-2-7B shapes, FixedRows(64), batch 8 x 512, bf16").show()

# %% [markdown]
# ## 4. The BudgetExplorer
#
# Move the sliders: budget in % of rows or of parameters, strategy, normalizer, per-type shares,
# `min_rows`/`max_rows`, whole heads, the batch shape for the memory estimate. The readout and the
# plots follow at once; `explorer.plan` is the current plan, and *Export plan JSON* saves it.

# %%
from rowsft_nb.widgets import BudgetExplorer
explorer = BudgetExplorer(report, percent=5.0, batch_size=16, seq_len=128, plan_path=str(OUT / "plan.json"))
explorer

# %% [markdown]
# It stays interactive at 7B shapes (1.4 M rows, 224 modules): the first plan sorts the scores once,
# later slider moves reuse that sort. Timed here through the same state object the sliders drive:

# %%
import time
t0 = time.perf_counter()
explorer_7b = BudgetExplorer(big, percent=1.0, batch_size=8, seq_len=512, dtype=torch.bfloat16)
build = time.perf_counter() - t0
moves = []
for pct in [0.5, 1.5, 2.0, 3.0, 5.0, 2.5]:
    t0 = time.perf_counter()
    explorer_7b.state.set_percent(pct)
    explorer_7b.update_view()
    moves.append(time.perf_counter() - t0)
print(f"explorer built in {build:.2f} s; slider move + redraw: median {1000 * np.median(moves):.0f} ms, max {1000 * max(moves):.0f} ms")
explorer_7b

# %%
plan_from_explorer = explorer.plan      # take whatever the sliders chose above
print(plan_from_explorer)

# %% [markdown]
# ## What to try next
#
# - In the explorer, switch to *% of params* and `topk`: how much importance does 1% of the
#   parameters cover compared with a uniform 1% of rows?
# - Compare `normalizer="rank"` with `"mean"` for `ParamBudget(..., "topk")`: raw-score
#   normalizers favour modules whose scores are spread out.
# - Exclude the pooler (`exclude=["pooler"]`) or the attention (`include=["intermediate", "output.dense"]`)
#   and see the memory estimate change: fewer modules with trainable rows save fewer inputs.
# - Train two of these plans with [01_quickstart](01_quickstart.ipynb)'s recipe, or see
#   [04_compare](04_compare.ipynb) for accuracy at equal budgets.
