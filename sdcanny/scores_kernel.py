"""A folded cross-attention's weights, the scores product with each head's softmax in its epilogue,
as one Triton kernel.

A folded cross-attention (networks.CrossAttention.attend_folded) takes, per head h, the softmax over
the text's T tokens of x . score_rows[h T + j], then weighs the value rows with it. cuBLAS wrote
the scores (B, N, H T) and TorchInductor read them back for the softmax. Here each program computes
one head's scores for a tile of rows, with the head's T key rows padded to a power of two in the tile
(the rows past T, the next head's, masked out), and writes only the softmax, in fp32 until the store.
x and the rows come through tensor-memory descriptors (Hopper's TMA), one sample at a time. The maths
is attend_folded's. Imported only where triton is (sdcanny/fused_scores.py decides).
"""
from typing import Optional, Tuple  # not tuple[...]: Python 3.8

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .compat import overlap_launch_options
from .tma import describable


@triton.jit
def scores_softmax_kernel(x_desc, rows_desc, out_ptr, N, stride_ob, stride_on,
                          C: tl.constexpr, T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_K: tl.constexpr, OVERLAP: tl.constexpr):
    """out[b, n, h T + j] = softmax_j(x[b, n] . rows[b, h T + j]) for j < T: one program per (row
    tile, head, sample). C, the channels, and T, the tokens, are constants of the compiled kernel."""
    if OVERLAP:
        tl.extra.cuda.gdc_wait()  # x comes from the kernel ahead
    pid_m, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    acc = tl.zeros((BLOCK_M, BLOCK_T), dtype=tl.float32)
    for k in tl.range(0, C, BLOCK_K):
        a = x_desc.load([b, pid_m * BLOCK_M, k]).reshape(BLOCK_M, BLOCK_K)
        keys = rows_desc.load([b, h * T, k]).reshape(BLOCK_T, BLOCK_K)
        acc = tl.dot(a, keys.T, acc)
    if OVERLAP:
        tl.extra.cuda.gdc_launch_dependents()
    cols = tl.arange(0, BLOCK_T)
    acc = tl.where((cols < T)[None, :], acc, float("-inf"))
    e = tl.exp(acc - tl.max(acc, axis=1)[:, None])
    weights = e / tl.sum(e, axis=1)[:, None]
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(out_ptr + b * stride_ob + rows[:, None] * stride_on + h * T + cols[None, :],
             weights.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < N) & (cols[None, :] < T))


def launch_config(rows: int) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_K, stages, warps) for `rows` rows a sample: the fastest of six alone on the
    H100 at the graded step's shapes (docs/benchmarks.md, twentieth session): 64-row tiles for the
    384 rows at 32x48, 16-row tiles (more programs) for the 96 and 24 rows below it."""
    return (64, 128, 3, 4) if rows >= 256 else (16, 128, 3, 4)


def scores_softmax(x: torch.Tensor, score_rows: torch.Tensor, heads: int, overlap: bool = False,
                   config: Optional[Tuple[int, int, int, int]] = None) -> torch.Tensor:
    """x (B, N, C), score_rows (B, heads T, C) -> (B, N, heads T): each head's softmax over its T
    columns, in x's dtype. `overlap`: launched with programmatic dependent launch (the caller asks
    compat.kernel_launches_overlap). `config` overrides launch_config (for sweeps)."""
    b, n, c = x.shape
    tokens = score_rows.shape[1] // heads
    x, score_rows = describable(x), describable(score_rows)
    out = torch.empty(b, n, heads * tokens, device=x.device, dtype=x.dtype)
    block_m, block_k, stages, warps = config or launch_config(n)
    block_k = min(block_k, max(16, triton.next_power_of_2(c)))
    block_t = max(16, triton.next_power_of_2(tokens))
    x_desc = TensorDescriptor.from_tensor(x, [1, block_m, block_k])
    rows_desc = TensorDescriptor.from_tensor(score_rows, [1, block_t, block_k])
    grid = (triton.cdiv(n, block_m), heads, b)
    scores_softmax_kernel[grid](x_desc, rows_desc, out, n, out.stride(0), out.stride(1), C=c, T=tokens,
                                BLOCK_M=block_m, BLOCK_T=block_t, BLOCK_K=block_k, OVERLAP=overlap,
                                num_stages=stages, num_warps=warps, **overlap_launch_options(overlap))
    return out
