import os
from pathlib import Path

import pytest
import torch

# Tests run on 2 shared cores; pin threads so timings and numerics don't depend on the machine.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


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
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data is not beside this checkout")
    return SHARED_DATA
