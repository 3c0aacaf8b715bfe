"""rowsft_nb.bench (memory accounting, baselines, interleaved timing and its statistics) and
the benchmark runner in benchmarks/ (goals, tables, output folder, `rowsft-nb bench`)."""
import copy
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rowsft_nb import bench, cli, inject
from rowsft_nb.adapter import adapted_modules
from rowsft_nb.targets import find_targets, linear_shape
from rowsft_nb.testing import random_batches, synthetic_report

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the runner's modules (not part of the package)

import bench_all  # noqa: E402
import bench_goals  # noqa: E402
import bench_methods  # noqa: E402
import bench_report  # noqa: E402

# synthetic reports carry a placeholder model hash: inject() warns about it, as it should
pytestmark = pytest.mark.filterwarnings("ignore:the plan was selected on weights")


def _report(model, seed=0):
    names = find_targets(model)
    modules = dict(model.named_modules())
    return synthetic_report({n: linear_shape(modules[n]) for n in names}, seed=seed)


@pytest.fixture
def llama_setup(tiny_llama):
    report = _report(tiny_llama)
    plan, column_plan = bench.matched_plans(report, lora_rank=2)
    batch = random_batches(tiny_llama, n=1, batch_size=2, seq_len=16)[0]
    return tiny_llama, plan, column_plan, batch


# ------------------------------------------------------------------ memory and baselines
def test_matched_plans_equal_budget_and_lora_count(llama_setup):
    model, plan, column_plan, _ = llama_setup
    denom = sum(d_out + d_in for d_out, d_in in plan.shapes.values())
    assert plan.trainable_parameters() <= 2 * denom
    assert column_plan.trainable_parameters() <= 2 * denom
    assert plan.trainable_parameters() > 0.9 * 2 * denom
    assert set(plan.modules) == set(plan.shapes)  # min_rows=1: every module has rows
    assert round(plan.equivalent_lora_rank()) == 2
    lora = bench.apply_lora(copy.deepcopy(model), plan)
    n_lora = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert n_lora == 2 * denom  # r * (d_in + d_out) per module, exactly


