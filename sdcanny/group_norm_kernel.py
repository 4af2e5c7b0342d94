"""GroupNorm, with the SiLU after it and a per-channel addend before it, in one or two Triton kernels.

TorchInductor writes a channels-last GroupNorm that follows a cuDNN convolution as several kernels
(partial statistics, their sum, the normalisation); in the graded step they cost 10-30 µs a
GroupNorm (docs/benchmarks.md). Two forms here, by the size of a group:

- small groups (under SPLIT_FROM elements: the 4x6 and 8x12 latents, and 16x24 at 640 channels):
  one launch, one program per group and sample. A group that fits in registers (ONE_PASS_LIMIT)
  is read once and its statistics taken about the exact mean; a larger one is read twice.
- larger groups: two launches over tiles of pixels with every channel, so that the loads are
  whole channels-last rows and about one program runs per SM (one program per group and sample
  left half the GPU idle at 32x48 and took 9-12 µs, 32 µs at 960 channels). The first kernel
  writes each tile's per-group sums, the second adds them up (every program, for its sample) and
  normalises its tile.

Sums are fp32 and taken about the group's first value (a shift, so that a mean far from zero does
not cancel the variance away); the mean and the biased variance are torch's.

The input may have any strides whose pixels form one axis (channels-last, contiguous, channel
slices of either); the output is always a new channels-last tensor, whatever the input's layout,
so that the op's traced output (sdcanny/fused_norm.py) never depends on how TorchInductor lays out
the input. Imported only where triton is (sdcanny/fused_norm.py decides).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

ONE_PASS_LIMIT = 32768  # elements of a group held in registers at once (64 a thread at 16 warps)
TWO_PASS_BLOCK = 8192  # elements of a larger group each step of its two passes loads
SPLIT_FROM = 8192  # groups of at least this many elements go through the tiled pair of kernels
SUB_TILE_ELEMENTS = 4096  # elements (padded channels x pixels) each step of a tiled program loads
MAX_TILES = 64  # tiles per sample: every program of the second kernel reads all of its sample's sums


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
def store_normalized(value, mean, rstd, pixel, channel, mask, weight_ptr, bias_ptr, y_base, first_channel,
                     sy_p, SILU: tl.constexpr):
    """(value - mean) * rstd, scaled and shifted per channel, SiLU'd, into the channels-last output."""
    weight = tl.load(weight_ptr + first_channel + channel, mask=mask).to(tl.float32)
    bias = tl.load(bias_ptr + first_channel + channel, mask=mask).to(tl.float32)
    out = (value - mean) * rstd * weight + bias
    if SILU:
        out = out * tl.sigmoid(out)
    tl.store(y_base + pixel * sy_p + channel, out.to(y_base.dtype.element_ty), mask=mask)


