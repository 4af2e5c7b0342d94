"""GroupNorm, with the SiLU after it and per-channel addends before it, as one Triton kernel.

TorchInductor writes a channels-last GroupNorm that follows a cuDNN convolution as several kernels
(partial statistics, their sum, the normalisation); in the graded step they cost 10-30 µs a
GroupNorm (docs/benchmarks.md). Here one program normalises one group of one sample in one launch.
A group that fits in registers (ONE_PASS_LIMIT elements: every group of the graded step but those
of 640 and 960 channels at 32x48 and of 1920 at 16x24) is read once, its statistics taken about the
exact mean, and written once; a larger group is read twice (fp32 sums about the group's first value, so that a mean far from zero
does not cancel the variance away, then the normalised output). The mean and the biased variance
are torch's. (A pair of kernels over tiles of whole channels-last rows, for more programs at 32x48,
was slower in the step; so was one kernel over slabs of rows whose programs met their sums through
atomics and a grid-wide count: docs/benchmarks.md.)

The addends are a time-embedding row (columns of a wider one, read in place) and, where the
network folds it here, the bias of the convolution before the norm. The input may have any strides
whose pixels form one axis (channels-last, contiguous, channel slices of either); the output is
always a new channels-last tensor, whatever the input's layout, so that the op's traced output
(sdcanny/fused_norm.py) never depends on how TorchInductor lays out the input. Imported only
where triton is (sdcanny/fused_norm.py decides).

The VAE decoder's groups are another matter: one sample, 32 groups of 24576 to 393216 elements (up
to 50 MB a tensor at 256x384), where 32 programs cannot stream the tensor and TorchInductor's
GroupNorms took 1.2 ms of the graded call's 3.1 ms decode (docs/benchmarks.md). Called with
`tiles`, the op goes through three kernels over tiles of whole channels-last pixel rows instead:
per-tile sums of every group (`tile_sums_kernel`), each group's mean and variance from them
(`tile_stats_kernel`), and the normalisation (`tile_normalize_kernel`). (For the step's groups, a
pair of such kernels was slower than one program per group: docs/benchmarks.md.)
"""
from typing import Optional, Tuple  # not tuple[...]: Python 3.8 (and no __future__ annotations in jit code)

import torch
import triton
import triton.language as tl

from .compat import overlap_launch_options
from .fp8 import check_modes

# Elements of a group held in registers at once (32 a thread at 16 warps). 32768 spilled: the 640 x
# 32 x 48 group was 0.6 µs faster in two passes of 16384, and the 960-channel one's two passes of
# 16384 took 13.8 µs where six of 8192 took 24.7 (H100, docs/benchmarks.md)
ONE_PASS_LIMIT = 16384
TWO_PASS_BLOCK = 16384  # elements of a larger group each step of its two passes loads
TILE_LOAD_ELEMENTS = 4096  # elements (pixels x channels) the tiled kernels load at once
# Tiles of a sample the sums are taken over: larger images load several blocks a tile, up to
# MAX_LOADS (unrolled); beyond that the tiles multiply (and the statistics' loads widen)
MAX_TILES = 512
MAX_LOADS = 8


@triton.jit
def sum_halves(hi, lo, scale):
    """fp8.sum_halves of one value's halves, in fp32."""
    return (hi.to(tl.float32) + lo.to(tl.float32) * 0.0625) * scale  # fp8.LOW_TERM_WEIGHT


