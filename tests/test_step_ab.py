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


@pytest.mark.skipif(not installed("skimage"), reason="benchmarks/gpu_benchmark.py (imported by step_ab) takes scikit-image's photos")
def test_the_table_takes_the_median_of_paired_differences():
    """Round by round differences (1.0, 0.5, 1.0): their median 1.0, not the difference of the
    medians (0.5); the per-call figure is 20 steps of it."""
    import step_ab
    rows = step_ab.table({"a": [1.0, 2.0, 3.0], "b": [2.0, 2.5, 4.0]}, "a")
    assert rows[2] == "| a | 2.0 | 1.0 | 3.0 | +0.0 | +0.00 |"
    assert rows[3] == "| b | 2.5 | 2.0 | 4.0 | +1.0 | +0.02 |"