def test_memory_components_match_arithmetic(llama_setup):
    model, plan, _, batch = llama_setup
    adapted = inject(copy.deepcopy(model), plan, train_heads=False)
    mem = bench.measure_memory(adapted, batch, "rowsft")
    n = plan.trainable_parameters()
    assert mem.trainable_parameters == n
    assert mem.trainable == 4 * n           # fp32 deltas
    assert mem.gradients == 4 * n           # one gradient per delta
    # AdamW: exp_avg + exp_avg_sq per parameter, plus a float32 step scalar per tensor
    assert mem.optimizer == 2 * 4 * n + 4 * len(plan.modules)
    base_bytes = sum(p.numel() * 4 for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    # frozen base + its buffers + the adapter's int64 row indices + the fused layers' copy of
    # the original rows W0[rows] (fp32 here, one per trainable row entry)
    assert {m.mode for m in adapted_modules(adapted).values()} == {"fused"}
    assert mem.weights == base_bytes + buffers + 8 * plan.num_rows() + 4 * n
    assert mem.step_peak > 0 and mem.saved > 0
    assert mem.total == mem.weights + mem.trainable + mem.optimizer + mem.step_peak


def test_floor_has_nothing_trainable_and_full_counts_everything(llama_setup):
    model, plan, _, batch = llama_setup
    floor = bench.measure_memory(copy.deepcopy(model), batch, "floor")
    assert floor.trainable == floor.gradients == floor.optimizer == 0
    assert floor.trainable_parameters == 0
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert floor.weights == sum(p.numel() * 4 for p in model.parameters()) + buffers
    full = bench.measure_memory(bench.apply_full(copy.deepcopy(model)), batch, "full")
    n_all = sum(p.numel() for p in model.parameters())
    assert full.weights == buffers and full.trainable == full.gradients == 4 * n_all
    assert full.saved >= floor.saved - 4 * batch["input_ids"].numel() * model.config.hidden_size


def test_dense_mask_gradients_zero_outside_rows(llama_setup):
    model, plan, _, batch = llama_setup
    masked = bench.apply_dense_mask(copy.deepcopy(model), plan)
    masked(**batch).loss.backward()
    modules = dict(masked.named_modules())
    checked = 0
    for name, rows in plan.rows.items():
        g = modules[name].weight.grad
        assert g is not None and g.shape == modules[name].weight.shape  # full size
        off = torch.ones(g.shape[0], dtype=torch.bool)
        off[rows] = False
        assert torch.count_nonzero(g[off]) == 0
        assert torch.count_nonzero(g[rows]) > 0
        checked += 1
    assert checked == len(plan.modules)
    # the masked full-size gradient on the rows equals the row adapter's delta gradient
    adapted = inject(copy.deepcopy(model), plan, train_heads=False)
    adapted(**batch).loss.backward()
    name = plan.modules[0]
    torch.testing.assert_close(modules[name].weight.grad[plan.rows[name]],
                               dict(adapted.named_modules())[name].delta.grad)


def test_onehot_equals_row_adapter(llama_setup):
    model, plan, _, batch = llama_setup
    onehot = bench.apply_onehot(copy.deepcopy(model), plan)
    adapted = inject(copy.deepcopy(model), plan, train_heads=False)
    with torch.no_grad():
        base_logits = model(**batch).logits
        torch.testing.assert_close(onehot(**batch).logits, base_logits)  # zero init
        g = torch.Generator().manual_seed(1)
        for name in plan.modules:
            d = torch.randn(dict(onehot.named_modules())[name].delta.shape, generator=g)
            dict(onehot.named_modules())[name].delta.copy_(d)
            dict(adapted.named_modules())[name].delta.copy_(d)
        torch.testing.assert_close(onehot(**batch).logits, adapted(**batch).logits,
                                   rtol=1e-4, atol=1e-5)
    mem = bench.measure_memory(onehot, batch, "onehot")
    assert mem.trainable == 4 * plan.trainable_parameters()
    onehot_bytes = sum(4 * r.numel() * plan.shapes[n][0] for n, r in plan.rows.items())
    base_bytes = sum(p.numel() * 4 for p in model.parameters())
    base_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    assert mem.weights == base_bytes + onehot_bytes  # the one-hot matrices are extra memory


def test_prepare_method_errors_leave_the_model_untouched(llama_setup):
    model, plan, _, _ = llama_setup
    before = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match="unknown method"):
        bench.prepare_method(model, "bogus", plan)
    with pytest.raises(ValueError, match="column_plan"):
        bench.prepare_method(model, "columns", plan)
    assert [p.requires_grad for p in model.parameters()] == before
    with pytest.raises(ValueError, match="no trainable"):
        bench.measure_memory(bench.apply_floor(copy.deepcopy(model)),
                             random_batches(model, n=1)[0], "rowsft")


def test_missing_peft_names_the_bench_extra(llama_setup, monkeypatch):
    model, plan, _, _ = llama_setup
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'rowsft-nb\[bench\]'"):
        bench.apply_lora(copy.deepcopy(model), plan)
    built = []
    with pytest.raises(ImportError, match=r"rowsft-nb\[bench\]"):
        bench.build_methods(lambda: built.append(1) or copy.deepcopy(model), plan)
    assert built == []  # refused before building any model
    assert bench.machine_info(1)["peft"] is None


# ------------------------------------------------------------------ interleaved timing
def test_round_robin_order_rotates_the_start():
    names = ["floor", "rowsft", "lora"]
    order = bench.round_robin_order(names, 7)
    assert len(order) == 7
    for k, rnd in enumerate(order):
        assert rnd == [names[(k + i) % 3] for i in range(3)]  # starts at method k mod M
    # over M consecutive rounds every method sits in every position exactly once
    for pos in range(3):
        assert sorted(rnd[pos] for rnd in order[:3]) == sorted(names)
    with pytest.raises(ValueError, match="rounds"):
        bench.round_robin_order(names, 0)
    with pytest.raises(ValueError, match="distinct"):
        bench.round_robin_order(["a", "a"], 2)