@triton.jit
def load_group_block(x_base, add_ptr, add_bias_ptr, x_scale_ptr, sample, first_channel, start, count, pixels,
                     channels, sx_p, sx_c, sa_n, sa_c, GROUP_CHANNELS: tl.constexpr, CHANNELS_INNER: tl.constexpr,
                     HAS_ADD: tl.constexpr, HAS_ADD_BIAS: tl.constexpr, HALVES: tl.constexpr, BLOCK: tl.constexpr):
    """Elements start..start+BLOCK of one group in memory order (channels innermost for a
    channels-last tensor, pixels for a contiguous one), as fp32 with the addend (plus the
    per-channel add_bias; or add_bias alone) added in the activation's dtype, as `h + t.to(h.dtype)`
    in the network.
    With HALVES, x is an fp8 product's halves (fp8.two_term_halves as an image: the channel's lo half `channels`
    channels on), each value the hi half plus 2^-4 the lo, times x_scale per channel, in fp32."""
    index = start + tl.arange(0, BLOCK)
    mask = index < count
    if CHANNELS_INNER:
        pixel, channel = index // GROUP_CHANNELS, index % GROUP_CHANNELS
    else:
        pixel, channel = index % pixels, index // pixels
    value = tl.load(x_base + pixel * sx_p + channel * sx_c, mask=mask, other=0.0)
    if HALVES:
        low = tl.load(x_base + pixel * sx_p + (channels + channel) * sx_c, mask=mask, other=0.0)
        value = sum_halves(value, low, tl.load(x_scale_ptr + first_channel + channel, mask=mask, other=0.0))
    if HAS_ADD:
        addend = tl.load(add_ptr + sample * sa_n + (first_channel + channel) * sa_c, mask=mask, other=0.0)
        addend = addend.to(value.dtype)
        if HAS_ADD_BIAS:
            addend += tl.load(add_bias_ptr + first_channel + channel, mask=mask, other=0.0).to(value.dtype)
        value = value + addend
    elif HAS_ADD_BIAS:
        value = value + tl.load(add_bias_ptr + first_channel + channel, mask=mask, other=0.0).to(value.dtype)
    return value.to(tl.float32), pixel, channel, mask


