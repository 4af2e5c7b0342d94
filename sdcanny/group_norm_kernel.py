"""GroupNorm, with the SiLU after it and a per-channel addend before it, as one Triton kernel.

TorchInductor writes a GroupNorm over a channels-last activation that a cuDNN convolution made as
reductions that walk it across its channels; after a convolution they took 10-30 µs each in the
graded step (docs/benchmarks.md). Here one program normalises one group of one sample: it reads
the group twice (statistics, then the normalised output; the second read comes from L2) and
writes it once, in the input's layout.

The statistics are fp32 sums of the values less the group's first value (a shift, so that a mean
far from zero does not cancel the variance away), then the mean and the biased variance, as torch's
group_norm computes them. Imported only where triton is (sdcanny/fused_norm.py decides).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

BLOCK = 2048  # elements of a group each step of a program loads
WARPS = 8


@triton.jit
def load_group_block(x_base, add_ptr, sample, first_channel, start, count, pixels, sx_p, sx_c, sa_n, sa_c,
                     GROUP_CHANNELS: tl.constexpr, CHANNELS_INNER: tl.constexpr, HAS_ADD: tl.constexpr,
                     BLOCK: tl.constexpr):
    """Elements start..start+BLOCK of one group in memory order (channels innermost for a
    channels-last tensor, pixels for a contiguous one), as fp32 with the addend added in the
    activation's dtype, as `h + t.to(h.dtype)` in the network."""
    index = start + tl.arange(0, BLOCK)
    mask = index < count
    if CHANNELS_INNER:
        pixel, channel = index // GROUP_CHANNELS, index % GROUP_CHANNELS
    else:
        pixel, channel = index % pixels, index // pixels
    value = tl.load(x_base + pixel * sx_p + channel * sx_c, mask=mask, other=0.0)
    if HAS_ADD:
        addend = tl.load(add_ptr + sample * sa_n + (first_channel + channel) * sa_c, mask=mask, other=0.0)
        value = value + addend.to(value.dtype)
    return value.to(tl.float32), pixel, channel, mask


@triton.jit
def group_norm_kernel(x_ptr, add_ptr, weight_ptr, bias_ptr, y_ptr, pixels, sx_n, sx_p, sx_c, sy_n, sy_p, sy_c,
                      sa_n, sa_c, eps,
                      GROUP_CHANNELS: tl.constexpr, CHANNELS_INNER: tl.constexpr, HAS_ADD: tl.constexpr,
                      SILU: tl.constexpr, BLOCK: tl.constexpr, BLOCKS: tl.constexpr):
    group, sample = tl.program_id(0), tl.program_id(1)
    count = pixels * GROUP_CHANNELS
    first_channel = group * GROUP_CHANNELS
    x_base = x_ptr + sample.to(tl.int64) * sx_n + first_channel * sx_c
    y_base = y_ptr + sample.to(tl.int64) * sy_n + first_channel * sy_c
    shift = tl.load(x_base).to(tl.float32)  # the group's first value: any value would do, a near one cancels less
    if HAS_ADD:
        shift += tl.load(add_ptr + sample * sa_n + first_channel * sa_c).to(tl.float32)
    sum1 = tl.zeros([BLOCK], dtype=tl.float32)
    sum2 = tl.zeros([BLOCK], dtype=tl.float32)
    for block in range(BLOCKS):
        value, _, _, mask = load_group_block(x_base, add_ptr, sample, first_channel, block * BLOCK, count, pixels,
                                             sx_p, sx_c, sa_n, sa_c, GROUP_CHANNELS, CHANNELS_INNER, HAS_ADD, BLOCK)
        centred = tl.where(mask, value - shift, 0.0)
        sum1 += centred
        sum2 += centred * centred
    mean_shifted = tl.sum(sum1, axis=0) / count
    variance = tl.maximum(tl.sum(sum2, axis=0) / count - mean_shifted * mean_shifted, 0.0)
    mean = mean_shifted + shift
    rstd = 1.0 / tl.sqrt(variance + eps)
    for block in range(BLOCKS):
        value, pixel, channel, mask = load_group_block(x_base, add_ptr, sample, first_channel, block * BLOCK, count,
                                                        pixels, sx_p, sx_c, sa_n, sa_c, GROUP_CHANNELS,
                                                        CHANNELS_INNER, HAS_ADD, BLOCK)
        weight = tl.load(weight_ptr + first_channel + channel, mask=mask).to(tl.float32)
        bias = tl.load(bias_ptr + first_channel + channel, mask=mask).to(tl.float32)
        out = (value - mean) * rstd * weight + bias
        if SILU:
            out = out * tl.sigmoid(out)
        tl.store(y_base + pixel * sy_p + channel * sy_c, out.to(y_ptr.dtype.element_ty), mask=mask)


def group_norm_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                   silu: bool, add: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu?(group_norm(x + add[:, :, None, None])) of an (N, C, H, W) tensor, into
    torch.empty_like(x) (x's layout where x is dense, else contiguous: what the op's fake says).
    The kernel walks each tensor's pixels as one axis; an x whose pixels are not one (a view) is
    first copied channels-last."""
    batch, channels, height, width = x.shape
    y = torch.empty_like(x)
    if not pixels_form_one_axis(x):
        x = x.contiguous(memory_format=torch.channels_last)
    assert pixels_form_one_axis(y), y.stride()
    sx_n, sx_c, _, sx_w = x.stride()
    sy_n, sy_c, _, sy_w = y.stride()
    sa_n, sa_c = add.stride() if add is not None else (0, 0)
    count = height * width * channels // groups
    group_norm_kernel[(groups, batch)](
        x, add if add is not None else x, weight, bias, y, height * width, sx_n, sx_w, sx_c, sy_n, sy_w, sy_c,
        sa_n, sa_c, eps,
        GROUP_CHANNELS=channels // groups, CHANNELS_INNER=sx_c == 1, HAS_ADD=add is not None, SILU=silu,
        BLOCK=BLOCK, BLOCKS=triton.cdiv(count, BLOCK), num_warps=WARPS)
    return y


def pixels_form_one_axis(t: torch.Tensor) -> bool:
    """Whether pixel (h, w) of t sits at h * W + w pixel strides: channels-last or contiguous
    tensors, and channel slices of them."""
    return t.shape[2] == 1 or t.stride(2) == t.shape[3] * t.stride(3)
