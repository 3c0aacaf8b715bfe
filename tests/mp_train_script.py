"""A short user-style script: score, select, inject and train a row adapter on a tiny LLaMA,
then save it from rank 0. Launched by tests/test_multiprocess.py; see docs/distributed.md.

    python tests/mp_train_script.py OUT 8                                  # one process
    torchrun --nproc_per_node 2 tests/mp_train_script.py OUT 4             # DDP (gloo on CPU)
    accelerate launch --config_file ddp.yaml tests/mp_train_script.py OUT 4
    accelerate launch --config_file fsdp2.yaml tests/mp_train_script.py OUT 4   # FSDP2
    torchrun --nproc_per_node 2 tests/mp_train_script.py OUT 4 --fsdp      # FSDP2, no config file

Same global batch (per-device batch x processes) => same deltas. Writes OUT/adapter (rank 0
only) and OUT/run.json (rank 0 only): steps, world size, whether the model was sharded, and
the largest |delta| difference between rank 0 and every other rank.
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.distributed as dist
from datasets import Dataset

import rowsft_nb as rs
from rowsft_nb import testing

STEPS = 3


def full_trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable tensors as full (unsharded) CPU tensors; collective under FSDP: every rank
    must call it."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.detach()
            if hasattr(t, "full_tensor"):  # a DTensor sharded by FSDP2
                t = t.full_tensor()
            out[name] = t.cpu().clone()
    return out


def fsdp2_train(model: torch.nn.Module, ds: Dataset, per_device_batch: int) -> int:
    """FSDP2 (``fully_shard``) with a plain AdamW loop: accelerate 1.15 turns FSDP off on CPU
    (it runs DDP instead), so on CPU/gloo the model is sharded here. Every decoder layer is
    one FSDP unit, the rest of the model the root unit. Rank r takes rows
    [r*B, (r+1)*B) of each global batch; FSDP averages the gradients over ranks, which
    equals the mean loss over the global batch (every row has the same token count).
    Without a launcher the same loop runs unsharded on the whole global batch."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.0)
    glob = per_device_batch * world
    for step in range(STEPS):
        rows = ds[step * glob + rank * per_device_batch: step * glob + (rank + 1) * per_device_batch]
        batch = {k: torch.tensor(v) for k, v in rows.items()}
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return STEPS


def main(out_dir: str, per_device_batch: int, fsdp: bool) -> None:
    torch.set_num_threads(1)
    model = testing.tiny_llama(seed=0)
    report = rs.score(model, testing.random_batches(model, n=2, seed=1), metric="l2",
                      progress=False)
    rs.inject(model, rs.select(report, rs.FixedRows(4)))

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, testing.VOCAB, (8 * STEPS, 16), generator=g)  # global batch 8
    ds = Dataset.from_dict({"input_ids": ids.tolist(),
                            "attention_mask": torch.ones_like(ids).tolist(),
                            "labels": ids.tolist()})
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if fsdp:
        steps = fsdp2_train(model, ds, per_device_batch)
    else:  # DDP under torchrun / accelerate launch, one process without a launcher
        steps = rs.train(model, ds, lr=1e-2, max_steps=STEPS, batch_size=per_device_batch,
                         device="cpu", progress_bar=False, evaluate_before=False,
                         train_sampling_strategy="sequential", report_to=[],
                         ddp_backend="gloo" if world > 1 else None).steps

    state = full_trainable_state(model)
    sharded = any(hasattr(p, "full_tensor") for p in model.parameters())
    rank = dist.get_rank() if dist.is_initialized() else 0
    max_diff = 0.0
    if world > 1:  # every rank sends its deltas to rank 0, which compares them
        gathered = [None] * world
        dist.gather_object(state, gathered if rank == 0 else None, dst=0)
        if rank == 0:
            max_diff = max(float((other[k] - state[k]).abs().max())
                           for other in gathered[1:] for k in state)
    if rank == 0:
        if sharded:  # save_adapter needs whole tensors: load them into an unsharded copy
            model = testing.tiny_llama(seed=0)
            rs.inject(model, rs.select(report, rs.FixedRows(4)))
            model.load_state_dict(state, strict=False)
        rs.save_adapter(model, os.path.join(out_dir, "adapter"))
        with open(os.path.join(out_dir, "run.json"), "w") as f:
            json.dump({"steps": steps, "world_size": world, "sharded": sharded,
                       "max_rank_diff": max_diff}, f)
    if dist.is_initialized():
        dist.barrier()  # rank 1 exits only after rank 0 has saved
        dist.destroy_process_group()


if __name__ == "__main__":
    # `accelerate launch` with an FSDP config sets ACCELERATE_USE_FSDP; accelerate 1.15 then
    # runs DDP on CPU, so this script shards the model itself (fsdp2_train).
    main(sys.argv[1], int(sys.argv[2]),
         "--fsdp" in sys.argv[3:] or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true")
