"""The feed-forward's GEGLU as one Triton matrix product that also lays out the folded output's input.

In the fast back-end a transformer's last block feeds [value * gelu(gate), r] (r: the residual)
to one folded output product (networks.SpatialTransformer.fold_output_projection). cuBLAS wrote the
GEGLU Linear's 2 x 4C outputs and TorchInductor read them back to write the gated half and copy r
beside it: at the graded 32x48 latent 16 MB out and in again per layer. Here the weight's rows come
interleaved (value row j, then gate row j: fused_geglu.interleave_rows), so each output tile of the product
holds matching value and gate columns; the epilogue splits them and writes only value * gelu(gate),
in fp32 until the store. The operands come through tensor-memory descriptors (Hopper's TMA); extra
programs copy r into the last columns. The maths is networks.GEGLU's. Imported only where triton is
(sdcanny/fused_geglu.py decides).
"""
from typing import Optional, Tuple  # not tuple[...]: Python 3.8

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .compat import overlap_launch_options
from .tma import describable

RESIDUAL_COLUMNS = 128  # columns of r a copying program moves per load


@triton.jit
def geglu_kernel(x_desc, w_desc, b_ptr, r_ptr, out_ptr, M, I, stride_r, stride_out,
                 K: tl.constexpr, C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr, RESIDUAL_COLUMNS: tl.constexpr, OVERLAP: tl.constexpr):
    """out[:, :I] = value * gelu(gate) and out[:, I:I + C] = r, where the product x w^T + b holds
    (value j, gate j) in columns (2j, 2j + 1). Programs past the product's tiles copy r, a row tile
    each. Product programs walk GROUP_M row tiles per column tile, so that neighbours share weight
    tiles in L2."""
    if OVERLAP:
        tl.extra.cuda.gdc_wait()  # x and r come from the kernel ahead
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(2 * I, BLOCK_N)
    rows_in_tile = tl.arange(0, BLOCK_M)
    if pid >= tiles_m * tiles_n:
        rows = (pid - tiles_m * tiles_n) * BLOCK_M + rows_in_tile
        for c in range(0, C, RESIDUAL_COLUMNS):
            cols = c + tl.arange(0, RESIDUAL_COLUMNS)
            mask = (rows[:, None] < M) & (cols[None, :] < C)
            r = tl.load(r_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask)
            tl.store(out_ptr + rows[:, None] * stride_out + I + cols[None, :], r, mask=mask)
        return
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K):
        a = x_desc.load([pid_m * BLOCK_M, k])
        b = w_desc.load([pid_n * BLOCK_N, k])
        acc = tl.dot(a, b.T, acc)
    if OVERLAP:
        tl.extra.cuda.gdc_launch_dependents()
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc += tl.load(b_ptr + cols, mask=cols < 2 * I, other=0.0).to(tl.float32)[None, :]
    value, gate = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
    gated = value * 0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476))  # exact GELU, as F.gelu
    rows = pid_m * BLOCK_M + rows_in_tile
    out_cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    tl.store(out_ptr + rows[:, None] * stride_out + out_cols[None, :], gated.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (out_cols[None, :] < I))


def launch_config(rows: int) -> Tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, stages, warps) for a product of `rows` rows: the best of 12
    configurations at each of the graded step's shapes on the H100 (docs/benchmarks.md)."""
    if rows >= 768:
        return 128, 128, 64, 3, 8
    if rows > 64:
        return 64, 128, 64, 4, 4
    return 64, 64, 64, 6, 4


def geglu_with_residual(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor,
                        overlap: bool = False,
                        config: Optional[Tuple[int, int, int, int, int]] = None) -> torch.Tensor:
    """x (M, K) and residual (M, C) rows, weight (2I, K) and bias (2I,) interleaved
    (fused_geglu.interleave_rows)
    -> (M, I + C): [value * gelu(gate), residual], in x's dtype. `overlap`: launched with
    programmatic dependent launch (the caller asks compat.kernel_launches_overlap). `config`
    overrides launch_config (for sweeps)."""
    m, k = x.shape
    inner, c = weight.shape[0] // 2, residual.shape[1]
    x, weight = describable(x), describable(weight)
    residual = residual if residual.stride(1) == 1 else residual.contiguous()
    out = torch.empty(m, inner + c, device=x.device, dtype=x.dtype)
    block_m, block_n, block_k, stages, warps = config or launch_config(m)
    block_k = min(block_k, max(16, triton.next_power_of_2(k)))
    x_desc = TensorDescriptor.from_tensor(x, [block_m, block_k])
    w_desc = TensorDescriptor.from_tensor(weight, [block_n, block_k])
    tiles_m = triton.cdiv(m, block_m)
    grid = (tiles_m * triton.cdiv(2 * inner, block_n) + tiles_m,)
    geglu_kernel[grid](x_desc, w_desc, bias, residual, out, m, inner, residual.stride(0), out.stride(0),
                       K=k, C=c, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
                       RESIDUAL_COLUMNS=RESIDUAL_COLUMNS, OVERLAP=overlap, num_stages=stages, num_warps=warps,
                       **overlap_launch_options(overlap))
    return out
