"""Bad input is refused with one clear error before any expensive work (issue 11, part 6):
train() arguments, datasets, labels, merged/meta models; prepare_task labels; CLI flags."""
import importlib

import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from rowsft_nb import cli, testing
from rowsft_nb.adapter import inject, merge, unmerge
from rowsft_nb.data import prepare_task
from rowsft_nb.plan import RowPlan
from rowsft_nb.targets import find_targets, linear_shape
from rowsft_nb.train import train

train_module = importlib.import_module("rowsft_nb.train")  # rowsft_nb.train is the function
FAST = dict(device="cpu", progress_bar=False, batch_size=4, logging_steps=1)


def cls_dataset(n=8, labels=None):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, testing.VOCAB, (n, 6), generator=g)
    labels = labels if labels is not None else (ids[:, 1] % 2).tolist()
    return Dataset.from_dict({"input_ids": ids.tolist(),
                              "attention_mask": torch.ones_like(ids).tolist(), "labels": labels})


def adapted_bert():
    model = testing.tiny_bert()
    names = find_targets(model, "all-linear")
    plan = RowPlan(rows={n: [0, 1] for n in names},
                   shapes={n: linear_shape(model.get_submodule(n)) for n in names})
    return inject(model, plan)


def snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def assert_unchanged(model, before):
    state, flags = snapshot(model)
    assert flags == before[1]
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[k], before[0][k]) for k in state)


@pytest.fixture
def no_trainer(monkeypatch):
    """Building the Trainer (the first expensive step) fails the test."""
    def boom():
        raise AssertionError("train() got as far as building the Trainer")
    monkeypatch.setattr(train_module, "_make_trainer_class", boom)


# ------------------------------------------------------------------ train() arguments
@pytest.mark.parametrize("kwargs, message", [
    ({"max_steps": 0}, "max_steps must be a whole number >= 1, got 0"),
    ({"max_steps": -3}, "max_steps must be a whole number >= 1, got -3"),
    ({"max_steps": 2.5}, "max_steps must be a whole number >= 1, got 2.5"),
    ({"max_steps": True}, "max_steps must be a whole number >= 1, got True"),
    ({"epochs": 0}, "epochs must be a finite number > 0, got 0"),
    ({"epochs": -1.0}, "epochs must be a finite number > 0, got -1.0"),
    ({"epochs": float("nan")}, "epochs must be a finite number > 0, got nan"),
    ({"epochs": "2"}, "epochs must be a finite number > 0, got '2'"),
    ({"lr": float("nan")}, "lr must be a finite number > 0, got nan"),
    ({"lr": -1e-3}, "lr must be a finite number > 0"),
    ({"batch_size": 0}, "batch_size must be a whole number >= 1, got 0"),
    ({"grad_accum": 0}, "grad_accum must be a whole number >= 1, got 0"),
])
def test_bad_step_counts_and_rates_are_refused_before_training(kwargs, message, no_trainer):
    model = adapted_bert()
    before = snapshot(model)
    with pytest.raises(ValueError) as e:
        train(model, cls_dataset(), **{**FAST, **kwargs})
    assert message in str(e.value)
    assert_unchanged(model, before)


def test_whole_float_max_steps_and_fractional_epochs_still_train():
    """The checks refuse nonsense only: max_steps=2.0 and epochs=0.5 are valid."""
    result = train(adapted_bert(), cls_dataset(), max_steps=2.0, **FAST)
    assert result.steps == 2
    result = train(adapted_bert(), cls_dataset(n=16), epochs=0.5, **FAST)
    assert result.steps == 2  # half of 16 examples / batch 4


def test_output_dir_under_a_regular_file_is_refused(tmp_path, no_trainer):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=r"output_dir: .*file.txt is a file, so .* cannot be created"):
        train(adapted_bert(), cls_dataset(), output_dir=blocker / "run", **FAST)
    with pytest.raises(ValueError, match="output_dir: .*file.txt is a file, not a folder"):
        train(adapted_bert(), cls_dataset(), output_dir=blocker, **FAST)


