"""Fused row mode (rowsft_nb.adapter.fused) and activation sharing (adapter.sharing):
mode choice and fallbacks, gradients against a dense W0 + scatter(dW) reference, every
promise of the delta path (step 0, merge/unmerge, save/load, unload, hash, state_dict,
accumulation, checkpointing, compile, half precision) and the exact saved-for-backward bytes
that sharing removes."""
import copy
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from rowsft_nb import testing
from rowsft_nb.adapter import (FusedRowLinear, RowSparseLinear, adapted_modules, adapter_modes,
                               adapter_state, inject, load_adapter, merge, merge_and_unload,
                               save_adapter, unload, unmerge)
from rowsft_nb.adapter.sharing import unshare_activations
from rowsft_nb.plan import RowPlan
from rowsft_nb.profiling import saved_tensor_bytes
from rowsft_nb.targets import Conv1D, find_targets, linear_shape, model_fingerprint, row_weight


def _plan(model, r=3, seed=0, columns=()):
    mods = dict(model.named_modules())
    names = find_targets(model)
    g = torch.Generator().manual_seed(seed)
    rows = {n: torch.randperm(linear_shape(mods[n])[0], generator=g)[:r].sort().values
            for n in names}
    cols = {n: [0, 1] for n in columns}
    return RowPlan(rows=rows, columns=cols, shapes={n: linear_shape(mods[n]) for n in names})


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _train(model, batch, steps=2, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.0)
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


# ---------------------------------------------------------------------------- modes
def test_auto_mode_fuses_where_exact_and_falls_back_elsewhere():
    model = testing.tiny_llama()
    mlp1 = model.model.layers[1].mlp
    model.model.layers[0].mlp.up_proj.weight = mlp1.up_proj.weight          # tied weights
    plan = _plan(model, columns=["model.layers.0.self_attn.q_proj"])
    inject(model, plan)
    modes = adapter_modes(model)
    assert modes["model.layers.0.self_attn.q_proj"] == "delta: column deltas"
    assert modes["model.layers.0.mlp.up_proj"].startswith("delta: weight is shared")
    assert modes["model.layers.1.mlp.up_proj"].startswith("delta: weight is shared")
    assert modes["model.layers.1.mlp.down_proj"] == "fused"
    layers = adapted_modules(model)
    assert type(layers["model.layers.0.mlp.up_proj"]) is RowSparseLinear
    assert isinstance(layers["model.layers.1.mlp.down_proj"], FusedRowLinear)
    assert "mode=fused" in repr(layers["model.layers.1.mlp.down_proj"])
    assert "mode=delta" in repr(layers["model.layers.0.mlp.up_proj"])
    assert adapter_state(model).modes["model.layers.1.mlp.down_proj"] is None


def test_dropout_bias_delta_mode_and_subclassed_bases_take_the_delta_path():
    for kwargs, why in [({"dropout": 0.1}, "dropout"), ({"bias": True}, "bias deltas"),
                        ({"mode": "delta"}, "mode='delta'")]:
        model = testing.tiny_llama()
        inject(model, _plan(model), **kwargs)
        assert all(why in v for v in adapter_modes(model).values()), (kwargs, adapter_modes(model))

    class QuantLinear(nn.Linear):  # stands for bitsandbytes Linear4bit etc.
        pass

    model = testing.tiny_llama()
    old = model.model.layers[0].mlp.down_proj
    q = QuantLinear(old.in_features, old.out_features, bias=False)
    q.weight = old.weight
    model.model.layers[0].mlp.down_proj = q
    inject(model, _plan(model))
    assert "not a plain nn.Linear" in adapter_modes(model)["model.layers.0.mlp.down_proj"]


def test_mode_fused_refuses_before_changing_anything_and_unknown_mode():
    model = testing.tiny_llama()
    before = copy.deepcopy(model.state_dict())
    plan = _plan(model, columns=["model.layers.1.self_attn.v_proj"])
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.v_proj.*column deltas"):
        inject(model, plan, mode="fused")
    with pytest.raises(ValueError, match="mode must be one of"):
        inject(model, plan, mode="fast")
    assert not any(isinstance(m, RowSparseLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("conv1d", [False, True])
def test_gradients_match_dense_reference(conv1d):
    torch.manual_seed(0)
    d_in, d_out = 24, 16
    base = Conv1D(d_out, d_in) if conv1d else nn.Linear(d_in, d_out)
    nn.init.normal_(base.weight)
    nn.init.normal_(base.bias)
    w0 = row_weight(base).detach().clone()
    rows = torch.tensor([1, 5, 6, 13])
    layer = FusedRowLinear(base, rows=rows)
    with torch.no_grad():
        layer.delta.normal_()
    x = torch.randn(3, 7, d_in, requires_grad=True)
    g = torch.randn(3, 7, d_out)
    layer(x).backward(g)

    delta = layer.delta.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    dense = w0 + torch.zeros_like(w0).index_copy(0, rows, delta)   # W0 + scatter(dW)
    y_ref = F.linear(xr, dense, base.bias)
    y_ref.backward(g)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y_ref, rtol=1e-6, atol=1e-6)
        if not conv1d:   # one F.linear with the dense weight: the same bits
            assert torch.equal(layer(x), y_ref)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.delta.grad, delta.grad, rtol=1e-6, atol=1e-6)
    assert base.weight.grad is None


