# %% [markdown]
# # 07 · A 4-bit base: quantization error, residual rows, merging back into 4-bit
#
# QLoRA made it normal to fine-tune on top of a 4-bit model. Row-sparse fine-tuning does the
# same, and the rows give two things LoRA does not:
#
# 1. **An exact residual start** (the authors' `ours_loftq`): the selected rows begin at their
#    *float* values, `ΔW = (W - deq(NF4(W)))[rows]`, so at step 0 they carry no quantization
#    error. (LoftQ gives LoRA an approximate one, the best rank-r fit of every row's error;
#    section 3 compares the two.)
# 2. **A merge back into 4-bit that touches only those rows**: NF4 stores the weight in blocks
#    of 64 consecutive values of one row, so writing new rows re-quantizes only their blocks;
#    every other block keeps its bytes. QLoRA's merge (dequantize, add, quantize again) changes
#    every block of every adapted layer.
#
# Steps: quantize SmolLM2-135M-Instruct to NF4 (bitsandbytes, on CPU here), look at the
# quantization error per row next to row importance, compare the residual start with QLoRA's
# and LoftQ's at step 0, train rows from the residual start on `trec_instruct`, merge three
# ways and compare. `ROWSFT_FAST=1` (what CI runs and what the
# committed outputs show) quantizes only the first 2 layers' Linear modules (the rest stays float),
# scores rows by L2 instead of Taylor, measures on one batch of 4 examples and trains 1 step on
# one thread: read its numbers as a smoke test. The full mode quantizes all 30 layers.

# %%
import os
FAST = os.environ.get("ROWSFT_FAST", "0") == "1"   # CI sets ROWSFT_FAST=1: fewer layers, samples and steps
os.environ.setdefault("HF_HUB_OFFLINE", "1")        # everything here is embedded: never download
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import copy
import warnings
import numpy as np
import pandas as pd
import torch
import datasets, transformers
import rowsft_nb as rs
from rowsft_nb import quant

# Figures store plotly JSON (interactive) and a PNG that readers of the saved notebook see
# (nbconvert, GitHub); without kaleido + Chromium only the JSON, with one warning.
from rowsft_nb.widgets import static
static.enable()
datasets.disable_progress_bars()
transformers.logging.disable_progress_bar()
transformers.logging.set_verbosity_error()
# peft 0.21 reads a transformers attribute that transformers 5 deprecated (harmless)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
if FAST:   # CI's small shared CPU: two threads competing with other jobs ran this ~3x slower
    torch.set_num_threads(1)
SEED = 0
torch.manual_seed(SEED)
print("fast mode" if FAST else "full mode", "| torch", torch.__version__, "| rowsft_nb", rs.__version__)

# %% [markdown]
# ## 1. Quantize
#
# `rs.quantize` swaps Linear layers for bitsandbytes `Linear4bit` in place: NF4 codes (4 bits
# per weight), one absmax scale per block of 64 weights, and *double quantization* (the absmax
# scales themselves stored in 8 bits). `lm_head` stays float, as in QLoRA. We keep the float
# model as the reference the quantization error is measured against. (The embedded SmolLM2 was
# itself shipped as a 4-bit GGUF and dequantized to float32: "float" here means those weights.)
# The compute dtype is float32 rather than the usual bf16 so that the errors below are NF4's
# alone, not bf16 rounding.

# %%
# NBVAL_CHECK_OUTPUT
from rowsft_nb.assets import load_causal_lm

float_model, tok = load_causal_lm()
LAYERS = range(2) if FAST else range(float_model.config.num_hidden_layers)
targets = [n for n in rs.find_targets(float_model)
           if any(n.startswith(f"model.layers.{i}.") for i in LAYERS)]
model = quant.quantize(copy.deepcopy(float_model), "nf4", blocksize=64, double_quant=True,
                       compute_dtype=torch.float32, targets=targets)
print(f"quantized {len(targets)} Linear modules in {len(LAYERS)} of "
      f"{float_model.config.num_hidden_layers} layers:", quant.quant_settings(model))
layer = model.get_submodule(targets[0])
print(f"{targets[0]}: {type(layer).__name__}, packed weight {tuple(layer.weight.shape)} "
      f"{layer.weight.dtype} for a [{layer.out_features}, {layer.in_features}] matrix")

# %%
def linear_mib(m):
    """Bytes held by the quantized target modules (packed codes + scales) or their float weights."""
    total = 0
    for n in targets:
        mod = m.get_submodule(n)
        total += sum(t.numel() * t.element_size() for t in mod.state_dict().values()
                     if isinstance(t, torch.Tensor))
    return total / 2**20

