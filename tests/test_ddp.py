"""Two CPU processes (gloo) train the same row-sparse plan as one process with the same
global batch: both ranks end with identical deltas, equal to the single-process run."""
import importlib.util
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rowsft_nb._io import read_safetensors

WORKER = Path(__file__).with_name("ddp_worker.py")
ROOT = WORKER.parent.parent


def _run(cmd, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _run_here(out) -> None:
    """The one-process reference in this process (saves ~15 s of imports); threads and RNG
    states are put back after."""
    spec = importlib.util.spec_from_file_location("ddp_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    threads, py_state, np_state = torch.get_num_threads(), random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            worker.main(str(out), 8)
    finally:
        torch.set_num_threads(threads)
        random.setstate(py_state)
        np.random.set_state(np_state)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
          "--standalone", str(WORKER), str(ddp), "4"], tmp_path)
    single.mkdir()
    _run_here(single)
    r0, meta0 = read_safetensors(ddp / "rank0.safetensors")
    r1, meta1 = read_safetensors(ddp / "rank1.safetensors")
    one, meta = read_safetensors(single / "rank0.safetensors")
    assert meta0["world_size"] == 2 and meta["world_size"] == 1
    assert meta0["steps"] == meta1["steps"] == meta["steps"] == 6
    assert r0.keys() == one.keys() and any(k.endswith(".delta") for k in one)
    for k in one:
        assert torch.equal(r0[k], r1[k]), f"ranks differ on {k}"
        torch.testing.assert_close(r0[k], one[k], atol=1e-5, rtol=1e-4, msg=k)
    assert any(one[k].abs().sum() > 0 for k in one if k.endswith(".delta"))
