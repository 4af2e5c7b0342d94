from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from trace_gaps import memset_neighbours, read_events, stream_report, window  # noqa: E402


def kernel(name, ts, dur, tid=7, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "pid": 0, "tid": tid, "ts": ts, "dur": dur}


# main stream: a convolution, a Triton kernel 2 us later, a memset 1 us later, cuDNN attention 3 us
# after that, then a Triton kernel that starts 0.5 us before the attention ends (overlapped launch)
# and a product after a 40 us wait; a second stream, and host events that are not GPU work
TRACE = {"traceEvents": [
    kernel("sm90_xmma_fprop_implicit_gemm_cudnn", 0, 10),
    kernel("triton_per_fused_native_group_norm_0", 12, 3),
    kernel("Memset (Unknown)", 16, 1, cat="gpu_memset"),
    kernel("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 20, 10),
    kernel("triton_poi_fused_add_1", 29.5, 2),
    kernel("nvjet_sm90_hsh_64x48", 71.5, 5),
    kernel("nvjet_sm90_hsh_64x48", 5, 4, tid=9),
    {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 1, "tid": 1, "ts": 0, "dur": 100},
]}


def test_gaps_are_told_by_the_kernel_after_them():
    events = read_events(TRACE)
    assert len(events) == 7 and [e.start_us for e in events] == sorted(e.start_us for e in events)
    main = [e for e in events if e.stream == "0/7"]
    r = stream_report(main)
    assert r["kernels"] == 6 and r["busy_us"] == pytest.approx(31)
    assert r["waits_us"] == pytest.approx(40)  # the product's wait is not a launch gap
    gaps = r["gaps"]
    assert gaps["Triton reductions (norms)"] == {"count": 1, "sum_us": 2, "median_us": 2}
    assert gaps["copy, fill"]["sum_us"] == pytest.approx(1)
    assert gaps["attention"]["sum_us"] == pytest.approx(3)
    assert gaps["Triton element-wise"]["sum_us"] == pytest.approx(-0.5)  # started before the attention ended
    assert "matrix product" not in gaps
    assert memset_neighbours(main) == {("triton_per_fused_native_group_norm_0",
                                        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop"): 1}


def test_the_window_takes_events_by_start_within_the_span():
    events = read_events(TRACE)  # span 0 .. 76.5 us
    middle = window(events, 0.1, 0.5)  # starts in [7.65, 38.25)
    assert [e.start_us for e in middle] == [12, 16, 20, 29.5]