# ---------------------------------------------------------------------------- promises
def test_step0_train_merge_save_load_unload_state_dict_and_hash(tmp_path):
    model = testing.tiny_llama()
    base = copy.deepcopy(model)
    original = copy.deepcopy(model.state_dict())
    h0 = model_fingerprint(model)
    batch = testing.random_batches(model, n=1)[0]
    inject(model, _plan(model))
    assert set(adapter_modes(model).values()) == {"fused"}
    model.train()
    base.train()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base(**batch).logits)   # zero init: bit-equal
    _train(model, batch)
    layer = adapted_modules(model)["model.layers.0.mlp.down_proj"]
    assert layer.fused and layer.delta.abs().sum() > 0
    with torch.no_grad():
        out = model(**batch).logits
    # the hash and state_dict see the ORIGINAL base weights, never the fused ones
    assert model_fingerprint(model) == h0
    sd = model.state_dict()
    for k, v in sd.items():
        if ".base_layer." in k:
            assert torch.equal(v, original[k.replace(".base_layer", "")]), k
    assert not layer.fused
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, out)   # fuses again on the next forward
    # load_state_dict into a fresh adapted model gives the same model
    other = inject(copy.deepcopy(base), _plan(base))
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(other(**batch).logits, out)
    # merge writes the same W0[rows] + dW the forward used: bit-equal; unmerge restores W0
    merge(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, out)
    unmerge(model)
    assert all(torch.equal(row_weight(m.base_layer),
                           row_weight(dict(base.named_modules())[n]))
               for n, m in adapted_modules(model).items())
    # save_adapter saves dW; load_adapter on a fresh base reproduces the outputs bit-exactly
    save_adapter(model, tmp_path / "a")
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "a")
    for n, m in adapted_modules(loaded).items():
        assert torch.equal(m.delta, adapted_modules(model)[n].delta)
    loaded.train()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, out)
    merged = merge_and_unload(copy.deepcopy(model))
    with torch.no_grad():
        assert torch.equal(merged(**batch).logits, out)
    # unload: base weights exactly as before inject, also right after a fused forward
    with torch.no_grad():
        model(**batch)
    unload(model)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    assert model_fingerprint(model) == h0


def test_fused_optimizer_kernels_that_skip_the_version_counter_still_update_the_forward():
    model = testing.tiny_llama()
    batch = testing.random_batches(model, n=1)[0]
    plan = _plan(model)
    inject(model, plan)
    ref = inject(testing.tiny_llama(), plan, mode="delta")
    for m in (model, ref):
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2,
                                fused=True)
        for _ in range(2):
            m(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
    layer = adapted_modules(model)["model.layers.0.mlp.down_proj"]
    assert layer.delta._version == 0 and layer.delta.abs().sum() > 0   # no version bump
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref(**batch).logits, rtol=1e-5,
                                   atol=1e-6)


def test_two_forwards_then_one_backward_and_a_restore_in_between_raises():
    model = testing.tiny_llama()
    batch = testing.random_batches(model, n=2)
    plan = _plan(model)
    inject(model, plan, init="kaiming")
    ref = inject(testing.tiny_llama(), plan, mode="delta", init="kaiming")
    for m in (model, ref):
        m.train()
        (m(**batch[0]).loss + m(**batch[1]).loss).backward()   # rewrites W between forwards
    got, want = _grads(model), _grads(ref)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7)
    loss = model(**batch[0]).loss
    model.state_dict()          # puts W0[rows] back: the graph's weight changed in place
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_hooks_on_base_layer_take_the_delta_path_with_original_weights():
    model = testing.tiny_llama()
    batch = testing.random_batches(model, n=1)[0]
    inject(model, _plan(model))
    _train(model, batch, steps=1)
    with torch.no_grad():
        out = model(**batch).logits
    layer = adapted_modules(model)["model.layers.1.mlp.down_proj"]
    seen = []
    handle = layer.base_layer.register_forward_hook(
        lambda mod, inp, o: seen.append(torch.equal(row_weight(mod)[layer.rows],
                                                    layer.base_rows)))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, out, rtol=1e-5, atol=1e-6)
    handle.remove()
    assert seen == [True]   # the hook saw W0, as on the delta path


