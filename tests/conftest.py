from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # helpers shared by the tests (clip_files, fake_tensorrt)
sys.path.insert(0, str(ROOT))  # the top-level scripts (canny2image_TRT.py, ...) import from here

from sdcanny.config import TINY  # noqa: E402
from sdcanny.synthetic import HINT_GAIN, synthetic_state_dict, write_checkpoint  # noqa: E402

# CI machines have 2 cores; more threads than that only adds scheduling noise.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_state():
    """The tiny synthetic checkpoint with the canny map's path strengthened (HINT_GAIN), so that
    comparisons see errors in the hint path."""
    return synthetic_state_dict(TINY, seed=0, control_gain=HINT_GAIN)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_state, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    write_checkpoint(tiny_state, path)
    return path


@pytest.fixture(scope="session")
def hf_hub_cache(tmp_path_factory) -> Path:
    """A Hugging Face hub cache with CLIP's tokenizer files (see tests/clip_files.py). Skips where
    the BPE merges file is not at hand; under CI (CI=true, which .ci/run provides it for) that
    is a failure, so the docker's tokenizer path is never silently untested there."""
    from clip_files import bpe_source, make_hub_cache
    source = bpe_source()
    if source is None:
        message = "SDCANNY_CLIP_BPE does not name bpe_simple_vocab_16e6.txt.gz (see .ci/run)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return make_hub_cache(source, tmp_path_factory.mktemp("hf") / "hub")
