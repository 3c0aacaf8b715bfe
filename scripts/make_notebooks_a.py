"""Write the tutorial notebooks 01_quickstart, 02_importance, 03_budgets and 06_deploy
(sources only; run scripts/run_notebooks.py afterwards to store fast-mode outputs).

Usage:  python scripts/make_notebooks_a.py [01 02 03 06]
Edit the cells here, not in the .ipynb files, so the four notebooks stay consistent.
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
CHECK = "# NBVAL_CHECK_OUTPUT\n"


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str):
    return new_code_cell(text.strip("\n"))


SETUP = '''
import os
FAST = os.environ.get("ROWSFT_FAST", "0") == "1"   # CI sets ROWSFT_FAST=1: fewer samples and steps
os.environ.setdefault("HF_HUB_OFFLINE", "1")        # everything here is embedded: never download
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path
import numpy as np
import pandas as pd
import torch
import plotly.graph_objects as go
import plotly.io as pio
import datasets, transformers
import rowsft_nb as rs

# Static figures are stored as plotly JSON only (small; JupyterLab renders it).
pio.renderers.default = "plotly_mimetype"
datasets.disable_progress_bars()
transformers.logging.disable_progress_bar()
torch.manual_seed(0)
OUT = Path("outputs")                                # notebooks/outputs/, git-ignored
OUT.mkdir(exist_ok=True)
print("fast mode" if FAST else "full mode", "| torch", torch.__version__, "| rowsft_nb", rs.__version__)
'''

HEATMAP_HELPER = '''
from rowsft_nb.widgets import ImportanceState

def heatmap_trace(report, normalization="mean", order="index", log=True):
    """A static plotly heatmap of a report: one row per layer, binned neurons per module type."""
    state = ImportanceState(report, max_columns=210)
    state.set_normalization(normalization); state.set_order(order); state.set_log_scale(log)
    hm = state.heatmap()
    trace = go.Heatmap(z=hm.z, y=hm.row_labels, colorscale="Viridis",
                       colorbar=dict(title=dict(text=hm.colorbar_title, side="right")))
    ticks = ([(a + b - 1) / 2 for _, a, b in hm.type_spans],
             [t.replace("attention.", "attn.") for t, _, _ in hm.type_spans])
    return trace, ticks
'''

WHAT_NEXT_01 = '''
## What to try next

- **Another metric**: replace `metric="taylor"` with `"wanda"`, `"fisher"` or `"l2"` — notebook
  [02_importance](02_importance.ipynb) compares them side by side.
- **Another budget**: `rs.FixedRows(32)`, `rs.ParamBudget(0.02, allocator="topk")` — see
  [03_budgets](03_budgets.ipynb) for what each costs in parameters and memory.
- **More training**: run with `ROWSFT_FAST=0` (the default outside CI) for 1,600 examples and a
  full epoch, or raise `lr` / `epochs`.
- **Another task**: `rowsft_nb.assets.list_tasks()` lists `sms_spam` and `trec` (6 classes; use
  `load_encoder(num_labels=6)`).
- **Interactive training**: `rowsft_nb.widgets.TrainingLauncher(model, plan, data.train,
  eval_dataset=data.validation, tokenizer=tok)` starts and stops a run with live curves.
- **Deploy**: [06_deploy](06_deploy.ipynb) reloads this adapter and merges it into the weights.
'''


# ============================================================================ 01
def quickstart():
    return [
        md('''
# 01 · Quickstart: train 5% of the rows

Row-based sparse fine-tuning (SPruFT, Li & Bhaskara 2025) borrows one idea from *structural
pruning*: some output neurons (rows of a weight matrix `W` of shape `[d_out, d_in]`) matter much
more than others, and pruning methods already know how to rank them. Instead of deleting the
least important rows, we **train only the most important ones**: for every Linear layer we keep
`W` frozen and learn a delta for a few selected rows,

$$y = W_0 x + b_0 + \\text{scatter}_\\text{rows}(\\Delta W\\, x), \\qquad \\Delta W \\in \\mathbb{R}^{r \\times d_{in}}.$$

The whole pipeline is five calls:

```
model + data --score()--> ImportanceReport --select()--> RowPlan --inject()--> adapted model
             --train()--> trained adapter --save_adapter()--> adapter_model.safetensors
```

Here: all-MiniLM-L6-v2 (22.7 M parameters, embedded, no download) learns movie-review sentiment.
A few minutes on a laptop CPU; with `ROWSFT_FAST=1` (what CI runs) about one.
'''),
        code(SETUP),
        md('''
## 1. Model and data

`load_encoder` gives MiniLM as a sequence classifier with a freshly initialised 2-class head
(seeded, so the same `seed` always gives the same head). `movie_sentiment` holds ~10k Rotten
Tomatoes snippets labelled negative/positive; `prepare_task` tokenises and subsamples it.
'''),
        code('''
from rowsft_nb.assets import load_encoder, load_task
from rowsft_nb.data import prepare_task, calibration_batches

N_TRAIN, N_EVAL = (256, 128) if FAST else (1600, 500)
model, tok = load_encoder(num_labels=2, seed=0)
data = prepare_task("movie_sentiment", tok, max_length=48, n_train=N_TRAIN, n_eval=N_EVAL, seed=0)
print(f"train {len(data.train)}, validation {len(data.validation)}, labels {data.label_names}")
load_task("movie_sentiment")["train"].select(range(3)).to_pandas()
'''),
        md('''
## 2. Score every neuron

Importance is measured on a few **calibration batches** of the task. The first-order Taylor
score of row $i$ is $\\big|\\sum_j w_{ij}\\, \\partial L/\\partial w_{ij}\\big|$: how much the loss
would change, to first order, if that neuron were removed. Gradients are summed over the
batches; no weight changes.
'''),
        code('''
N_CALIB = 32 if FAST else 128
batches = calibration_batches(data.train, batch_size=16, n_samples=N_CALIB,
                              collator=data.collator, seed=0)
report = rs.score(model, batches, metric="taylor", seed=0, progress=False)
print(report, "from", report.meta["n_samples"], "examples")
report.summary().head(7)
'''),
        md('''
## 3. Look at the heatmap

Each row of the heatmap is a transformer layer, each block of columns a module type, each cell
the mean score of a bin of neurons (scores divided by the module's mean, log scale). Bright
specks are the few neurons that carry most of the importance — the ones we will train.
'''),
        code(HEATMAP_HELPER + '''
trace, (tickvals, ticktext) = heatmap_trace(report)
fig = go.Figure(trace)
fig.update_layout(height=330, margin=dict(l=60, r=10, t=40, b=40), title="Taylor importance of MiniLM's neurons",
                  xaxis=dict(tickvals=tickvals, ticktext=ticktext), yaxis=dict(autorange="reversed"))
fig.show()
'''),
        md('''
## 4. Select 5% of the rows

`Ratio(0.05)` keeps the 5% highest-scoring rows of every Linear layer (the paper's default for
encoders). The result is a `RowPlan`: module name → row indices.
'''),
        code(CHECK + '''
plan = rs.select(report, rs.Ratio(0.05))
print(plan)
'''),
        code('''
print("rows of layer 0's query projection:", plan.rows["bert.encoder.layer.0.attention.self.query"].tolist())
'''),
        md('''
The interactive explorer below shows the same heatmap; click a cell to see that module's
per-neuron profile with the selected rows marked, and switch the normalization (it needs a
running kernel — on GitHub you only see the static figure above).
'''),
        code('''
from rowsft_nb.widgets import ImportanceExplorer
ImportanceExplorer(report, plan=plan)
'''),
        md('''
## 5. Inject the adapter

`inject` replaces each planned Linear with a `RowSparseLinear` that holds the frozen weight and
a zero-initialised delta for its rows, so the adapted model equals the base model exactly until
training starts. The classifier head is new, so it is trained fully.
'''),
        code(CHECK + '''
rs.inject(model, plan)
trainable, total = rs.trainable_parameters(model)
print(f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.2%})")
print(f"  row deltas {plan.trainable_parameters():,} + classifier head {trainable - plan.trainable_parameters():,}")
'''),
        md('''
## 6. Train

`rs.train` runs `transformers.Trainer` on whatever requires grad and evaluates before and after:
one epoch, batches of 16 (16 steps in fast mode, 100 in full mode; the short run takes a larger
learning rate).
'''),
        code('''
result = rs.train(model, data.train, eval_dataset=data.validation, tokenizer=tok,
                  lr=5e-3 if FAST else 2e-3, epochs=1, batch_size=16, seed=0,
                  logging_steps=2 if FAST else 10, progress_bar=False)
print(result.summary())
'''),
        code(CHECK + '''
before, after = result.metrics_before["accuracy"], result.metrics_after["accuracy"]
print("accuracy improved:", after > before)
'''),
        code('''
losses = [(h["step"], h["loss"]) for h in result.history if "loss" in h]
fig = go.Figure(go.Scatter(x=[s for s, _ in losses], y=[l for _, l in losses], mode="lines+markers"))
fig.update_layout(height=280, width=520, margin=dict(l=50, r=10, t=40, b=40), title=
                  f"training loss (accuracy {before:.3f} → {after:.3f})", xaxis_title="step", yaxis_title="loss")
fig.show()
'''),
        md('''
## 7. Save the adapter

Only the deltas, their row indices and the trained head are written — as
`adapter_model.safetensors` plus a readable `adapter_config.json` (the plan and where it came
from). No pickle.
'''),
        code('''
adapter_dir = rs.save_adapter(model, OUT / "quickstart_adapter")
for f in sorted(adapter_dir.iterdir()):
    print(f"{f.name:28s} {f.stat().st_size / 2**20:6.2f} MiB")
'''),
        md(WHAT_NEXT_01),
    ]


# ============================================================================ 02
def importance():
    return [
        md('''
# 02 · Importance metrics side by side

**What structural-pruning importance means.** A pruning method removes whole neurons (rows of
`W`) and asks: which removal costs the least? Its *importance* score estimates how much the loss
(or the layer's output) would change if neuron $i$ disappeared. Different metrics answer with
different information:

| metric | score of row $i$ | needs |
|---|---|---|
| `l2` (magnitude) | $\\lVert w_i \\rVert_2$ | weights only |
| `taylor` | $\\big\\lvert\\sum_j w_{ij}\\, g_{ij}\\big\\rvert$, $g = \\sum_b \\partial L_b/\\partial W$: first-order loss change when row $i$ is zeroed | gradients |
| `fisher` | $\\sum_b \\big(\\sum_j w_{ij}\\, g^b_{ij}\\big)^2$: the same, squared per batch (a Fisher / second-order proxy) | gradients |
| `wanda` | $\\sum_j \\lvert w_{ij}\\rvert\\, \\lVert X_j \\rVert_2$: weight times input-activation size | activations |
| `random` | uniform | nothing (the baseline) |

**Why should such rows be good to train?** A row whose removal changes the loss a lot is a row
the network's output is sensitive to, and for Taylor-type scores it is a row where weights and
gradients line up. One gradient step restricted to rows $S$ lowers the loss, to first order, by
$\\eta \\sum_{i \\in S} \\lVert g_i \\rVert^2$ — so rows that capture more of the gradient give more
progress per trainable parameter. We check both claims below instead of taking them on faith.
'''),
        code(SETUP),
        code('''
from rowsft_nb.assets import load_encoder
from rowsft_nb.data import prepare_task, calibration_batches

N_CALIB = 32 if FAST else 128
model, tok = load_encoder(num_labels=2, seed=0)
data = prepare_task("movie_sentiment", tok, max_length=64, n_train=256 if FAST else 1000,
                    n_eval=64 if FAST else 256, seed=0)
batches = calibration_batches(data.train, batch_size=16, n_samples=N_CALIB, collator=data.collator, seed=0)
held_out = calibration_batches(data.validation, batch_size=32, n_samples=len(data.validation), collator=data.collator)
'''),
        md('''
## 1. Score with every metric

The same calibration batches for every metric; `l2` and `random` ignore them.
'''),
        code('''
METRICS = ["l2", "taylor", "fisher", "wanda", "random"]
reports = {m: rs.score(model, batches, metric=m, seed=0, progress=False) for m in METRICS}
pd.DataFrame.from_dict({m: {"modules": len(r.modules), "rows": r.total_rows(), "examples used": r.meta["n_samples"],
                            "mean Gini (concentration)": round(r.summary()["gini"].mean(), 3)}
                        for m, r in reports.items()}, orient="index")
'''),
        md('''
The Gini coefficient says how concentrated a module's importance is (0 = every neuron equal,
→ 1 = a few neurons hold it all). Gradient-based scores are far more concentrated than weight
magnitude: a handful of neurons dominate.

## 2. Heatmaps

Scores divided by each module's mean, log scale, one row per layer (`other` = the pooler).
'''),
        code(HEATMAP_HELPER + '''
from plotly.subplots import make_subplots

fig = make_subplots(rows=len(METRICS), cols=1, subplot_titles=METRICS, vertical_spacing=0.05)
for i, m in enumerate(METRICS, start=1):
    trace, (tickvals, ticktext) = heatmap_trace(reports[m])
    trace.update(coloraxis="coloraxis")
    fig.add_trace(trace, row=i, col=1)
    fig.update_xaxes(tickvals=tickvals, ticktext=ticktext if i == len(METRICS) else [""] * len(tickvals), row=i, col=1)
    fig.update_yaxes(autorange="reversed", row=i, col=1)
fig.update_layout(height=170 * len(METRICS), margin=dict(l=60, r=10, t=40, b=40),
                  coloraxis=dict(colorscale="Viridis", cmin=-2, cmax=1.5,
                                 colorbar=dict(title=dict(text="log10 score / mean", side="right"))))
fig.show()
'''),
        md('''
## 3. How much do their selections agree?

Select 5% of the rows per module with each metric and compare the plans with the Jaccard index
$|A \\cap B| / |A \\cup B|$ over (module, row) pairs. Two *independent random* 5% selections agree
by chance at about $p / (2 - p) \\approx 0.026$.
'''),
        code('''
plans = {m: rs.select(r, rs.Ratio(0.05)) for m, r in reports.items()}
overlap = pd.DataFrame([[plans[a].overlap(plans[b])["overall"] for b in METRICS] for a in METRICS],
                       index=METRICS, columns=METRICS)
p = plans["taylor"].num_rows() / reports["taylor"].total_rows()
print(f"chance level for two random {p:.1%} selections: {p / (2 - p):.3f}")
overlap.round(3)
'''),
        code('''
fig = go.Figure(go.Heatmap(z=overlap.values, x=METRICS, y=METRICS, colorscale="Blues", zmin=0, zmax=1,
                           text=overlap.round(2).values, texttemplate="%{text}"))
fig.update_layout(height=360, width=440, margin=dict(l=60, r=10, t=40, b=40),
                  title="plan overlap (Jaccard)", yaxis=dict(autorange="reversed"))
fig.show()
'''),
        code(CHECK + '''
chance = p / (2 - p)
print("every plan trains the same number of parameters:",
      len({pl.trainable_parameters() for pl in plans.values()}) == 1)
print("random agrees with the others at about chance level:",
      all(abs(overlap.loc["random", m] - chance) < 0.03 for m in METRICS if m != "random"))
'''),
        md('''
Where do the metrics agree? Per module type, Taylor vs the others:
'''),
        code('''
from rowsft_nb.targets import module_type
rows = []
for other in ["l2", "fisher", "wanda", "random"]:
    per_module = plans["taylor"].overlap(plans[other])["per_module"]
    for name, j in per_module.items():
        rows.append({"vs": other, "type": module_type(name), "jaccard": j})
pd.DataFrame(rows).pivot_table(index="type", columns="vs", values="jaccard", sort=False).round(3)
'''),
        md('''
## 4. What does each metric protect? Prune and see

Zero the selected 5% of rows in every layer (structural pruning) and measure, on held-out data,
(a) the task loss and (b) how far the sentence representation moves (relative change of the
mean-pooled last hidden state, what MiniLM was trained to produce). Each metric ranks by its own
objective: Taylor and Fisher by the *task loss of the current model* — here with an untrained
classifier head, whose loss sits near $\ln 2 \approx 0.69$ whatever the backbone does — while
`l2` and `wanda` rank by how much signal flows through a neuron, so removing their rows moves the
representation most.
'''),
        code('''
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
'''),
        md('''
## 5. Do the selected rows capture the gradient?

One backward pass on held-out data gives the gradient $g_i$ of every row. The share of
$\\sum_i \\lVert g_i \\rVert^2$ that falls into a plan's rows is the share of the first-order loss
decrease that a gradient step on those rows alone can achieve.
'''),
        code('''
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
'''),
        code(CHECK + '''
print("Taylor rows capture more of the gradient than random rows:", share["taylor"] > share["random"])
'''),
        md('''
With 5% of the rows, random selection captures about 5% of the gradient; a metric that
captures several times more points the update at the rows where the loss is most sensitive. That is the
mechanism behind "train the important rows". Whether this turns into better accuracy after many steps is an empirical question —
[04_compare](04_compare.ipynb) trains Taylor rows, random rows, LoRA and full fine-tuning side by
side.

## 6. Explore interactively

Pick the metric, normalization, order and module types; click a cell for a module's profile.
'''),
        code('''
from rowsft_nb.widgets import ImportanceExplorer
ImportanceExplorer(reports, plan=plans["taylor"])
'''),
        md('''
## What to try next

- Score with more calibration examples (`N_CALIB`) and watch the Taylor/Fisher overlap rise:
  with few batches the gradient estimates are noisy.
- `metric="class_taylor"` ranks neurons per class and averages their quantiles, so neurons that
  matter to a rare class survive; `"hessian"` (OBD) and `"zo_taylor"` (forward passes only) are
  also in `rs.METRICS`.
- `groups="auto"` in `rs.score` makes coupled rows (heads, q/k/v) share one score — try it with
  `select(..., head_aligned=True)` in [03_budgets](03_budgets.ipynb).
- Select with a global budget (`rs.ParamBudget(0.05)`) instead of 5% per module: the metrics then
  also disagree on *which layers* get rows.
'''),
    ]


# ============================================================================ 03
def budgets():
    return [
        md('''
# 03 · Budgets: how many rows, where, and what they cost

The importance report ranks rows; the **budget** decides how many of them train and in which
modules. `rs.select(report, budget, ...)` turns the two into a `RowPlan`. Budgets:

| budget | meaning |
|---|---|
| `FixedRows(r)` | the `r` best rows of every module (the paper's LLM default: 64) |
| `Ratio(p)` | the best `round(p · d_out)` rows of every module (the paper's encoder default: 5%) |
| `TypeRatios({...}, default=0)` | a ratio per module type; unlisted types get `default` |
| `ParamBudget(n, "topk")` | a global budget of `n` parameters (or a fraction): the globally best rows, scores made comparable across modules by `normalizer` (rank by default) |
| `ParamBudget(n, "coverage")` | the same budget spread so that every module covers as much of *its own* importance as possible |

Options of `select`: `head_aligned=True` takes whole attention heads, `multiple_of=8` rounds the
rows of every module (friendlier kernels), `min_rows`/`max_rows`, `include`/`exclude`.

Cost is measured in trainable parameters (`r · d_in` per module), the **equivalent LoRA rank**
(the rank whose LoRA on the same modules has as many parameters) and estimated training memory.
'''),
        code(SETUP),
        code('''
from rowsft_nb.assets import load_encoder
from rowsft_nb.data import prepare_task, calibration_batches

model, tok = load_encoder(num_labels=2, seed=0)
data = prepare_task("movie_sentiment", tok, max_length=64, n_train=256, n_eval=32, seed=0)
batches = calibration_batches(data.train, 16, 32 if FAST else 128, data.collator, seed=0)
report = rs.score(model, batches, metric="taylor", seed=0, progress=False)
target_params = sum(o * i for o, i in report.shapes.values())
print(report, f"| {target_params:,} parameters in the target modules, {report.meta['model_parameters']:,} in the model")
'''),
        md('''
## 1. One report, many plans

`TypeRatios` keys are module types: a short name (`"query"`) or a suffix of the type
(`"intermediate.dense"`). Careful: `"output.dense"` is a suffix of both `attention.output.dense`
and the MLP's `output.dense`; the longest matching key wins, so list both when they differ.
'''),
        code('''
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
                          "% of model": 100 * p.trainable_parameters() / report.meta["model_parameters"],
                          "LoRA rank equiv.": p.equivalent_lora_rank(),
                          "importance covered %": 100 * covered(p, report)} for k, p in plans.items()}).T
table.astype({"modules": int, "rows": int, "trainable": int}).round(2)
'''),
        md('''
The per-module budgets (`FixedRows`, `Ratio`, `TypeRatios`) cost the same whatever the scores
are; `ParamBudget` spends at most its budget wherever the scores say. Both facts are checked here:
'''),
        code(CHECK + '''
for k in ["FixedRows(16)", "Ratio(5%)", "Ratio(5%), multiple_of=8", "TypeRatios(q,v 10%, MLP 3%)"]:
    print(f"{k:30s} rows {plans[k].num_rows():6,}  trainable {plans[k].trainable_parameters():9,}")
budget = int(0.025 * target_params)
print("ParamBudget plans stay within", f"{budget:,}", "parameters:",
      all(plans[k].trainable_parameters() <= budget for k in plans if k.startswith("ParamBudget")))
print("multiple_of=8 rows are multiples of 8:",
      all(v.numel() % 8 == 0 for v in plans["Ratio(5%), multiple_of=8"].rows.values()))
print("head-aligned rows come in whole heads of 32:", all(
    v.numel() % 32 == 0 and bool((v.view(-1, 32)[:, 0] % 32 == 0).all())
    for n, v in plans["ParamBudget(2.5%, topk), heads"].rows.items() if n in report.groups and v.numel()))
'''),
        md('''
## 2. Where does each budget put its rows?

Trainable parameters per layer (the pooler is `other`). Uniform budgets spread evenly; `topk`
follows the scores wherever they are highest, `coverage` gives each module what it needs to cover
its own importance.
'''),
        code('''
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
'''),
        code('''
by_type = pd.DataFrame({k: per(p, module_type) for k, p in plans.items()}).fillna(0).astype(int)
fig = go.Figure([go.Bar(name=t, x=list(by_type.columns), y=by_type.loc[t].values) for t in by_type.index])
fig.update_layout(barmode="stack", height=380, margin=dict(l=60, r=10, t=40, b=120),
                  title="trainable parameters per module type", yaxis_title="parameters")
fig.show()
'''),
        md('''
## 3. Memory next to LoRA and full fine-tuning

`plan.memory_estimate(batch_size, seq_len)` is an analytic model (documented in
`rowsft_nb.memory`): frozen **weights**, **trainable** deltas, their **gradients**, AdamW
**optimizer** state (two values per trainable parameter) and extra **activations** saved for
backward. LoRA is sized at the plan's equivalent rank on the same modules, so the parameter
counts match; full fine-tuning trains everything.
'''),
        code(CHECK + '''
est = plans["Ratio(5%)"].memory_estimate(batch_size=16, seq_len=128)
print(f"equivalent LoRA rank {est.lora_rank:.2f}, trainable {est.trainable_parameters:,}")
est.to_frame("MiB").round(2)
'''),
        code('''
def memory_figure(est, unit=("MiB", 2**20), title=""):
    frame = est.to_frame("B").drop(columns="total")
    fig = go.Figure([go.Bar(name=c, x=list(frame.index), y=frame[c] / unit[1]) for c in frame.columns])
    fig.update_layout(barmode="stack", height=320, width=520, margin=dict(l=60, r=10, t=40, b=40),
                      title=title, yaxis_title=unit[0])
    return fig

memory_figure(est, title="MiniLM, Ratio(5%), batch 16 x 128 tokens, fp32").show()
'''),
        md('''
For a model this small the frozen weights dominate. At 7B shapes the optimizer state is what
separates the methods. `rowsft_nb.testing.llama2_7b_report()` is a report with random scores and
Llama-2-7B's shapes (no weights needed): the paper's LLM default, 64 rows per module, in bf16.
'''),
        code(CHECK + '''
from rowsft_nb.testing import llama2_7b_report
big = llama2_7b_report()
plan_7b = rs.select(big, rs.FixedRows(64))
est_7b = plan_7b.memory_estimate(batch_size=8, seq_len=512, dtype=torch.bfloat16)
print(plan_7b, f"| equivalent LoRA rank {plan_7b.equivalent_lora_rank():.1f}")
est_7b.to_frame("GiB").round(2)
'''),
        code('''
memory_figure(est_7b, unit=("GiB", 2**30), title="Llama-2-7B shapes, FixedRows(64), batch 8 x 512, bf16").show()
'''),
        md('''
## 4. The BudgetExplorer

Move the sliders: budget in % of rows or of parameters, strategy, normalizer, per-type shares,
`min_rows`/`max_rows`, whole heads, the batch shape for the memory estimate. The readout and the
plots follow at once; `explorer.plan` is the current plan, and *Export plan JSON* saves it.
'''),
        code('''
from rowsft_nb.widgets import BudgetExplorer
explorer = BudgetExplorer(report, percent=5.0, batch_size=16, seq_len=128, plan_path=str(OUT / "plan.json"))
explorer
'''),
        md('''
It stays interactive at 7B shapes (1.4 M rows, 224 modules): the first plan sorts the scores once,
later slider moves reuse that sort. Timed here through the same state object the sliders drive:
'''),
        code('''
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
'''),
        code('''
plan_from_explorer = explorer.plan      # take whatever the sliders chose above
print(plan_from_explorer)
'''),
        md('''
## What to try next

- In the explorer, switch to *% of params* and `topk`: how much importance does 1% of the
  parameters cover compared with a uniform 1% of rows?
- Compare `normalizer="rank"` with `"mean"` for `ParamBudget(..., "topk")`: raw-score
  normalizers favour modules whose scores are spread out.
- Exclude the pooler (`exclude=["pooler"]`) or the attention (`include=["intermediate", "output.dense"]`)
  and see the memory estimate change: fewer modules with trainable rows save fewer inputs.
- Train two of these plans with [01_quickstart](01_quickstart.ipynb)'s recipe, or see
  [04_compare](04_compare.ipynb) for accuracy at equal budgets.
'''),
    ]


# ============================================================================ 06
def deploy():
    return [
        md('''
# 06 · Deploy: save, reload, merge

A trained row-sparse adapter is small: the deltas of the selected rows, their indices and any
fully trained head. This notebook follows one adapter through its life:

1. train briefly and **save** it (`save_adapter`),
2. **reload** it onto a fresh base model (`load_adapter`),
3. **merge** it into the weights (`merge_and_unload`: `W0[rows] += ΔW`, exact) and check the
   outputs match,
4. look inside the files and compare their size with a LoRA adapter of the same parameter count
   and with the full model.
'''),
        code(SETUP),
        code('''
from rowsft_nb.assets import load_encoder
from rowsft_nb.data import prepare_task, calibration_batches

model, tok = load_encoder(num_labels=2, seed=0)
data = prepare_task("movie_sentiment", tok, max_length=48, n_train=96 if FAST else 1000,
                    n_eval=32, seed=0)
report = rs.score(model, metric="l2")              # any report works here; l2 needs no data
plan = rs.select(report, rs.Ratio(0.05))
rs.inject(model, plan)
result = rs.train(model, data.train, tokenizer=tok, lr=2e-3, max_steps=6 if FAST else 60,
                  batch_size=16, seed=0, progress_bar=False)
print(result.summary())
'''),
        md('''
## 1. Save

Two files: `adapter_model.safetensors` (tensors) and `adapter_config.json` (everything needed to
rebuild the adapter: the plan, the base model class and a hash of its weights, dtypes, options).
'''),
        code('''
adapter_dir = rs.save_adapter(model, OUT / "deploy_adapter")
for f in sorted(adapter_dir.iterdir()):
    print(f"{f.name:28s} {f.stat().st_size:>12,} bytes")
'''),
        code('''
import json
from safetensors import safe_open

config = json.loads((adapter_dir / "adapter_config.json").read_text())
print({k: v for k, v in config.items() if k not in ("plan", "modules")})
with safe_open(adapter_dir / "adapter_model.safetensors", framework="pt") as f:
    keys = list(f.keys())
    tensors = pd.DataFrame([{"tensor": k, "shape": tuple(f.get_slice(k).get_shape()), "dtype": f.get_slice(k).get_dtype()}
                            for k in keys])
print(len(keys), "tensors; a few of them:")
tensors[tensors.tensor.str.startswith(("bert.encoder.layer.0.attention.self.query", "heads."))]
'''),
        md('''
Per adapted module: `<name>.row_index` (which rows, int64) and `<name>.delta` (`[r, d_in]`, the
trained values); the new classifier head is stored whole under `heads.`.

## 2. Reload onto a fresh base model

`load_encoder(seed=0)` rebuilds the same base model (the same pretrained weights and the same
seeded classifier initialisation). `load_adapter` checks the shapes and the base-weights hash,
injects the plan, and loads the tensors bit-exactly.
'''),
        code('''
batch = next(iter(calibration_batches(data.validation, 32, 32, data.collator)))
batch = {k: v for k, v in batch.items() if k != "labels"}
model.eval()
with torch.no_grad():
    trained_logits = model(**batch).logits

fresh, _ = load_encoder(num_labels=2, seed=0)
with torch.no_grad():
    base_logits = fresh(**batch).logits
reloaded = rs.load_adapter(fresh, adapter_dir).eval()
with torch.no_grad():
    reloaded_logits = reloaded(**batch).logits
'''),
        code(CHECK + '''
diff_reload = (reloaded_logits - trained_logits).abs().max().item()
print(f"max abs diff, reloaded vs trained: {diff_reload:.1e}")
print("reloaded outputs match:", diff_reload == 0.0)
print("training changed the outputs:", (trained_logits - base_logits).abs().max().item() > 1e-3)
'''),
        md('''
## 3. Merge into the weights

`merge_and_unload` adds each delta into its rows of the frozen weight and puts the plain
`nn.Linear` layers back: the result is an ordinary `BertForSequenceClassification` with no
adapter code and no extra compute at inference. Only the planned rows of each weight change.
'''),
        code('''
from rowsft_nb.targets import row_weight

base_weights = {n: row_weight(m.base_layer).detach().clone()
                for n, m in rs.adapter.adapted_modules(reloaded).items()}
merged = rs.merge_and_unload(reloaded)
with torch.no_grad():
    merged_logits = merged(**batch).logits
modules = dict(merged.named_modules())
changed = {n: torch.nonzero((row_weight(modules[n]) != w).any(1)).flatten() for n, w in base_weights.items()}
print(type(merged).__name__, "| adapter layers left:", len(rs.adapter.adapted_modules(merged)))
'''),
        code('''
diff_merge = (merged_logits - trained_logits).abs().max().item()
print(f"max abs diff, merged vs trained: {diff_merge:.1e}   (float32 rounding: W0 + dW is summed once)")
'''),
        code(CHECK + '''
print("outputs match:", diff_merge < 1e-4)
print("every changed row is a planned row:",
      all(set(changed[n].tolist()) <= set(plan.rows[n].tolist()) for n in changed))
'''),
        md('''
The merged model saves and loads like any Hugging Face model (`merged.save_pretrained(...)`),
and because only `r` rows of each matrix changed, it can be re-quantized row by row with little
error.

## 4. How big is it, next to LoRA and the full model?

A LoRA adapter with the same number of trainable parameters: PEFT LoRA on the same modules at the
plan's equivalent rank (rounded), with the classifier head saved too (`modules_to_save`), written
with `save_pretrained` (safetensors). Untrained — the file size does not depend on the values.
'''),
        code('''
import warnings
from peft import LoraConfig, get_peft_model
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # a transformers 5 deprecation inside PEFT

rank = max(1, round(plan.equivalent_lora_rank()))
lora_base, _ = load_encoder(num_labels=2, seed=0)
lora = get_peft_model(lora_base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=plan.modules,
                                            modules_to_save=["classifier"]))
lora_trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
lora.save_pretrained(OUT / "deploy_lora")
merged.save_pretrained(OUT / "deploy_merged")          # the full fine-tuned model
'''),
        code(CHECK + '''
rowsft_trainable = config["trainable_parameters"]
print(f"row-sparse adapter: {rowsft_trainable:,} trainable parameters")
print(f"LoRA rank {rank}:       {lora_trainable:,} trainable parameters")
print(f"full model:         {sum(p.numel() for p in merged.parameters()):,} parameters")
'''),
        code('''
def size(folder, pattern="*.safetensors"):
    return sum(f.stat().st_size for f in Path(folder).glob(pattern))

sizes = pd.DataFrame({
    "row-sparse (rowsft_nb)": {"weights file": size(adapter_dir), "config": size(adapter_dir, "*.json"),
                               "trainable params": rowsft_trainable},
    f"LoRA r={rank} (PEFT)": {"weights file": size(OUT / "deploy_lora"), "config": size(OUT / "deploy_lora", "*.json"),
                             "trainable params": lora_trainable},
    "full model": {"weights file": size(OUT / "deploy_merged"), "config": size(OUT / "deploy_merged", "*.json"),
                   "trainable params": sum(p.numel() for p in merged.parameters())},
}).T
sizes["weights MiB"] = (sizes["weights file"] / 2**20).round(2)
sizes["bytes per param"] = (sizes["weights file"] / sizes["trainable params"]).round(2)
sizes
'''),
        md('''
Both adapters store 4 bytes per fp32 value; the row-sparse file adds 8 bytes per selected row for
its int64 index, LoRA adds nothing but needs `r · (d_in + d_out)` values per module where
row-sparse needs `r · d_in`. The full model is two orders of magnitude larger. The row-sparse
config is bigger because it carries the plan (every selected row index, human-readable).

## What to try next

- Reload the quickstart's adapter (`outputs/quickstart_adapter`, written by
  [01_quickstart](01_quickstart.ipynb)) the same way.
- Load the adapter onto a base with a different classifier seed: `load_adapter` restores the
  trained head, so the outputs still match. Then try a base with different weights and read the
  warning about the weights hash.
- `rs.merge(model)` / `rs.unmerge(model)` fold the deltas in and out while keeping the adapter —
  handy to compare merged and unmerged speed.
- Save the merged model in bf16 (`merged.to(torch.bfloat16).save_pretrained(...)`) and measure
  how much the outputs move.
'''),
    ]


NOTEBOOKS = {"01": ("01_quickstart.ipynb", quickstart), "02": ("02_importance.ipynb", importance),
             "03": ("03_budgets.ipynb", budgets), "06": ("06_deploy.ipynb", deploy)}


def build(key: str) -> Path:
    name, make = NOTEBOOKS[key]
    nb = new_notebook(cells=make(), metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"}})
    path = NB_DIR / name
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return path


if __name__ == "__main__":
    for key in sys.argv[1:] or list(NOTEBOOKS):
        print(build(key).relative_to(ROOT))
