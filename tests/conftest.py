import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the top-level scripts (canny2image_TRT.py, ...) import from here

from sdcanny.config import TINY  # noqa: E402
from sdcanny.synthetic import synthetic_state_dict, write_checkpoint  # noqa: E402

# CI machines have 2 cores; more threads than that only adds scheduling noise.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_state():
    return synthetic_state_dict(TINY, seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_state, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    write_checkpoint(tiny_state, path)
    return path
