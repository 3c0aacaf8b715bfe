# %% [markdown]
# # Workshop 2 · Budgets: hit a parameter target, compare memory
#
# Before training you choose *how many* rows train, per module. Here the model is
# SmolLM2-135M (LLaMA architecture, 210 target modules of 7 types with different shapes) and the
# target is the parameter count of **LoRA at rank 16** on the same modules. You will hit that
# target three ways — by arithmetic with `FixedRows`, with a global `ParamBudget`, and checking
# with `plan.equivalent_lora_rank()` — then compare what the budgets cost in memory.
#
# Scores come from the data-free `l2` metric (row sums of squares): budget arithmetic does not depend on
# which metric ranked the rows. About 20 minutes.

# %%
import os
FAST = os.environ.get("ROWSFT_FAST", "0") == "1"   # CI sets ROWSFT_FAST=1: fewer samples and steps
os.environ.setdefault("HF_HUB_OFFLINE", "1")        # everything here is embedded: never download
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

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
transformers.logging.set_verbosity_error()
SEED = 0
torch.manual_seed(SEED)
print("fast mode" if FAST else "full mode", "| torch", torch.__version__, "| rowsft_nb", rs.__version__)

# %%
# NBVAL_CHECK_OUTPUT
from rowsft_nb.assets import load_causal_lm

model, tok = load_causal_lm()                         # ~35 s the very first time, seconds after
report = rs.score(model, metric="l2", progress=False)
shapes = report.shapes                                # {module name: (d_out, d_in)}
print(report)
for kind, shape in {n.rsplit(".", 1)[-1]: s for n, s in shapes.items()}.items():
    print(f"  {kind:10s} (d_out, d_in) = {shape}")

# %% [markdown]
# ## 2a. The target
#
# LoRA at rank $k$ on a module of shape $(d_{out}, d_{in})$ trains $k\,(d_{in} + d_{out})$
# parameters (matrices $A \in \mathbb{R}^{k \times d_{in}}$, $B \in \mathbb{R}^{d_{out} \times k}$).
# Compute `target`, the total for rank 16 over all modules in `shapes`.

# %%
RANK = 16
### BEGIN SOLUTION: sum RANK * (d_in + d_out) over shapes.values()
target = sum(RANK * (d_out + d_in) for d_out, d_in in shapes.values())
### END SOLUTION
n_model = sum(p.numel() for p in model.parameters())
print(f"target: {target:,} trainable parameters ({target / n_model:.2%} of the model)")

# %% [markdown]
# ## 2b. FixedRows by arithmetic
#
# A row of a module costs its $d_{in}$. Find the `r` for which `FixedRows(r)` in every module
# comes closest to `target`, select that plan, and check how close it is.

# %%
### BEGIN SOLUTION: define r (an int: target / the sum of every module's d_in, rounded) and plan_fixed = rs.select(report, rs.FixedRows(r))
r = round(target / sum(d_in for _, d_in in shapes.values()))
plan_fixed = rs.select(report, rs.FixedRows(r))
### END SOLUTION

# %%
# NBVAL_CHECK_OUTPUT
print(f"FixedRows({r}): {plan_fixed.trainable_parameters():,} parameters, "
      f"{plan_fixed.trainable_parameters() / target - 1:+.1%} vs the target, "
      f"equivalent LoRA rank {plan_fixed.equivalent_lora_rank():.2f}")

# %% [markdown]
# Why is the rank close to `r / 2`, but not exactly? (Hint: for a square matrix
# $r\,d = k \cdot 2d$. Which modules here are not square, and which way does each push?)
#
# ## 2c. A global ParamBudget
#
# `ParamBudget(n)` spends exactly up to `n` parameters wherever the (rank-normalised) scores are
# highest, so different modules get different row counts. Build `plan_budget` with the target as
# its budget and with whole heads in attention (`head_aligned=True`).

# %%
### BEGIN SOLUTION: define plan_budget with rs.select(report, <a ParamBudget>, head_aligned=True)
plan_budget = rs.select(report, rs.ParamBudget(target), head_aligned=True)
### END SOLUTION

# %%
# NBVAL_CHECK_OUTPUT
print(f"ParamBudget: {plan_budget.trainable_parameters():,} parameters "
      f"(never above the budget: {plan_budget.trainable_parameters() <= target})")


# %%
def rows_by(plan, key):
    return pd.Series({n: len(i) for n, i in plan.rows.items()}).groupby(key).sum()

type_of = lambda n: n.rsplit(".", 1)[-1]
layer_of = lambda n: int(n.split(".")[2])
print(pd.DataFrame({f"FixedRows({r})": rows_by(plan_fixed, type_of),
                    "ParamBudget": rows_by(plan_budget, type_of)}).fillna(0).astype(int))
per_layer = pd.DataFrame({t: pd.Series({layer_of(n): len(i) for n, i in plan_budget.rows.items() if type_of(n) == t})
                          for t in sorted({type_of(n) for n in plan_budget.rows})}).fillna(0)
fig = go.Figure([go.Bar(x=per_layer.index, y=per_layer[t], name=t) for t in per_layer.columns])
fig.update_layout(barmode="stack", height=320, title="ParamBudget: rows per layer and module type",
                  xaxis_title="layer", yaxis_title="rows", margin=dict(l=50, r=10, t=40, b=40))
fig.show()

# %% [markdown]
# ## 2d. Memory
#
# `plan.memory_estimate(batch_size, seq_len)` estimates training memory by component for the
# row-sparse plan, for LoRA at the same parameter count and for full fine-tuning. Compute
# `est` for `plan_fixed` at batch 8 × 512 tokens in bfloat16, show it in MiB, and compute
# `saving`, the fraction of LoRA's total that the row-sparse plan saves.

# %%
### BEGIN SOLUTION: define est (plan_fixed.memory_estimate(...)) and saving (from est.total("rowsft") and est.total("lora"))
est = plan_fixed.memory_estimate(batch_size=8, seq_len=512, dtype=torch.bfloat16)
saving = 1 - est.total("rowsft") / est.total("lora")
### END SOLUTION
print(f"row-sparse saves {saving:.1%} of LoRA's estimated training memory")
est.to_frame("MiB").round(1)

# %% [markdown]
# ## Discuss
#
# - Which component dominates for each method? Which one does the row-sparse plan actually
#   shrink compared with LoRA, and why? (Look at `activations`: LoRA also saves its rank-`k`
#   intermediate for every module.)
# - Recompute the estimate for `plan_budget`. Is it different from `plan_fixed` even though the
#   parameter counts match? The estimate is analytic; the benchmarks (`make bench`) measure.
# - Try `multiple_of=8` in `select` (rows in multiples of 8, friendlier to GPU kernels): how far
#   does it move the count from the target?
# - Bonus: `rs.TypeRatios({"q_proj": 0.1, "v_proj": 0.1})` is LoRA's classic q/v-only choice.
#   What LoRA rank is it equivalent to?
