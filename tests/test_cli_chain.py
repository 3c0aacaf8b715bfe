"""Bring your own model and data: the `rowsft-nb score | select | train | merge | export`
chain over files, on tiny checkpoints saved with save_pretrained (BERT classifier, LLaMA
causal LM, T5 seq2seq) and small CSV / JSONL / Parquet files; plus rowsft_nb.sources."""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from rowsft_nb import cli
from rowsft_nb.testing import tiny_bert, tiny_llama, tiny_model

WORDS = ("good great fine bad awful poor okay so so movie film plot actor was the a "
         "what is two plus three four five six yes no capital of france paris").split()
SPECIAL = ["[PAD]", "[EOS]", "[UNK]"]  # ids 0, 1, 2 (T5's pad 0 / eos 1)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]",
                                   unk_token="[UNK]", model_max_length=32,
                                   model_input_names=["input_ids", "attention_mask"])


def _reviews(n: int = 24) -> pd.DataFrame:
    g = torch.Generator().manual_seed(0)
    words = {"pos": ["good", "great", "fine"], "neg": ["bad", "awful", "poor"],
             "neutral": ["okay", "so"]}
    rows = []
    for i in range(n):
        label = ("pos", "neg", "neutral")[i % 3]
        pick = torch.randint(0, len(words[label]), (3,), generator=g).tolist()
        rows.append({"id": i, "review": "the movie was " + " ".join(words[label][k] for k in pick),
                     "sentiment": label})
    return pd.DataFrame(rows)


