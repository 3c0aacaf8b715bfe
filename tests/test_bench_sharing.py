"""benchmarks/bench_sharing.py: per-family memory of fused rows and activation sharing.

The saved-byte drops are checked against what the shapes say sharing recomputes, worked out
here by hand from the bench's configs (hidden 128, 2 layers; LLaMA MLP width 344, BERT 512)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from torch import nn

from rowsft_nb.adapter import fused as fused_mod

pytest.importorskip("peft")  # the LoRA baseline (the 'bench' extra; make install installs it)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the runner's modules (not part of the package)

import bench_sharing  # noqa: E402

B, S, H, L = 2, 16, 128, 2  # batch, tokens, hidden, layers
FP32 = 4


@pytest.fixture(scope="module")
def result():
    return bench_sharing.run(["llama", "bert", "gpt2"], batch_size=B, seq_len=S, threads=None)


def test_fused_sharing_saves_less_than_delta_rows_and_matches_its_gradients(result):
    for fam in ("llama", "bert"):
        r = result["families"][fam]
        m = r["methods"]
        assert m["fused_shared"]["saved"] < m["delta"]["saved"], fam
        assert m["fused_shared"]["overhead"] < m["delta"]["overhead"], fam
        assert m["fused_shared"]["over_lora"] == pytest.approx(
            m["fused_shared"]["overhead"] / m["lora"]["overhead"])
        assert r["check"]["ok"], (fam, r["check"])
        assert r["delta_modules"] == {}  # plain fp32 Linear everywhere: every module fused
    assert "apply" not in vars(fused_mod._FusedRows)  # the recorder put the class back


def test_saved_bytes_drop_by_the_recomputed_inputs(result):
    tokens = B * S
    # LLaMA (MLP width 344): per layer the down-projection input, the post-attention norm
    # (gate/up input); layer 1's input norm (q/k/v); layer 0's reads the frozen embeddings
    llama = result["families"]["llama"]
    down = L * tokens * 344 * FP32
    assert llama["saved_drop_vs_delta"] >= down
    assert llama["saved_drop_vs_delta"] == down + (2 * L - 1) * tokens * H * FP32
    # BERT (width 512): per layer the GELU output and the attention-output LayerNorm; layer
    # 0's output LayerNorm feeds layer 1's q/k/v (layer 1's feeds the pooler through a slice)
    bert = result["families"]["bert"]
    gelu = L * tokens * 512 * FP32
    assert bert["saved_drop_vs_delta"] >= gelu
    assert bert["saved_drop_vs_delta"] == gelu + (2 * L - 1) * tokens * H * FP32
    for fam in ("llama", "bert"):
        r = result["families"][fam]
        assert r["down_input_lower_bound"] == (down if fam == "llama" else gelu)
        assert r["saved_drop_vs_delta"] == r["recomputed_input_bytes"]   # all of it, no more
        assert r["saved_drop_vs_fused"] == r["saved_drop_vs_delta"]
        assert f"{'model.layers' if fam == 'llama' else 'bert.encoder.layer'}.1." in \
            " ".join(r["recomputed"])


def test_control_gpt2_shares_only_its_layer_norms(result):
    r = result["families"]["gpt2"]
    model = bench_sharing.build_model("gpt2")
    norms = sorted(n for n, m in model.named_modules() if type(m) is nn.LayerNorm)
    assert sorted(r["shared_producers"]) == norms        # no MLP producer: GPT2MLP is unknown
    # consumers of a LayerNorm whose input requires grad; c_proj inputs are saved as before
    assert r["recomputed"] == ["transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_attn",
                               "transformer.h.1.mlp.c_fc"]
    assert not any(n.endswith("c_proj") for n in r["recomputed"])
    assert r["saved_drop_vs_delta"] == 3 * B * S * H * FP32
    assert r["down_input_lower_bound"] == 0 and r["check"]["ok"]


def test_main_writes_json_and_markdown(tmp_path):
    out = tmp_path / "sharing.json"
    assert bench_sharing.main(["--families", "phi3", "--batch-size", "2", "--seq-len", "8",
                               "--threads", "0", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    phi3 = data["families"]["phi3"]
    assert phi3["shared_producers"] == [] and phi3["recomputed"] == []   # nothing known
    assert phi3["methods"]["fused_shared"]["saved"] == phi3["methods"]["fused"]["saved"]
    md = out.with_suffix(".md").read_text()
    assert "| phi3 (control" in md and "bench_sharing.py" in md


def test_unknown_family_is_refused_before_any_work():
    with pytest.raises(ValueError, match="unknown families"):
        bench_sharing.run(["llama", "nope"])


def test_vision_floor_backpropagates_to_the_pixels():
    from rowsft_nb.bench import forward_loss, measure_memory
    from rowsft_nb.testing import random_batches, tiny_vit

    model = tiny_vit()
    batch = random_batches(model, n=1, batch_size=2)[0]
    assert float(forward_loss(model, batch, floor=True)) == float(model(**batch).loss)
    # a frozen model whose input needs no grad saves nothing; the floor's backward reaches
    # the pixels, so at least the patch convolution's input (the pixels) is saved
    assert measure_memory(model, batch, "floor").saved >= batch["pixel_values"].numel() * FP32