print(f"target modules: {linear_mib(float_model):.1f} MiB in float32 -> {linear_mib(model):.1f} MiB in NF4")

# %% [markdown]
# ## 2. Where is the quantization error, and where is the importance?
#
# `quant.quantization_error(model, float_model)` gives, per quantized layer, each row's squared
# error $\|W_i - \mathrm{deq}(Q)_i\|^2$: exactly what a residual start on row $i$ would repair.
# We wrap it in an `ImportanceReport` so the heatmap of [02_importance](02_importance.ipynb)
# can draw it next to the importance of the same rows, scored on the **4-bit** model (its
# weights are decoded one layer at a time; the gradients are those of the model that will
# train): Taylor in full mode, L2 (row norms, no forward pass) in fast mode.

# %%
from rowsft_nb.data import prepare_task, calibration_batches
from rowsft_nb.widgets.figures import heatmap_figure

N_TRAIN, N_EVAL, N_CALIB = (16, 4, 4) if FAST else (320, 64, 32)
data = prepare_task("trec_instruct", tok, max_length=96, n_train=N_TRAIN, n_eval=N_EVAL, seed=SEED)
calib = calibration_batches(data.train, batch_size=4 if FAST else 8, n_samples=N_CALIB, collator=data.collator, seed=SEED)
evals = calibration_batches(data.validation, batch_size=4 if FAST else 8, n_samples=N_EVAL, collator=data.collator, seed=SEED)

METRIC = "l2" if FAST else "taylor"                 # fast mode: L2 needs no forward/backward pass
imp = rs.score(model, calib, metric=METRIC, targets=targets, seed=SEED, progress=False)
err = quant.quantization_error(model, float_model)
qerr = rs.ImportanceReport({n: err[n] for n in targets}, dict(imp.shapes), "quantization error")

SHOW = [0, 1] if FAST else [0, 10, 20, 29]          # layers drawn (7 modules each)
shown = [n for n in targets if int(n.split(".")[2]) in SHOW]
sub = lambda r: rs.ImportanceReport({n: r.scores[n] for n in shown}, {n: r.shapes[n] for n in shown}, r.metric)
fig = heatmap_figure({"quantization error per row": sub(qerr), f"{METRIC} importance (4-bit model)": sub(imp)},
                     max_columns=192, row_height=16)
fig.show()

# %% [markdown]
# Both maps divide each module's row values by their mean and take log10, so the colours
# compare rows within a module. NF4 scales each block by its largest value, so a row's error
# grows with its magnitude: the error map mostly shows *large* rows. Importance is a different
# signal. How much of the error would the 64 most important rows of each module repair?

# %%
K = 64
def topk(s, k=K):
    return set(torch.topk(s, k).indices.tolist())

per_module = pd.DataFrame([{
    "module": n.rsplit(".", 1)[-1],
    "share of error in top-64 important rows": float(err[n][list(topk(imp.scores[n]))].sum() / err[n].sum()),
    "share of error in top-64 error rows": float(err[n][list(topk(err[n]))].sum() / err[n].sum()),
    "rows": len(err[n]),
    "overlap of the two top-64 sets": len(topk(imp.scores[n]) & topk(err[n])) / K,
} for n in targets])
per_module.groupby("module", sort=False).mean().round(3)

# %% [markdown]
# ## 3. Residual start, and QLoRA / LoftQ at step 0
#
# Select the 64 most important rows per module (Taylor as the paper in full mode, L2 in fast
# mode). With `init="residual"` each selected row's delta starts at
# $W_i - \mathrm{deq}(Q)_i$, so those rows compute with float weights while the rest of the
# layer stays 4-bit. How much does that buy before any training? We compare four starts, each
# against the float model on the calibration tokens (mean next-token KL and logit MSE), at
# equal trainable parameters:
#
# * **plain NF4**: the quantized model, nothing trainable;
# * **NF4 + residual rows**: the plan's rows, residual start;
# * **QLoRA**: PEFT LoRA on the same modules at the equal rank
#   $r = $ `round(plan.equivalent_lora_rank())`; $B = 0$ at init, so it computes exactly the
#   plain 4-bit model;
# * **LoftQ**: the same LoRA started from the best rank-$r$ approximation (SVD) of each layer's
#   error matrix $W - \mathrm{deq}(Q)$ (one LoftQ iteration; PEFT's own LoftQ needs CUDA,
#   `rowsft_nb.bench.quant.loftq_init` is its algorithm on any device).
#
# The last column is the authors' nuclear-norm ratio
# $1 - \sum\|W - W_{\text{start}}\|_* / \sum\|W - \mathrm{deq}(Q)\|_*$ over the adapted
# modules: how much of the error matrices the start removes. `step0_errors` adapts copies;
# `model` itself is not changed.

