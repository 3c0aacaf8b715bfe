# %% [markdown]
# # Workshop 1 · A Taylor score by hand
#
# `rowsft_nb.score(..., metric="taylor")` ranks each output neuron (row $i$ of a weight
# $W \in \mathbb{R}^{d_{out} \times d_{in}}$) by
#
# $$s_i = \sum_j \big|w_{ij}\, G_{ij}\big|, \qquad G = \sum_{b} \frac{\partial L_b}{\partial W},$$
#
# the gradient of each calibration batch's loss $L_b$, summed over the batches. This is the
# paper's Taylor importance (the authors' default): each weight's first-order importance
# $|w_{ij} G_{ij}|$, summed over the row. The *multivariable* variant
# (`metric="taylor_multivariable"`) takes the absolute value after the sum,
# $\big|\sum_j w_{ij} G_{ij}\big|$: the predicted loss change of removing the whole row at once,
# in which weights of opposite sign can cancel. In this exercise you compute $s_i$ yourself for
# one layer of MiniLM, check it against the library, and then test what the first-order
# expansion claims: setting row $i$ to zero changes the total loss by about
# $-\sum_j w_{ij} G_{ij}$.
#
# Fill in the cells marked `# TODO` (they raise `NotImplementedError` until you do). About
# 25 minutes.

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

# %% [markdown]
# ## Setup: a model, calibration batches and the library's scores
#
# MiniLM as a 2-class sentiment classifier (its head is freshly initialised from a seed — the
# loss is still a perfectly good function to differentiate). Two calibration batches of 8
# movie-review snippets.

# %%
# NBVAL_CHECK_OUTPUT
from rowsft_nb.assets import load_encoder
from rowsft_nb.data import prepare_task, calibration_batches

model, tok = load_encoder(num_labels=2, seed=SEED)
data = prepare_task("movie_sentiment", tok, max_length=48, n_train=64, n_eval=16, seed=SEED)
batches = calibration_batches(data.train, batch_size=8, n_samples=16, collator=data.collator, seed=SEED)

LAYER = "bert.encoder.layer.3.intermediate.dense"
layer = model.get_submodule(LAYER)
report = rs.score(model, batches, metric="taylor", seed=SEED, progress=False)
print(report)
print(LAYER, "weight", list(layer.weight.shape), "-> scores", list(report.scores[LAYER].shape))

# %% [markdown]
# ## 1a. The summed gradient $G$
#
# Compute `G`, the gradient of the loss with respect to `layer.weight`, summed over `batches`.
#
# Hints: `model(**batch).loss` is a batch's loss; `torch.autograd.grad(loss, tensor)` returns
# gradients without touching `.grad`. **Put the model in eval mode first** — `score()` does, and
# with dropout on, every forward pass is different.

# %%
model.eval()
G = torch.zeros_like(layer.weight)
### BEGIN SOLUTION: for each batch: loss = model(**batch).loss; add torch.autograd.grad(loss, layer.weight)[0] to G
for batch in batches:
    loss = model(**batch).loss
    G += torch.autograd.grad(loss, layer.weight)[0]
### END SOLUTION
print("G:", list(G.shape), f"norm {G.norm():.4f}")

# %% [markdown]
# ## 1b. The scores, and a check against the library
#
# Compute `by_hand`, the Taylor score of every row of `LAYER` (a `[1536]` tensor), from
# `layer.weight` and `G`. Then compare with `report.scores[LAYER]`. The library never builds
# `G`: it gets the same number from the layer's inputs and output gradients with hooks, so
# expect agreement to about 1e-5 relative, not bit-for-bit.

# %%
W = layer.weight.detach()
### BEGIN SOLUTION: elementwise W * G, absolute value, then sum over the input dimension (dim=1)
by_hand = (W * G).abs().sum(dim=1)
### END SOLUTION

