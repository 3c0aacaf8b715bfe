# %% [markdown]
# # 01 · Quickstart: train 5% of the rows
#
# Row-based sparse fine-tuning (SPruFT, Li & Bhaskara 2025) borrows one idea from *structural
# pruning*: some output neurons (rows of a weight matrix `W` of shape `[d_out, d_in]`) matter much
# more than others, and pruning methods already know how to rank them. Instead of deleting the
# least important rows, we **train only the most important ones**: for every Linear layer we keep
# `W` frozen and learn a delta for a few selected rows,
#
# $$y = W_0 x + b_0 + \text{scatter}_\text{rows}(\Delta W\, x), \qquad \Delta W \in \mathbb{R}^{r \times d_{in}}.$$
#
# The whole pipeline is five calls:
#
# ```
# model + data --score()--> ImportanceReport --select()--> RowPlan --inject()--> adapted model
#              --train()--> trained adapter --save_adapter()--> adapter_model.safetensors
# ```
#
# Here: all-MiniLM-L6-v2 (22.7 M parameters, embedded, no download) learns movie-review sentiment.
# A few minutes on a laptop CPU; with `ROWSFT_FAST=1` (what CI runs) about one.

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

# %% [markdown]
# ## 1. Model and data
#
# `load_encoder` gives MiniLM as a sequence classifier with a freshly initialised 2-class head
# (seeded, so the same `seed` always gives the same head). `movie_sentiment` holds ~10k Rotten
# Tomatoes snippets labelled negative/positive; `prepare_task` tokenises and subsamples it.

# %%
from rowsft_nb.assets import load_encoder, load_task
from rowsft_nb.data import prepare_task, calibration_batches

N_TRAIN, N_EVAL = (256, 128) if FAST else (1600, 500)
model, tok = load_encoder(num_labels=2, seed=0)
data = prepare_task("movie_sentiment", tok, max_length=48, n_train=N_TRAIN, n_eval=N_EVAL, seed=0)
print(f"train {len(data.train)}, validation {len(data.validation)}, labels {data.label_names}")
load_task("movie_sentiment")["train"].select(range(3)).to_pandas()

# %% [markdown]
# ## 2. Score every neuron
#
# Importance is measured on a few **calibration batches** of the task. The first-order Taylor
# score of row $i$ (the paper's, Li & Bhaskara 2025) is
# $\sum_j \big|w_{ij}\, \partial L/\partial w_{ij}\big|$: how much the loss would change, to first
# order, if each of the row's weights were removed, summed over the row. Gradients are summed
# over the batches; no weight changes.

# %%
N_CALIB = 32 if FAST else 128
batches = calibration_batches(data.train, batch_size=16, n_samples=N_CALIB,
                              collator=data.collator, seed=0)
report = rs.score(model, batches, metric="taylor", seed=0, progress=False)
print(report, "from", report.meta["n_samples"], "examples")
report.summary().head(7)

# %% [markdown]
# ## 3. Look at the heatmap
#
# Each row of the heatmap is a transformer layer, each block of columns (between the white lines)
# a module type, each cell the mean score of a small bin of neurons (scores divided by the
# module's mean, log scale; the colour range spans the 1st to 99.5th percentile). Bright specks
# are the few neurons that carry most of the importance — the ones we will train.

# %%
from rowsft_nb.widgets.figures import heatmap_figure

fig = heatmap_figure(report, title="Taylor importance of MiniLM's neurons")
fig.show()

# %% [markdown]
# ## 4. Select 5% of the rows
#
# `Ratio(0.05)` keeps the 5% highest-scoring rows of every Linear layer (the paper's default for
# encoders). The result is a `RowPlan`: module name → row indices.

# %%
# NBVAL_CHECK_OUTPUT

plan = rs.select(report, rs.Ratio(0.05))
print(plan)

# %%
print("rows of layer 0's query projection:", plan.rows["bert.encoder.layer.0.attention.self.query"].tolist())

# %% [markdown]
# The interactive explorer below opens on the same heatmap (scores divided by each module's
# mean, log scale); click a cell to see that module's per-neuron profile with the selected rows
# marked, and switch the normalization (it needs a running kernel — on GitHub you only see the
# static figure above).

# %%
from rowsft_nb.widgets import ImportanceExplorer
ImportanceExplorer(report, plan=plan, normalization="mean", log_scale=True)

