import os

import pytest
import torch

# Two threads on two cores is erratic; tests are small enough for one.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path / "run"
