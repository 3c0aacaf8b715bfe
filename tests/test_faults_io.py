"""Fault injection on saved files: a save killed at any instant (SIGKILL) leaves the old or the
new artifact, never a mix; every damaged adapter, plan or report file fails with one error
naming the file and the problem, before the model changes."""
import copy
import json
import os
import random
import signal
import struct
import time
import warnings

import pytest
import torch
from safetensors.torch import save_file

from rowsft_nb import testing
from rowsft_nb._io import FileFormatError, read_safetensors, write_json, write_safetensors
from rowsft_nb.adapter import adapted_modules, inject, load_adapter, save_adapter
from rowsft_nb.plan import RowPlan
from rowsft_nb.scoring.report import ImportanceReport
from rowsft_nb.targets import find_targets, linear_shape

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def make_plan(model, r, seed):
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    shapes = {n: linear_shape(modules[n]) for n in find_targets(model)}
    return RowPlan(rows={n: torch.randperm(shapes[n][0], generator=g)[:r] for n in shapes},
                   shapes=shapes)


def adapted(base, r, seed):
    """An adapted copy of ``base`` with r random rows per target, random deltas and head."""
    model = inject(copy.deepcopy(base), make_plan(base, r, seed), bias=True)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def trained_state(model):
    """What an adapter file must reproduce: indices, deltas and trainable heads."""
    out = {}
    for name, layer in adapted_modules(model).items():
        out[f"{name}.rows"] = layer.rows.clone()
        for k, p in layer.delta_parameters().items():
            out[f"{name}.{k}"] = p.detach().clone()
    for n, p in model.named_parameters():
        if p.requires_grad and ".delta" not in n and "column_delta" not in n:
            out[n] = p.detach().clone()
    return out


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: type(m) for n, m in model.named_modules()})


def assert_unchanged(model, snap):
    sd, flags, types = snapshot(model)
    assert sd.keys() == snap[0].keys() and all(torch.equal(sd[k], snap[0][k]) for k in sd)
    assert flags == snap[1]
    assert types == snap[2]


def report_for(base, seed):
    modules = dict(base.named_modules())
    shapes = {n: linear_shape(modules[n]) for n in find_targets(base)}
    return testing.synthetic_report(shapes, seed=seed)


def same_report(a, b):
    return (a.metric == b.metric and a.shapes == b.shapes and a.meta == b.meta
            and same(a.scores, b.scores))