@triton.jit
def e4m3_value(v):
    """v (fp32, |v| <= 448) rounded to the nearest e4m3 value, ties to even, as fp32, which then
    converts to e4m3 exactly. The rounding is fp32 arithmetic, not the conversion's, which Triton's
    interpreter gets wrong where a value rounds up into the next binade: v is scaled by the
    reciprocal of its binade's e4m3 step (2^(exponent - 3), at least the subnormal step 2^-9; a
    power of two, so exactly), and adding 1.5 x 2^23 rounds what has at most 4 integer bits."""
    exponent = tl.maximum(((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    inverse_step = ((127 + 3 - exponent) << 23).to(tl.float32, bitcast=True)
    step = ((127 - 3 + exponent) << 23).to(tl.float32, bitcast=True)
    return ((v * inverse_step + 12582912.0) - 12582912.0) * step


@triton.jit
def store_patches(y_base, out, pixel, channel, mask, sy_p, width, height, channels):
    """out into the 3x3 patches of the padded output (networks.patch_matrix's layout: a row per
    pixel, tap-major, channels inner, sy_p apart), the zeros of the padding included."""
    row, column = pixel // width, pixel % width
    for tap in tl.static_range(9):
        dy, dx = tap // 3 - 1, tap % 3 - 1
        # this pixel is tap (dy, dx) of the pixel (dy, dx) before it, where that one is in the image
        target = (row >= dy) & (row - dy < height) & (column >= dx) & (column - dx < width)
        tl.store(y_base + (pixel - dy * width - dx) * sy_p + tap * channels + channel, out, mask=mask & target)
        # and where this pixel's own tap (dy, dx) is off the image, that tap is padding
        outside = (row + dy < 0) | (row + dy >= height) | (column + dx < 0) | (column + dx >= width)
        tl.store(y_base + pixel * sy_p + tap * channels + channel, tl.zeros_like(out), mask=mask & outside)


@triton.jit
def store_normalized(value, mean, rstd, pixel, channel, mask, weight_ptr, bias_ptr, y_base, first_channel,
                     sy_p, width, height, channels, term_scale, lo_offset, SILU: tl.constexpr,
                     PATCHES: tl.constexpr, TERMS: tl.constexpr):
    """(value - mean) * rstd, scaled and shifted per channel, SiLU'd, into the channels-last output;
    or, with PATCHES, into the 3x3 patches of the padded output (store_patches); with TERMS too,
    as two e4m3 terms under term_scale (fp8.two_terms), each low term lo_offset after its high one."""
    weight = tl.load(weight_ptr + first_channel + channel, mask=mask).to(tl.float32)
    bias = tl.load(bias_ptr + first_channel + channel, mask=mask).to(tl.float32)
    out = (value - mean) * rstd * weight + bias
    if SILU:
        out = out * tl.sigmoid(out)
    if TERMS:  # the scale is a bound on |out| / 448: the clamp only keeps a wrong one from making NaNs
        # div_rn: rounded as torch divides, so that fp8.two_terms of the output gives the same terms
        scaled = tl.minimum(tl.maximum(tl.math.div_rn(out, term_scale), -448.0), 448.0)
        hi = e4m3_value(scaled)
        store_patches(y_base, hi.to(tl.float8e4nv), pixel, channel, mask, sy_p, width, height, channels)
        lo = e4m3_value((scaled - hi) * 16.0)  # fp8.LOW_TERM_SHIFT
        store_patches(y_base + lo_offset, lo.to(tl.float8e4nv), pixel, channel, mask, sy_p, width, height, channels)
    elif PATCHES:
        store_patches(y_base, out.to(y_base.dtype.element_ty), pixel, channel, mask, sy_p, width, height, channels)
    else:
        tl.store(y_base + pixel * sy_p + channel, out.to(y_base.dtype.element_ty), mask=mask)


@triton.jit
def group_norm_kernel(x_ptr, add_ptr, add_bias_ptr, x_scale_ptr, weight_ptr, bias_ptr, y_ptr, term_scale_ptr, pixels,
                      width, channels, sx_n, sx_p, sx_c, sy_n, sy_p, sa_n, sa_c, lo_offset, eps,
                      GROUP_CHANNELS: tl.constexpr, CHANNELS_INNER: tl.constexpr, HAS_ADD: tl.constexpr,
                      HAS_ADD_BIAS: tl.constexpr, HALVES: tl.constexpr, SILU: tl.constexpr, BLOCK: tl.constexpr,
                      BLOCKS: tl.constexpr, PATCHES: tl.constexpr, TERMS: tl.constexpr, OVERLAP: tl.constexpr):
    group, sample = tl.program_id(0), tl.program_id(1)
    term_scale = 1.0
    if TERMS:
        term_scale = tl.load(term_scale_ptr).to(tl.float32)
    if OVERLAP:  # launched while the kernel ahead finishes: wait here for its results
        tl.extra.cuda.gdc_wait()
    count = pixels * GROUP_CHANNELS
    first_channel = group * GROUP_CHANNELS
    x_base = x_ptr + sample.to(tl.int64) * sx_n + first_channel * sx_c
    y_base = y_ptr + sample.to(tl.int64) * sy_n + first_channel  # channels-last (or patches): a channel is 1 apart
    height = pixels // width
    if BLOCKS == 1:  # the whole group in registers: read once, statistics about the exact mean
        value, pixel, channel, mask = load_group_block(
            x_base, add_ptr, add_bias_ptr, x_scale_ptr, sample, first_channel, 0, count, pixels, channels, sx_p,
            sx_c, sa_n, sa_c, GROUP_CHANNELS, CHANNELS_INNER, HAS_ADD, HAS_ADD_BIAS, HALVES, BLOCK)
        if OVERLAP:  # the input is read: the next kernel may start (it waits for this one's output)
            tl.extra.cuda.gdc_launch_dependents()
        mean = tl.sum(value, axis=0) / count
        centred = tl.where(mask, value - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / count + eps)
        store_normalized(value, mean, rstd, pixel, channel, mask, weight_ptr, bias_ptr, y_base, first_channel,
                         sy_p, width, height, channels, term_scale, lo_offset, SILU, PATCHES, TERMS)
    else:
        shift = tl.load(x_base).to(tl.float32)  # the group's first value: any would do, a near one cancels less
        if HALVES:
            shift = sum_halves(shift, tl.load(x_base + channels * sx_c), tl.load(x_scale_ptr + first_channel))
        if HAS_ADD:
            shift += tl.load(add_ptr + sample * sa_n + first_channel * sa_c).to(tl.float32)
        sum1 = tl.zeros([BLOCK], dtype=tl.float32)
        sum2 = tl.zeros([BLOCK], dtype=tl.float32)
        for block in range(BLOCKS):
            value, _, _, mask = load_group_block(
                x_base, add_ptr, add_bias_ptr, x_scale_ptr, sample, first_channel, block * BLOCK, count, pixels,
                channels, sx_p, sx_c, sa_n, sa_c, GROUP_CHANNELS, CHANNELS_INNER, HAS_ADD, HAS_ADD_BIAS, HALVES, BLOCK)
            centred = tl.where(mask, value - shift, 0.0)
            sum1 += centred
            sum2 += centred * centred
        if OVERLAP:  # the next kernel only waits for this one's output, and never writes its input
            tl.extra.cuda.gdc_launch_dependents()
        mean_shifted = tl.sum(sum1, axis=0) / count
        variance = tl.maximum(tl.sum(sum2, axis=0) / count - mean_shifted * mean_shifted, 0.0)
        mean = mean_shifted + shift
        rstd = 1.0 / tl.sqrt(variance + eps)
        for block in range(BLOCKS):
            value, pixel, channel, mask = load_group_block(
                x_base, add_ptr, add_bias_ptr, x_scale_ptr, sample, first_channel, block * BLOCK, count, pixels,
                channels, sx_p, sx_c, sa_n, sa_c, GROUP_CHANNELS, CHANNELS_INNER, HAS_ADD, HAS_ADD_BIAS, HALVES, BLOCK)
            store_normalized(value, mean, rstd, pixel, channel, mask, weight_ptr, bias_ptr, y_base,
                             first_channel, sy_p, width, height, channels, term_scale, lo_offset, SILU, PATCHES,
                             TERMS)


@triton.jit
def with_bias(value, bias_ptr, channel, HAS_BIAS: tl.constexpr):
    """value (x's dtype) plus the per-channel bias where HAS_BIAS, summed in fp32 and rounded to x's
    dtype, as TorchInductor adds a convolution's bias to its output; as fp32."""
    if HAS_BIAS:
        value = (value.to(tl.float32) + tl.load(bias_ptr + channel).to(tl.float32)).to(value.dtype)
    return value.to(tl.float32)


@triton.jit
def load_rows(x_base, bias_ptr, first_pixel, pixels, sx_p, CHANNELS: tl.constexpr, ROWS: tl.constexpr,
              HAS_BIAS: tl.constexpr):
    """ROWS channels-last pixel rows from first_pixel (those past the image masked), every channel,
    as a (pixel, channel) block of fp32 (with_bias): each row one contiguous read."""
    pixel = first_pixel + tl.arange(0, ROWS)[:, None]
    channel = tl.arange(0, CHANNELS)[None, :]
    mask = (pixel < pixels) & (channel < CHANNELS)
    value = tl.load(x_base + pixel * sx_p + channel, mask=mask, other=0.0)
    return with_bias(value, bias_ptr, channel, HAS_BIAS), pixel, channel, mask


@triton.jit
def tile_sums_kernel(x_ptr, add_bias_ptr, sums_ptr, pixels, sx_n, sx_p, GROUPS: tl.constexpr,
                     GROUP_CHANNELS: tl.constexpr, ROWS: tl.constexpr, LOADS: tl.constexpr, HAS_ADD_BIAS: tl.constexpr,
                     OVERLAP: tl.constexpr):
    """Per tile (LOADS x ROWS pixels) and group: the sum and the sum of squares about the group's
    shift, into sums (N, tiles, GROUPS, 2). The loads are unrolled and summed element-wise; the
    block is reduced to its groups once, at the end."""
    tile, sample, tiles = tl.program_id(0), tl.program_id(1), tl.num_programs(0)
    if OVERLAP:
        tl.extra.cuda.gdc_wait()
    x_base = x_ptr + sample.to(tl.int64) * sx_n
    channels: tl.constexpr = GROUPS * GROUP_CHANNELS
    channel = tl.arange(0, channels)
    # each channel's group's first value (pixel 0, the group's first channel): the sums are taken
    # about it, so that a mean far from zero does not cancel the variance away
    first = (channel // GROUP_CHANNELS) * GROUP_CHANNELS
    shift = with_bias(tl.load(x_base + first), add_bias_ptr, first, HAS_ADD_BIAS)[None, :]
    sum1 = tl.zeros([ROWS, channels], dtype=tl.float32)
    sum2 = tl.zeros([ROWS, channels], dtype=tl.float32)
    for load in tl.static_range(LOADS):
        value, _, _, mask = load_rows(x_base, add_bias_ptr, (tile * LOADS + load) * ROWS, pixels, sx_p, channels, ROWS,
                                      HAS_ADD_BIAS)
        centred = tl.where(mask, value - shift, 0.0)
        sum1 += centred
        sum2 += centred * centred
    if OVERLAP:
        tl.extra.cuda.gdc_launch_dependents()
    out = sums_ptr + ((sample * tiles + tile) * GROUPS + tl.arange(0, GROUPS)) * 2
    tl.store(out, tl.sum(tl.sum(tl.reshape(sum1, [ROWS, GROUPS, GROUP_CHANNELS]), axis=2), axis=0))
    tl.store(out + 1, tl.sum(tl.sum(tl.reshape(sum2, [ROWS, GROUPS, GROUP_CHANNELS]), axis=2), axis=0))


@triton.jit
def tile_stats_kernel(x_ptr, add_bias_ptr, sums_ptr, stats_ptr, tiles, pixels, sx_n, eps, GROUPS: tl.constexpr,
                      GROUP_CHANNELS: tl.constexpr, TILE_BLOCK: tl.constexpr, HAS_ADD_BIAS: tl.constexpr,
                      OVERLAP: tl.constexpr):
    """One group's tile sums (TILE_BLOCK >= tiles, in one load) added up into its mean and 1 / std,
    into stats (N, GROUPS, 2): a program a group, so that no single program reads every sum (one
    program for all 32 groups took 22 µs, the sums kernel 4-13; docs/benchmarks.md)."""
    group, sample = tl.program_id(0), tl.program_id(1)
    if OVERLAP:
        tl.extra.cuda.gdc_wait()
    tile = tl.arange(0, TILE_BLOCK)
    sums = sums_ptr + ((sample * tiles + tile) * GROUPS + group) * 2
    sum1 = tl.sum(tl.load(sums, mask=tile < tiles, other=0.0), axis=0)
    sum2 = tl.sum(tl.load(sums + 1, mask=tile < tiles, other=0.0), axis=0)
    if OVERLAP:
        tl.extra.cuda.gdc_launch_dependents()
    count = pixels * GROUP_CHANNELS
    mean_shifted = sum1 / count
    variance = tl.maximum(sum2 / count - mean_shifted * mean_shifted, 0.0)
    x_base = x_ptr + sample.to(tl.int64) * sx_n
    first = group * GROUP_CHANNELS
    mean = mean_shifted + with_bias(tl.load(x_base + first), add_bias_ptr, first, HAS_ADD_BIAS)  # the group's shift
    out = stats_ptr + (sample * GROUPS + group) * 2
    tl.store(out, mean)
    tl.store(out + 1, 1.0 / tl.sqrt(variance + eps))


@triton.jit
def tile_normalize_kernel(x_ptr, add_bias_ptr, stats_ptr, weight_ptr, bias_ptr, y_ptr, pixels, sx_n, sx_p, sy_n,
                          sy_p, GROUPS: tl.constexpr, GROUP_CHANNELS: tl.constexpr, ROWS: tl.constexpr,
                          SILU: tl.constexpr, HAS_ADD_BIAS: tl.constexpr, OVERLAP: tl.constexpr):
    """ROWS pixel rows normalised with their groups' statistics, scaled, shifted, SiLU'd."""
    block, sample = tl.program_id(0), tl.program_id(1)
    if OVERLAP:
        tl.extra.cuda.gdc_wait()
    channels: tl.constexpr = GROUPS * GROUP_CHANNELS
    channel = tl.arange(0, channels)
    stats = stats_ptr + (sample * GROUPS + channel // GROUP_CHANNELS) * 2  # each channel's group's
    mean = tl.load(stats)
    scale = tl.load(stats + 1) * tl.load(weight_ptr + channel).to(tl.float32)
    bias = tl.load(bias_ptr + channel).to(tl.float32)
    value, pixel, channel, mask = load_rows(x_ptr + sample.to(tl.int64) * sx_n, add_bias_ptr, block * ROWS, pixels,
                                            sx_p, channels, ROWS, HAS_ADD_BIAS)
    if OVERLAP:
        tl.extra.cuda.gdc_launch_dependents()
    out = (value - mean[None, :]) * scale[None, :] + bias[None, :]
    if SILU:
        out = out * tl.sigmoid(out)
    tl.store(y_ptr + sample.to(tl.int64) * sy_n + pixel * sy_p + channel, out.to(y_ptr.dtype.element_ty), mask=mask)


def tiling(pixels: int, channels: int) -> Tuple[int, int, int]:
    """(ROWS, LOADS, tiles) for the sums: ROWS pixel rows a load (TILE_LOAD_ELEMENTS), LOADS loads a
    tile, as few as keep the tiles within MAX_TILES, at most MAX_LOADS."""
    rows = max(1, TILE_LOAD_ELEMENTS // channels)
    loads = min(MAX_LOADS, triton.cdiv(triton.cdiv(pixels, rows), MAX_TILES))
    return rows, loads, triton.cdiv(pixels, rows * loads)


def tiled_group_norm_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                         silu: bool, overlap: bool, add_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu?(group_norm(x + add_bias[:, None, None])) through the three tiled kernels, into a new
    channels-last tensor; x is read channels-last (copied so first where it is not). add_bias (C,),
    where given, is the convolution's bias that the VAE decoder's ResBlocks leave to their second norm
    (networks.VAEResnetBlock), each sum rounded to x's dtype as the convolution's output would be.
    The channels and the groups must be powers of two (the kernels' tl.arange spans one; the VAE
    decoder's are)."""
    batch, channels, height, width = x.shape
    if not (power_of_two(channels) and power_of_two(groups)) or channels % groups:
        raise ValueError(f"the tiled kernels take power-of-two channels and groups, got {channels} and {groups}")
    if x.stride(1) != 1 or not pixels_form_one_axis(x):
        x = x.contiguous(memory_format=torch.channels_last)
    pixels, group_channels = height * width, channels // groups
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    sx_n, _, _, sx_p = x.stride()
    sy_n, _, _, sy_p = y.stride()
    rows, loads, tiles = tiling(pixels, channels)
    sums = torch.empty((batch, tiles, groups, 2), dtype=torch.float32, device=x.device)
    stats = torch.empty((batch, groups, 2), dtype=torch.float32, device=x.device)
    shape = dict(GROUPS=groups, GROUP_CHANNELS=group_channels, HAS_ADD_BIAS=add_bias is not None, OVERLAP=overlap,
                 **overlap_launch_options(overlap))
    add_bias = x if add_bias is None else add_bias  # a pointer the kernels do not read then
    tile_sums_kernel[(tiles, batch)](x, add_bias, sums, pixels, sx_n, sx_p, ROWS=rows, LOADS=loads, num_warps=8,
                                     **shape)
    tile_stats_kernel[(groups, batch)](x, add_bias, sums, stats, tiles, pixels, sx_n, eps,
                                       TILE_BLOCK=triton.next_power_of_2(tiles), num_warps=4, **shape)
    tile_normalize_kernel[(triton.cdiv(pixels, rows), batch)](x, add_bias, stats, weight, bias, y, pixels, sx_n, sx_p,
                                                              sy_n, sy_p, ROWS=rows, SILU=silu, num_warps=8, **shape)
    return y


def launch_shape(count: int) -> Tuple[int, int, int]:
    """(BLOCK, BLOCKS, warps) for a group of `count` elements: one block of the next power of two
    where the group fits in registers, else two passes of fixed blocks. 16 warps from 4096
    elements: alone and after a convolution, at the step's shapes on the H100, 16 warps were the
    fastest or within 1.1 µs of it, 4 or 8 up to 3 µs slower (docs/benchmarks.md)."""
    if count <= ONE_PASS_LIMIT:
        block = triton.next_power_of_2(count)
        return block, 1, 16 if block >= 4096 else 4
    return TWO_PASS_BLOCK, triton.cdiv(count, TWO_PASS_BLOCK), 16


def group_norm_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                   silu: bool, add: Optional[torch.Tensor] = None, add_column: int = 0,
                   add_bias: Optional[torch.Tensor] = None, patches: bool = False, overlap: bool = False,
                   tiles: bool = False, term_scale: Optional[torch.Tensor] = None,
                   x_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu?(group_norm(x + addend[:, :, None, None])) of an (N, C, H, W) tensor, into a new
    channels-last tensor, or with `patches` into the (N x H x W, 9 x C) matrix of its 3x3 patches
    (padding 1), networks.patch_matrix's, made here instead of by another kernel from the
    normalised tensor; with a `term_scale` too, as the (2 x N x H x W, 9 x C) rows of the patches'
    two e4m3 terms under that scale (fp8.two_terms, made from the fp32 values). With an `x_scale`
    (C,), x is an fp8 product's halves instead, (N, 2C, H, W) fp32 (fp8.two_term_halves as an image), summed as
    fp8.sum_halves does; only into fp8 terms. `overlap`: launched
    with programmatic dependent launch (the caller asks compat.kernel_launches_overlap whether the
    GPU and triton have it). The addend is add's columns add_column..add_column+C, plus add_bias (C,)
    where given, in x's dtype. `add` has N rows or one, broadcast over the samples as the network's
    sum does it (the step's time rows are one for both guidance branches). The kernel walks the
    input's pixels as one axis; an x whose pixels are not one (a view across rows) is first copied
    channels-last. `tiles`: through the three tiled kernels (tiled_group_norm_act) where the channels
    and groups are powers of two (else one program per group), for large groups of few samples (the
    VAE decoder's); no addend there but add_bias, no patches. add_bias may come without an addend."""
    batch, channels, height, width = x.shape
    channels //= 2 if x_scale is not None else 1
    check_modes(patches, tiles, term_scale, x_scale)
    if channels % groups:
        raise ValueError(f"{channels} channels do not split into {groups} groups")
    if tiles:
        if add is not None or patches:
            raise ValueError("the tiled GroupNorm kernels take no addend but add_bias and write no patches")
        if power_of_two(channels) and power_of_two(groups):
            return tiled_group_norm_act(x, weight, bias, groups, eps, silu, overlap, add_bias)
    if add is not None:  # a view: the kernel reads the columns in place, a single row at stride 0
        add = add[:, add_column:add_column + channels].expand(batch, channels)
    terms = term_scale is not None
    if patches:  # with terms, each pixel's row of high terms followed by its row of low terms
        y = torch.empty(((2 if terms else 1) * batch * height * width, 9 * channels),
                        dtype=torch.float8_e4m3fn if terms else x.dtype, device=x.device)
        sy_p = (2 if terms else 1) * 9 * channels
        sy_n = height * width * sy_p
    else:
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        sy_n, _, _, sy_p = y.stride()
    if not pixels_form_one_axis(x):
        x = x.contiguous(memory_format=torch.channels_last)
    sx_n, sx_c, _, sx_p = x.stride()
    sa_n, sa_c = add.stride() if add is not None else (0, 0)
    block, blocks, warps = launch_shape(height * width * channels // groups)
    unread = x  # a pointer for the inputs a call has not
    group_norm_kernel[(groups, batch)](
        x, add if add is not None else unread, add_bias if add_bias is not None else unread,
        x_scale if x_scale is not None else unread, weight, bias, y, term_scale if terms else unread,
        height * width, width, channels, sx_n, sx_p, sx_c, sy_n, sy_p, sa_n, sa_c, 9 * channels, eps,
        GROUP_CHANNELS=channels // groups, CHANNELS_INNER=sx_c == 1, HAS_ADD=add is not None,
        HAS_ADD_BIAS=add_bias is not None, HALVES=x_scale is not None, SILU=silu, BLOCK=block, BLOCKS=blocks,
        num_warps=warps, PATCHES=patches, TERMS=terms, OVERLAP=overlap, **overlap_launch_options(overlap))
    return y


def power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def pixels_form_one_axis(t: torch.Tensor) -> bool:
    """Whether pixel (h, w) of t sits at h * W + w pixel strides: channels-last or contiguous
    tensors, and channel slices of them."""
    return t.shape[2] == 1 or t.stride(2) == t.shape[3] * t.stride(3)