# %%
# NBVAL_CHECK_OUTPUT
lib = report.scores[LAYER]
rel = ((by_hand - lib).abs().max() / lib.abs().max()).item()
print("same shape:", by_hand.shape == lib.shape)
print("agree to 1e-4 (relative to the largest score):", rel < 1e-4)
print("same top-10 rows:", set(by_hand.topk(10).indices.tolist()) == set(lib.topk(10).indices.tolist()))


# %% [markdown]
# ## 1c. What the score predicts
#
# First-order Taylor: removing row $i$ (setting $w_{i\cdot} = 0$) changes the total loss
# $\sum_b L_b$ by about $-\sum_j w_{ij} G_{ij}$. Test it on the 6 highest-scoring rows and 6
# random rows: write `actual_change(row)`, which zeroes that row of `layer.weight`, measures the
# total loss over `batches`, **restores the row**, and returns the change.

# %%
@torch.no_grad()
def total_loss():
    return sum(model(**batch).loss.item() for batch in batches)


@torch.no_grad()
def actual_change(row: int) -> float:
    """Total calibration loss with row `row` of LAYER zeroed, minus the loss without."""
    ### BEGIN SOLUTION: keep a copy of the row, zero it, measure total_loss(), copy the row back (also on error: try/finally)
    saved = layer.weight[row].clone()
    try:
        layer.weight[row] = 0
        return total_loss() - base_loss
    finally:
        layer.weight[row] = saved
    ### END SOLUTION


base_loss = total_loss()
predicted = -(W * G).sum(dim=1)
gen = torch.Generator().manual_seed(SEED)
top_rows = by_hand.topk(6).indices.tolist()
random_rows = torch.randperm(W.shape[0], generator=gen)[:6].tolist()
rows = pd.DataFrame([{"row": r, "kind": kind, "score": by_hand[r].item(), "predicted": predicted[r].item(),
                      "actual": actual_change(r)}
                     for kind, rs_ in (("top", top_rows), ("random", random_rows)) for r in rs_])
print("weights restored:", torch.equal(layer.weight, W) and abs(total_loss() - base_loss) < 1e-6)
rows.round(5)

# %%
fig = go.Figure()
for kind, color in (("top", "crimson"), ("random", "gray")):
    part = rows[rows.kind == kind]
    fig.add_trace(go.Scatter(x=part.predicted, y=part.actual, mode="markers", name=f"{kind} rows",
                             marker=dict(color=color, size=9)))
lim = float(rows[["predicted", "actual"]].abs().max().max()) * 1.1
fig.add_trace(go.Scatter(x=[-lim, lim], y=[-lim, lim], mode="lines", name="y = x",
                         line=dict(dash="dot", color="black")))
fig.update_layout(height=380, xaxis_title="predicted loss change (first order)",
                  yaxis_title="actual loss change", margin=dict(l=50, r=10, t=30, b=40))
fig.show()
print(f"correlation predicted vs actual: {np.corrcoef(rows.predicted, rows.actual)[0, 1]:.2f}")
print(f"mean |actual change|: top rows {rows[rows.kind == 'top'].actual.abs().mean():.2e}, "
      f"random rows {rows[rows.kind == 'random'].actual.abs().mean():.2e}")

# %% [markdown]
# ## Discuss
#
# - Do the high-scoring rows change the loss more than random ones? Where does the first-order
#   prediction miss, and why (hint: GELU follows this layer; removing a row is not a small step)?
# - The score sums $|w_{ij} G_{ij}|$, so a row whose removal would *lower* the loss also scores
#   high. Why is that still a reasonable row to fine-tune?
# - `metric="taylor_multivariable"` uses $\big|\sum_j w_{ij} G_{ij}\big|$ instead (the absolute
#   value of `predicted` above). Compute it by hand as well and compare the top-10 rows with
#   `rs.score(model, batches, metric="taylor_multivariable")`. Which rows does it rank low that
#   the paper's score ranks high, and why?
# - Bonus: score with `groups="auto"` and check that `intermediate.dense` row $i$ and
#   `output.dense` input column $i$ now carry the same score.