@triton.jit
def group_norm_kernel(x_ptr, add_ptr, weight_ptr, bias_ptr, y_ptr, pixels, sx_n, sx_p, sx_c, sy_n, sy_p,
                      sa_n, sa_c, eps,
                      GROUP_CHANNELS: tl.constexpr, CHANNELS_INNER: tl.constexpr, HAS_ADD: tl.constexpr,
                      SILU: tl.constexpr, BLOCK: tl.constexpr, BLOCKS: tl.constexpr):
    group, sample = tl.program_id(0), tl.program_id(1)
    count = pixels * GROUP_CHANNELS
    first_channel = group * GROUP_CHANNELS
    x_base = x_ptr + sample.to(tl.int64) * sx_n + first_channel * sx_c
    y_base = y_ptr + sample.to(tl.int64) * sy_n + first_channel  # channels-last: a channel is 1 apart
    if BLOCKS == 1:  # the whole group in registers: read once, statistics about the exact mean
        value, pixel, channel, mask = load_group_block(x_base, add_ptr, sample, first_channel, 0, count, pixels,
                                                        sx_p, sx_c, sa_n, sa_c, GROUP_CHANNELS, CHANNELS_INNER,
                                                        HAS_ADD, BLOCK)
        mean = tl.sum(value, axis=0) / count
        centred = tl.where(mask, value - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / count + eps)
        store_normalized(value, mean, rstd, pixel, channel, mask, weight_ptr, bias_ptr, y_base, first_channel,
                         sy_p, SILU)
    else:
        shift = tl.load(x_base).to(tl.float32)  # the group's first value: any would do, a near one cancels less
        if HAS_ADD:
            shift += tl.load(add_ptr + sample * sa_n + first_channel * sa_c).to(tl.float32)
        sum1 = tl.zeros([BLOCK], dtype=tl.float32)
        sum2 = tl.zeros([BLOCK], dtype=tl.float32)
        for block in range(BLOCKS):
            value, _, _, mask = load_group_block(x_base, add_ptr, sample, first_channel, block * BLOCK, count,
                                                 pixels, sx_p, sx_c, sa_n, sa_c, GROUP_CHANNELS, CHANNELS_INNER,
                                                 HAS_ADD, BLOCK)
            centred = tl.where(mask, value - shift, 0.0)
            sum1 += centred
            sum2 += centred * centred
        mean_shifted = tl.sum(sum1, axis=0) / count
        variance = tl.maximum(tl.sum(sum2, axis=0) / count - mean_shifted * mean_shifted, 0.0)
        mean = mean_shifted + shift
        rstd = 1.0 / tl.sqrt(variance + eps)
        for block in range(BLOCKS):
            value, pixel, channel, mask = load_group_block(x_base, add_ptr, sample, first_channel, block * BLOCK,
                                                            count, pixels, sx_p, sx_c, sa_n, sa_c, GROUP_CHANNELS,
                                                            CHANNELS_INNER, HAS_ADD, BLOCK)
            store_normalized(value, mean, rstd, pixel, channel, mask, weight_ptr, bias_ptr, y_base,
                             first_channel, sy_p, SILU)


@triton.jit
def load_tile(x_base, add_ptr, sample, first_pixel, pixels, sx_p, sx_c, sa_n, sa_c, GROUPS: tl.constexpr,
              GROUP_CHANNELS: tl.constexpr, CHANNEL_BLOCK: tl.constexpr, HAS_ADD: tl.constexpr, SUB: tl.constexpr):
    """SUB pixels from first_pixel, every channel, as a (pixel, group, channel in group) block of
    fp32 with the addend added in the activation's dtype; channels past GROUP_CHANNELS are padding."""
    pixel = first_pixel + tl.arange(0, SUB)[:, None, None]
    in_group = tl.arange(0, CHANNEL_BLOCK)[None, None, :]
    channel = tl.arange(0, GROUPS)[None, :, None] * GROUP_CHANNELS + in_group
    mask = (pixel < pixels) & (in_group < GROUP_CHANNELS)
    value = tl.load(x_base + pixel * sx_p + channel * sx_c, mask=mask, other=0.0)
    if HAS_ADD:
        addend = tl.load(add_ptr + sample * sa_n + channel * sa_c, mask=in_group < GROUP_CHANNELS, other=0.0)
        value = value + addend.to(value.dtype)
    return value.to(tl.float32), pixel, channel, mask


@triton.jit
def group_shifts(x_base, add_ptr, sample, sx_c, sa_n, sa_c, GROUPS: tl.constexpr, GROUP_CHANNELS: tl.constexpr,
                 HAS_ADD: tl.constexpr):
    """Each group's first value (pixel 0, its first channel), fp32, the addend added as load_tile does."""
    first_channel = tl.arange(0, GROUPS) * GROUP_CHANNELS
    value = tl.load(x_base + first_channel * sx_c)
    if HAS_ADD:
        value = value + tl.load(add_ptr + sample * sa_n + first_channel * sa_c).to(value.dtype)
    return value.to(tl.float32)


