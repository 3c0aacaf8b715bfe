"""Trains a tiny row-sparse BERT and saves its trainable weights; launched by test_ddp.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py OUT_DIR 4
    python tests/ddp_worker.py OUT_DIR 8        # one process, the same global batch

Each process writes OUT_DIR/rank{RANK}.safetensors.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from datasets import Dataset

from rowsft_nb import testing
from rowsft_nb._io import write_safetensors
from rowsft_nb.adapter import inject
from rowsft_nb.plan import RowPlan
from rowsft_nb.targets import find_targets, linear_shape
from rowsft_nb.train import train


def main(out_dir: str, per_device_batch: int) -> None:
    torch.set_num_threads(1)
    model = testing.tiny_bert()
    names = find_targets(model, "all-linear")
    plan = RowPlan(rows={n: [0, 3, 7] for n in names},
                   shapes={n: linear_shape(model.get_submodule(n)) for n in names})
    inject(model, plan)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, testing.VOCAB, (64, 10), generator=g)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                            "labels": (ids[:, 1] % 2).tolist()})
    result = train(model, ds, lr=1e-2, max_steps=6, batch_size=per_device_batch, device="cpu",
                   progress_bar=False, train_sampling_strategy="sequential",
                   ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None)
    rank = int(os.environ.get("RANK", "0"))
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    write_safetensors(os.path.join(out_dir, f"rank{rank}.safetensors"), state,
                      {"steps": result.steps, "world_size": int(os.environ.get("WORLD_SIZE", "1"))})


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
