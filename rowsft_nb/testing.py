"""Tiny random models built from configs in well under a second, offline.

Shared by the tests, the browser-test notebook and quick benchmarks.

Usage::

    model = tiny_llama()                       # LlamaForCausalLM, GQA (4 heads, 2 KV heads)
    model = tiny_model("gpt_neox")             # any of ARCHITECTURES (13 model families)
    batches = random_batches(model, n=4)       # list of dicts with input_ids/attention_mask/labels
"""
from __future__ import annotations

import torch
from torch import nn

VOCAB = 128


def _seeded(build, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.eval()


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2) -> nn.Module:
    """LlamaForCausalLM: hidden 64, 2 layers, 4 heads, 2 KV heads (GQA), vocab 128."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden + 16,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=False)
    return _seeded(lambda: LlamaForCausalLM(cfg), seed)


def tiny_bert(seed: int = 0, num_labels: int = 2) -> nn.Module:
    """BertForSequenceClassification: hidden 32, 2 layers, 4 heads, vocab 128."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _seeded(lambda: BertForSequenceClassification(cfg), seed)


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """GPT2LMHeadModel: n_embd 32, 2 layers; projections are Conv1D with weight [in, out]."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=0, eos_token_id=0)
    return _seeded(lambda: GPT2LMHeadModel(cfg), seed)


def tiny_vit(seed: int = 0, num_labels: int = 3) -> nn.Module:
    """ViTForImageClassification: 16x16 images, patch 4, hidden 32, 2 layers."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                    num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    num_labels=num_labels, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)
    return _seeded(lambda: ViTForImageClassification(cfg), seed)


def _tiny_from_config(model_cls: str, config_cls: str, seed: int, **kwargs) -> nn.Module:
    import transformers

    cfg = getattr(transformers, config_cls)(**kwargs)
    return _seeded(lambda: getattr(transformers, model_cls)(cfg), seed)


_LM = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=4, max_position_embeddings=64)
_NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

# architecture -> (model class, config class, config kwargs): tiny random models (hidden 32,
# 2 layers, 4 heads, vocab 128), no dropout so that outputs are deterministic in train mode.
TINY_CONFIGS: dict[str, tuple[str, str, dict]] = {
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig",
                 dict(_LM, rotary_pct=0.5, hidden_dropout=0.0, attention_dropout=0.0,
                      use_parallel_residual=True, tie_word_embeddings=False)),
    "phi3": ("Phi3ForCausalLM", "Phi3Config",
             dict(_LM, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=False)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config",
              dict(_LM, num_key_value_heads=2, tie_word_embeddings=False)),
    "mistral": ("MistralForCausalLM", "MistralConfig",
                dict(_LM, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig",
               dict(_LM, num_key_value_heads=2, head_dim=16, sliding_window=16,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "opt": ("OPTForCausalLM", "OPTConfig",
            dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                 dropout=0.0, attention_dropout=0.0, pad_token_id=1, bos_token_id=2,
                 eos_token_id=2)),
    "falcon": ("FalconForCausalLM", "FalconConfig",
               dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    multi_query=True, new_decoder_architecture=False, parallel_attn=True,
                    hidden_dropout=0.0, attention_dropout=0.0, bos_token_id=1,
                    eos_token_id=2)),
    "t5": ("T5ForConditionalGeneration", "T5Config",
           dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                relative_attention_num_buckets=8, dropout_rate=0.0,
                feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0,
                eos_token_id=1, tie_word_embeddings=False)),
    "roberta": ("RobertaForSequenceClassification", "RobertaConfig",
                dict(_LM, num_labels=2, pad_token_id=1, **_NO_DROPOUT)),
    "distilbert": ("DistilBertForSequenceClassification", "DistilBertConfig",
                   dict(vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=2, n_heads=4,
                        max_position_embeddings=64, num_labels=2, dropout=0.0,
                        attention_dropout=0.0, seq_classif_dropout=0.0)),
}
ARCHITECTURES = ("gpt2", "gpt_neox", "phi3", "qwen2", "mistral", "gemma3", "opt", "falcon",
                 "t5", "roberta", "distilbert", "vit", "llama")