@triton.jit
def tile_sums_kernel(x_ptr, add_ptr, sums_ptr, pixels, sx_n, sx_p, sx_c, sa_n, sa_c,
                     GROUPS: tl.constexpr, GROUP_CHANNELS: tl.constexpr, CHANNEL_BLOCK: tl.constexpr,
                     HAS_ADD: tl.constexpr, SUB: tl.constexpr, STEPS: tl.constexpr):
    """Per tile (STEPS x SUB pixels) and group: the sum and the sum of squares about the group's shift."""
    tile, sample, tiles = tl.program_id(0), tl.program_id(1), tl.num_programs(0)
    x_base = x_ptr + sample.to(tl.int64) * sx_n
    shift = group_shifts(x_base, add_ptr, sample, sx_c, sa_n, sa_c, GROUPS, GROUP_CHANNELS, HAS_ADD)[None, :, None]
    sum1 = tl.zeros([GROUPS], dtype=tl.float32)
    sum2 = tl.zeros([GROUPS], dtype=tl.float32)
    for step in range(STEPS):
        value, _, _, mask = load_tile(x_base, add_ptr, sample, (tile * STEPS + step) * SUB, pixels, sx_p, sx_c,
                                      sa_n, sa_c, GROUPS, GROUP_CHANNELS, CHANNEL_BLOCK, HAS_ADD, SUB)
        centred = tl.where(mask, value - shift, 0.0)
        sum1 += tl.sum(tl.sum(centred, axis=2), axis=0)
        sum2 += tl.sum(tl.sum(centred * centred, axis=2), axis=0)
    out = sums_ptr + ((sample * tiles + tile) * GROUPS + tl.arange(0, GROUPS)) * 2
    tl.store(out, sum1)
    tl.store(out + 1, sum2)


@triton.jit
def tile_normalize_kernel(x_ptr, add_ptr, sums_ptr, weight_ptr, bias_ptr, y_ptr, pixels, sx_n, sx_p, sx_c,
                          sy_n, sy_p, sa_n, sa_c, eps,
                          GROUPS: tl.constexpr, GROUP_CHANNELS: tl.constexpr, CHANNEL_BLOCK: tl.constexpr,
                          HAS_ADD: tl.constexpr, SILU: tl.constexpr, SUB: tl.constexpr, STEPS: tl.constexpr,
                          TILES_BLOCK: tl.constexpr):
    """The sample's tile sums added up into each group's mean and variance, then this tile normalised."""
    tile, sample, tiles = tl.program_id(0), tl.program_id(1), tl.num_programs(0)
    x_base = x_ptr + sample.to(tl.int64) * sx_n
    y_base = y_ptr + sample.to(tl.int64) * sy_n  # channels-last: a channel is 1 apart
    every_tile = tl.arange(0, TILES_BLOCK)[:, None]
    sums = sums_ptr + ((sample * tiles + every_tile) * GROUPS + tl.arange(0, GROUPS)[None, :]) * 2
    sum1 = tl.sum(tl.load(sums, mask=every_tile < tiles, other=0.0), axis=0)
    sum2 = tl.sum(tl.load(sums + 1, mask=every_tile < tiles, other=0.0), axis=0)
    count = pixels * GROUP_CHANNELS
    mean_shifted = sum1 / count
    variance = tl.maximum(sum2 / count - mean_shifted * mean_shifted, 0.0)
    shift = group_shifts(x_base, add_ptr, sample, sx_c, sa_n, sa_c, GROUPS, GROUP_CHANNELS, HAS_ADD)
    mean = (mean_shifted + shift)[None, :, None]
    rstd = (1.0 / tl.sqrt(variance + eps))[None, :, None]
    for step in range(STEPS):
        value, pixel, channel, mask = load_tile(x_base, add_ptr, sample, (tile * STEPS + step) * SUB, pixels, sx_p,
                                                sx_c, sa_n, sa_c, GROUPS, GROUP_CHANNELS, CHANNEL_BLOCK, HAS_ADD, SUB)
        weight = tl.load(weight_ptr + channel, mask=mask).to(tl.float32)
        bias = tl.load(bias_ptr + channel, mask=mask).to(tl.float32)
        out = (value - mean) * rstd * weight + bias
        if SILU:
            out = out * tl.sigmoid(out)
        tl.store(y_base + pixel * sy_p + channel, out.to(y_base.dtype.element_ty), mask=mask)