def test_time_interleaved_runs_warmup_then_rotating_rounds_and_times_each_step():
    """A fake clock that each step advances by a known amount: the recorded wall and CPU
    times are exactly those amounts, and the steps ran in the scheduled order."""
    now = {"wall": 0.0, "cpu": 0.0}
    cost = {"a": 1.0, "b": 2.0, "c": 4.0}
    log = []

    def make(name):
        def step():
            log.append(name)
            now["wall"] += cost[name] + 0.5 * len(log)  # load drifts upward over time
            now["cpu"] += cost[name]
        return step

    samples = bench.time_interleaved({n: make(n) for n in cost}, rounds=5, warmup=1,
                                     wall_clock=lambda: now["wall"], cpu_clock=lambda: now["cpu"])
    expected = list("abc" + "abc" "bca" "cab" "abc" "bca")  # warm-up, then 5 rotating rounds
    assert log == expected
    for name in cost:
        assert samples[name]["cpu"] == [cost[name]] * 5
        steps_at = [i + 1 for i, x in enumerate(log) if x == name][1:]  # after warm-up
        assert samples[name]["wall"] == [cost[name] + 0.5 * i for i in steps_at]
        assert len(samples[name]["switches"]) == 5


def test_ratio_stats_match_a_direct_computation():
    """Synthetic per-round timings under drifting load: the statistics are those of the
    per-round ratios computed directly (numpy quantiles, the 40th/61st order statistics
    of 100, the textbook 95% median CI)."""
    g = np.random.default_rng(0)
    load = 1.0 + np.cumsum(g.uniform(0, 0.05, 100))        # machine slowing down
    floor = 0.2 * load * g.uniform(0.97, 1.03, 100)
    method = 0.2 * 1.1 * load * g.uniform(0.97, 1.03, 100)
    s = bench.ratio_stats(list(method), list(floor))
    r = np.sort(method / floor)
    assert s["n"] == 100
    assert s["median"] == pytest.approx(float(np.median(r)), rel=1e-12)
    assert s["q1"] == pytest.approx(float(np.quantile(r, 0.25)), rel=1e-12)
    assert s["q3"] == pytest.approx(float(np.quantile(r, 0.75)), rel=1e-12)
    assert (s["ci_low"], s["ci_high"]) == (r[39], r[60])
    assert s["ci_level"] == pytest.approx(0.9648, abs=1e-4)
    assert s["ci_low"] <= s["median"] <= s["ci_high"]
    assert abs(s["median"] - 1.1) < 0.02  # the load cancels in per-round ratios
    # ... whereas the ratio of sequential medians (first half vs second half) does not
    seq = statistics.median(method[50:]) / statistics.median(floor[:50])
    assert abs(seq - 1.1) > 0.1
    # exact CI ranks for other sizes: binomial(n, 1/2) order statistics
    assert bench.median_ci_ranks(12)[:2] == (3, 10)
    assert bench.median_ci_ranks(5)[:2] == (1, 5)  # too few rounds for 95%: the widest
    assert bench.median_ci_ranks(5)[2] == pytest.approx(1 - 2 / 32)
    with pytest.raises(ValueError, match="one reference time per round"):
        bench.ratio_stats([1.0, 2.0], [1.0])


def _synthetic_samples(speed, rounds=60, seed=1):
    """Per-round times for methods whose true cost is ``speed[name]`` x floor, under a
    shared per-round load and small independent jitter."""
    g = np.random.default_rng(seed)
    load = g.uniform(1.0, 1.5, rounds)
    return {name: {"wall": list(0.1 * f * load * g.uniform(0.98, 1.02, rounds)),
                   "cpu": list(0.1 * f * g.uniform(0.99, 1.01, rounds)),
                   "switches": [0] * rounds} for name, f in speed.items()}


def test_impossible_result_faster_than_the_floor_is_rejected():
    samples = _synthetic_samples({"floor": 1.0, "rowsft": 0.85, "lora": 1.2, "full": 2.0})
    summary = bench.summarize_times(samples)
    rows = summary["methods"]["rowsft"]
    assert rows["ratio_floor"]["wall"]["ci_high"] < 1.0
    assert rows["verdict"] == bench.IMPOSSIBLE == "rejected: impossible, machine too noisy"
    assert rows["step_ratio_floor"] is None and rows["step_ratio_lora"] is None
    assert "faster than the frozen model" in rows["rejected_because"]
    assert summary["rejected"] == ["rowsft"]
    for name, f in (("lora", 1.2), ("full", 2.0)):
        ok = summary["methods"][name]
        assert ok["verdict"] == "ok"
        assert ok["step_ratio_floor"] == pytest.approx(f, rel=0.02)
    assert summary["methods"]["full"]["step_ratio_lora"] == pytest.approx(2.0 / 1.2, rel=0.03)
    # a rejected LoRA takes every ratio to LoRA with it
    summary = bench.summarize_times(_synthetic_samples({"floor": 1.0, "lora": 0.8, "full": 2.0}))
    assert summary["rejected"] == ["lora"]
    assert summary["methods"]["full"]["step_ratio_floor"] == pytest.approx(2.0, rel=0.02)
    assert summary["methods"]["full"]["step_ratio_lora"] is None
    # the runner's tables and goals print the rejection instead of the number
    row = {"step": {"median_s": 0.1}, "time": summary["methods"]["lora"],
           "step_ratio_floor": None, "step_ratio_lora": None}
    assert bench_report.ratio_text(row, "floor") == bench.IMPOSSIBLE


