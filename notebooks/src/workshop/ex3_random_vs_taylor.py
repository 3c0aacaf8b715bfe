# %% [markdown]
# # Workshop 3 · Important rows vs random rows
#
# The method's central claim: rows that structural-pruning importance ranks high are better
# rows to fine-tune than arbitrary ones. Test it: train 2% of the rows of every MiniLM layer,
# once chosen by Taylor importance and once at random, same data, same steps, same seed, and
# compare validation accuracy on movie-review sentiment.
#
# In a workshop-sized run the difference is small and noisy; the point is to build the
# comparison correctly (same budget, fresh model per run, fixed seeds) so that a longer run
# means something. About 25 minutes; the full run (`ROWSFT_FAST=0`) takes a few minutes per
# training.

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
from rowsft_nb.assets import load_encoder
from rowsft_nb.data import prepare_task, calibration_batches

N_TRAIN, N_EVAL, STEPS, LR = (384, 96, 24, 5e-3) if FAST else (2000, 500, 150, 2e-3)
model, tok = load_encoder(num_labels=2, seed=SEED)
data = prepare_task("movie_sentiment", tok, max_length=48, n_train=N_TRAIN, n_eval=N_EVAL, seed=SEED)
batches = calibration_batches(data.train, batch_size=16, n_samples=64, collator=data.collator, seed=SEED)
report_taylor = rs.score(model, batches, metric="taylor", seed=SEED, progress=False)
print(report_taylor, f"| train {len(data.train)}, validation {len(data.validation)}")

# %% [markdown]
# ## 3a. Two plans with the same budget
#
# Make `plan_taylor` from `report_taylor` with `Ratio(0.02)` (2% of each module's rows), and
# `plan_random` the same way from a report with `metric="random"` (data-free, seeded). Then
# check they train the same number of parameters and measure how much they overlap.

# %%
BUDGET = rs.Ratio(0.02)
### BEGIN SOLUTION: define plan_taylor, report_random (rs.score with metric="random", seed=SEED) and plan_random
plan_taylor = rs.select(report_taylor, BUDGET)
report_random = rs.score(model, metric="random", seed=SEED, progress=False)
plan_random = rs.select(report_random, BUDGET)
### END SOLUTION

# %%
# NBVAL_CHECK_OUTPUT
print(plan_taylor)
print(plan_random)
print("same trainable parameters:", plan_taylor.trainable_parameters() == plan_random.trainable_parameters())

# %%
print(f"overlap (Jaccard of selected rows): {plan_taylor.overlap(plan_random)['overall']:.3f}")


# %% [markdown]
# ## 3b. One training run per plan
#
# Write `run(plan)`: load a **fresh** MiniLM (same seed, so the classifier head starts
# identical), `inject` the plan, train it and return the `TrainResult`. `inject` changes the
# model in place, so reusing `model` would train on top of the previous run.

# %%
def run(plan):
    ### BEGIN SOLUTION: load_encoder(num_labels=2, seed=SEED), rs.inject(...), then return rs.train(...) on data.train with eval_dataset=data.validation, tokenizer=tok, lr=LR, max_steps=STEPS, batch_size=16, seed=SEED
    fresh, _ = load_encoder(num_labels=2, seed=SEED)
    rs.inject(fresh, plan)
    return rs.train(fresh, data.train, eval_dataset=data.validation, tokenizer=tok, lr=LR,
                    max_steps=STEPS, batch_size=16, seed=SEED, progress_bar=False)
    ### END SOLUTION


results = {"taylor": run(plan_taylor), "random": run(plan_random)}
for name, res in results.items():
    print(f"{name:7s} {res.summary()}")

# %%
table = pd.DataFrame({name: {"accuracy before": res.metrics_before["accuracy"],
                             "accuracy after": res.metrics_after["accuracy"],
                             "validation loss after": res.metrics_after["loss"],
                             "trainable parameters": res.trainable_parameters}
                      for name, res in results.items()}).T.astype({"trainable parameters": int})
fig = go.Figure(go.Bar(x=table.index, y=table["accuracy after"], text=table["accuracy after"].round(3)))
fig.update_layout(height=300, yaxis_title="validation accuracy", yaxis_range=[0, 1],
                  title=f"2% of rows per module, {STEPS} steps", margin=dict(l=50, r=10, t=40, b=40))
fig.show()
table

# %% [markdown]
# ## Discuss
#
# - Is one run per plan enough to call a winner? Repeat with `seed` 1 and 2 (for the scores,
#   the random rows *and* `train`) and report mean ± std — notebook
#   [04_compare](../../04_compare.ipynb) does exactly this with cached results.
# - The classifier head trains fully in both runs (`inject(..., train_heads=True)` is the
#   default for classifiers). How much of the accuracy is the head alone? Try
#   `plan = rs.select(report_taylor, rs.FixedRows(0))`… why does `inject` refuse that, and what
#   would you do instead?
# - Lower the budget to `Ratio(0.005)`: does the gap between Taylor and random rows grow?
# - Swap `metric="taylor"` for `"wanda"` or `"l2"`: which ranking of rows trains best here?