# ---------------------------------------------------------------- SIGKILL during saves
@pytest.mark.slow
def test_killed_saves_leave_old_or_new_adapter_plan_and_report(tmp_path):
    """A forked child (everything imported, models built) saves the other adapter, plan and
    report, then the current ones, ... into the folder; it is SIGKILLed at a random instant
    within its first or second save, then every artifact must load and equal A or B
    bit-exactly. Repeated 30 times."""
    base = testing.tiny_bert()
    models = {"A": adapted(base, 2, seed=1), "B": adapted(base, 5, seed=2)}
    states = {k: trained_state(m) for k, m in models.items()}
    plans = {"A": make_plan(base, 2, 1), "B": make_plan(base, 5, 2)}
    reports = {"A": report_for(base, 1), "B": report_for(base, 2)}
    adir, ppath, rpath = tmp_path / "adapter", tmp_path / "plan.json", tmp_path / "r.safetensors"
    (tmp_path / "adapter").mkdir()
    (adir / "NOTES.md").write_text("a user's file")

    def save(key):
        save_adapter(models[key], adir)
        plans[key].save(ppath)
        reports[key].save(rpath)

    start = time.perf_counter()
    for _ in range(3):
        save("A")
    duration = (time.perf_counter() - start) / 3  # one save of all three artifacts
    rng = random.Random(0)
    current, seen, failures = "A", {"A": 0, "B": 0}, []
    for i in range(30):
        other = "B" if current == "A" else "A"
        read_fd, write_fd = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pid = os.fork()
        if pid == 0:  # child: saves other, current, other, ...; never returns into pytest
            try:
                os.close(read_fd)
                os.write(write_fd, b"r")
                n = 0
                while True:
                    save(other if n % 2 == 0 else current)
                    os.write(write_fd, b"s")  # one save completed
                    n += 1
            finally:
                os._exit(0)
        try:  # the child is killed and reaped whatever happens here
            os.close(write_fd)
            ready = os.read(read_fd, 1)
            t = time.perf_counter()
            if rng.random() < 0.5:  # kill in the first save, or in the second one
                os.read(read_fd, 1)
                duration = time.perf_counter() - t  # this child's pace, on this busy machine
            time.sleep(rng.uniform(0, 1.2 * duration))
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_fd)
        assert ready == b"r", "the saving child died before it started"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a JSON copy one save behind is expected
                got = trained_state(load_adapter(copy.deepcopy(base), adir))
            which = [k for k, s in states.items() if same(got, s)]
            plan = RowPlan.load(ppath).to_dict()
            which_plan = [k for k, p in plans.items() if p.to_dict() == plan]
            report = ImportanceReport.load(rpath)
            which_report = [k for k, r in reports.items() if same_report(report, r)]
            if len(which) != 1 or len(which_plan) != 1 or len(which_report) != 1:
                failures.append(f"kill {i}: adapter {which}, plan {which_plan}, "
                                f"report {which_report}")
            else:
                seen[which[0]] += 1
                current = which[0]
        except Exception as e:  # noqa: BLE001 - every failure is counted and reported
            failures.append(f"kill {i}: {type(e).__name__}: {e}")
    assert not failures, f"{len(failures)} of 30 kills left a broken artifact: {failures[:3]}"
    print(f"last save {duration * 1e3:.1f} ms; folder held A/B after the kills: {seen}")
    assert seen["A"] and seen["B"], seen  # the kills really landed in different saves
    assert (adir / "NOTES.md").read_text() == "a user's file"
    save("A")  # a completed save deletes the temporaries of the killed writers
    assert [p.name for p in tmp_path.rglob(".*")] == []
    assert {"NOTES.md", CONFIG, WEIGHTS} <= {p.name for p in adir.iterdir()}


def hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_save_leaves_no_temporary_files_and_ignores_stale_ones(tmp_path):
    import fcntl

    base = testing.tiny_bert()
    model = adapted(base, 2, seed=1)
    stale = tmp_path / f".{WEIGHTS}.999999999-deadbeef.tmp"  # a killed writer's leftover
    stale.write_bytes(b"half a file")
    save_adapter(model, tmp_path)
    assert hidden(tmp_path) == [] and {CONFIG, WEIGHTS} <= {p.name for p in tmp_path.iterdir()}
    live = tmp_path / f".{CONFIG}.{os.getpid()}-cafe.tmp"  # a live writer's: kept, ignored
    live.write_bytes(b"{")
    with open(live, "rb") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # what a writer in progress holds
        assert same(trained_state(load_adapter(copy.deepcopy(base), tmp_path)),
                    trained_state(model))
        save_adapter(model, tmp_path)
        assert hidden(tmp_path) == [live.name]
    save_adapter(model, tmp_path)  # its writer is gone (lock released): now deleted
    assert hidden(tmp_path) == []