def test_within_noise_of_the_floor_is_not_rejected():
    # true ratio 1.0 with heavy jitter: the median may fall below 1 but its CI holds 1
    g = np.random.default_rng(3)
    floor = list(g.uniform(0.9, 1.1, 40))
    same = list(g.uniform(0.9, 1.1, 40))
    samples = {"floor": {"wall": floor, "cpu": floor}, "rowsft": {"wall": same, "cpu": same}}
    s = bench.summarize_times(samples, lora=None)["methods"]["rowsft"]
    assert s["ratio_floor"]["wall"]["ci_low"] < 1.0 < s["ratio_floor"]["wall"]["ci_high"]
    assert s["verdict"] == "ok" and s["step_ratio_floor"] is not None
    # a CPU clock too coarse to see the floor's step gives no CPU ratio, not a crash
    coarse = {"floor": {"wall": floor, "cpu": [0.0] * 40}, "rowsft": {"wall": same, "cpu": same}}
    s = bench.summarize_times(coarse, lora=None)["methods"]["rowsft"]
    assert s["ratio_floor"]["cpu"] is None and s["verdict"] == "ok"
    assert not bench.impossible({"ci_high": 0.99}, margin=0.02)
    assert bench.impossible({"ci_high": 0.97}, margin=0.02)


def test_time_methods_on_real_tiny_models(llama_setup):
    model, plan, column_plan, batch = llama_setup
    models = {m: bench.prepare_method(copy.deepcopy(model), m, plan, column_plan)
              for m in ("floor", "rowsft", "lora")}
    threads = torch.get_num_threads()
    summary = bench.time_methods(models, batch, rounds=3)
    assert summary["rounds"] == 3 and summary["warmup"] == 1
    assert summary["torch_threads"] == 1                 # one thread by default ...
    assert torch.get_num_threads() == threads            # ... and the setting restored
    for name, s in summary["methods"].items():
        assert s["rounds"] == 3 and len(summary["samples"][name]["wall"]) == 3
        assert s["wall_s"]["median"] > 0 and s["cpu_s"]["median"] > 0
        direct = statistics.median(w / f for w, f in zip(summary["samples"][name]["wall"],
                                                         summary["samples"]["floor"]["wall"]))
        assert s["ratio_floor"]["wall"]["median"] == pytest.approx(direct)
    assert summary["methods"]["floor"]["ratio_floor"]["wall"]["median"] == 1.0
    # the adapters trained during timing (one AdamW step per warm-up and round)
    assert any(p.abs().sum() > 0 for n, p in models["rowsft"].named_parameters()
               if p.requires_grad)
    with pytest.raises(ValueError, match="frozen floor"):
        bench.time_methods({"rowsft": models["rowsft"]}, batch, rounds=1)


# ------------------------------------------------------------------ the runner (benchmarks/)
def test_memory_and_speed_every_method_on_tiny_bert():
    from rowsft_nb.testing import tiny_bert

    model = tiny_bert()
    plan, column_plan = bench.matched_plans(_report(model), lora_rank=2)
    batch = random_batches(model, n=1, batch_size=2, seq_len=12)[0]
    cfg = bench_all.BenchConfig(lora_rank=2, time_rounds=3)
    res = bench_methods.memory_and_speed("tiny-bert", model, batch, plan, column_plan, cfg)
    rows = res["methods"]
    assert set(rows) == set(bench.METHODS)
    assert rows["floor"]["overhead"] == 0
    assert rows["columns"]["trainable_parameters"] == column_plan.trainable_parameters()
    assert rows["rowsft"]["trainable_parameters"] == plan.trainable_parameters()
    assert rows["full"]["trainable_parameters"] == sum(p.numel() for p in model.parameters())
    planned = sum(o * i for o, i in plan.shapes.values())
    assert rows["dense_mask"]["optimizer"] >= 2 * 4 * planned
    assert res["timing"]["rounds"] == 3
    for name, r in rows.items():
        assert r["step"]["rounds"] == 3 and r["step"]["median_s"] > 0
        assert len(res["samples"][name]["wall"]) == 3
    assert res["ratios"]["rowsft_overhead_over_lora"] == pytest.approx(
        rows["rowsft"]["overhead"] / rows["lora"]["overhead"])
    full = {"memory": {"tiny": res}}
    full["goals"] = bench_goals.goals(full)
    assert len(full["goals"]) == 5
    text = bench_report.to_markdown(full)
    assert text.count("\n| ") >= len(bench.METHODS) + 5  # one table row per method + goals
    assert f"| rowsft | {plan.trainable_parameters():,} |" in text
    json.dumps(res)  # the JSON the runner writes


