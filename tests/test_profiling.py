"""profiling: exact byte counts against allocations of known size."""
import pytest
import torch
from torch import nn

from rowsft_nb.profiling import measure_peak, peak_memory, saved_tensor_bytes, tensor_bytes

MiB = 1 << 20


def test_peak_memory_counts_a_known_allocation():
    assert peak_memory(lambda: torch.empty(256, 1024)) == MiB  # 256*1024 float32


def test_peak_memory_is_the_running_maximum_not_the_sum():
    def fn():
        a = torch.empty(1024, 1024)           # 4 MiB
        b = torch.empty(512, 1024)            # +2 MiB -> 6 MiB live
        del b
        c = torch.empty(256, 1024)            # 4 + 1 = 5 MiB live
        return a, c

    (a, c), peak = measure_peak(fn)
    assert peak == 6 * MiB
    assert a.shape == (1024, 1024) and c.shape == (256, 1024)


def test_peak_memory_ignores_memory_that_existed_before():
    existing = torch.empty(4 * MiB // 4)
    assert peak_memory(lambda: existing.add_(1.0)) < 1024  # a few bytes of scalars at most


def test_peak_memory_rejects_unknown_device():
    with pytest.raises(ValueError, match="cpu"):
        peak_memory(lambda: None, device="meta")


def test_saved_tensor_bytes_matches_what_autograd_keeps():
    lin = nn.Linear(64, 32)
    x = torch.randn(8, 64, requires_grad=True)
    # linear saves its input x (8*64*4 bytes) and the weight (a parameter: skipped);
    # tanh saves its output (8*32*4 bytes).
    saved = saved_tensor_bytes(lambda: torch.tanh(lin(x)).sum(), lin)
    assert saved == 8 * 64 * 4 + 8 * 32 * 4


def test_saved_tensor_bytes_counts_each_storage_once():
    x = torch.randn(100, requires_grad=True)
    # x * x saves x twice (same storage), counted once; x is not a parameter here.
    assert saved_tensor_bytes(lambda: (x * x).sum()) == 400


def test_tensor_bytes_each_storage_once():
    a = torch.zeros(10)
    assert tensor_bytes([a, a[2:5], torch.zeros(5, dtype=torch.float64)]) == 40 + 40
    lin = nn.Linear(4, 3)
    assert tensor_bytes(lin) == (12 + 3) * 4
    assert tensor_bytes(a) == 40


def test_profiling_prints_nothing_to_stderr():
    """torch's profiler backend printed 'USDT: ... profiler_start' lines at the C level,
    which landed in notebook outputs; a fresh process must print nothing."""
    import subprocess
    import sys

    code = ("import torch\nfrom rowsft_nb.profiling import peak_memory\n"
            "print(peak_memory(lambda: torch.randn(1000).sum()))\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "KINETO_LOG_LEVEL"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "USDT" not in run.stderr and "profiler_start" not in run.stderr, run.stderr
    assert int(run.stdout.strip()) > 0