def test_unavailable_cuda_index_names_the_device(no_trainer):
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError) as e:
        train(adapted_bert(), cls_dataset(), **{**FAST, "device": f"cuda:{n + 3}"})
    text = str(e.value)
    assert f"cuda:{n + 3}" in text
    assert ("CUDA is not available here" in text) if n == 0 else (f"has {n} CUDA device" in text)


# ------------------------------------------------------------------ train() datasets
def test_labels_outside_num_labels_are_named_before_training(no_trainer):
    model = adapted_bert()  # tiny_bert: num_labels=2
    before = snapshot(model)
    with pytest.raises(ValueError) as e:
        train(model, cls_dataset(labels=[0, 1, 7, 1, 0, 2, 1, 0]), **FAST)
    text = str(e.value)
    assert "train dataset has labels [2, 7] outside [0, 2)" in text
    assert "num_labels=8" in text and "prepare_task" in text
    with pytest.raises(ValueError, match=r"eval dataset has labels \[-1\] outside \[0, 2\)"):
        train(model, cls_dataset(), eval_dataset=cls_dataset(labels=[0, 1, -1, 1, 0, 1, 1, 0]),
              max_steps=1, **FAST)
    assert_unchanged(model, before)


def test_ignore_index_labels_are_allowed():
    result = train(adapted_bert(), cls_dataset(labels=[0, 1, -100, 1, 0, 1, 1, 0]),
                   max_steps=1, **FAST)
    assert result.steps == 1


def test_wrong_columns_say_what_was_expected(no_trainer):
    ds = Dataset.from_dict({"tokens": [[1, 2, 3]] * 4, "labels": [0, 1, 0, 1]})
    with pytest.raises(ValueError) as e:
        train(adapted_bert(), ds, **FAST)
    text = str(e.value)
    assert "columns ['labels', 'tokens']" in text
    assert "input_ids + labels (missing input_ids)" in text and "prepare_task" in text


def test_untokenised_text_and_label_columns_point_to_prepare_task(no_trainer):
    ds = Dataset.from_dict({"text": ["good", "bad", "fine", "awful"], "label": [1, 0, 1, 0]})
    with pytest.raises(ValueError) as e:
        train(adapted_bert(), ds, **FAST)
    text = str(e.value)
    assert "untokenised columns ['label', 'text']" in text
    assert "rowsft_nb.prepare_task(DatasetDict({'train': ds}), tokenizer)" in text


def test_leftover_text_column_is_named(no_trainer):
    ds = cls_dataset().add_column("text", ["x"] * 8)
    with pytest.raises(ValueError, match=r"still has text columns \['text'\].*remove_columns"):
        train(adapted_bert(), ds, **FAST)


def test_custom_collator_may_read_raw_columns():
    """A collator of the user's own builds input_ids itself: no column check gets in the way."""
    ds = Dataset.from_dict({"text": ["ab", "cde", "f", "gh"], "label": [1, 0, 1, 0]})

    def collate(rows):
        ids = torch.tensor([[5 + len(r["text"])] * 4 for r in rows])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.tensor([r["label"] for r in rows])}

    result = train(adapted_bert(), ds, data_collator=collate, max_steps=1, **FAST)
    assert result.steps == 1


# ------------------------------------------------------------------ train() models
def test_training_a_merged_adapter_says_unmerge(no_trainer):
    model = adapted_bert()
    merge(model)
    before = snapshot(model)
    with pytest.raises(ValueError) as e:
        train(model, cls_dataset(), **FAST)
    assert "adapter is merged" in str(e.value) and "rowsft_nb.unmerge(model)" in str(e.value)
    assert_unchanged(model, before)


