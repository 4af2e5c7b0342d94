"""GEGLU (the feed-forward's first Linear, then value * gelu(gate)) as one Triton matrix product.

cuBLAS writes the Linear's 2 x 4C outputs and TorchInductor then reads them back for the product
with the GELU: at the graded step's 32x48 latent that is 16 MB out and in again per layer. Here each
program computes a tile of both halves (two accumulators over the same input tile) and writes only
value * gelu(gate), half the bytes, with no rounding to fp16 in between. The maths is
networks.geglu_torch's. Imported only where triton is (sdcanny/fused_geglu.py decides).
"""
from typing import Tuple  # not tuple[...]: Python 3.8

import torch
import triton
import triton.language as tl


@triton.jit
def geglu_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out[m, n] = (x[m] . w[n] + b[n]) * gelu(x[m] . w[N + n] + b[N + n]) for n < N (w: (2N, K),
    rows of K contiguous). Programs walk GROUP_M row tiles per column tile, so that neighbouring
    programs share weight tiles in L2."""
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :]
    value_ptrs = w_ptr + cols[None, :] * stride_wn + ks[:, None]
    gate_ptrs = value_ptrs + N * stride_wn
    row_ok, col_ok = rows[:, None] < M, cols[None, :] < N
    value = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = ks < K - k
        x = tl.load(x_ptrs, mask=row_ok & k_ok[None, :], other=0.0)
        value = tl.dot(x, tl.load(value_ptrs, mask=k_ok[:, None] & col_ok, other=0.0), value)
        gate = tl.dot(x, tl.load(gate_ptrs, mask=k_ok[:, None] & col_ok, other=0.0), gate)
        x_ptrs += BLOCK_K
        value_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
    value += tl.load(b_ptr + cols, mask=cols < N, other=0.0)[None, :].to(tl.float32)
    gate += tl.load(b_ptr + N + cols, mask=cols < N, other=0.0)[None, :].to(tl.float32)
    out = value * 0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476))  # exact GELU, as F.gelu
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok & col_ok)


def launch_config(rows: int) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, stages, warps): the best of 16 configurations per step shape on the H100
    (docs/benchmarks.md): 128-row tiles from 768 rows, 64-row tiles below."""
    return (128, 64, 3, 8) if rows >= 768 else (64, 64, 4, 4)


def geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (..., K), weight (2N, K), bias (2N,) -> (..., N) in x's dtype."""
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    n = weight.shape[0] // 2
    out = torch.empty(rows.shape[0], n, device=x.device, dtype=x.dtype)
    block_m, block_n, stages, warps = launch_config(rows.shape[0])
    block_k = min(64, max(16, triton.next_power_of_2(k)))
    grid = (triton.cdiv(rows.shape[0], block_m) * triton.cdiv(n, block_n),)
    geglu_kernel[grid](rows, weight, bias, out, rows.shape[0], n, k, rows.stride(0), weight.stride(0), out.stride(0),
                       BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, num_stages=stages,
                       num_warps=warps)
    return out.reshape(*x.shape[:-1], n)
