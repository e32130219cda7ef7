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

demo: $(STAMP)
	$(BIN)/python -m compress.demo

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) out