# %% [markdown]
# ## 5. Inject the adapter
#
# `inject` replaces each planned Linear with a `RowSparseLinear` that holds the frozen weight and
# a zero-initialised delta for its rows, so the adapted model equals the base model exactly until
# training starts. The classifier head is new, so it is trained fully.

# %%
# NBVAL_CHECK_OUTPUT

rs.inject(model, plan)
trainable, total = rs.trainable_parameters(model)
print(f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.2%})")
print(f"  row deltas {plan.trainable_parameters():,} + classifier head {trainable - plan.trainable_parameters():,}")

# %% [markdown]
# ## 6. Train
#
# `rs.train` runs `transformers.Trainer` on whatever requires grad and evaluates before and after:
# one epoch, batches of 16 (16 steps in fast mode, 100 in full mode; the short run takes a larger
# learning rate).

# %%
result = rs.train(model, data.train, eval_dataset=data.validation, tokenizer=tok,
                  lr=5e-3 if FAST else 2e-3, epochs=1, batch_size=16, seed=0,
                  logging_steps=2 if FAST else 10, progress_bar=False)
print(result.summary())

# %%
# NBVAL_CHECK_OUTPUT

before, after = result.metrics_before["accuracy"], result.metrics_after["accuracy"]
print("accuracy improved:", after > before)

# %%
losses = [(h["step"], h["loss"]) for h in result.history if "loss" in h]
fig = go.Figure(go.Scatter(x=[s for s, _ in losses], y=[l for _, l in losses], mode="lines+markers"))
fig.update_layout(height=280, width=520, margin=dict(l=50, r=10, t=40, b=40), title=
                  f"training loss (accuracy {before:.3f} → {after:.3f})", xaxis_title="step", yaxis_title="loss")
fig.show()

# %% [markdown]
# ## 7. Save the adapter
#
# Only the deltas, their row indices and the trained head are written — as
# `adapter_model.safetensors` plus a readable `adapter_config.json` (the plan and where it came
# from). No pickle.

# %%
adapter_dir = rs.save_adapter(model, OUT / "quickstart_adapter")
for f in sorted(adapter_dir.iterdir()):
    print(f"{f.name:28s} {f.stat().st_size / 2**20:6.2f} MiB")

# %% [markdown]
# ## 8. Train interactively
#
# `TrainingLauncher` runs the same `rs.train` in a background thread with live curves: press
# **Launch**, watch the training loss and the validation accuracy (before training, every 10
# steps, after), press **Stop** whenever you like, then **Save adapter**. It trains a fresh copy
# of MiniLM (same seeded head) on the plan of section 4, so it starts where section 6 started.
# The defaults — 30 steps of 16 examples, 64 validation examples — took 43 s here on 2 CPU
# cores shared with other jobs. Change the learning rate or the steps and launch again (it
# needs a running kernel).

# %%
from rowsft_nb.widgets import TrainingLauncher

fresh, _ = load_encoder(num_labels=2, seed=0)       # the untrained model of section 1
launcher = TrainingLauncher(fresh, plan, data.train, tokenizer=tok,
                            eval_dataset=data.validation.select(range(64)),
                            lr=5e-3, steps=30, batch_size=16, eval_every=10,
                            adapter_dir=str(OUT / "launcher_adapter"))
launcher

# %% [markdown]
# ## What to try next
#
# - **Another metric**: replace `metric="taylor"` with `"wanda"`, `"fisher"` or `"l2"` — notebook
#   [02_importance](02_importance.ipynb) compares them side by side.
# - **Another budget**: `rs.FixedRows(32)`, `rs.ParamBudget(0.02, allocator="topk")` — see
#   [03_budgets](03_budgets.ipynb) for what each costs in parameters and memory.
# - **More training**: run with `ROWSFT_FAST=0` (the default outside CI) for 1,600 examples and a
#   full epoch, or raise `lr` / `epochs`.
# - **Another task**: `rowsft_nb.assets.list_tasks()` lists `sms_spam` and `trec` (6 classes; use
#   `load_encoder(num_labels=6)`).
# - **Pick the budget with sliders**: give the launcher a `BudgetExplorer` instead of a plan
#   ([03_budgets](03_budgets.ipynb)); every Launch trains the plan its sliders show.
# - **Deploy**: [06_deploy](06_deploy.ipynb) reloads this adapter and merges it into the weights.