def test_gradient_accumulation_and_activation_checkpointing_match():
    def grads(mode="auto", checkpoint=None, halves=False):
        model = testing.tiny_llama()
        batch = testing.random_batches(model, n=1, batch_size=4)[0]
        inject(model, _plan(model), mode=mode, init="kaiming")
        model.train()
        if checkpoint is not None:
            model.gradient_checkpointing_enable({"use_reentrant": checkpoint})
            model.enable_input_require_grads()
        if halves:
            for part in (slice(0, 2), slice(2, 4)):
                (model(**{k: v[part] for k, v in batch.items()}).loss / 2).backward()
        else:
            model(**batch).loss.backward()
        return {n: g for n, g in _grads(model).items() if n.endswith("delta")}

    ref = grads()
    assert len(ref) == 14 and all(g.abs().sum() > 0 for g in ref.values())
    for kwargs in ({"mode": "delta"}, {"halves": True}, {"checkpoint": True},
                   {"checkpoint": False}):
        got = grads(**kwargs)
        assert got.keys() == ref.keys()
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7, msg=f"{kwargs} {n}")


def test_torch_compile_tiny():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    for p in net.parameters():
        p.requires_grad_(False)
    net[2] = FusedRowLinear(net[2], rows=[0, 3])
    eager = copy.deepcopy(net)
    compiled = torch.compile(net, backend="aot_eager")
    x = torch.randn(5, 8)
    opt = torch.optim.SGD([net[2].delta], lr=0.5)
    opt_e = torch.optim.SGD([eager[2].delta], lr=0.5)
    for _ in range(2):   # the second step runs with the dW the optimizer wrote
        compiled(x).square().sum().backward()
        eager(x).square().sum().backward()
        torch.testing.assert_close(net[2].delta.grad, eager[2].delta.grad)
        opt.step()
        opt_e.step()
        opt.zero_grad()
        opt_e.zero_grad()
    assert net[2].delta.abs().sum() > 0
    torch.testing.assert_close(compiled(x), eager(x))


def test_half_precision_forward_sees_deployed_weight_and_fp32_master_rows_move():
    model = testing.tiny_llama().to(torch.bfloat16)
    batch = testing.random_batches(model, n=1)[0]
    inject(model, _plan(model))
    layer = adapted_modules(model)["model.layers.1.mlp.down_proj"]
    assert layer.delta.dtype == torch.float32 and layer.base_rows.dtype == torch.bfloat16
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    model.train()
    history = []
    for _ in range(3):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        history.append(layer.delta.detach().clone())
        with torch.no_grad():
            model(**batch)
        w = row_weight(layer.base_layer)[layer.rows]
        # the forward sees bf16(W0[rows] + dW): the deployed (merged) weight
        assert torch.equal(w, (layer.base_rows.float() + layer.delta).to(torch.bfloat16))
    # updates far below a bf16 step still accumulate in the fp32 master rows
    assert 0 < history[0].abs().max() < 1e-5
    assert (history[2] - history[1]).abs().sum() > 0
    assert torch.equal(row_weight(layer.base_layer)[layer.rows], layer.base_rows)


# ---------------------------------------------------------------------------- sharing
# Inputs no longer saved per token (fp32), with hidden h and MLP width f. LLaMA (h 64, f 144):
# layer 0: post-attention norm (gate/up input) h + down input f; layer 1: input norm (q/k/v) h
# + post-attention norm h + down f. (Layer 0's input norm reads the embeddings, which do not
# require grad: the frozen graph saves nothing there, so x is saved as before.) BERT (h 32,
# f 64): per layer attention-output LayerNorm h + GELU input f, and layer 0's output LayerNorm
# feeding layer 1's q/k/v h; the last one feeds the pooler through a slice: not shared.
@pytest.mark.parametrize("arch,producers,per_token", [
    ("llama", ["model.layers.{}.input_layernorm", "model.layers.{}.mlp",
               "model.layers.{}.post_attention_layernorm"], 3 * 64 + 2 * 144),
    # Gemma 3 (h 32, f 64): as LLaMA, its MLP input norm is pre_feedforward_layernorm
    ("gemma3", ["model.layers.{}.input_layernorm", "model.layers.{}.mlp",
                "model.layers.{}.pre_feedforward_layernorm"], 3 * 32 + 2 * 64),
    ("bert", ["bert.encoder.layer.{}.attention.output.LayerNorm",
              "bert.encoder.layer.{}.intermediate", "bert.encoder.layer.{}.output.LayerNorm"],
     3 * 32 + 2 * 64)])
