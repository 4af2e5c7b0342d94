"""benchmarks/step_shapes.py on the CPU: the im2col formulation is the same convolution, and the
step's matrix products and convolutions are found by shape and counted."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import step_shapes  # noqa: E402
from sdcanny.config import CONFIGS  # noqa: E402


@pytest.mark.parametrize("stride, size", [(1, (6, 10)), (2, (6, 10)), (2, (7, 9))])
def test_im2col_is_the_same_convolution(stride, size):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, *size, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(7, 5, 3, 3, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(7, generator=g, dtype=torch.float64)
    expected = F.conv2d(x, weight, bias, stride, 1)
    got = step_shapes.im2col_conv(x, weight, bias, stride)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert step_shapes.gflop(("conv", 2, 5, *size, 7, stride)) * 1e9 == 2 * expected[0, 0].numel() * 2 * 7 * 9 * 5


def test_the_step_operations_are_counted_per_shape():
    cfg = CONFIGS["tiny"]
    ops = step_shapes.step_operations(cfg, torch.device("cpu"), torch.float32)
    h, w = step_shapes.GRADED_LATENT
    # the first 3x3 conv of the UNet and of the ControlNet both see the latent once: the layers
    # before the first cross-attention run once for both guidance branches
    assert ops[("conv", 1, cfg.unet.in_channels, h, w, cfg.unet.model_channels, 1)] == 2
    assert ("conv", 2, cfg.unet.in_channels, h, w, cfg.unet.model_channels, 1) not in ops
    assert any(op[0] == "conv" and op[-1] == 2 for op in ops)  # the downsampling convs
    # the time embedding is made ahead for every step (Stages.time_rows): no product of its one or
    # two rows (the time MLP, the stacked ResBlock projections) is left in the step
    assert not any(op[0] == "gemm" and op[1] <= 2 for op in ops)
    # fused q, k, v of the self-attentions (batch 2 x h*w tokens) and no per-step key/value
    # products of the 77-token text context (made with the text, in the text stage)
    width = cfg.unet.model_channels
    assert ops[("gemm", 2 * h * w, width, 3 * width, False)] >= 1
    assert ops[("gemm", h * w, width, 3 * width, False)] == 2  # the first one of each network, shared
    assert not any(op[0] == "gemm" and op[1] == 2 * 77 for op in ops)
