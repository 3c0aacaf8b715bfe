"""Tokenising tasks and collating batches (rowsft_nb.data)."""
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from rowsft_nb.data import (CAUSAL_LM, CLASSIFICATION, IGNORE_INDEX, CausalLMCollator,
                            calibration_batches, prepare_task, tokenize_instruction)

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}[SEP]{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def bert_tok():
    from transformers import AutoTokenizer

    from rowsft_nb.assets import minilm_path
    return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)


@pytest.fixture
def chat_tok(bert_tok):
    import copy
    tok = copy.deepcopy(bert_tok)
    tok.chat_template = CHAT
    return tok


def _cls_dict():
    feats = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    rows = {"text": ["good film", "bad film", "great", "awful acting", "fine", "dull"] * 3,
            "label": [1, 0, 1, 0, 1, 0] * 3}
    full = Dataset.from_dict(rows, features=feats)
    return DatasetDict({"train": full.select(range(12)), "validation": full.select(range(12, 18))})


def test_classification_matches_direct_tokenizer(bert_tok):
    ds = _cls_dict()
    data = prepare_task(ds, bert_tok, max_length=8)
    assert data.kind == CLASSIFICATION and data.label_names == ["neg", "pos"]
    assert data.test is None and len(data.validation) == 6
    for i in range(len(ds["train"])):
        direct = bert_tok(ds["train"][i]["text"], truncation=True, max_length=8)
        assert data.train[i]["input_ids"] == direct["input_ids"]
        assert data.train[i]["labels"] == ds["train"][i]["label"]
    batch = data.collator([data.train[i] for i in range(4)])
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].tolist() == [1, 0, 1, 0]
    # padding is masked out
    lengths = [len(data.train[i]["input_ids"]) for i in range(4)]
    assert batch["attention_mask"].sum(1).tolist() == lengths


def test_subsampling_is_seeded_and_sized(bert_tok):
    ds = _cls_dict()
    a = prepare_task(ds, bert_tok, n_train=5, n_eval=3, seed=1)
    b = prepare_task(ds, bert_tok, n_train=5, n_eval=3, seed=1)
    c = prepare_task(ds, bert_tok, n_train=5, n_eval=3, seed=2)
    assert len(a.train) == 5 and len(a.validation) == 3
    assert a.train["input_ids"] == b.train["input_ids"]
    assert a.train["input_ids"] != c.train["input_ids"]


def test_embedded_task_by_name(bert_tok):
    data = prepare_task("movie_sentiment", bert_tok, max_length=16, n_train=20, n_eval=10)
    assert data.name == "movie_sentiment" and data.num_labels == 2
    assert len(data.train) == 20 and len(data.validation) == 10 and len(data.test) == 10
    assert max(len(x) for x in data.train["input_ids"]) <= 16


def test_instruction_loss_only_on_response(chat_tok):
    ex = tokenize_instruction(chat_tok, "what is two plus two", "four", max_length=64)
    head = chat_tok.apply_chat_template([{"role": "user", "content": "what is two plus two"}],
                                        add_generation_prompt=True, tokenize=False)
    n_prompt = len(chat_tok(head, add_special_tokens=False)["input_ids"])
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    answer = chat_tok.decode(ex["input_ids"][n_prompt:])
    assert answer.startswith("four")


def test_instruction_truncation_keeps_response(chat_tok):
    ex = tokenize_instruction(chat_tok, "word " * 200, "the answer", max_length=24)
    assert len(ex["input_ids"]) == 24
    labelled = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert chat_tok.decode(labelled).startswith("the answer")


def test_instruction_task_and_causal_collator(chat_tok):
    ds = DatasetDict({"train": Dataset.from_dict({"prompt": ["a b c", "d"], "response": ["x", "y z w"]})})
    data = prepare_task(ds, chat_tok, max_length=32)
    assert data.kind == CAUSAL_LM and data.validation is None
    batch = data.collator([data.train[0], data.train[1]])
    n0, n1 = len(data.train[0]["input_ids"]), len(data.train[1]["input_ids"])
    width = max(n0, n1)
    assert batch["input_ids"].shape == (2, width)
    short = 0 if n0 < n1 else 1
    n_short = min(n0, n1)
    assert batch["attention_mask"][short, n_short:].sum() == 0
    assert (batch["labels"][short, n_short:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][short, n_short:] == chat_tok.pad_token_id).all()


def test_causal_collator_pad_to_multiple():
    out = CausalLMCollator(pad_token_id=7, pad_to_multiple_of=8)([{"input_ids": [1, 2, 3]}])
    assert out["input_ids"].tolist() == [[1, 2, 3] + [7] * 5]
    assert out["labels"].tolist() == [[1, 2, 3] + [IGNORE_INDEX] * 5]


def test_calibration_batches_cover_samples(bert_tok):
    data = prepare_task(_cls_dict(), bert_tok)
    batches = calibration_batches(data.train, batch_size=4, n_samples=10, collator=data.collator)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    assert torch.cat([b["labels"] for b in batches]).tolist() == data.train["labels"][:10]


def test_bad_inputs_name_the_problem(bert_tok):
    with pytest.raises(ValueError, match="expected text\\+label"):
        prepare_task(DatasetDict({"train": Dataset.from_dict({"x": [1]})}), bert_tok)
    with pytest.raises(ValueError, match="Unknown task"):
        prepare_task("no_such_task", bert_tok)
    with pytest.raises(ValueError, match="n_train"):
        prepare_task(_cls_dict(), bert_tok, n_train=0)