def _qa(n: int = 16) -> pd.DataFrame:
    pairs = [("what is two plus three", "five"), ("what is two plus four", "six"),
             ("capital of france", "paris"), ("is the film good", "yes")]
    return pd.DataFrame([{"question": pairs[i % 4][0], "answer": pairs[i % 4][1], "n": i}
                         for i in range(n)])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Saved tiny checkpoints (with the tokenizer) and data files."""
    root = tmp_path_factory.mktemp("byo")
    tok = _tokenizer()
    vocab = len(tok)
    models = {"bert": tiny_bert(num_labels=3), "llama": tiny_llama(),
              "t5": tiny_model("t5")}
    for name, model in models.items():
        assert model.config.vocab_size >= vocab
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    _reviews().to_csv(root / "reviews.csv", index=False)
    _qa().to_csv(root / "qa.csv", index=False)
    _qa().to_json(root / "qa.jsonl", orient="records", lines=True)
    _qa().to_parquet(root / "qa.parquet")
    (root / "notes.txt").write_text("not a table")
    from rowsft_nb import FixedRows, inject, save_adapter, score, select
    from rowsft_nb.testing import random_batches

    bert = tiny_bert(num_labels=3)
    report = score(bert, random_batches(bert, n=1), metric="l2", progress=False)
    save_adapter(inject(bert, select(report, FixedRows(1))), root / "adapter")
    return root


def _run(*argv: str) -> None:
    assert cli.main(list(argv)) == 0


def _batch(tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


# ---------------------------------------------------------------------------- the chains
def test_classification_chain_score_select_train_merge_export(work, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rowsft_nb import RowPlan, load_adapter
    from rowsft_nb.adapter import read_adapter_config
    from rowsft_nb.scoring import ImportanceReport

    model_dir, csv = str(work / "bert"), str(work / "reviews.csv")
    data = ["--data", csv, "--text-column", "review", "--label-column", "sentiment",
            "--max-length", "16", "--no-progress"]
    report, plan_path = tmp_path / "report.safetensors", tmp_path / "plan.json"
    adapter, merged, peft_dir = tmp_path / "adapter", tmp_path / "merged", tmp_path / "peft"

    _run("score", "--model", model_dir, *data, "--metric", "l2", "--n-samples", "8",
         "--out", str(report))
    rep = ImportanceReport.load(report)
    base = AutoModelForSequenceClassification.from_pretrained(model_dir)
    q = "bert.encoder.layer.0.attention.self.query"
    torch.testing.assert_close(rep.scores[q], base.get_submodule(q).weight.detach().square().sum(1))

    _run("select", "--report", str(report), "--rows", "2", "--out", str(plan_path))
    plan = RowPlan.load(plan_path)
    assert set(plan.modules) == set(rep.scores)
    assert all(idx.numel() == 2 for idx in plan.rows.values())
    for name, idx in plan.rows.items():  # the 2 highest-scoring rows of every layer
        assert set(idx.tolist()) == set(rep.scores[name].topk(2).indices.tolist())

    _run("train", "--model", model_dir, *data, "--plan", str(plan_path), "--max-steps", "2",
         "--batch-size", "4", "--lr", "0.05", "--out", str(adapter))
    out = capsys.readouterr().out
    assert "3 labels" in out and "held-out after:  accuracy" in out
    config = read_adapter_config(adapter)
    # string labels -> ids in sorted order, recorded with the adapter
    assert config["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}
    assert config["plan"]["rows"] == plan.to_dict()["rows"]
    card = (adapter / "README.md").read_text()
    assert "base_model:" in card and "accuracy" in card and "0: neg, 1: neutral, 2: pos" in card

    _run("merge", "--model", model_dir, "--adapter", str(adapter), "--out", str(merged))
    _run("export", "--model", model_dir, "--adapter", str(adapter), "--out", str(peft_dir))

    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = _batch(tok, ["the movie was good", "bad bad awful plot", "so so okay"])
    adapted = load_adapter(AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=3), adapter)
    want = _logits(adapted, batch)
    plain = _logits(AutoModelForSequenceClassification.from_pretrained(model_dir), batch)
    assert not torch.allclose(want, plain)  # training changed the outputs

    merged_model = AutoModelForSequenceClassification.from_pretrained(merged)
    assert merged_model.config.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    torch.testing.assert_close(_logits(merged_model, batch), want, atol=1e-5, rtol=1e-5)
    # only the planned rows of a layer changed in the merged weights
    diff = (merged_model.get_submodule(q).weight - base.get_submodule(q).weight).abs().sum(1)
    assert set(diff.nonzero().flatten().tolist()) <= set(plan.rows[q].tolist())
    assert AutoTokenizer.from_pretrained(merged)("good")["input_ids"] == tok("good")["input_ids"]

    peft = pytest.importorskip("peft")
    lora = peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=3), str(peft_dir))
    torch.testing.assert_close(_logits(lora.eval(), batch), want, atol=1e-5, rtol=1e-5)


def test_causal_lm_chain_from_csv_with_column_mapping(work, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rowsft_nb import load_adapter
    from rowsft_nb.adapter import read_adapter_config

    model_dir = str(work / "llama")
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    # scores and selects in the same command (--metric/--ratio) this time
    _run("train", "--model", model_dir, "--data", str(work / "qa.csv"),
         "--prompt-column", "question", "--response-column", "answer", "--metric", "taylor",
         "--ratio", "0.1", "--calib-samples", "4", "--max-steps", "2", "--batch-size", "4",
         "--lr", "0.05", "--max-length", "16", "--no-progress", "--out", str(adapter))
    out = capsys.readouterr().out
    assert "causal_lm" in out and "held-out after:  loss" in out
    config = read_adapter_config(adapter)
    assert config["base_model_class"] == "LlamaForCausalLM" and "id2label" not in config
    assert config["plan"]["meta"]["metric"] == "taylor"

    _run("merge", "--model", model_dir, "--adapter", str(adapter), "--out", str(merged))
    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = _batch(tok, ["what is two plus three five"])
    want = _logits(load_adapter(AutoModelForCausalLM.from_pretrained(model_dir), adapter), batch)
    assert not torch.allclose(want, _logits(AutoModelForCausalLM.from_pretrained(model_dir), batch))
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(merged), batch), want,
                               atol=1e-5, rtol=1e-5)


def test_seq2seq_chain_score_select_train(work, tmp_path, capsys):
    from transformers import AutoModelForSeq2SeqLM

    from rowsft_nb import load_adapter
    from rowsft_nb.adapter import read_adapter_config
    from rowsft_nb.scoring import ImportanceReport

    model_dir = str(work / "t5")
    data = ["--data", str(work / "qa.parquet"), "--prompt-column", "question",
            "--response-column", "answer", "--max-length", "16", "--no-progress"]
    report, plan_path, adapter = (tmp_path / "r.safetensors", tmp_path / "p.json",
                                  tmp_path / "adapter")
    _run("score", "--model", model_dir, *data, "--metric", "taylor", "--n-samples", "4",
         "--batch-size", "4", "--out", str(report))
    rep = ImportanceReport.load(report)
    # taylor needs the decoder targets: every decoder layer got a score, some non-zero
    dec = [n for n in rep.scores if n.startswith("decoder.")]
    assert dec and all(rep.scores[n].abs().sum() > 0 for n in dec)
    _run("select", "--report", str(report), "--ratio", "0.25", "--out", str(plan_path))
    _run("train", "--model", model_dir, *data, "--plan", str(plan_path), "--max-steps", "2",
         "--batch-size", "4", "--lr", "0.05", "--out", str(adapter))
    assert "seq2seq); data qa.parquet" in capsys.readouterr().out  # kind from the config
    config = read_adapter_config(adapter)
    assert config["base_model_class"] == "T5ForConditionalGeneration"
    model = load_adapter(AutoModelForSeq2SeqLM.from_pretrained(model_dir), adapter)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith(".delta"))


def test_task_kind_flag_trains_a_classifier_on_a_causal_lm_checkpoint(work, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from rowsft_nb import load_adapter
    from rowsft_nb.adapter import read_adapter_config

    adapter = tmp_path / "adapter"
    _run("train", "--model", str(work / "llama"), "--data", str(work / "reviews.csv"),
         "--text-column", "review", "--label-column", "sentiment", "--task-kind",
         "classification", "--metric", "l2", "--ratio", "0.1", "--max-steps", "1",
         "--batch-size", "4", "--max-length", "16", "--no-progress", "--out", str(adapter))
    config = read_adapter_config(adapter)
    assert config["base_model_class"] == "LlamaForSequenceClassification"
    assert config["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}
    assert config["heads"] == ["score"]  # the new head trains fully
    base = AutoModelForSequenceClassification.from_pretrained(work / "llama", num_labels=3)
    load_adapter(base, adapter)  # the saved head fits a 3-label classifier of that checkpoint


# ---------------------------------------------------------------------------- flags
def _fail_if_loaded(monkeypatch):
    """Any model load fails the test: flag errors must come first."""
    import rowsft_nb.sources as sources

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the flags were checked")
    monkeypatch.setattr(sources, "load_model", boom)
    monkeypatch.setattr(cli, "_load", boom)


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "./no/such/model"], "--model ./no/such/model: "),
    (["train", "--model", "{bert}", "--data", "{dir}/missing.csv"], "--data "),
    (["train", "--model", "{bert}", "--data", "{dir}/notes.txt"], "unknown data format '.txt'"),
    (["score", "--model", "{bert}", "--text-column", "review"], "--text-column maps a column"),
    (["score", "--model", "{bert}", "--task", "sms_spam", "--data", "{dir}/reviews.csv"],
     "give one"),
    (["train", "--model", "{bert}", "--data", "{dir}/reviews.csv", "--validation-fraction", "1.5"],
     "--validation-fraction must be in (0, 1)"),
    (["train", "--model", "{bert}", "--data", "{dir}/reviews.csv", "--text-column", "nope"],
     "has no column 'nope' (text_column (--text-column))"),
    (["train", "--model", "{bert}", "--data", "{dir}/reviews.csv", "--text-column", "review"],
     "trains on text + label columns"),  # no label column
    (["train", "--model", "{llama}", "--data", "{dir}/reviews.csv", "--text-column", "review",
      "--label-column", "sentiment"], "--task-kind classification"),
    (["train", "--model", "{bert}", "--data", "{dir}/reviews.csv", "--ratio", "0"], "--ratio"),
    (["select", "--report", "{dir}/missing.safetensors"], "--report "),
    (["merge", "--model", "{bert}", "--adapter", "{dir}/bert", "--out", "{dir}/m"], "--adapter "),
    (["export", "--model", "{bert}", "--adapter", "{dir}/nothing", "--out", "{dir}/e"],
     "no such folder"),
    (["export", "--model", "{bert}", "--adapter", "{dir}/adapter", "--out", "{dir}/adapter"],
     "holds a rowsft_nb adapter"),
    (["merge", "--model", "{bert}", "--adapter", "{dir}/adapter", "--out", "{dir}"],
     "the folder is not empty and holds no model"),
    (["train", "--model", "{bert}", "--task-kind", "nonsense"], "invalid choice"),
])
def test_bad_flags_exit_2_with_one_line_before_loading_a_model(work, argv, message, capsys,
                                                               monkeypatch):
    _fail_if_loaded(monkeypatch)
    argv = [a.format(dir=work, bert=work / "bert", llama=work / "llama") for a in argv]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    if "invalid choice" not in message:
        assert len(err.splitlines()) == 1 and err.startswith(f"rowsft-nb {argv[0]}: error: ")


def test_select_refuses_two_budgets(work, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["select", "--report", "x", "--ratio", "0.1", "--rows", "2"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_select_in_a_subprocess(tmp_path):
    from rowsft_nb import RowPlan
    from rowsft_nb.testing import synthetic_report

    report = synthetic_report({"a.q": (8, 4), "a.v": (6, 4)}, seed=3)
    report.save(tmp_path / "r.safetensors")
    exe = Path(sys.executable).with_name("rowsft-nb")
    assert exe.exists(), "the console script is not installed (pip install -e .)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(exe), "select", "--report", str(tmp_path / "r.safetensors"),
                           "--rows", "3", "--out", str(tmp_path / "p.json")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("selected 6 of 14 rows")
    plan = RowPlan.load(tmp_path / "p.json")
    assert {n: set(i.tolist()) for n, i in plan.rows.items()} == {
        n: set(s.topk(3).indices.tolist()) for n, s in report.scores.items()}


# ---------------------------------------------------------------------------- sources
def test_load_data_reads_every_format_the_same(work, tmp_path):
    from datasets import Dataset, DatasetDict

    from rowsft_nb.sources import load_data

    frame = _qa()
    Dataset.from_pandas(frame, preserve_index=False).save_to_disk(str(tmp_path / "saved"))
    cols = dict(prompt_column="question", response_column="answer")
    sources = [work / "qa.csv", work / "qa.jsonl", work / "qa.parquet", tmp_path / "saved", frame]
    loaded = [load_data(s, **cols, seed=7) for s in sources]
    want = frame.rename(columns={"question": "prompt", "answer": "response"})
    want = want[["prompt", "response"]]
    for raw in loaded:
        assert isinstance(raw, DatasetDict) and set(raw) == {"train", "validation"}
        assert raw["train"].column_names == ["prompt", "response"]
        assert len(raw["validation"]) == 2 and len(raw["train"]) == 14  # ceil(0.1 * 16)
        rows = raw["train"].to_list() + raw["validation"].to_list()
        assert sorted(map(tuple, (r.values() for r in rows))) == sorted(map(tuple, want.values))
    # the split is seeded: same rows held out for every format and every call
    assert all(r["validation"].to_list() == loaded[0]["validation"].to_list() for r in loaded)
    held = loaded[0]["validation"].to_list()
    assert load_data(frame, **cols, seed=7)["validation"].to_list() == held
    assert load_data(frame, **cols, seed=8)["validation"].to_list() != held  # another seed


def test_load_data_validation_file_and_saved_splits(work, tmp_path):
    from datasets import Dataset, DatasetDict

    from rowsft_nb.sources import load_data

    raw = load_data(work / "reviews.csv", text_column="review", label_column="sentiment",
                    validation=work / "reviews.csv")
    assert len(raw["train"]) == len(raw["validation"]) == 24  # given, not split off
    ds = Dataset.from_pandas(_reviews(), preserve_index=False)
    DatasetDict({"train": ds.select(range(20)), "test": ds.select(range(20, 24))}).save_to_disk(
        str(tmp_path / "dd"))
    raw = load_data(tmp_path / "dd", text_column="review", label_column="sentiment")
    assert len(raw["train"]) == 20 and len(raw["validation"]) == 4
    assert raw["validation"]["text"] == ds.select(range(20, 24))["review"]


def test_string_labels_become_sorted_ids(work):
    from rowsft_nb import prepare_task
    from rowsft_nb.sources import label_names, load_data

    raw = load_data(work / "reviews.csv", text_column="review", label_column="sentiment")
    assert label_names(raw) == ["neg", "neutral", "pos"]
    tok = _tokenizer()
    data = prepare_task(raw, tok, max_length=16)
    assert data.label2id == {"neg": 0, "neutral": 1, "pos": 2}
    want = [data.label2id[s] for s in raw["train"]["label"]]
    assert data.train["labels"] == want


def test_seq2seq_tokenisation_puts_the_response_in_labels():
    from datasets import Dataset, DatasetDict

    from rowsft_nb import prepare_task

    tok = _tokenizer()
    raw = DatasetDict({"train": Dataset.from_dict({"prompt": ["capital of france"],
                                                   "response": ["paris"]})})
    data = prepare_task(raw, tok, kind="seq2seq", max_length=16)
    ex = data.train[0]
    assert ex["input_ids"] == tok("capital of france")["input_ids"]
    assert ex["labels"] == tok(text_target="paris")["input_ids"] + [tok.eos_token_id]  # stop
    lm = prepare_task(raw, tok, kind="causal_lm", max_length=16).train[0]
    assert lm["labels"][:3] == [-100] * 3 and len(lm["input_ids"]) == len(lm["labels"])


def test_text_only_data_trains_a_causal_lm_on_the_text():
    from datasets import Dataset, DatasetDict

    from rowsft_nb import prepare_task
    from rowsft_nb.sources import data_kind, load_data

    raw = load_data(pd.DataFrame({"body": ["the film was good", "the plot was bad"] * 3}),
                    text_column="body")
    assert data_kind(raw) == "text" and raw["train"].column_names == ["text"]
    data = prepare_task(raw, _tokenizer(), kind="causal_lm", max_length=16)
    ex = data.train[0]
    assert ex["labels"] == ex["input_ids"] and ex["input_ids"][-1] == _tokenizer().eos_token_id
    with pytest.raises(ValueError, match="text \\+ label"):
        prepare_task(DatasetDict({"train": Dataset.from_dict({"text": ["a"], "label": [1]})}),
                     _tokenizer(), kind="seq2seq")


def test_hub_ids_pass_the_flag_check_and_paths_must_exist(work):
    from rowsft_nb.sources import model_source_problem

    assert model_source_problem("HuggingFaceTB/SmolLM2-135M") is None  # loaded later (cache)
    assert model_source_problem(str(work / "bert")) is None
    assert "no such folder" in model_source_problem("./missing-model")
    assert "no config.json" in model_source_problem(str(work))
    assert "is a file" in model_source_problem(str(work / "reviews.csv"))


def test_task_kind_comes_from_the_saved_config_and_can_be_overridden(work):
    from rowsft_nb.sources import infer_model_kind, load_data

    assert infer_model_kind(str(work / "bert")) == "classification"
    assert infer_model_kind(str(work / "llama")) == "causal_lm"
    assert infer_model_kind(str(work / "t5")) == "seq2seq"
    raw = load_data(work / "reviews.csv", text_column="review", label_column="sentiment")
    llama = str(work / "llama")
    assert infer_model_kind(llama, raw, task_kind="classification") == "classification"
    with pytest.raises(ValueError, match="--task-kind classification"):
        infer_model_kind(str(work / "llama"), raw)


def test_load_model_sizes_the_head_to_the_labels_and_seeds_it(work):
    from rowsft_nb.sources import load_model

    names = {0: "neg", 1: "neutral", 2: "pos", 3: "mixed"}
    a, tok = load_model(str(work / "bert"), "classification", id2label=names, seed=1)
    b, _ = load_model(str(work / "bert"), "classification", id2label=names, seed=1)
    assert a.config.id2label == names and a.classifier.out_features == 4
    torch.testing.assert_close(a.classifier.weight, b.classifier.weight)  # seeded new head
    kept, _ = load_model(str(work / "bert"), "classification",
                         id2label={0: "x", 1: "y", 2: "z"})
    saved = tiny_bert(num_labels=3)  # same labels count: the checkpoint's head is kept
    torch.testing.assert_close(kept.classifier.weight, saved.classifier.weight)
    assert tok.pad_token == "[PAD]"


# ---------------------------------------------------------------------------- hygiene
def test_training_bars_are_labelled_and_the_model_card_shows_the_run(monkeypatch, tmp_path):
    """train() draws tqdm.auto bars named training / eval before / eval after; the next
    save_adapter writes a README.md card with the plan and the metrics of that run."""
    import rowsft_nb.progress as progress
    from rowsft_nb import FixedRows, inject, save_adapter, score, select, train
    from rowsft_nb.testing import random_batches

    labels: list[str] = []

    class Recorder(progress.tqdm):
        def __init__(self, *args, **kwargs):
            labels.append(kwargs.get("desc"))
            super().__init__(*args, **kwargs)
    monkeypatch.setattr(progress, "tqdm", Recorder)
    from datasets import Dataset

    model = tiny_bert()
    rows = [{k: v[i].tolist() for k, v in b.items()} for b in random_batches(model, n=2)
            for i in range(4)]
    ds = Dataset.from_list(rows)
    inject(model, select(score(model, random_batches(model, n=1), metric="l2", progress=False),
                         FixedRows(1)))
    result = train(model, ds, eval_dataset=ds, max_steps=1, batch_size=4, device="cpu",
                   progress_bar=True)
    assert labels == ["eval before", "training", "eval after"]

    save_adapter(model, tmp_path / "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text()
    before, after = result.metrics_before["accuracy"], result.metrics_after["accuracy"]
    assert f"| accuracy | {before:.4g} | {after:.4g} |" in card
    assert '| budget | `{"kind": "fixed_rows", "r": 1}` |' in card
    assert "| importance metric | l2 |" in card and "| trained heads | classifier |" in card
    from rowsft_nb.adapter import adapter_state

    n_rows = sum(int(r.numel()) for r in adapter_state(model).plan.rows.values())
    assert f"({n_rows:,} rows)" in card


def test_no_bare_prints_in_library_code():
    """Library messages go through logging/warnings; only the CLI prints (doctor builds text)."""
    import ast

    import rowsft_nb

    root = Path(rowsft_nb.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert offenders == []


def test_doctor_report_is_text_the_cli_prints(capsys):
    from rowsft_nb import doctor

    text, ok = doctor.report()
    assert text.startswith("rowsft_nb: python") and ok == text.endswith("all good")
    assert cli.main(["doctor"]) == (0 if ok else 1)
    assert capsys.readouterr().out == text + "\n"