def tiny_model(arch: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny random model of one of :data:`ARCHITECTURES`, built from a config (offline).
    ``overrides`` change config fields, e.g.
    ``tiny_model("falcon", new_decoder_architecture=True, num_kv_heads=2)``.

    Usage: ``model = tiny_model("gpt_neox")``
    """
    if arch in ("llama", "gpt2", "vit", "bert") and not overrides:
        return globals()[f"tiny_{arch}"](seed)
    if arch not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of "
                         f"{sorted(set(ARCHITECTURES) | set(TINY_CONFIGS))}")
    model_cls, config_cls, kwargs = TINY_CONFIGS[arch]
    return _tiny_from_config(model_cls, config_cls, seed, **{**kwargs, **overrides})


def random_batches(model: nn.Module, n: int = 4, batch_size: int = 4, seq_len: int = 16,
                   seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` random batches that fit ``model``: token ids (or pixels for ViT) with labels
    (next-token labels for causal LMs, class ids for classifiers)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    out = []
    for _ in range(n):
        if getattr(cfg, "model_type", "") == "vit":
            pixels = torch.randn(batch_size, 3, cfg.image_size, cfg.image_size, generator=g)
            labels = torch.randint(0, cfg.num_labels, (batch_size,), generator=g)
            out.append({"pixel_values": pixels, "labels": labels})
            continue
        ids = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if type(model).__name__.endswith("ForSequenceClassification"):
            batch["labels"] = torch.randint(0, cfg.num_labels, (batch_size,), generator=g)
        else:
            batch["labels"] = ids.clone()
        out.append(batch)
    return out


def synthetic_report(shapes: dict[str, tuple[int, int]], seed: int = 0,
                     groups: dict[str, int] | None = None, metric: str = "random",
                     model_parameters: int | None = None,
                     model_class: str = "SyntheticModel") -> "ImportanceReport":
    """An ImportanceReport with random positive scores for the given ``{name: (d_out, d_in)}``
    shapes (rows and input columns), built without any model; for selection tests/benches.

    Usage: ``report = synthetic_report({"layers.0.q_proj": (64, 32)}, seed=1)``
    """
    from .scoring.report import ImportanceReport

    shapes = {k: (int(v[0]), int(v[1])) for k, v in shapes.items()}
    g = torch.Generator().manual_seed(seed)
    n_rows = [s[0] for s in shapes.values()]
    n_cols = [s[1] for s in shapes.values()]
    # One draw for all modules, then views: fast for millions of rows. Values in (0, 1].
    rows = (1.0 - torch.rand(sum(n_rows), generator=g)).split(n_rows)
    cols = (1.0 - torch.rand(sum(n_cols), generator=g)).split(n_cols)
    if model_parameters is None:
        model_parameters = sum(o * i for o, i in shapes.values())
    return ImportanceReport(
        scores=dict(zip(shapes, rows)), shapes=shapes, metric=metric,
        column_scores=dict(zip(shapes, cols)), head_dims=dict(groups or {}),
        meta={"metric": metric, "n_samples": 0, "n_tokens": 0, "seconds": 0.0,
              "model_class": model_class, "model_hash": f"synthetic-{seed}",
              "model_parameters": int(model_parameters), "seed": seed,
              "targets": list(shapes)})


def llama2_7b_report(seed: int = 0) -> "ImportanceReport":
    """Random-score ImportanceReport with Llama-2-7B shapes: 32 layers of q/k/v/o (4096 x 4096),
    gate/up (11008 x 4096), down (4096 x 11008); groups of 128 rows (heads) for q/k/v.

    Usage: ``report = llama2_7b_report()``  # ~1.4 M rows, builds in well under a second
    """
    shapes: dict[str, tuple[int, int]] = {}
    groups: dict[str, int] = {}
    for i in range(32):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"model.layers.{i}.self_attn.{p}"] = (4096, 4096)
        for p in ("q_proj", "k_proj", "v_proj"):
            groups[f"model.layers.{i}.self_attn.{p}"] = 128
        shapes[f"model.layers.{i}.mlp.gate_proj"] = (11008, 4096)
        shapes[f"model.layers.{i}.mlp.up_proj"] = (11008, 4096)
        shapes[f"model.layers.{i}.mlp.down_proj"] = (4096, 11008)
    return synthetic_report(shapes, seed=seed, groups=groups, model_parameters=6_738_415_616,
                            model_class="LlamaForCausalLM")