# ---------------------------------------------------------------- damaged adapter files
def tensor_span(path, key):
    """Byte range of tensor ``key``'s data inside a safetensors file."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    start, end = json.loads(raw[8:8 + n])[key]["data_offsets"]
    return 8 + n + start, 8 + n + end


def poke(path, key, values):
    """Overwrite the first elements of float32 tensor ``key`` in place (bytes on disk)."""
    start, end = tensor_span(path, key)
    raw = bytearray(path.read_bytes())
    data = torch.tensor(values, dtype=torch.float32).numpy().tobytes()
    assert start + len(data) <= end
    raw[start:start + len(data)] = data
    path.write_bytes(bytes(raw))


def rewrite_config(directory, change):
    """Apply ``change(config)`` to both the JSON config and the copy in the weights file."""
    tensors, meta = read_safetensors(directory / WEIGHTS)
    change(meta["config"])
    write_safetensors(directory / WEIGHTS, tensors, meta)
    write_json(directory / CONFIG, meta["config"])


def save_v1(model, directory):
    """An adapter as rowsft_nb format 1 wrote it: JSON config only, no checksums."""
    save_adapter(model, directory)
    tensors, meta = read_safetensors(directory / WEIGHTS)
    config = meta["config"]
    config["version"] = 1
    (directory / WEIGHTS).unlink()
    save_file(tensors, str(directory / WEIGHTS),
              metadata={"rowsft": json.dumps({"format": "rowsft_nb.adapter", "version": 1})})
    (directory / CONFIG).write_text(json.dumps(config, indent=2))


DELTA = "bert.encoder.layer.0.attention.self.query.delta"


def truncate(p):
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])


def garble_header(p):
    raw = bytearray(p.read_bytes())
    raw[8:40] = bytes(range(200, 232))
    p.write_bytes(bytes(raw))


def edit_json(fn):
    def apply(d):
        config = json.loads((d / CONFIG).read_text())
        (d / CONFIG).write_text(json.dumps(fn(config)))
    return apply


def set_key(key, value):
    def fn(config):
        config[key] = value
        return config
    return fn


def plan_rows(value):
    def fn(config):
        name = next(iter(config["plan"]["rows"]))
        config["plan"]["rows"][name] = value
        return config
    return fn


# fault id -> (damage(directory), error class, message pattern)
ADAPTER_FAULTS = {
    "weights_truncated": (lambda d: truncate(d / WEIGHTS), FileFormatError,
                          rf"{WEIGHTS} is not a readable safetensors file.*truncated or garbled"),
    "weights_empty": (lambda d: (d / WEIGHTS).write_bytes(b""), FileFormatError,
                      rf"{WEIGHTS} is not a readable safetensors file"),
    "weights_garbled_header": (lambda d: garble_header(d / WEIGHTS), FileFormatError,
                               rf"{WEIGHTS} is not a readable safetensors file"),
    "weights_missing": (lambda d: (d / WEIGHTS).unlink(), FileNotFoundError,
                        rf"{WEIGHTS} does not exist"),
    "finite_bytes_changed_in_delta": (lambda d: poke(d / WEIGHTS, DELTA, [0.25, -1.5, 3.0]),
                                      FileFormatError, rf"{WEIGHTS}: tensor '{DELTA}' fails its "
                                                       "sha256 check"),
    "nan_written_into_delta": (lambda d: poke(d / WEIGHTS, DELTA, [float("nan"), 1.0,
                                                                   float("inf")]),
                               FileFormatError, rf"{WEIGHTS}: module 'bert\.encoder\.layer\.0\."
                                                r"attention\.self\.query' has 2 non-finite"),
    "config_truncated": (lambda d: (d / CONFIG).write_text((d / CONFIG).read_text()[:50]),
                         FileFormatError, rf"{CONFIG} is not valid JSON.*truncated or garbled"),
    "config_is_a_list": (lambda d: (d / CONFIG).write_text("[1, 2]"), FileFormatError,
                         rf"{CONFIG} holds a JSON list, expected an object"),
    "config_without_plan": (edit_json(lambda c: {k: v for k, v in c.items() if k != "plan"}),
                            FileFormatError, rf"{CONFIG} lacks the 'plan' entry"),
    "config_heads_not_a_list": (edit_json(set_key("heads", "classifier")), FileFormatError,
                                rf"{CONFIG}: 'heads' must be a list of module names"),
    "config_dropout_a_string": (edit_json(set_key("dropout", "0.1")), FileFormatError,
                                rf"{CONFIG}: 'dropout' must be a number in \[0, 1\)"),
    "config_unknown_dtype": (edit_json(set_key("delta_dtype", "float7")), FileFormatError,
                             rf"{CONFIG}: .*unknown dtype 'float7'"),
    "config_newer_version": (edit_json(set_key("version", 99)), FileFormatError,
                             rf"{CONFIG} has adapter format version 99.*upgrade"),
    "config_plan_half_index": (edit_json(plan_rows([0, 0.5])), FileFormatError,
                               rf"{CONFIG}: its 'plan' is malformed.*\[1\] is 0\.5, not an "
                               "integer"),
    "config_plan_rows_a_string": (edit_json(plan_rows("0,1")), FileFormatError,
                                  rf"{CONFIG}: its 'plan' is malformed.*must be a list"),
    "peft_lora_folder": (lambda d: (save_file({"base_model.model.x.lora_A.weight": torch.ones(
        2, 2)}, str(d / WEIGHTS), metadata={"format": "pt"}), (d / CONFIG).write_text(
        '{"peft_type": "LORA"}')), FileFormatError,
        rf"{WEIGHTS} is not a rowsft_nb adapter weights file.*PeftModel\.from_pretrained"),
    "folder_empty": (lambda d: [p.unlink() for p in d.iterdir()], FileNotFoundError,
                     "holds no adapter"),
}


@pytest.mark.parametrize("fault,version", [
    (f, v) for f in sorted(ADAPTER_FAULTS) for v in (1, 2)
    if (f, v) != ("finite_bytes_changed_in_delta", 1)])  # format 1 has no checksums
def test_damaged_adapter_fails_naming_file_and_problem_model_unchanged(fault, version, tmp_path):
    damage, error, pattern = ADAPTER_FAULTS[fault]
    base = testing.tiny_bert()
    d = tmp_path / "adapter"
    (save_v1 if version == 1 else save_adapter)(adapted(base, 2, seed=1), d)
    damage(d)
    model = copy.deepcopy(base)
    snap = snapshot(model)
    with pytest.raises(error, match=pattern):
        load_adapter(model, d)
    assert_unchanged(model, snap)


def test_weights_file_config_is_checked_too(tmp_path):
    base = testing.tiny_bert()
    save_adapter(adapted(base, 2, seed=1), tmp_path)
    rewrite_config(tmp_path, lambda c: c.pop("plan"))
    (tmp_path / CONFIG).unlink()
    with pytest.raises(FileFormatError, match=rf"{WEIGHTS} lacks the 'plan' entry"):
        load_adapter(copy.deepcopy(base), tmp_path)


def test_nan_delta_saved_by_a_diverged_run_is_refused_at_load(tmp_path):
    base = testing.tiny_bert()
    model = adapted(base, 2, seed=1)
    name = "bert.encoder.layer.1.output.dense"
    with torch.no_grad():
        adapted_modules(model)[name].delta[0, :3] = float("nan")
    save_adapter(model, tmp_path)  # checksums match: only the finiteness check can catch it
    with pytest.raises(FileFormatError, match=rf"module '{name}' has 3 non-finite"):
        load_adapter(copy.deepcopy(base), tmp_path)


def test_format_1_adapter_still_loads_bit_exactly(tmp_path):
    base = testing.tiny_bert()
    model = adapted(base, 2, seed=1)
    save_v1(model, tmp_path)
    assert "config" not in read_safetensors(tmp_path / WEIGHTS)[1]
    assert same(trained_state(load_adapter(copy.deepcopy(base), tmp_path)), trained_state(model))


@pytest.mark.parametrize("copy_state", ["missing", "older"])
def test_interrupted_json_copy_loads_the_weights_files_own_config(copy_state, tmp_path):
    """The state a save killed between its two renames leaves: new weights, old/no JSON."""
    base = testing.tiny_bert()
    a, b = adapted(base, 2, seed=1), adapted(base, 5, seed=2)
    save_adapter(a, tmp_path)
    old_json = (tmp_path / CONFIG).read_text()
    save_adapter(b, tmp_path)
    if copy_state == "missing":
        (tmp_path / CONFIG).unlink()
    else:
        (tmp_path / CONFIG).write_text(old_json)
    with pytest.warns(UserWarning, match=f"{CONFIG} (is missing|differs)"):
        got = trained_state(load_adapter(copy.deepcopy(base), tmp_path))
    assert same(got, trained_state(b))


# ---------------------------------------------------------------- bad heads: validated first
def test_bad_heads_entry_fails_before_injecting_then_retry_works(tmp_path):
    base = testing.tiny_bert()
    good = adapted(base, 2, seed=1)
    save_adapter(good, tmp_path / "good")
    save_adapter(good, tmp_path / "bad")
    rewrite_config(tmp_path / "bad", lambda c: c["heads"].append("bert.pooler.nonexistent"))
    model = copy.deepcopy(base)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"trained heads \['bert\.pooler\.nonexistent'\] are "
                                         r"not classifier heads.*\['classifier'\]"):
        load_adapter(model, tmp_path / "bad")
    assert_unchanged(model, snap)
    assert not adapted_modules(model)
    loaded = load_adapter(model, tmp_path / "good")  # no "double injection"
    assert same(trained_state(loaded), trained_state(good))


# ---------------------------------------------------------------- damaged plan files
def plan_json(tmp_path):
    base = testing.tiny_bert()
    path = tmp_path / "plan.json"
    make_plan(base, 2, 1).save(path)
    return path


def edit_plan(fn):
    def apply(p):
        d = json.loads(p.read_text())
        fn(d)
        p.write_text(json.dumps(d))
    return apply


def first_rows(value):
    def fn(d):
        d["rows"][next(iter(d["rows"]))] = value
    return fn


PLAN_FAULTS = {
    "truncated": (lambda p: p.write_text(p.read_text()[:40]), r"is not valid JSON"),
    "list": (lambda p: p.write_text("[]"), r"holds a JSON list, expected an object"),
    "not_a_plan": (edit_plan(lambda d: d.update(format="other")), r"not a RowPlan"),
    "missing_rows": (edit_plan(lambda d: d.pop("rows")), r"has no 'rows' entry"),
    "shapes_wrong_type": (edit_plan(lambda d: d.update(shapes=[1, 2])),
                          r"'shapes' must be an object"),
    "shape_not_two_ints": (edit_plan(lambda d: d["shapes"].update(
        {next(iter(d["shapes"])): [32, "32"]})), r"must be \[d_out, d_in\]"),
    "half_index": (edit_plan(first_rows([1, 0.5])), r"\[1\] is 0\.5, not an integer index"),
    "bool_index": (edit_plan(first_rows([True])), r"\[0\] is True, not an integer index"),
    "rows_not_a_list": (edit_plan(first_rows(3)), r"must be a list of integers"),
    "index_out_of_range": (edit_plan(first_rows([0, 10_000])), r"index out of range"),
}


@pytest.mark.parametrize("fault", sorted(PLAN_FAULTS))
def test_damaged_plan_file_fails_naming_file_and_problem(fault, tmp_path):
    damage, pattern = PLAN_FAULTS[fault]
    path = plan_json(tmp_path)
    damage(path)
    with pytest.raises(FileFormatError, match=rf"plan\.json.*{pattern}"):
        RowPlan.load(path)


def test_plan_constructor_refuses_fractional_indices_instead_of_truncating():
    with pytest.raises(ValueError, match=r"index 0\.5 for 'x' is not an integer"):
        RowPlan(rows={"x": [0, 0.5]}, shapes={"x": (4, 4)})
    with pytest.raises(ValueError, match=r"index 2\.5 for 'x' is not an integer"):
        RowPlan(rows={"x": torch.tensor([2.5])}, shapes={"x": (4, 4)})
    plan = RowPlan(rows={"x": torch.tensor([3.0, 1.0])}, shapes={"x": (4, 4)})  # whole floats
    assert plan.rows["x"].tolist() == [1, 3] and plan.rows["x"].dtype == torch.int64


# ---------------------------------------------------------------- damaged report files
def report_file(tmp_path):
    path = tmp_path / "report.safetensors"
    report_for(testing.tiny_bert(), 1).save(path)
    return path


def rewrite_report_meta(fn):
    def apply(p):
        tensors, meta = read_safetensors(p)
        fn(meta, tensors)
        write_safetensors(p, tensors, meta)
    return apply


def raw_metadata(text):
    def apply(p):
        tensors, _ = read_safetensors(p)
        save_file(tensors, str(p), metadata={"rowsft": text})
    return apply


SCORES = "rows/bert.encoder.layer.0.attention.self.query"
REPORT_FAULTS = {
    "truncated": (truncate, r"is not a readable safetensors file.*truncated or garbled"),
    "garbled_header": (garble_header, r"is not a readable safetensors file"),
    "finite_bytes_changed": (lambda p: poke(p, SCORES, [7.0, 8.0]),
                             rf"tensor '{SCORES}' fails its sha256 check"),
    "metadata_garbled": (raw_metadata('{"format": "rowsft_nb.Imp'), r"metadata in its header is "
                                                                       "not valid JSON"),
    "metadata_a_list": (raw_metadata("[1, 2]"), r"metadata in its header is not a JSON object"),
    "not_a_report": (rewrite_report_meta(lambda m, t: m.update(format="x")),
                     r"is not an ImportanceReport file"),
    "missing_order": (rewrite_report_meta(lambda m, t: m.pop("order")), r"lacks 'order'"),
    "order_wrong_type": (rewrite_report_meta(lambda m, t: m.update(order="q")),
                         r"wrong types"),
    "missing_scores": (rewrite_report_meta(lambda m, t: t.pop(SCORES)),
                       r"lacks the scores of module"),
    "scores_wrong_length": (rewrite_report_meta(lambda m, t: t.update({SCORES: t[SCORES][:3]})),
                            r"scores for .* have shape \(3,\)"),
}


@pytest.mark.parametrize("fault", sorted(REPORT_FAULTS))
def test_damaged_report_file_fails_naming_file_and_problem(fault, tmp_path):
    damage, pattern = REPORT_FAULTS[fault]
    path = report_file(tmp_path)
    damage(path)
    with pytest.raises(FileFormatError, match=rf"report\.safetensors.*{pattern}"):
        ImportanceReport.load(path)


def test_report_without_checksums_from_older_versions_still_loads(tmp_path):
    path = report_file(tmp_path)
    report = ImportanceReport.load(path)
    tensors, meta = read_safetensors(path)
    path.unlink()
    save_file(tensors, str(path), metadata={"rowsft": json.dumps(meta)})
    assert same_report(ImportanceReport.load(path), report)


# ---------------------------------------------------------------- training checkpoints
def test_checkpoint_save_failing_midway_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    """A checkpoint save that dies after the weights and before trainer_state.json (here an
    error; a kill behaves the same) must not leave a checkpoint-N that resume_from=True picks;
    a stale staging folder of a killed run is ignored, then deleted."""
    from datasets import Dataset
    from transformers import Trainer
    from transformers.trainer_utils import get_last_checkpoint

    from rowsft_nb.train import train

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, testing.VOCAB, (32, 8), generator=g)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(
        ids).tolist(), "labels": (ids[:, 1] % 2).tolist()})
    fast = dict(device="cpu", progress_bar=False, batch_size=8, lr=1e-2, max_steps=4,
                save_steps=2, output_dir=tmp_path)
    base = testing.tiny_bert()
    real = Trainer._save_rng_state

    def dies_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise OSError("disk full (injected)")
        return real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", dies_at_step_4)
    with pytest.raises(OSError, match="injected"):
        train(inject(copy.deepcopy(base), make_plan(base, 2, 1)), ds, **fast)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    assert (tmp_path / "checkpoint-2" / "trainer_state.json").exists()
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")

    stale = tmp_path / ".checkpoint-4.4242-0bad.tmp" / "checkpoint-4"  # a killed run's
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    result = train(inject(copy.deepcopy(base), make_plan(base, 2, 1)), ds, resume_from=True,
                   **fast)
    assert result.steps == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    state = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_save_adapter_keeps_a_readme_the_user_wrote(tmp_path):
    """The model card never replaces a README.md the user put in the folder; it does replace
    its own card on the next save."""
    import warnings as _w

    from rowsft_nb import testing
    from rowsft_nb.adapter import inject, save_adapter
    from rowsft_nb.selection import FixedRows, select
    from rowsft_nb.scoring import score

    model = testing.tiny_llama()
    inject(model, select(score(model, metric="l2", progress=False), FixedRows(2)))
    mine = tmp_path / "README.md"
    mine.write_text("# my notes\n")
    with pytest.warns(UserWarning, match="not written by rowsft_nb"):
        save_adapter(model, tmp_path)
    assert mine.read_text() == "# my notes\n"
    mine.unlink()
    save_adapter(model, tmp_path)
    first = mine.read_text()
    assert "library_name: rowsft_nb" in first
    with _w.catch_warnings():
        _w.simplefilter("error")
        save_adapter(model, tmp_path)        # our own card: replaced without a warning
    assert "library_name: rowsft_nb" in mine.read_text()
