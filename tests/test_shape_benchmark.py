"""benchmarks/shape_benchmark.py's per-size measurement on the CPU (the tiny checkpoint, the fast
back-end eager in fp32): each size's row carries the work size the front end makes, the form it ran
in and its timings, and the table names the worst first call. The script runs only on a GPU, where
it had broken unnoticed when the back-end's buffers changed."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sdcanny.image import stand_in_photo
from sdcanny.pipeline import GRADED_CALL
from test_fast import cpu_pipe

pytest.importorskip("skimage", reason="the benchmark's photographs come from scikit-image (optional)")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import shape_benchmark  # noqa: E402


def test_each_size_gets_its_row_and_the_table_its_worst_first_call(tiny_checkpoint):
    pipe = cpu_pipe(tiny_checkpoint)
    img = stand_in_photo((256, 384, 3))  # 2:3, as the benchmark's photographs
    calls = [{**GRADED_CALL, "image_resolution": 64, "num_samples": n, "ddim_steps": 2} for n in (2, 1)]
    rows = [shape_benchmark.measure_size(pipe, img, call, repeats=1) for call in calls]
    # the long side: 64 x 1.5 = 96 px, rounded to a multiple of 64 by the front end: 128
    assert [(r["resolution"], r["samples"], r["work"], r["form"]) for r in rows] == [
        (64, 2, "64x128", "eager"), (64, 1, "64x128", "eager")]
    assert all(r["first_s"] > 0 and r["second_s"] > 0 and r["steady_ms"] > 0 for r in rows)
    meta = {"device": "cpu", "torch": "t", "date": "d", "commit": "c", "command": "cmd", "initialize_s": 1.0,
            "startup": "s"}
    worst = max(rows, key=lambda r: r["first_s"])
    assert (f"worst first call: {worst['first_s']:.2f} s ({worst['work']}, {worst['samples']} samples) over "
            "resolutions 64..64 and num_samples 1..2 (2 sizes)") in shape_benchmark.table(meta, rows)
