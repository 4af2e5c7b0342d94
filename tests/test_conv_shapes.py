"""benchmarks/conv_shapes.py on the CPU: the im2col formulation is the same convolution, and the
step's convolutions are found by shape and counted."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import conv_shapes  # noqa: E402
from sdcanny.config import CONFIGS  # noqa: E402


@pytest.mark.parametrize("stride, size", [(1, (6, 10)), (2, (6, 10)), (2, (7, 9))])
def test_im2col_is_the_same_convolution(stride, size):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, *size, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(7, 5, 3, 3, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(7, generator=g, dtype=torch.float64)
    expected = F.conv2d(x, weight, bias, stride, 1)
    got = conv_shapes.im2col_conv(x, weight, bias, stride)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_the_step_convolutions_are_counted_per_shape():
    cfg = CONFIGS["tiny"]
    shapes = conv_shapes.step_convolutions(cfg, torch.device("cpu"), torch.float32)
    assert all(b == 2 for b, *_ in shapes)
    # the UNet's first conv sees the latent; the ControlNet's first conv does too: two of that shape
    h, w = conv_shapes.GRADED_LATENT
    assert shapes[(2, cfg.unet.in_channels, h, w, cfg.unet.model_channels, 1)] == 2
    assert any(stride == 2 for *_, stride in shapes)  # the downsampling convs