# %%
from rowsft_nb.bench.quant import step0_errors

plan = rs.select(imp, rs.FixedRows(K))
print(plan, f"| equal LoRA rank {plan.equivalent_lora_rank():.1f}")
step0 = step0_errors(float_model, model, plan, calib)
labels = {"plain_4bit": "plain NF4", "residual_rows": "NF4 + residual rows",
          "qlora": "QLoRA (B = 0)", "loftq": "LoftQ (1 iteration)"}
step0_table = pd.DataFrame([{"start": labels[k], "trainable": v["trainable"], "LoRA rank": v.get("rank"),
                             "KL to float": v["kl"], "logit MSE": v["logit_mse"],
                             "nuclear-norm ratio": v["nuclear_ratio"]} for k, v in step0.items()]).set_index("start")
step0_table["LoRA rank"] = step0_table["LoRA rank"].astype("Int64")
step0_table

# %% [markdown]
# In the committed fast run (2 quantized layers, L2 rows, one batch of 4 examples) the residual
# rows cut the KL to the float model from 0.0547 (plain NF4) to 0.0508 and the logit MSE from
# 1.41 to 1.24. LoftQ at the same budget (rank 31: 630,912 trainable parameters against the
# rows' 638,976) cuts more, to 0.0441 and 1.06, and removes slightly more of the error
# matrices' nuclear norm (0.133 against 0.128). QLoRA's zero start is exactly plain NF4. So at
# step 0 and equal parameters, a rank-31 fit of *every* row's error beats exact float values on
# 64 rows per module here: NF4's error is spread over all rows (the 64 largest-error rows hold
# only 6-54% of a module's error, section 2), and 31 singular directions per layer catch more.
# What the residual start has instead: it is exact on its rows (no SVD, nothing to fit), and
# those rows are the only ones a merge back into 4-bit touches (section 5); a LoftQ adapter
# changes every row of every adapted layer when merged.
#
# Now the rows that will train: inject them into `model` itself, residual start.

# %%
# NBVAL_CHECK_OUTPUT
rs.inject(model, plan, init="residual", reference=float_model)
layer = model.get_submodule(targets[0])
rows = plan.rows[targets[0]]
w_rows = quant.dequantize_weight(layer.base_layer)[rows] + layer.delta.detach()
w_float = float_model.get_submodule(targets[0]).weight[rows]
print(f"{type(layer).__name__} over {type(layer.base_layer).__name__}; trainable {rs.trainable_parameters(model)[0]:,}"
      f" (LoRA at rank {step0['loftq']['rank']}: {step0['loftq']['trainable']:,})")
print("selected rows start at their float values:", torch.allclose(w_rows, w_float, atol=1e-6))
print("QLoRA's zero start computes the plain 4-bit model:", step0["qlora"]["kl"] == step0["plain_4bit"]["kl"])

# %% [markdown]
# ## 4. Train
#
# `rs.train` trains the deltas; the 4-bit base stays frozen (bitsandbytes decodes it in every
# forward). The validation loss is on the answer tokens.

# %%
STEPS, BATCH = (1, 4) if FAST else (20, 8)
result = rs.train(model, data.train, eval_dataset=None if FAST else data.validation, tokenizer=tok,
                  lr=3e-4, max_steps=STEPS, batch_size=BATCH, warmup_steps=0, seed=SEED,
                  logging_steps=1, progress_bar=False)
print(result.summary())

# %% [markdown]
# ## 5. Merge three ways
#
# * `into="float"` (the authors'): dequantize every layer, then $\mathrm{deq}(Q) + S^\top A$
#   exactly — a float model, 8× the bytes of the 4-bit one.
# * `into="4bit"` (the default on a 4-bit base): write $\mathrm{deq}(Q)_{rows} + \Delta W$ into
#   the selected rows and re-quantize only the blocks holding them.
# * `into="requantize"` (QLoRA's merge): dequantize each adapted layer, merge, quantize all of it
#   again.
#
# Each merged model is compared with the **unmerged adapted model** it came from: the KL and
# logit MSE are what the merge itself costs. The blocks column counts NF4 blocks (64 weights)
# in the adapted layers whose stored codes or scale changed.

# %%
def blocks(layer):
    """Per NF4 block of a Linear4bit: its decoded values [n_blocks, 64] and packed bytes [n_blocks, 32]."""
    return (quant.dequantize_weight(layer).reshape(-1, 64),
            layer.weight.data.view(torch.uint8).reshape(-1, 32))

before = {n: blocks(model.get_submodule(n).base_layer) for n in plan.modules}
n_blocks = sum(v.shape[0] for v, _ in before.values())
model.eval()

