import os
from pathlib import Path

import pytest
import torch

# Tests run on 2 shared cores; pin threads so timings and numerics don't depend on the machine.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def benchmark_module(monkeypatch):
    """Import a script of benchmarks/ by name (they import each other as top-level modules)."""
    import importlib

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    return importlib.import_module


@pytest.fixture
def tiny_tok():
    from deltatune.testing import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture
def tiny_lm():
    from deltatune.testing import tiny_model

    return tiny_model()


@pytest.fixture
def shared_data() -> Path:
    # the project's data lives beside the checkout (README); missing data is a set-up error, not a skip
    assert SHARED_DATA.is_dir(), f"{SHARED_DATA} is missing: check out the project with ../shared beside it"
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny model and tokenizer saved as a transformers folder, for code that loads by path."""
    from deltatune.testing import tiny_model, tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny")
    tiny_model().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def data_file(tmp_path_factory) -> Path:
    """36 Alpaca records "What is a + b?" -> "The answer is a+b." (a, b in 0..5)."""
    import json

    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [
        {"instruction": f"What is {a} + {b}?", "output": f"The answer is {a + b}."} for a in range(6) for b in range(6)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one thread is fastest, and immune to a machine whose cores other jobs hold."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