def _timed_block(rowsft_vs_floor, rowsft_vs_lora, rejected=False):
    def ratios(median, lo, hi):
        return {"wall": {"median": median, "ci_low": lo, "ci_high": hi}}

    verdict = bench.IMPOSSIBLE if rejected else "ok"
    return {"ratios": {"rowsft_overhead_over_lora": 0.45, "columns_overhead_over_lora": 0.3,
                       "rowsft_total_over_dense_mask": 0.4},
            "methods": {"rowsft": {"time": {"verdict": verdict, "rejected_because": "why",
                                            "ratio_floor": ratios(*rowsft_vs_floor),
                                            "ratio_lora": ratios(*rowsft_vs_lora)}},
                        "lora": {"time": {"verdict": "ok"}}, "floor": {"time": {"verdict": "ok"}}}}


def test_goals_compare_against_limits_with_spread_and_rejection():
    res = {"memory": {"m": _timed_block((1.05, 1.03, 1.07), (0.86, 0.83, 0.88))},
           "accuracy": {"summary": {"rowsft_taylor": {"mean": 0.80}, "lora": {"mean": 0.805},
                                    "rowsft_random": {"mean": 0.81}}}}
    got = {g["goal"]: g for g in bench_goals.goals(res)}
    assert got["row memory above floor <= 0.5x LoRA's"]["met"]
    assert not got["column memory above floor <= 0.2x LoRA's"]["met"]
    assert got["row total <= 0.5x dense-mask total"]["met"]
    t = got["row step time <= 0.85x LoRA"]
    assert t["met"] is False and t["measured"] == 0.86 and t["spread"] == [0.83, 0.88]
    assert t["status"] == "not met, CI crosses the limit"
    f = got["row step time <= 1.06x frozen floor"]
    assert f["met"] is True and f["status"] == "met, CI crosses the limit"
    assert got["row (Taylor) accuracy within 1 point of LoRA (LoRA - row, points)"]["met"]
    assert not got["importance rows above random rows (Taylor - random, points)"]["met"]
    rejected = bench_goals.goals({"memory": {"m": _timed_block((0.8, 0.7, 0.9), (0.7, 0.6, 0.8),
                                                               rejected=True)}})
    for g in rejected:
        if "step time" in g["goal"]:
            assert g["status"] == bench.IMPOSSIBLE and g["met"] is None and g["measured"] is None
    table = bench_report.to_markdown({"goals": rejected})
    assert table.count(bench.IMPOSSIBLE) == 2


def test_runner_validates_before_work_and_writes_to_the_named_folder(tmp_path, monkeypatch,
                                                                      capsys):
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(bench_all, "run", lambda **kw: calls.append(kw) or {
        "seconds": {"total": 0.0}, "goals": [], "command": kw["command"]})
    with pytest.raises(SystemExit) as e:
        bench_all.main(["--parts", "memory,nope"])
    assert e.value.code == 2 and "unknown benchmark parts ['nope']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_all.main(["--rounds", "0"])
    with pytest.raises(SystemExit):
        bench_all.main(["--out-dir", str(tmp_path / "lib" / "site-packages" / "x")])
    assert "installed package" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(SystemExit):
        bench_all.main(["--parts", "memory"])
    assert "rowsft-nb[bench]" in capsys.readouterr().err
    assert calls == []  # nothing ran
    assert bench_all.main(["--quick", "--parts", "scoring"]) == 0  # no LoRA: no peft needed
    out = tmp_path / "rowsft-bench-results" / "bench_quick.json"
    assert json.loads(out.read_text())["command"] == "rowsft-nb bench --quick --parts scoring"
    assert out.with_suffix(".md").exists()
    assert calls[0]["parts"] == ["scoring"] and calls[0]["threads"] == 1
    assert calls[0]["cfg"].time_rounds == bench_all.BenchConfig.quick().time_rounds
    assert bench_all.main(["--parts", "scoring", "--rounds", "7", "--out-dir", "res"]) == 0
    assert (tmp_path / "res" / "bench.json").exists()
    assert calls[1]["cfg"].time_rounds == calls[1]["cfg"].smollm_time_rounds == 7


