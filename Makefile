# Entry points, each doing its own set-up on a fresh machine:
#   make demo   -> runs ParVTS and ST3 on the bundled small VLM on a real photo (offline)
#   make test   -> runs the test suite
#   make docs   -> builds the documentation site (docs/, mkdocs.yml) into site/
# Both install exactly the locked versions (requirements/lock.txt); `make lock` regenerates the locks.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PHOTO ?= ../shared/data/photos/COCO_val2017_000000039769_two_cats.jpg
LOCK := requirements/lock.txt
# the oldest transformers of pyproject's supported range, tested by `make test-oldest` (.ci/run)
OLDEST_VENV := .venv-oldest
OLDEST_LOCK := requirements/lock-oldest.txt
# on the oldest transformers: the conformance matrix (every method x every family: stock parity with nothing
# pruned, batched = one by one, accelerate hooks, no host sync), the engine's LLaVA tests (per-layer counts),
# forward calls outside generate (logits at every position, test_loglikelihood.py) and vtprune's loads
# without hub kernels (the use_kernels keyword)
PARITY_TESTS := tests/test_conformance.py tests/test_engine.py tests/test_loglikelihood.py tests/test_hub_kernels.py
# the lock is resolved for this platform against the local CPU torch wheel (requirements/torch.txt)
TORCH_WHEELS ?= /opt/wheels
UV_VERSION := 0.13.9
COMPILE = $(BIN)/uv pip compile pyproject.toml --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	--find-links $(TORCH_WHEELS) -c requirements/torch.txt --no-emit-package torch --generate-hashes --upgrade -q

.PHONY: setup demo test test-oldest lint lock docs

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# install(venv-bin, lock): torch (the local CPU wheel), the lock without resolving, the no-deps pins, vtprune
define install
	$(1)/python -c "import torch" 2>/dev/null || $(1)/pip install -q -r requirements/torch.txt
	$(1)/pip install -q --no-deps --require-hashes -r $(2)
	$(1)/pip install -q --no-deps -r requirements/no-deps.txt
	$(1)/pip install -q --no-deps -e .
endef

$(VENV)/.installed: pyproject.toml $(LOCK) requirements/torch.txt requirements/no-deps.txt | $(BIN)/python
	$(call install,$(BIN),$(LOCK))
	touch $@

setup: $(VENV)/.installed

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/vtprune generate --image $(PHOTO) --prompt "What is in the image?" --method parvts --budget 49 --compare
	HF_HUB_OFFLINE=1 $(BIN)/vtprune generate --image $(PHOTO) --prompt "What is in the image?" --method st3 --compare

# two workers (pytest-xdist): the suite is CPU-bound on one thread per test module (conftest.one_thread)
test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n 2 tests

$(OLDEST_VENV)/bin/python:
	$(PY) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/pip install -q --upgrade pip

$(OLDEST_VENV)/.installed: pyproject.toml $(OLDEST_LOCK) requirements/torch.txt requirements/no-deps.txt | $(OLDEST_VENV)/bin/python
	$(call install,$(OLDEST_VENV)/bin,$(OLDEST_LOCK))
	touch $@

# the engine parity subset on the oldest supported transformers
test-oldest: $(OLDEST_VENV)/.installed
	HF_HUB_OFFLINE=1 $(OLDEST_VENV)/bin/python -m pytest -n 2 $(PARITY_TESTS)

# the documentation site into site/ (mkdocs-material, the API reference by mkdocstrings); --strict: every warning
# (a broken link or anchor, a docstring that does not parse) fails the build
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# ruff, the layer contracts of ARCHITECTURE.md (import-linter, pyproject.toml) and the type checker on src/
lint: setup
	$(BIN)/ruff check src tests scripts experiments
	$(BIN)/lint-imports
	$(BIN)/mypy

# Regenerate the locks at the newest releases the pyproject ranges allow (run it to take new releases,
# or after changing a dependency in pyproject.toml; then run `make test test-oldest` and commit the locks).
lock: | $(BIN)/python
	$(BIN)/uv --version >/dev/null 2>&1 || $(BIN)/pip install -q "uv==$(UV_VERSION)"
	$(COMPILE) --extra dev --extra docs --extra eval --extra lmms --extra train --extra bench -o $(LOCK)
	$(COMPILE) --extra dev --extra docs --extra eval --extra lmms --extra train --extra bench -c requirements/oldest.txt -o $(OLDEST_LOCK)