def test_unmerged_adapter_trains_again():
    model = adapted_bert()
    merge(model)
    unmerge(model)
    result = train(model, cls_dataset(), max_steps=1, **FAST)
    assert result.steps == 1
    assert model.bert.encoder.layer[0].attention.self.query.delta.abs().sum() > 0


def test_meta_device_model_is_refused(no_trainer):
    with torch.device("meta"):
        model = testing.tiny_bert()
    with pytest.raises(ValueError) as e:
        train(model, cls_dataset(), **FAST)
    assert "on the meta device" in str(e.value) and "real weights" in str(e.value)


# ------------------------------------------------------------------ prepare_task labels
@pytest.fixture(scope="module")
def bert_tok():
    from transformers import AutoTokenizer

    from rowsft_nb.assets import minilm_path
    return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)


def test_sparse_integer_labels_become_contiguous_ids_with_a_recorded_mapping(bert_tok):
    ds = DatasetDict({"train": Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [9, 0, 5, 9]}),
                      "validation": Dataset.from_dict({"text": ["e", "f"], "label": [5, 0]})})
    data = prepare_task(ds, bert_tok, max_length=8)
    assert data.num_labels == 3 and data.label_names == ["0", "5", "9"]
    assert data.label2id == {"0": 0, "5": 1, "9": 2}
    assert data.id2label == {0: "0", 1: "5", 2: "9"}
    assert data.train["labels"] == [2, 0, 1, 2]
    assert data.validation["labels"] == [1, 0]


def test_string_labels_are_mapped_in_sorted_order(bert_tok):
    ds = DatasetDict({"train": Dataset.from_dict({"text": ["a", "b", "c"], "label": ["pos", "neg", "pos"]})})
    data = prepare_task(ds, bert_tok, max_length=8)
    assert data.label2id == {"neg": 0, "pos": 1} and data.train["labels"] == [1, 0, 1]


def test_classlabel_ids_are_kept_and_unlabeled_rows_refused(bert_tok):
    feats = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    ok = DatasetDict({"train": Dataset.from_dict({"text": ["a", "b"], "label": [1, 0]}, features=feats)})
    data = prepare_task(ok, bert_tok, max_length=8)
    assert data.train["labels"] == [1, 0] and data.label2id == {"neg": 0, "pos": 1}
    bad = DatasetDict({"train": Dataset.from_dict({"text": ["a", "b"], "label": [1, -1]}, features=feats)})
    with pytest.raises(ValueError, match=r"label values \[-1\] are not ids of the ClassLabel"):
        prepare_task(bad, bert_tok, max_length=8)


def test_prepare_task_says_which_columns_it_expects(bert_tok):
    with pytest.raises(ValueError) as e:
        prepare_task(DatasetDict({"train": Dataset.from_dict({"sentence": ["a"], "y": [1]})}), bert_tok)
    assert "['sentence', 'y']" in str(e.value) and "text+label" in str(e.value)
    assert "rename_column" in str(e.value)
    tokenised = DatasetDict({"train": cls_dataset()})
    with pytest.raises(ValueError, match="already tokenised .* pass its splits to rowsft_nb.train"):
        prepare_task(tokenised, bert_tok)


# ------------------------------------------------------------------ CLI flags
@pytest.fixture
def no_model_loads(monkeypatch):
    """Loading any model fails the test: the flag checks must come first."""
    from rowsft_nb import assets

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the flags were checked")
    for target, name in ((cli, "_load"), (assets, "load_encoder"), (assets, "load_causal_lm")):
        monkeypatch.setattr(target, name, boom)


def _cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    return err


