"""Multi-head attention, softmax(q k^T / sqrt(d)) v, as one Triton kernel (flash attention's
online softmax): one program per BLOCK_M queries of one head of one sample, the keys walked
BLOCK_N at a time, the scores never written out. The head is padded to the next power of two in
registers only (zero columns change no score, and the output's padding columns are not stored).

Written for the graded step's short attentions (up to 384 keys), where cuDNN's kernel, with the
memset TorchInductor puts before it, was slower: alone on the H200, 4.6-8.4 µs against 8.4-10.2
(docs/benchmarks.md). At 1536 keys of width 40 it was not faster, and sdcanny/fused_attention.py
sends longer attentions to SDPA.

q is (B, N, H*d) and k, v are (B, T, H*d), each with any strides whose last is 1: the slices of a
fused q/k/v projection are read in place. The output is a new contiguous (B, N, H*d) tensor, the
input of the output projection. Imported only where triton is (sdcanny/fused_attention.py decides).
"""
from typing import Dict, Optional, Tuple  # not tuple[...]: Python 3.8

import torch
import triton
import triton.language as tl

from .compat import overlap_launch_options


@triton.jit
def attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, queries, keys, sq_b, sq_n, sk_b, sk_t, sv_b, sv_t, so_b, so_n,
                     scale_log2,
                     HEADS: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, OVERLAP: tl.constexpr):
    pid_m, head_of_sample = tl.program_id(0), tl.program_id(1)
    if OVERLAP:  # launched while the kernel ahead finishes: wait here for its results
        tl.extra.cuda.gdc_wait()
    sample, head = head_of_sample // HEADS, head_of_sample % HEADS
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D_PAD)
    in_head = cols < D
    q = tl.load(q_ptr + sample.to(tl.int64) * sq_b + rows[:, None] * sq_n + head * D + cols[None, :],
                mask=(rows < queries)[:, None] & in_head[None, :], other=0.0)
    k_base = k_ptr + sample.to(tl.int64) * sk_b + head * D
    v_base = v_ptr + sample.to(tl.int64) * sv_b + head * D
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for start in range(0, keys, BLOCK_N):
        key = start + tl.arange(0, BLOCK_N)
        is_key = key < keys
        k = tl.load(k_base + key[None, :] * sk_t + cols[:, None], mask=in_head[:, None] & is_key[None, :], other=0.0)
        scores = tl.dot(q, k) * scale_log2  # log2 units: exp(s / sqrt(d)) = 2^(s log2(e) / sqrt(d))
        scores = tl.where(is_key[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        shifted = scores - new_max[:, None]
        p = tl.math.exp2(shifted).to(v_ptr.dtype.element_ty)  # rounded as the product with v takes it
        rescale = tl.math.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(p.to(tl.float32), axis=1)
        v = tl.load(v_base + key[:, None] * sv_t + cols[None, :], mask=is_key[:, None] & in_head[None, :], other=0.0)
        acc = tl.dot(p, v, acc * rescale[:, None])
        row_max = new_max
    if OVERLAP:  # q, k and v are read: the next kernel may start (it waits for this one's output)
        tl.extra.cuda.gdc_launch_dependents()
    out = acc / row_sum[:, None]
    tl.store(o_ptr + sample.to(tl.int64) * so_b + rows[:, None] * so_n + head * D + cols[None, :],
             out.to(o_ptr.dtype.element_ty), mask=(rows < queries)[:, None] & in_head[None, :])


# (queries, keys, head width) -> (BLOCK_M, BLOCK_N, warps, stages): the fastest of 20-36 launches
# for each of the graded step's shapes, alone on the H200 (docs/benchmarks.md); other shapes take
# default_launch's.
LAUNCHES: Dict[Tuple[int, int, int], Tuple[int, int, int, int]] = {
    (1536, 77, 40): (64, 32, 4, 1), (384, 384, 80): (64, 128, 4, 3), (96, 96, 160): (64, 32, 4, 3),
    (24, 24, 160): (64, 32, 4, 1)}


def default_launch(keys: int) -> Tuple[int, int, int, int]:
    """Within 0.6 µs of the best at every step shape in the same sweep: key blocks of 32 up to 128
    keys (one to four blocks, nothing to overlap), else 64 keys a block, three loads in flight."""
    return (64, 32, 4, 1) if keys <= 128 else (64, 64, 4, 3)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              launch: Optional[Tuple[int, int, int, int]] = None, overlap: bool = False) -> torch.Tensor:
    """softmax(q_h k_h^T / sqrt(d)) v_h for each head h, q (B, N, H*d), k and v (B, T, H*d) -> (B, N, H*d).
    `overlap`: launched with programmatic dependent launch (the caller asks
    compat.kernel_launches_overlap whether the GPU and triton have it)."""
    batch, queries, channels = q.shape
    keys = k.shape[1]
    width = channels // heads
    if channels % heads or k.shape != v.shape or k.shape[::2] != q.shape[::2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} are not (B, N, H*d), "
                         f"(B, T, H*d), (B, T, H*d) for {heads} heads")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("the kernel reads rows: the last stride of q, k and v must be 1")
    out = torch.empty((batch, queries, channels), dtype=q.dtype, device=q.device)
    block_m, block_n, warps, stages = launch or LAUNCHES.get((queries, keys, width)) or default_launch(keys)
    grid = (triton.cdiv(queries, block_m), batch * heads)
    attention_kernel[grid](q, k, v, out, queries, keys, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                           v.stride(0), v.stride(1), out.stride(0), out.stride(1), 1.4426950408889634 * width ** -0.5,
                           HEADS=heads, D=width, D_PAD=max(16, triton.next_power_of_2(width)), BLOCK_M=block_m,
                           BLOCK_N=block_n, num_warps=warps, num_stages=stages, OVERLAP=overlap,
                           **overlap_launch_options(overlap))
    return out
