"""scripts/gpu_check.py (the prepared GPU benchmark) runs on CPU in --tiny mode: every method
of both groups is measured, at equal trainable parameters, and bad input fails clearly."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from rowsft_nb.bench import IMPOSSIBLE

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"
FLOAT = ("floor", "rows_delta", "rows_fused", "rows_fused_shared", "lora", "full")
QUANT = ("nf4_floor", "nf4_rows", "qlora")


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lora_params_per_rank(cfg) -> int:
    """sum(d_in + d_out) over the 7 Linear layers of a LLaMA block, times the layers."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    per_layer = (h + h) * 2 + (h + kv) * 2 + (h + i) * 3   # q, o; k, v; gate, up, down
    return per_layer * cfg["num_hidden_layers"]


@pytest.mark.slow
def test_tiny_quant_run_measures_every_method_at_equal_parameters(gpu_check, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "g.json"
    with torch.random.fork_rng(devices=[]):
        # bf16 weights, as on a GPU (rows and LoRA keep fp32 masters)
        assert gpu_check.main(["--tiny", "--quant", "--weights-dtype", "bfloat16",
                               "--rounds", "3", "--warmup", "1", "--json", str(out)]) == 0
    info = json.loads(out.read_text())
    result = info["models"]["tiny"]
    per_rank = _lora_params_per_rank(gpu_check.CONFIGS["tiny"])
    plan = result["plan"]
    assert plan["lora_parameters_per_rank"] == per_rank
    assert plan["lora_rank"] == max(1, round(plan["parameters"] / per_rank))
    # the default budget: LoRA rank 4 on every planned module
    assert plan["parameters"] <= 4 * per_rank and plan["lora_rank"] == 4

    groups = result["groups"]
    assert list(groups["float"]["methods"]) == list(FLOAT)
    assert list(groups["nf4"]["methods"]) == list(QUANT)
    rows = {**groups["float"]["methods"], **groups["nf4"]["methods"]}
    for name, r in rows.items():
        assert math.isfinite(r["peak_bytes"]) and r["peak_bytes"] > 0, name
        assert math.isfinite(r["step_s"]) and r["step_s"] > 0, name
        assert r["verdict"] in ("ok", IMPOSSIBLE), name
        for g in groups.values():
            if name in g["methods"]:
                assert len(g["timing"]["samples"][name]["wall"]) == 3
    # equal trainable parameters: rows exactly the plan's, LoRA/QLoRA rank x sum(d_in + d_out)
    for name in ("rows_delta", "rows_fused", "rows_fused_shared", "nf4_rows"):
        assert rows[name]["trainable"] == plan["parameters"], name
    for name in ("lora", "qlora"):
        assert rows[name]["trainable"] == plan["lora_rank"] * per_rank, name
        assert abs(rows[name]["trainable"] - plan["parameters"]) <= per_rank / 2
    assert rows["floor"]["trainable"] == rows["nf4_floor"]["trainable"] == 0
    assert rows["full"]["trainable"] == rows["full"]["total"]
    # each row method is the layer form it claims
    n = plan["modules"]
    assert rows["rows_delta"]["layer_modes"] == {"delta": n}
    assert rows["rows_fused"]["layer_modes"] == {"fused": n}
    assert rows["rows_fused"]["shared_producers"] == 0
    assert rows["rows_fused_shared"]["layer_modes"] == {"fused": n}
    assert rows["rows_fused_shared"]["shared_producers"] > 0
    assert rows["nf4_rows"]["layer_modes"] == {"delta": n}   # quantized base: delta path
    for name in ("rows_delta", "rows_fused", "rows_fused_shared", "nf4_rows", "lora", "qlora"):
        assert rows[name]["trainable_dtypes"] == ["float32"], name
    assert rows["full"]["trainable_dtypes"] == ["bfloat16"]
    # memory above the floor: full fine-tuning holds AdamW's two bf16 moments for every weight
    assert rows["full"]["above_floor_bytes"] >= 4 * rows["full"]["trainable"]
    assert rows["full"]["above_floor_bytes"] > rows["lora"]["above_floor_bytes"] > 0
    assert rows["floor"]["above_floor_bytes"] == rows["nf4_floor"]["above_floor_bytes"] == 0
    # ratios are per-round ratios against the group's own floor and LoRA
    assert rows["floor"]["x_floor"]["median"] == rows["nf4_floor"]["x_floor"]["median"] == 1.0
    assert rows["lora"]["x_lora"]["median"] == rows["qlora"]["x_lora"]["median"] == 1.0
    assert rows["lora"]["above_floor_x_lora"] == 1.0
    assert result["score"]["metric"] == "taylor" and result["score"]["seconds"] > 0
    assert [p["phase"] for p in info["phases"]][0] == "tiny: load"


def test_unknown_model_or_method_fails_clearly(gpu_check, capsys):
    with pytest.raises(SystemExit) as err:
        gpu_check.main(["--model", "nonsense"])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert "unknown model 'nonsense'" in msg and "smollm2, llama1b" in msg and "--tiny" in msg
    with pytest.raises(SystemExit):
        gpu_check.main(["--tiny", "--methods", "floor,dora"])
    assert "unknown method 'dora'" in capsys.readouterr().err


def test_without_cuda_it_says_so(gpu_check, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: the full run is the GPU benchmark itself")
    assert gpu_check.main(["--model", "llama1b"]) == 2
    assert "CUDA is not available; run with --tiny" in capsys.readouterr().err


@pytest.mark.parametrize("name, published", [("smollm2", 134_515_008),
                                             ("llama1b", 1_235_814_400)])
def test_random_models_have_the_published_sizes(gpu_check, name, published):
    # SmolLM2-135M and Llama-3.2-1B parameter counts (tied embeddings), built on meta
    model = gpu_check.random_llama(name, 0, "meta", torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == published
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