# ------------------------------------------------------------------ `rowsft-nb bench`
def _fake_checkout(root: Path) -> None:
    (root / "rowsft_nb").mkdir(parents=True)
    (root / "benchmarks").mkdir()
    (root / "pyproject.toml").write_text('[project]\nname = "rowsft-nb"\n')
    (root / "benchmarks" / "bench_all.py").write_text(
        "SEEN = []\ndef main(argv):\n    SEEN.append(argv)\n    return 0\n")


def test_cli_bench_runs_the_checkouts_runner(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_runner prepends the fake folder
    _fake_checkout(tmp_path / "repo")
    (tmp_path / "repo" / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "repo" / "notebooks")  # any folder inside the checkout
    assert bench.find_runner() == tmp_path / "repo" / "benchmarks" / "bench_all.py"
    seen = {}
    real_load = bench.load_runner

    def load(path):
        module = real_load(path)
        seen["module"] = module
        return module

    monkeypatch.setattr("rowsft_nb.bench.locate.load_runner", load)
    assert cli.main(["bench", "--quick", "--parts", "memory"]) == 0
    assert seen["module"].SEEN == [["--quick", "--parts", "memory"]]
    assert "benchmarks/bench_all.py" in capsys.readouterr().err
    # this source tree is a checkout too, and its real runner loads and checks its options
    assert bench.find_runner(BENCHMARKS) == BENCHMARKS / "bench_all.py"
    monkeypatch.chdir(BENCHMARKS)
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--parts", "nope"])
    assert e.value.code == 2 and "unknown benchmark parts" in capsys.readouterr().err


def test_cli_bench_without_a_checkout_says_where_the_runner_lives(tmp_path, monkeypatch,
                                                                  capsys):
    import rowsft_nb.bench.locate as locate

    monkeypatch.chdir(tmp_path)
    # as installed from a wheel: the package sits in site-packages, no benchmarks/ next to it
    monkeypatch.setattr(locate, "__file__",
                        str(tmp_path / "site-packages" / "rowsft_nb" / "bench" / "locate.py"))
    assert bench.find_runner() is None
    assert cli.main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "source repository" in err and "benchmarks/bench_all.py" in err
    assert "pip install -e '.[bench]'" in err


def _direct_sign_flip(d, alternative):
    """All 2**n sign patterns as rows of a +-1 matrix (bit k of the pattern index flips pair k)."""
    d = np.asarray(d, dtype=np.float64)
    n = d.size
    signs = 1.0 - 2.0 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
    sums, obs = signs @ d, d.sum()
    if alternative == "two-sided":
        return float(np.mean(np.abs(sums) >= abs(obs) - 1e-9))
    if alternative == "greater":
        return float(np.mean(sums >= obs - 1e-9))
    return float(np.mean(sums <= obs + 1e-9))


def test_paired_sign_flip_statistics_match_a_direct_computation():
    import bench_accuracy

    # known values: 5 seeds all in favour -> the smallest p there is (2/32 two-sided, 1/32 one)
    up = [1.2, 0.4, 2.0, 0.9, 1.1]
    assert bench_accuracy.sign_flip_p(up) == 0.0625
    assert bench_accuracy.sign_flip_p(up, "greater") == 1 / 32
    assert bench_accuracy.sign_flip_p(up, "less") == 1.0
    rng = np.random.default_rng(0)
    for d in [rng.normal(0.5, 1.0, 5), rng.normal(0, 1, 7), [0.0, 1.0, -1.0, 2.0, 0.0],
              [-0.3, 0.2, 0.1, -0.6, 0.4, 0.2]]:
        for alt in ("two-sided", "greater", "less"):
            assert bench_accuracy.sign_flip_p(list(d), alt) == pytest.approx(
                _direct_sign_flip(d, alt))
    a = {0: 0.80, 1: 0.79, 2: 0.83, 3: 0.81, 4: 0.78, 9: 0.5}   # seed 9 has no pair: ignored
    b = {0: 0.81, 1: 0.77, 2: 0.83, 3: 0.80, 4: 0.80}
    p = bench_accuracy.paired_comparison(a, b, margin=1.0)
    d = [100 * (a[s] - b[s]) for s in range(5)]
    assert p["seeds"] == [0, 1, 2, 3, 4] and [q["diff_points"] for q in p["pairs"]] == d
    assert p["mean_diff_points"] == pytest.approx(np.mean(d))
    assert p["std_diff_points"] == pytest.approx(np.std(d, ddof=1))
    assert (p["wins"], p["ties"], p["losses"]) == (2, 1, 2)
    assert p["p_two_sided"] == pytest.approx(_direct_sign_flip(d, "two-sided"))
    assert p["p_a_greater"] == pytest.approx(_direct_sign_flip(d, "greater"))
    assert p["p_within_margin"] == pytest.approx(_direct_sign_flip(np.add(d, 1.0), "greater"))
    assert p["smallest_possible_p_two_sided"] == 0.0625
    with pytest.raises(ValueError, match="alternative"):
        bench_accuracy.sign_flip_p(up, "bigger")
    with pytest.raises(ValueError, match="no seed in common"):
        bench_accuracy.paired_comparison({0: 0.8}, {1: 0.8})
    # the goals read the paired test: rows ahead of random on every seed, 0.4 points off LoRA
    rows = {s: 0.80 + 0.01 * s for s in range(5)}
    acc = {"summary": {"rowsft_taylor": {"mean": np.mean(list(rows.values()))},
                       "lora": {"mean": np.mean(list(rows.values())) + 0.004},
                       "rowsft_random": {"mean": 0.0}},
           "paired": {"rowsft_taylor vs lora": bench_accuracy.paired_comparison(
                          rows, {s: v + 0.004 for s, v in rows.items()}, margin=1.0),
                      "rowsft_taylor vs rowsft_random": bench_accuracy.paired_comparison(
                          rows, {s: v - 0.02 for s, v in rows.items()})}}
    got = {g["goal"]: g for g in bench_goals.accuracy_goals(acc)}
    lora = got["row (Taylor) accuracy within 1 point of LoRA (LoRA - row, points)"]
    assert lora["met"] and lora["measured"] == pytest.approx(0.4)
    assert lora["p_value"] == 1 / 32 and lora["spread"] == [pytest.approx(0.4)] * 2
    rnd = got["importance rows above random rows (Taylor - random, points)"]
    assert rnd["met"] and rnd["p_value"] == 1 / 32 and "p (Taylor > random) = 0.03125 over 5 seeds" in rnd["status"]
    assert "0.0625 and 0.03125 for 5 seeds" in "\n".join(bench_report.accuracy_pairs_markdown(acc))


def test_accuracy_run_order_and_skip_smollm(tmp_path, monkeypatch):
    import bench_accuracy

    # goal methods first over every seed, then the rest seed by seed; every pair exactly once
    methods, seeds = ["full", "rowsft_taylor", "rowsft_l2", "lora", "rowsft_random"], [0, 1, 2]
    order = bench_accuracy.run_order(methods, seeds)
    assert sorted(order) == sorted((m, s) for m in methods for s in seeds)
    assert order[:9] == [(m, s) for m in ("rowsft_taylor", "lora", "rowsft_random")
                         for s in seeds]
    assert order[9:] == [("full", 0), ("rowsft_l2", 0), ("full", 1), ("rowsft_l2", 1),
                         ("full", 2), ("rowsft_l2", 2)]
    assert set(bench_all.BenchConfig().acc_methods) <= set(bench_accuracy.ACC_METHODS)
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(bench_all, "run", lambda **kw: calls.append(kw) or {
        "seconds": {"total": 0.0}, "goals": [], "command": kw["command"]})
    assert bench_all.main(["--parts", "scoring", "--skip-smollm", "--out-dir", "r"]) == 0
    assert bench_all.main(["--parts", "scoring", "--out-dir", "r"]) == 0
    assert calls[0]["cfg"].smollm is False and calls[1]["cfg"].smollm is True
