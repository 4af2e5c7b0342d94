"""The graded step's longest self-attention (1536 keys, width 40; and 384 keys, width 80) with q, k, v
read through TMA descriptors on the fused projection (B, N, 3C), against SDPA and against
sdcanny/attention_kernel.py's pointer loads, alone (issue 11; measured, not used): boxes of D_PAD columns from each head's first column (the
columns past the head belong to the next head or lie outside and are zero-filled: they meet q's
zero padding in the scores, and give output columns that are not stored).

    python3 benchmarks/attention_tma_sweep.py      # on a Hopper GPU
"""
import itertools, os, sys, time
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from graph_timing import replay_us  # noqa: E402


@triton.jit
def attn_tma_kernel(qkv_desc, o_ptr, queries, keys, so_b, so_n, scale_log2, C,
                    HEADS: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    pid_m, hs = tl.program_id(0), tl.program_id(1)
    sample, head = hs // HEADS, hs % HEADS
    row0 = pid_m * BLOCK_M
    cols = tl.arange(0, D_PAD)
    q = qkv_desc.load([sample, row0, head * D]).reshape(BLOCK_M, D_PAD)
    q = tl.where((cols < D)[None, :], q, 0.0)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for start in range(0, keys, BLOCK_N):
        k = qkv_desc.load([sample, start, C + head * D]).reshape(BLOCK_N, D_PAD)
        scores = tl.dot(q, k.T) * scale_log2
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        p = tl.math.exp2(scores - new_max[:, None]).to(tl.float16)
        rescale = tl.math.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(p.to(tl.float32), axis=1)
        v = qkv_desc.load([sample, start, 2 * C + head * D]).reshape(BLOCK_N, D_PAD)
        acc = tl.dot(p, v, acc * rescale[:, None])
        row_max = new_max
    out = acc / row_sum[:, None]
    rows = row0 + tl.arange(0, BLOCK_M)
    tl.store(o_ptr + sample.to(tl.int64) * so_b + rows[:, None] * so_n + head * D + cols[None, :],
             out.to(tl.float16), mask=(rows < queries)[:, None] & (cols < D)[None, :])


def attn_tma(qkv, heads, launch):
    b, n, c3 = qkv.shape
    c = c3 // 3
    d = c // heads
    bm, bn, warps, stages = launch
    dp = 1 << (d - 1).bit_length()
    out = torch.empty((b, n, c), dtype=qkv.dtype, device=qkv.device)
    assert bm == bn
    desc = TensorDescriptor(qkv, list(qkv.shape), list(qkv.stride()), [1, bm, dp])
    attn_tma_kernel[(triton.cdiv(n, bm), b * heads)](desc, out, n, n, out.stride(0), out.stride(1),
                                                     1.4426950408889634 * d ** -0.5, c, HEADS=heads, D=d, D_PAD=dp,
                                                     BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    return out


if __name__ == "__main__":
    from sdcanny.attention_kernel import attention
    H = 8
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    for n, d in ((1536, 40), (384, 80)):
        torch.manual_seed(0)
        c = H * d
        x = torch.randn(2, n, 3 * c, device="cuda", dtype=torch.half)
        q, k, v = x.chunk(3, dim=-1)
        heads = lambda z: z.reshape(2, n, H, d).transpose(1, 2)
        want = F.scaled_dot_product_attention(heads(q).float(), heads(k).float(), heads(v).float()).transpose(1, 2).reshape(2, n, c)
        sd = lambda: F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2).reshape(2, n, c)
        print(n, d, "sdpa", f"{replay_us(sd, 1):.2f}", "ours(pointer)", f"{replay_us(lambda: attention(q, k, v, H), 1):.2f}", flush=True)
        res = []
        for bm, warps, stages in itertools.product((64, 128), (4, 8), (2, 3, 4)):
            launch = (bm, bm, warps, stages)
            try:
                got = attn_tma(x, H, launch)
                err = ((got.float() - want).norm() / want.norm()).item()
                res.append((replay_us(lambda: attn_tma(x, H, launch), 1), launch, err))
            except Exception as e:
                print(launch, type(e).__name__, str(e)[:150], flush=True)
        for r in sorted(res)[:6]:
            print("   tma", f"{r[0]:.2f}", r[1], f"{r[2]:.1e}", flush=True)
