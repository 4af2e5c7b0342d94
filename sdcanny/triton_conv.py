"""Triton kernels for 3x3 convolutions (padding 1, stride 1 or 2) as implicit GEMMs split along K;
sdcanny/split_k.py says where they run and why.

Every block computes one (rows x output channels) tile over one slice of K = 9 x input channels;
unsliced, it adds the bias and writes the output, else its fp32 partial sums go to a workspace
and a second kernel adds the slices and the bias. The input (N, C, H, W) may have any strides
(TorchInductor hands over contiguous ones where its own kernel made the input; a copy to
channels-last cost more than the kernels saved); the output is channels-last; the weight is an (out, 9 x C) matrix of any
strides whose column (3 r + s) C + c is tap (r, s) of input channel c (a channels-last
(out, C, 3, 3) weight is that matrix with unit stride along K). C must be a multiple of the K tile.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .split_k import ConvTiles, output_size


@triton.jit
def _conv3x3_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, C, H, W, HO, WO, sxb, sxc, sxh, sxw, swn, swk,
                    K_TILES: tl.constexpr, STRIDE: tl.constexpr, SLICED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr):
    pid_mn = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_tiles = tl.cdiv(N, BN)
    rows = (pid_mn // n_tiles) * BM + tl.arange(0, BM)
    cols = (pid_mn % n_tiles) * BN + tl.arange(0, BN)
    row_ok = rows < M
    col_ok = cols < N
    pixels = HO * WO
    image = rows // pixels
    pixel = rows % pixels
    y0 = (pixel // WO) * STRIDE - 1  # the tap (0, 0) of each output pixel, padding 1
    x0 = (pixel % WO) * STRIDE - 1
    kk = tl.arange(0, BK)
    tiles_per_tap = C // BK
    k_tiles = 9 * tiles_per_tap
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for i in range(0, K_TILES):  # this slice's K tiles
        t = pid_k * K_TILES + i
        in_k = t < k_tiles  # the last slice may be short
        tap = t // tiles_per_tap
        c0 = (t - tap * tiles_per_tap) * BK
        y = y0 + tap // 3
        x = x0 + tap % 3
        inside = row_ok & (y >= 0) & (y < H) & (x >= 0) & (x < W) & in_k
        a = tl.load(x_ptr + (image * sxb + y * sxh + x * sxw)[:, None] + (c0 + kk)[None, :] * sxc,
                    mask=inside[:, None], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * swn + (t * BK + kk)[:, None] * swk, mask=col_ok[None, :] & in_k, other=0.0)
        acc += tl.dot(a, w)
    ok = row_ok[:, None] & col_ok[None, :]
    if not SLICED:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)
    else:  # this K slice's partial sums, fp32, into the workspace (SPLIT, M, N)
        tl.store(out_ptr + (pid_k * M + rows)[:, None] * N + cols[None, :], acc, mask=ok)


@triton.jit
def _conv_sum_slices_kernel(part_ptr, bias_ptr, out_ptr, MN, N, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < MN
    acc = tl.load(bias_ptr + offsets % N, mask=ok, other=0.0).to(tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(part_ptr + s * MN + offsets, mask=ok, other=0.0)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=ok)


def conv3x3_split_k(x: torch.Tensor, weight_matrix: torch.Tensor, bias: torch.Tensor, stride: int,
                    tiles: ConvTiles) -> torch.Tensor:
    """conv2d(x, weight, bias, stride, padding=1) with the weight as an (out, 9 x C) matrix (see
    above); channels-last output. `tiles.split` is lowered where K has fewer tiles than that many
    slices would need."""
    batch, channels, height, width = x.shape
    out_channels = weight_matrix.shape[0]
    if channels % tiles.block_k or weight_matrix.shape[1] != 9 * channels:
        raise ValueError(f"{channels} input channels with a {tuple(weight_matrix.shape)} weight matrix: the kernel "
                         f"needs (out, 9 x channels) and channels a multiple of {tiles.block_k}")
    ho, wo = output_size(height, stride), output_size(width, stride)
    m = batch * ho * wo
    out = torch.empty((batch, ho, wo, out_channels), dtype=x.dtype, device=x.device)
    k_tiles = 9 * channels // tiles.block_k
    per_split = triton.cdiv(k_tiles, tiles.split)
    split = triton.cdiv(k_tiles, per_split)
    target = out if split == 1 else torch.empty((split, m, out_channels), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, tiles.block_m) * triton.cdiv(out_channels, tiles.block_n), split)
    _conv3x3_kernel[grid](x, weight_matrix, bias, target, m, out_channels, channels, height, width, ho, wo,
                          *x.stride(), *weight_matrix.stride(), K_TILES=per_split, STRIDE=stride, SLICED=split > 1,
                          BM=tiles.block_m, BN=tiles.block_n, BK=tiles.block_k, num_warps=tiles.warps,
                          num_stages=tiles.stages)
    if split > 1:
        block = 1024
        _conv_sum_slices_kernel[(triton.cdiv(m * out_channels, block),)](target, bias, out, m * out_channels,
                                                                          out_channels, SPLIT=split, BLOCK=block,
                                                                          num_warps=4)
    return out.permute(0, 3, 1, 2)
