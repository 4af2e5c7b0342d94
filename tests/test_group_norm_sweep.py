"""benchmarks/group_norm_sweep.py's one-kernel GroupNorm, checked on a CPU in Triton's interpreter."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdcanny.optional import installed

SWEEP = Path(__file__).resolve().parents[1] / "benchmarks" / "group_norm_sweep.py"


@pytest.mark.skipif(not installed("triton") or not installed("triton.runtime.interpreter"),
                    reason="needs triton with its interpreter (3.0+)")
def test_the_kernel_matches_float64_group_norm_in_the_interpreter():
    """--interpret-check under TRITON_INTERPRET=1: both layouts, the addend and the SiLU, groups
    over several blocks, a mean far from zero, a channel slice (not dense) whose output is then
    contiguous; each within 1e-4 of float64 torch."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, str(SWEEP), "--interpret-check"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("interpreted") == 5
