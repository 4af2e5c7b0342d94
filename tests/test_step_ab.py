"""benchmarks/step_ab.py's bookkeeping on the CPU (its timing needs a GPU and runs on the device):
each build of a variant gets its own label, so a variant named twice is timed twice."""
import sys
from pathlib import Path

import pytest

from sdcanny.optional import installed

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.skipif(not installed("skimage"), reason="benchmarks/gpu_benchmark.py (imported by step_ab) takes scikit-image's photos")
def test_a_variant_named_again_is_a_build_of_its_own():
    import step_ab
    labels = step_ab.build_labels(["jit", "sdpa-attention", "jit", "jit"])
    assert labels == ["jit", "sdpa-attention", "jit (build 2)", "jit (build 3)"]
    assert len(set(labels)) == len(labels)
