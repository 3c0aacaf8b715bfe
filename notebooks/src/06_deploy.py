# %% [markdown]
# # 06 · Deploy: save, reload, merge
#
# A trained row-sparse adapter is small: the deltas of the selected rows, their indices and any
# fully trained head. This notebook follows one adapter through its life:
#
# 1. train briefly and **save** it (`save_adapter`),
# 2. **reload** it onto a fresh base model (`load_adapter`),
# 3. **merge** it into the weights (`merge_and_unload`: `W0[rows] += ΔW`, exact) and check the
#    outputs match,
# 4. look inside the files and compare their size with a LoRA adapter of the same parameter count
#    and with the full model.

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
data = prepare_task("movie_sentiment", tok, max_length=48, n_train=96 if FAST else 1000,
                    n_eval=32, seed=0)
report = rs.score(model, metric="l2")              # any report works here; l2 needs no data
plan = rs.select(report, rs.Ratio(0.05))
rs.inject(model, plan)
result = rs.train(model, data.train, tokenizer=tok, lr=2e-3, max_steps=6 if FAST else 60,
                  batch_size=16, seed=0, progress_bar=False)
print(result.summary())

# %% [markdown]
# ## 1. Save
#
# Two files: `adapter_model.safetensors` (tensors) and `adapter_config.json` (everything needed to
# rebuild the adapter: the plan, the base model class and a hash of its weights, dtypes, options).

# %%
adapter_dir = rs.save_adapter(model, OUT / "deploy_adapter")
for f in sorted(adapter_dir.iterdir()):
    print(f"{f.name:28s} {f.stat().st_size:>12,} bytes")

# %%
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

# %% [markdown]
# Per adapted module: `<name>.row_index` (which rows, int64) and `<name>.delta` (`[r, d_in]`, the
# trained values); the new classifier head is stored whole under `heads.`.
#
# ## 2. Reload onto a fresh base model
#
# `load_encoder(seed=0)` rebuilds the same base model (the same pretrained weights and the same
# seeded classifier initialisation). `load_adapter` checks the shapes and the base-weights hash,
# injects the plan, and loads the tensors bit-exactly.

# %%
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

# %%
# NBVAL_CHECK_OUTPUT

diff_reload = (reloaded_logits - trained_logits).abs().max().item()
print(f"max abs diff, reloaded vs trained: {diff_reload:.1e}")
print("reloaded outputs match:", diff_reload == 0.0)
print("training changed the outputs:", (trained_logits - base_logits).abs().max().item() > 1e-3)

# %% [markdown]
# ## 3. Merge into the weights
#
# `merge_and_unload` adds each delta into its rows of the frozen weight and puts the plain
# `nn.Linear` layers back: the result is an ordinary `BertForSequenceClassification` with no
# adapter code and no extra compute at inference. Only the planned rows of each weight change.

# %%
from rowsft_nb.targets import row_weight

base_weights = {n: row_weight(m.base_layer).detach().clone()
                for n, m in rs.adapter.adapted_modules(reloaded).items()}
merged = rs.merge_and_unload(reloaded)
with torch.no_grad():
    merged_logits = merged(**batch).logits
modules = dict(merged.named_modules())
changed = {n: torch.nonzero((row_weight(modules[n]) != w).any(1)).flatten() for n, w in base_weights.items()}
print(type(merged).__name__, "| adapter layers left:", len(rs.adapter.adapted_modules(merged)))

# %%
diff_merge = (merged_logits - trained_logits).abs().max().item()
print(f"max abs diff, merged vs trained: {diff_merge:.1e}   (float32 rounding: W0 + dW is summed once)")

# %%
# NBVAL_CHECK_OUTPUT

print("outputs match:", diff_merge < 1e-4)
print("every changed row is a planned row:",
      all(set(changed[n].tolist()) <= set(plan.rows[n].tolist()) for n in changed))

# %% [markdown]
# The merged model saves and loads like any Hugging Face model (`merged.save_pretrained(...)`),
# and because only `r` rows of each matrix changed, it can be re-quantized row by row with little
# error.
#
# ## 4. How big is it, next to LoRA and the full model?
#
# A LoRA adapter with the same number of trainable parameters: PEFT LoRA on the same modules at the
# plan's equivalent rank (rounded), with the classifier head saved too (`modules_to_save`), written
# with `save_pretrained` (safetensors). Untrained — the file size does not depend on the values.

# %%
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

# %%
# NBVAL_CHECK_OUTPUT

rowsft_trainable = config["trainable_parameters"]
print(f"row-sparse adapter: {rowsft_trainable:,} trainable parameters")
print(f"LoRA rank {rank}:       {lora_trainable:,} trainable parameters")
print(f"full model:         {sum(p.numel() for p in merged.parameters()):,} parameters")


# %%
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

# %% [markdown]
# Both adapters store 4 bytes per fp32 value; the row-sparse file adds 8 bytes per selected row for
# its int64 index, LoRA adds nothing but needs `r · (d_in + d_out)` values per module where
# row-sparse needs `r · d_in`. The full model is two orders of magnitude larger. The row-sparse
# config is bigger because it carries the plan (every selected row index, human-readable).
#
# ## What to try next
#
# - Reload the quickstart's adapter (`outputs/quickstart_adapter`, written by
#   [01_quickstart](01_quickstart.ipynb)) the same way.
# - Load the adapter onto a base with a different classifier seed: `load_adapter` restores the
#   trained head, so the outputs still match. Then try a base with different weights and read the
#   warning about the weights hash.
# - `rs.merge(model)` / `rs.unmerge(model)` fold the deltas in and out while keeping the adapter —
#   handy to compare merged and unmerged speed.
# - Save the merged model in bf16 (`merged.to(torch.bfloat16).save_pretrained(...)`) and measure
#   how much the outputs move.
