"""The benchmark's kernel breakdown (benchmarks/kernel_profile.py): kinds by name, busy time of
overlapping kernels, and a real profile of a CPU run read back."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import kernel_profile  # noqa: E402
from kernel_profile import Kernel, busy_us, kernel_kind, summarize  # noqa: E402


@pytest.mark.parametrize("name, kind", [
    ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "convolution"),
    ("void cudnn::cnn::conv2d_grouped_direct_kernel<__half>", "convolution"),
    ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NNN", "matrix product"),
    ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "matrix product"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
    ("fmha_cutlassF_f16_aligned_64x64_rf_sm80", "attention"),
    ("triton_per_fused_native_group_norm_silu_3", "Triton reductions (norms)"),
    ("triton_red_fused_native_group_norm_0", "Triton reductions (norms)"),
    # Inductor names a fused kernel after its ops: a convolution's bias add is not a convolution
    ("triton_poi_fused_clone_convolution_native_group_norm_silu_74", "Triton element-wise"),
    ("Memcpy DtoD (Device -> Device)", "copy, fill"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "copy, fill"),
    ("void at::native::reduce_kernel<512, 1>", "other"),
])
def test_kernels_are_grouped_by_what_their_names_say(name, kind):
    assert kernel_kind(name) == kind


def test_busy_time_counts_overlapping_kernels_once():
    # two streams: 0-10 and 5-12 overlap (12 us busy), then a gap, then 20-25 (5 us)
    kernels = [Kernel("a", 0, 10), Kernel("b", 5, 7), Kernel("c", 20, 5), Kernel("d", 21, 1)]
    assert busy_us(kernels) == 17
    s = summarize(kernels)
    assert s["span_ms"] == pytest.approx(0.025) and s["busy_ms"] == pytest.approx(0.017)
    assert s["kinds"]["other"] == {"count": 4, "ms": pytest.approx(0.023)}
    assert summarize([])["busy_ms"] == 0 and summarize([])["kernels"] == 0


def test_the_table_has_a_column_pair_per_variant_and_a_row_per_kind():
    s = summarize([Kernel("triton_poi_fused_add_0", 0, 1000), Kernel("nvjet_gemm", 1000, 3000)])
    text = kernel_profile.table({"compiled here": s, "compiled ahead": s}, steps=20)
    rows = text.strip().splitlines()
    assert rows[0].count("compiled here") == 2 and rows[0].count("compiled ahead") == 2
    assert len(rows) == 2 + len(kernel_profile.KIND_ORDER) + 2
    assert "| matrix product | 3.00 | 1 | 3.00 | 1 |" in rows
    assert "| Triton element-wise | 1.00 | 1 | 1.00 | 1 |" in rows
    assert rows[-1].endswith("| 4.00 / 4.00 | 0 |")  # busy / span in ms, 2 kernels over 20 steps rounds to 0


def test_a_profile_is_read_back_on_any_device():
    """On the CPU there are no CUDA kernels: the reader returns none, rather than CPU ops."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.ones(64, 64) @ torch.ones(64, 64)
    kernels = kernel_profile.cuda_kernels(prof)
    assert kernels == [] if not torch.cuda.is_available() else all(isinstance(k, Kernel) for k in kernels)


def test_kernels_by_name_sum_their_launches_most_time_first():
    kernels = [Kernel("nvjet_a", 0, 4), Kernel("triton_poi_b", 4, 30), Kernel("nvjet_a", 40, 6)]
    assert kernel_profile.by_name(kernels) == [("triton_poi_b", 1, pytest.approx(0.030)),
                                               ("nvjet_a", 2, pytest.approx(0.010))]
    rows = kernel_profile.name_table(kernels, steps=2).strip().splitlines()
    assert rows[2] == "| 0.030 | 0.5 | 30.0 | Triton element-wise | `triton_poi_b` |"
    assert rows[3] == "| 0.010 | 1.0 | 5.0 | matrix product | `nvjet_a` |"
