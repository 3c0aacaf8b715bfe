"""Tiny random models built from configs in well under a second, offline.

Shared by the tests, the browser-test notebook and quick benchmarks.

Usage::

    model = tiny_llama()                       # LlamaForCausalLM, GQA (4 heads, 2 KV heads)
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
