# %% [markdown]
# # 02 · Importance metrics side by side
#
# **What structural-pruning importance means.** A pruning method removes whole neurons (rows of
# `W`) and asks: which removal costs the least? Its *importance* score estimates how much the loss
# (or the layer's output) would change if neuron $i$ disappeared. Different metrics answer with
# different information:
#
# | metric | score of row $i$ | needs |
# |---|---|---|
# | `l2` (magnitude) | $\sum_j w_{ij}^2$ (the authors' squared norm) | weights only |
# | `taylor` (the paper's) | $\sum_j \big\lvert w_{ij}\, g_{ij}\big\rvert$, $g = \sum_b \partial L_b/\partial W$: each weight's first-order loss change if it were zeroed, summed over the row | gradients |
# | `taylor_multivariable` | $\big\lvert\sum_j w_{ij}\, g_{ij}\big\rvert$: the first-order loss change when the whole row is zeroed at once (signed terms can cancel) | gradients |
# | `fisher` | $\sum_b \big(\sum_j w_{ij}\, g^b_{ij}\big)^2$: the same, squared per batch (a Fisher / second-order proxy) | gradients |
# | `wanda` | $\sum_j \lvert w_{ij}\rvert\, \lVert X_j \rVert_2$: weight times input-activation size | activations |
# | `random` | uniform | nothing (the baseline) |
#
# **Why should such rows be good to train?** A row whose removal changes the loss a lot is a row
# the network's output is sensitive to, and for Taylor-type scores it is a row where weights and
# gradients line up. One gradient step restricted to rows $S$ lowers the loss, to first order, by
# $\eta \sum_{i \in S} \lVert g_i \rVert^2$ — so rows that capture more of the gradient give more
# progress per trainable parameter. We check both claims below instead of taking them on faith.

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

N_CALIB = 32 if FAST else 128
model, tok = load_encoder(num_labels=2, seed=0)
data = prepare_task("movie_sentiment", tok, max_length=64, n_train=256 if FAST else 1000,
                    n_eval=64 if FAST else 256, seed=0)
batches = calibration_batches(data.train, batch_size=16, n_samples=N_CALIB, collator=data.collator, seed=0)
held_out = calibration_batches(data.validation, batch_size=32, n_samples=len(data.validation), collator=data.collator)

# %% [markdown]
# ## 1. Score with every metric
#
# The same calibration batches for every metric; `l2` and `random` ignore them.

# %%
METRICS = ["l2", "taylor", "fisher", "wanda", "random"]
reports = {m: rs.score(model, batches, metric=m, seed=0, progress=False) for m in METRICS}
pd.DataFrame.from_dict({m: {"modules": len(r.modules), "rows": r.total_rows(), "examples used": r.meta["n_samples"],
                            "mean Gini (concentration)": round(r.summary()["gini"].mean(), 3)}
                        for m, r in reports.items()}, orient="index")

# %% [markdown]
# The Gini coefficient says how concentrated a module's importance is (0 = every neuron equal,
# → 1 = a few neurons hold it all). Gradient-based scores are far more concentrated than weight
# magnitude: a handful of neurons dominate. `random` is the yardstick, not an exception: scores
# drawn uniformly from [0, 1) have a Gini of 1/3 by construction, so a metric below 1/3 (like
# `l2`, whose rows all have similar norms) spreads importance *more* evenly than chance, and one
# far above it singles out few neurons.
#
# ## 2. Heatmaps
#
# Scores divided by each module's mean, log scale, one row per layer (`other` = the pooler),
# module blocks separated by white lines. **Each metric has its own colour scale** (1st to 99.5th
# percentile of its cells): the metrics live on very different ranges, and one shared scale
# would paint the flatter ones (`l2`, `wanda`, `random`) a uniform colour. Compare the *patterns*,
# not the colours across panels.

# %%
from rowsft_nb.widgets.figures import heatmap_figure

fig = heatmap_figure(reports)
fig.show()

# %% [markdown]
# ## 3. How much do their selections agree?
#
# Select 5% of the rows per module with each metric and compare the plans with the Jaccard index
# $|A \cap B| / |A \cup B|$ over (module, row) pairs. Two *independent random* 5% selections agree
# by chance at about $p / (2 - p) \approx 0.026$.

# %%
plans = {m: rs.select(r, rs.Ratio(0.05)) for m, r in reports.items()}
overlap = pd.DataFrame([[plans[a].overlap(plans[b])["overall"] for b in METRICS] for a in METRICS],
                       index=METRICS, columns=METRICS)
p = plans["taylor"].num_rows() / reports["taylor"].total_rows()
print(f"chance level for two random {p:.1%} selections: {p / (2 - p):.3f}")
overlap.round(3)

# %%
fig = go.Figure(go.Heatmap(z=overlap.values, x=METRICS, y=METRICS, colorscale="Blues", zmin=0, zmax=1,
                           text=overlap.round(2).values, texttemplate="%{text}"))
fig.update_layout(height=360, width=440, margin=dict(l=60, r=10, t=40, b=40),
                  title="plan overlap (Jaccard)", yaxis=dict(autorange="reversed"))
fig.show()

# %%
# NBVAL_CHECK_OUTPUT

chance = p / (2 - p)
print("every plan trains the same number of parameters:",
      len({pl.trainable_parameters() for pl in plans.values()}) == 1)
print("random agrees with the others at about chance level:",
      all(abs(overlap.loc["random", m] - chance) < 0.03 for m in METRICS if m != "random"))

# %% [markdown]
# Where do the metrics agree? Per module type, Taylor vs the others:

