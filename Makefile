# Two entry points for a fresh clone: `make demo` and `make test`.
# Both create the virtual environment on first use (torch 2.14.1 + torchvision 0.29.1, ~2 min).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test test-all bench clean

$(BIN)/.leuko-installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(BIN)/.leuko-installed

## Train an EfficientNet-Lite0 (offline ImageNet weights) on PBC, evaluate on a held-out split, print a summary.
demo: install
	$(BIN)/leuko demo $(if $(DATA),--data $(DATA),) $(if $(OUT),--out $(OUT),)

## The default test suite (slow end-to-end runs are excluded; see `make test-all`).
test: install
	$(BIN)/python -m pytest -q

test-all: install
	$(BIN)/python -m pytest -q -m ""

clean:
	rm -rf $(VENV) .pytest_cache