def test_sharing_saves_exactly_the_recomputed_inputs_and_keeps_gradients(arch, producers,
                                                                          per_token):
    def run(share):
        model = testing.tiny_model(arch)
        batch = testing.random_batches(model, n=1, batch_size=2, seq_len=8)[0]
        inject(model, _plan(model), init="kaiming", sharing=share)
        state = adapter_state(model)
        if share:
            assert set(p.format(i) for p in producers for i in (0, 1)) <= set(state.shared)
        else:   # sharing=False: no producer forward replaced
            assert state.shared == []
            assert not any("forward" in vars(m) for m in model.modules())
        model.train()
        saved = saved_tensor_bytes(lambda: model(**batch).loss,
                                   [*model.parameters(), *model.buffers()])
        model(**batch).loss.backward()
        return saved, _grads(model)

    (plain, g_plain), (shared, g_shared) = run(False), run(True)
    assert plain - shared == 2 * 8 * per_token * 4          # batch 2 x seq 8 tokens, fp32
    assert g_plain.keys() == g_shared.keys()
    assert all(torch.equal(g_plain[n], g_shared[n]) for n in g_plain)   # recompute is exact


def test_sharing_flag_is_checked_before_the_model_changes_and_unshare_matches_it():
    model = testing.tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="sharing must be True or False"):
        inject(model, _plan(model), sharing="yes")
    assert adapter_state(model) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # undoing sharing after inject saves exactly what sharing=False saves
    batch = testing.random_batches(model, n=1, batch_size=2, seq_len=8)[0]
    saved = []
    for how in ("flag", "unshare"):
        m = testing.tiny_llama()
        inject(m, _plan(m), sharing=how == "unshare")
        if how == "unshare":
            unshare_activations(m, adapter_state(m).shared)
        m.train()
        saved.append(saved_tensor_bytes(lambda: m(**batch).loss,
                                        [*m.parameters(), *m.buffers()]))
    assert saved[0] == saved[1]


def test_a_tagged_input_changed_in_place_is_saved_not_recomputed():
    torch.manual_seed(0)
    from rowsft_nb.adapter.sharing import _tag
    layer = FusedRowLinear(nn.Linear(6, 4), rows=[1, 2])
    z = torch.randn(3, 6, requires_grad=True)
    x = torch.nn.functional.gelu(z)
    _tag(x, torch.nn.functional.gelu, z)
    x.mul_(2.0)                     # x is no longer gelu(z)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.delta.grad, (2 * torch.nn.functional.gelu(z)).sum(0)
                               .detach().expand(2, 6))


def test_sharing_is_undone_by_unload_and_outputs_are_unchanged():
    model = testing.tiny_llama()
    base = copy.deepcopy(model)
    batch = testing.random_batches(model, n=1)[0]
    inject(model, _plan(model))
    mlp = model.model.layers[0].mlp
    assert "forward" in vars(mlp)
    model.train()
    base.train()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base(**batch).logits)
    unload(model)
    assert "forward" not in vars(mlp)
    assert not any("forward" in vars(m) for m in model.modules())


# ---------------------------------------------------------------------------- FSDP2
def _fsdp_worker(out_path):
    """Run under torchrun (2 gloo ranks): inject, then fully_shard each decoder layer; the
    fused layers see FSDP and take the delta path; grads equal a delta-mode reference."""
    import json

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    model = testing.tiny_llama()
    batch = testing.random_batches(model, n=1)[0]
    plan = _plan(model)
    ref = inject(copy.deepcopy(model), plan, mode="delta", init="kaiming")
    early = inject(copy.deepcopy(model), plan, init="kaiming")
    inject(model, plan, init="kaiming")
    with torch.no_grad():
        early(**batch)                      # fused before sharding: refused loudly
    for m in (model, early):
        for layer in m.model.layers:
            fully_shard(layer)
        fully_shard(m)
    try:
        early(**batch)
        refused = False
    except RuntimeError as e:
        refused = "restore_base_weights" in str(e)
    model.train()
    ref.train()
    model(**batch).loss.backward()
    ref(**batch).loss.backward()
    err = 0.0
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            err = max(err, float((g - q.grad).abs().max()))
    modes = sorted({str(m.fuse_blocked_now()) for m in adapted_modules(model).values()})
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"err": err, "modes": modes, "refused": refused}, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_after_inject_takes_the_delta_path_with_equal_gradients(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}"}
    out = tmp_path / "fsdp.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                           "2", "--standalone", __file__, "fsdp-worker", str(out)], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["modes"] == ["managed by FSDP (sharded weights)"]
    assert res["err"] < 1e-5 and res["refused"]


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "fsdp-worker":
    _fsdp_worker(sys.argv[2])
