PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRITON_INTERPRET := 1

.PHONY: install test test-fast demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch comes first, pinned, so pip takes the local CUDA build (it brings triton) instead of resolving a newer one
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e .[test,demo,viz]
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# the quick subset: every test not marked slow (the pytest marker `slow`: CLI subprocesses, training runs)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m 'not slow' tests

# digits teacher + three students through timm-sadistill train; outputs in .demo/
demo: $(STAMP)
	$(BIN)/python demo/distill_digits.py

clean:
	rm -rf $(VENV) build dist *.egg-info