# %%
from rowsft_nb.targets import module_type
rows = []
for other in ["l2", "fisher", "wanda", "random"]:
    per_module = plans["taylor"].overlap(plans[other])["per_module"]
    for name, j in per_module.items():
        rows.append({"vs": other, "type": module_type(name), "jaccard": j})
pd.DataFrame(rows).pivot_table(index="type", columns="vs", values="jaccard", sort=False).round(3)

# %% [markdown]
# ## 4. What does each metric protect? Prune and see
#
# Zero the selected 5% of rows in every layer (structural pruning) and measure, on held-out data,
# (a) the task loss and (b) how far the sentence representation moves (relative change of the
# mean-pooled last hidden state, what MiniLM was trained to produce). Each metric ranks by its own
# objective: Taylor and Fisher by the *task loss of the current model* — here with an untrained
# classifier head, whose loss sits near $\ln 2 \approx 0.69$ whatever the backbone does — while
# `l2` and `wanda` rank by how much signal flows through a neuron, so removing their rows moves the
# representation most.

# %%
from rowsft_nb.targets import row_weight

@torch.no_grad()
def held_out_eval(model):
    """Held-out loss and mean-pooled last hidden states."""
    model.eval()
    losses, pooled = [], []
    for b in held_out:
        out = model(**b, output_hidden_states=True)
        mask = b["attention_mask"].unsqueeze(-1).float()
        pooled.append((out.hidden_states[-1] * mask).sum(1) / mask.sum(1))
        losses.append(out.loss.item() * len(b["labels"]))
    return sum(losses) / sum(len(b["labels"]) for b in held_out), torch.cat(pooled)

@torch.no_grad()
def loss_without_rows(model, plan):
    """Held-out loss with the plan's rows zeroed (weights and bias), then everything restored."""
    modules, saved = dict(model.named_modules()), {}
    for name, idx in plan.rows.items():
        m = modules[name]
        saved[name] = (row_weight(m)[idx].clone(), m.bias[idx].clone() if m.bias is not None else None)
        row_weight(m)[idx] = 0
        if m.bias is not None:
            m.bias[idx] = 0
    try:
        return held_out_eval(model)
    finally:
        for name, (w, b) in saved.items():
            m = modules[name]
            row_weight(m)[plan.rows[name]] = w
            if b is not None:
                m.bias[plan.rows[name]] = b

base_loss, base_pooled = held_out_eval(model)
rows = {}
for m in METRICS:
    loss, pooled = loss_without_rows(model, plans[m])
    rows[m] = {"loss increase": loss - base_loss,
               "representation change": ((pooled - base_pooled).norm(dim=1) / base_pooled.norm(dim=1)).mean().item()}
print(f"loss of the intact model: {base_loss:.4f}")
pd.DataFrame.from_dict(rows, orient="index").round(4)

# %% [markdown]
# ## 5. Do the selected rows capture the gradient?
#
# One backward pass on held-out data gives the gradient $g_i$ of every row. The share of
# $\sum_i \lVert g_i \rVert^2$ that falls into a plan's rows is the share of the first-order loss
# decrease that a gradient step on those rows alone can achieve.

# %%
targets = reports["taylor"].modules
modules = dict(model.named_modules())
weights = [row_weight(modules[n]) for n in targets]
for p_ in model.parameters():
    p_.requires_grad_(False)
for w in weights:
    w.requires_grad_(True)
model.zero_grad()
model.eval()
for b in held_out:
    model(**b).loss.backward()
row_grad_sq = {n: (w.grad.detach() ** 2).sum(1) for n, w in zip(targets, weights)}
for w in weights:
    w.requires_grad_(False)
    w.grad = None
total_sq = sum(float(g.sum()) for g in row_grad_sq.values())
share = pd.Series({m: sum(float(row_grad_sq[n][idx].sum()) for n, idx in plans[m].rows.items()) / total_sq
                   for m in METRICS}, name="share of squared gradient in the selected rows")
share.round(3).to_frame()

# %%
# NBVAL_CHECK_OUTPUT

print("Taylor rows capture more of the gradient than random rows:", share["taylor"] > share["random"])

# %% [markdown]
# With 5% of the rows, random selection captures about 5% of the gradient; a metric that
# captures several times more points the update at the rows where the loss is most sensitive. That is the
# mechanism behind "train the important rows". Whether this turns into better accuracy after many steps is an empirical question —
# [04_compare](04_compare.ipynb) trains Taylor rows, random rows, LoRA and full fine-tuning side by
# side.
#
# ## 6. Explore interactively
#
# Pick the metric, normalization, order and module types; click a cell for a module's profile.

# %%
from rowsft_nb.widgets import ImportanceExplorer
ImportanceExplorer(reports, plan=plans["taylor"])

# %% [markdown]
# ## What to try next
#
# - Score with more calibration examples (`N_CALIB`) and watch the Taylor/Fisher overlap rise:
#   with few batches the gradient estimates are noisy.
# - `metric="class_taylor"` scores neurons per class and keeps, by default, each neuron's largest
#   class score (`rs.scoring.ClassTaylor(aggregate="quantiles")` averages quantiles instead), so
#   neurons that matter to one class survive; `"hessian"` (OBD, per-example squared gradients),
#   `"taylor2_class"` and `"zo_taylor"` (forward passes only) are also in `rs.METRICS`.
# - `groups="auto"` in `rs.score` makes coupled rows (heads, q/k/v) share one score — try it with
#   `select(..., head_aligned=True)` in [03_budgets](03_budgets.ipynb).
# - Select with a global budget (`rs.ParamBudget(0.05)`) instead of 5% per module: the metrics then
#   also disagree on *which layers* get rows.