@pytest.mark.parametrize("argv, flag_text", [
    (["train", "--ratio", "-1"], "--ratio must be in (0, 1]"),
    (["train", "--ratio", "1.5"], "--ratio must be in (0, 1]"),
    (["train", "--metric", "nope"], "--metric 'nope' is not a metric; choose one of"),
    (["train", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["train", "--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["train", "--epochs", "0"], "--epochs must be a finite number > 0"),
    (["train", "--max-steps", "0"], "--max-steps must be >= 1, got 0"),
    (["train", "--plan", "no/such/plan.json"], "--plan no/such/plan.json: no such file"),
    (["train", "--model", "encoder", "--task", "chat_qa"], "--model encoder needs a classification task"),
    (["demo", "--max-steps", "-2"], "--max-steps must be >= 1, got -2"),
    (["demo", "--n-train", "0"], "--n-train must be >= 1"),
    (["score", "--metric", "nope"], "--metric 'nope' is not a metric"),
    (["score", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["score", "--n-samples", "0"], "--n-samples must be >= 1"),
])
def test_bad_flags_exit_2_with_one_line_before_loading_a_model(argv, flag_text, capsys,
                                                               no_model_loads):
    err = _cli_error(argv, capsys)
    assert err.startswith(f"rowsft-nb {argv[0]}: error: ")
    assert flag_text in err


@pytest.mark.parametrize("command", ["train", "demo", "score"])
def test_missing_cuda_device_flag_exits_2(command, capsys, no_model_loads):
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    err = _cli_error([command, "--device", f"cuda:{n + 3}"], capsys)
    assert f"--device cuda:{n + 3}: " in err


def test_malformed_plan_file_exits_2(tmp_path, capsys, no_model_loads):
    plan = tmp_path / "plan.json"
    plan.write_text("{not json")
    err = _cli_error(["train", "--plan", str(plan)], capsys)
    assert f"--plan {plan}: " in err


@pytest.mark.parametrize("command", ["train", "demo", "score"])
def test_out_under_a_regular_file_exits_2_before_training(command, tmp_path, capsys,
                                                          no_model_loads):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("x")
    err = _cli_error([command, "--out", str(blocker / "adapter")], capsys)
    assert f"--out {blocker / 'adapter'}: {blocker} is a file" in err


def test_valid_flags_pass_the_checks(tmp_path, capsys, no_model_loads):
    """The defaults and a typical command line get as far as loading the model."""
    with pytest.raises(AssertionError, match="a model was loaded"):
        cli.main(["train", "--task", "sms_spam", "--ratio", "0.05", "--max-steps", "3",
                  "--device", "cpu", "--out", str(tmp_path / "a" / "b")])
    with pytest.raises(AssertionError, match="a model was loaded"):
        cli.main(["score", "--out", str(tmp_path / "r.safetensors")])


def test_cuda_index_checks_on_a_one_gpu_machine(monkeypatch, capsys, no_model_loads):
    """The GPU-machine branch, without a GPU: torch reports one CUDA device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    resolve = train_module.resolve_device
    assert resolve("cuda:0") == "cuda" and resolve("cuda") == "cuda"
    with pytest.raises(ValueError, match=r"'cuda:3' but this machine has 1 CUDA device\(s\) \(cuda:0..cuda:0\)"):
        resolve("cuda:3")
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        resolve("cuda:x")
    err = _cli_error(["train", "--device", "cuda:3"], capsys)
    assert "--device cuda:3: " in err and "has 1 CUDA device" in err
    assert cli._device_problem("cuda:0", indexed_ok=True) is None     # score moves the model there
    assert cli._device_problem("cuda:1", indexed_ok=True) is not None


def test_causal_lm_collator_ignores_leftover_text_columns():
    """CausalLMCollator reads only input_ids/attention_mask/labels: a leftover prompt
    column is harmless there and is not refused."""
    model = testing.tiny_llama()
    names = find_targets(model, "all-linear")
    inject(model, RowPlan(rows={n: [0] for n in names},
                          shapes={n: linear_shape(model.get_submodule(n)) for n in names}))
    ds = Dataset.from_dict({"input_ids": [[5, 6, 7, 8]] * 4, "prompt": ["p"] * 4})
    result = train(model, ds, max_steps=1, **FAST)
    assert result.task == "causal_lm" and result.steps == 1
