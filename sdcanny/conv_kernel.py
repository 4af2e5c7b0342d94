"""A 3x3 convolution (padding 1, stride 1) of a few output rows as one Triton kernel that streams
its weights across every SM: split along K = 9 x C into slices, each program computing all the
output rows for BLOCK_N output channels over one slice, written as fp32 partial sums.

At the graded step's 4x6 latent (48 output rows for the two guidance branches, 1280 channels) a
convolution is bound by reading its weights (29.5 MB at 1280 -> 1280). cuDNN's kernel runs there as
20 blocks on 132 SMs; this one as 20 x 13 programs, 14.9 µs alone on the H100 against cuDNN's 26.8
(docs/benchmarks.md). The slices are summed by whoever reads the result (sdcanny/fused_conv.py: in
the networks, TorchInductor folds the sum into the next element-wise kernel).

The input (N, C, H, W) may have any strides (channels-last reads whole rows of channels); the weight
is read as the (out, 9 x C) matrix whose column (3 r + s) C + c is tap (r, s) of input channel c: a
view where the (out, C, 3, 3) weight is channels-last, as the fast back-end keeps it. Imported only
where triton is (sdcanny/fused_conv.py decides).
"""
from typing import NamedTuple, Optional  # not X | None: Python 3.8

import torch
import triton
import triton.language as tl


@triton.jit
def conv3x3_slices_kernel(x_ptr, w_ptr, out_ptr, rows_total, height, width, channels, out_channels,
                          sx_n, sx_c, sx_h, sx_w, sw_o, k_tiles, tiles_per_slice,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n_tile, slice_index = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < rows_total
    pixels = height * width
    sample = rows // pixels
    y = (rows % pixels) // width
    x = rows % width
    kk = tl.arange(0, BLOCK_K)
    cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    chunks = channels // BLOCK_K
    first = slice_index * tiles_per_slice
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(first, tl.minimum(first + tiles_per_slice, k_tiles)):
        tap = t // chunks
        c0 = (t - tap * chunks) * BLOCK_K
        yy = y + tap // 3 - 1
        xx = x + tap % 3 - 1
        inside = row_ok & (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
        a = tl.load(x_ptr + (sample * sx_n + yy * sx_h + xx * sx_w)[:, None] + (c0 + kk)[None, :] * sx_c,
                    mask=inside[:, None], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * sw_o + (t * BLOCK_K + kk)[None, :])
        acc = tl.dot(a, w.T, acc)
    tl.store(out_ptr + (slice_index * rows_total + rows)[:, None] * out_channels + cols[None, :], acc,
             mask=row_ok[:, None])


class Launch(NamedTuple):
    block_n: int
    block_k: int
    slices: int
    stages: int
    warps: int


MAX_ROWS = 64  # all the output rows in one block of the kernel
# The fastest launch alone on the H100 at 4x6, 1280 -> 1280 without packed weights (BLOCK_N 64, BLOCK_K
# 128, 3 stages, two programs per SM: 13 slices of 20 column blocks; docs/benchmarks.md)
BLOCK_N, BLOCK_K, STAGES, PROGRAMS_PER_SM = 64, 128, 3, 2


def largest_tile(size: int, most: int) -> int:
    """The largest power of two from 16 to `most` that divides size (0 if none does)."""
    tile = most
    while tile >= 16 and size % tile:
        tile //= 2
    return tile if tile >= 16 else 0


def launch_for(rows: int, channels: int, out_channels: int, multiprocessors: int) -> Optional[Launch]:
    """The kernel's launch for this convolution, or None where the kernel does not take it (more
    than MAX_ROWS output rows, or channel counts that are not multiples of 16)."""
    block_n, block_k = largest_tile(out_channels, BLOCK_N), largest_tile(channels, BLOCK_K)
    if rows > MAX_ROWS or not block_n or not block_k:
        return None
    k_tiles = 9 * channels // block_k
    column_blocks = out_channels // block_n
    wanted = max(1, round(PROGRAMS_PER_SM * multiprocessors / column_blocks))
    per_slice = triton.cdiv(k_tiles, min(wanted, k_tiles))
    return Launch(block_n, block_k, triton.cdiv(k_tiles, per_slice), STAGES, 4)


def conv3x3_slices(x: torch.Tensor, weight: torch.Tensor, launch: Launch) -> torch.Tensor:
    """The (slices, N*H*W, out) fp32 partial sums of conv2d(x, weight, padding=1), rows in (n, y, x)
    order; their sum over the first axis is the convolution (no bias)."""
    n, c, h, w = x.shape
    out_channels = weight.shape[0]
    matrix = weight.permute(0, 2, 3, 1).reshape(out_channels, 9 * c)  # a view of a channels-last weight
    if matrix.stride(1) != 1:
        matrix = matrix.contiguous()
    rows = n * h * w
    k_tiles = 9 * c // launch.block_k
    per_slice = triton.cdiv(k_tiles, launch.slices)
    out = torch.empty((launch.slices, rows, out_channels), dtype=torch.float32, device=x.device)
    sx_n, sx_c, sx_h, sx_w = x.stride()
    conv3x3_slices_kernel[(out_channels // launch.block_n, launch.slices)](
        x, matrix, out, rows, h, w, c, out_channels, sx_n, sx_c, sx_h, sx_w, matrix.stride(0), k_tiles, per_slice,
        BLOCK_M=MAX_ROWS, BLOCK_N=launch.block_n, BLOCK_K=launch.block_k, num_stages=launch.stages,
        num_warps=launch.warps)
    return out