def launch_shape(count: int) -> tuple[int, int, int]:
    """(BLOCK, BLOCKS, warps) for a group of `count` elements: one block of the next power of two
    where the group fits in registers (about 32 elements a thread), else two passes of fixed blocks."""
    if count <= ONE_PASS_LIMIT:
        block = triton.next_power_of_2(count)
        return block, 1, min(16, max(4, block // 1024))
    return TWO_PASS_BLOCK, triton.cdiv(count, TWO_PASS_BLOCK), 8


def group_norm_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                   silu: bool, add: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu?(group_norm(x + add[:, :, None, None])) of an (N, C, H, W) tensor, into a new
    channels-last tensor. `add` is (N, C) or (1, C), broadcast over the samples as the network's
    sum does it (the step's time rows are one for both guidance branches). The kernels walk the
    input's pixels as one axis; an x whose pixels are not one (a view across rows) is first copied
    channels-last."""
    batch, channels, height, width = x.shape
    if channels % groups:
        raise ValueError(f"{channels} channels do not split into {groups} groups")
    if add is not None:
        add = add.expand(batch, channels)  # a single row is read at stride 0 by every sample
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    if not pixels_form_one_axis(x):
        x = x.contiguous(memory_format=torch.channels_last)
    sx_n, sx_c, _, sx_p = x.stride()
    sy_n, _, _, sy_p = y.stride()
    sa_n, sa_c = add.stride() if add is not None else (0, 0)
    pixels, group_channels = height * width, channels // groups
    flags = dict(GROUP_CHANNELS=group_channels, HAS_ADD=add is not None)
    add = add if add is not None else x  # an unread pointer where there is no addend
    if pixels * group_channels < SPLIT_FROM or groups & (groups - 1):  # tl.arange spans powers of two only
        block, blocks, warps = launch_shape(pixels * group_channels)
        group_norm_kernel[(groups, batch)](
            x, add, weight, bias, y, pixels, sx_n, sx_p, sx_c, sy_n, sy_p, sa_n, sa_c, eps,
            CHANNELS_INNER=sx_c == 1, SILU=silu, BLOCK=block, BLOCKS=blocks, num_warps=warps, **flags)
        return y
    channel_block = triton.next_power_of_2(group_channels)
    sub, steps, tiles = tiling(pixels, groups * channel_block)
    sums = torch.empty((batch, tiles, groups, 2), dtype=torch.float32, device=x.device)
    tile_sums_kernel[(tiles, batch)](x, add, sums, pixels, sx_n, sx_p, sx_c, sa_n, sa_c, GROUPS=groups,
                                     CHANNEL_BLOCK=channel_block, SUB=sub, STEPS=steps, num_warps=8, **flags)
    tile_normalize_kernel[(tiles, batch)](
        x, add, sums, weight, bias, y, pixels, sx_n, sx_p, sx_c, sy_n, sy_p, sa_n, sa_c, eps, GROUPS=groups,
        CHANNEL_BLOCK=channel_block, SILU=silu, SUB=sub, STEPS=steps,
        TILES_BLOCK=triton.next_power_of_2(tiles), num_warps=8, **flags)
    return y


def tiling(pixels: int, padded_channels: int) -> tuple[int, int, int]:
    """(SUB, STEPS, tiles) for the tiled kernels: SUB pixels a load (SUB_TILE_ELEMENTS with the
    channels padded per group), STEPS loads a tile, as few steps as keep the tiles within MAX_TILES."""
    sub = max(1, SUB_TILE_ELEMENTS // padded_channels)
    steps = triton.cdiv(triton.cdiv(pixels, sub), MAX_TILES)
    return sub, steps, triton.cdiv(pixels, sub * steps)


def pixels_form_one_axis(t: torch.Tensor) -> bool:
    """Whether pixel (h, w) of t sits at h * W + w pixel strides: channels-last or contiguous
    tensors, and channel slices of them."""
    return t.shape[2] == 1 or t.stride(2) == t.shape[3] * t.stride(3)