@torch.no_grad()
def val_loss(m):
    m.eval()
    return float(np.mean([m(**b).loss.item() for b in evals]))

rows_out, untouched_identical, merged_types = [], {}, {}
for into in ("float", "4bit", "requantize"):
    m = rs.merge_and_unload(copy.deepcopy(model), into=into)     # one merged copy at a time
    merged_types[into] = type(m.get_submodule(targets[0])).__name__
    changed = outside_changed = None
    if into != "float":
        changed = outside_changed = 0
        for n in plan.modules:
            v0, p0 = before[n]
            v1, p1 = blocks(m.get_submodule(n))
            diff = (v0 != v1).any(1) | (p0 != p1).any(1)
            d_in = v0.numel() // plan.shapes[n][0]
            in_rows = torch.zeros(plan.shapes[n][0], dtype=torch.bool)
            in_rows[plan.rows[n]] = True
            in_rows = in_rows.repeat_interleave(d_in // 64)      # block -> holds a selected row
            changed += int(diff.sum())
            outside_changed += int((diff & ~in_rows).sum())
        untouched_identical[into] = outside_changed == 0
    e = quant.output_error(model, m, calib)
    rows_out.append({"merge": into, "KL vs adapted": e["kl"], "logit MSE vs adapted": e["logit_mse"],
                     "blocks changed": changed, "of blocks": n_blocks if changed is not None else None,
                     "validation loss": val_loss(m)})
    del m
table = pd.DataFrame(rows_out).set_index("merge")
table.loc["unmerged (adapted)", "validation loss"] = val_loss(model)
table

# %% [markdown]
# What the table shows:

# %%
# NBVAL_CHECK_OUTPUT
sel_blocks = sum(len(plan.rows[n]) * (plan.shapes[n][1] // 64) for n in plan.modules)
print(f"adapted layers hold {n_blocks:,} NF4 blocks; the selected rows hold {sel_blocks:,} of them "
      f"({sel_blocks / n_blocks:.1%})")
print("4bit merge: blocks outside the selected rows bit-identical:", untouched_identical["4bit"])
print("4bit merge: changed blocks <= the selected rows' blocks:", table.loc["4bit", "blocks changed"] <= sel_blocks)
print("requantize merge changes blocks outside the selected rows:", not untouched_identical["requantize"])
print("merged layer types:", merged_types)

# %% [markdown]
# In the committed fast run (2 quantized layers, 1 step): the 4-bit merge changed 3,346 blocks,
# all inside the selected rows' 9,984 blocks (9.0% of 110,592), and every other block kept its
# bytes; QLoRA's requantize changed 110,347 of the 110,592. The float merge is exact (KL 6e-10,
# rounding). The two 4-bit merges cost about the same here — KL 0.0142 (rows) vs 0.0134
# (requantize), logit MSE 0.380 vs 0.412, validation loss 6.037 vs 6.078 against 6.019 unmerged
# (4 validation examples) —
# because after one step the selected rows still hold mostly their residual start, i.e. their
# float values, and writing them back to NF4 gives up that repair in both merges; the blocks
# requantize adds were NF4 values already and move little. At step 0 the residual rows had cut
# the KL to the float model from 0.0547 (plain NF4) to 0.0508 (nuclear-norm ratio 0.128),
# LoftQ at equal parameters to 0.0441 (0.133).
# In section 2 the fast mode's L2 importance is the row norm, which is what NF4's error grows
# with, so its top-64 rows hold nearly as much error as the top-64 error rows (k_proj 0.535 vs
# 0.538); Taylor importance (full mode) is a different signal.
#
# ## What to try next
#
# - **Zero start vs residual start**: inject with `init="zeros"` (QLoRA's start: the rows begin
#   at their 4-bit values) and compare the loss curves.
# - **LoftQ after training**: `rowsft_nb.bench.apply_lora(q_model, plan)` +
#   `rowsft_nb.bench.quant.loftq_init` give the LoRA of section 3; train it for the same steps and compare its merges with
#   `rowsft_nb.bench.quant.merge_errors(model, lora, evals)` (QLoRA's merge requantizes every row).
# - **Pick rows by error**: `rs.select(qerr, rs.FixedRows(64))` selects the rows the residual
#   start repairs most; compare the nuclear-norm ratio and the trained loss with Taylor's rows.
# - **Double quantization off**: `quantize(..., double_quant=False)`; then the 4-bit merge equals
#   quantizing the merged matrix from scratch on the selected rows' blocks, bit for bit.
# - **int8**: `quantize(model, "int8")` keeps one scale per row, so a row merge never touches
#   another row at all.
