"""The attention kernel on a CPU, in Triton's interpreter: run by tests/test_fused_attention.py as a
subprocess with TRITON_INTERPRET=1 (the variable must be set before triton is imported). Prints
one line per check; exits non-zero on the first that fails.

1. The kernel against attention written out head by head in float64: self-attention on the
   slices of one fused projection (read in place), cross-attention to 77 keys (not a whole number
   of key blocks), queries not a whole number of query blocks, head widths 40, 80 and 160 (padded
   to 64, 128 and 256 in registers), several key blocks with loads in flight, fp32 and fp16.
2. The op: up to KERNEL_KEYS keys the kernel, above them SDPA; both the same attention.
3. The tiny ControlNet and UNet with every unfolded attention through the op: the same outputs
   as with SDPA.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdcanny import fused_attention  # noqa: E402
from tiny_networks_through import check_through_op  # noqa: E402

# (batch, queries, keys or None for self-attention, heads, width, dtype, launch or None for the default)
KERNEL_CASES = ((2, 40, None, 2, 40, torch.float32, None), (2, 33, 77, 3, 40, torch.float32, None),
                (1, 70, None, 2, 80, torch.float32, (64, 32, 4, 3)), (2, 24, None, 2, 160, torch.float32, None),
                (2, 65, 77, 2, 40, torch.float16, (64, 64, 4, 3)), (1, 130, None, 1, 80, torch.float16, (64, 128, 4, 3)))


def written_out(q, k, v, heads):
    """softmax(q_h k_h^T / sqrt(d)) v_h per head in float64, from the (B, N, H*d) forms."""
    d = q.shape[-1] // heads
    outs = []
    for h in range(heads):
        qh, kh, vh = (t[..., h * d:(h + 1) * d].double() for t in (q, k, v))
        outs.append(torch.softmax(qh @ kh.transpose(1, 2) / d ** 0.5, dim=-1) @ vh)
    return torch.cat(outs, dim=-1)


def inputs(batch, queries, keys, heads, width, dtype, g, device="cpu"):
    c = heads * width
    if keys is None:  # the network's self-attention: slices of one (B, N, 3C) projection
        return (torch.randn(batch, queries, 3 * c, generator=g) * 2).to(device, dtype).chunk(3, dim=-1)
    return tuple((torch.randn(batch, n, c, generator=g) * 2).to(device, dtype) for n in (queries, keys, keys))


def check_kernel():
    from sdcanny.attention_kernel import attention  # triton: not on every stack that imports this file
    g = torch.Generator().manual_seed(0)
    for batch, queries, keys, heads, width, dtype, launch in KERNEL_CASES:
        q, k, v = inputs(batch, queries, keys, heads, width, dtype, g)
        assert keys is not None or not q.is_contiguous()  # read in place, not copied first
        got = attention(q, k, v, heads, launch=launch)
        want = written_out(q, k, v, heads)
        err = ((got.double() - want).norm() / want.norm()).item()
        print("kernel", batch, queries, keys, heads, width, dtype, launch, f"relative L2 {err:.1e}")
        assert got.shape == q.shape and got.dtype == dtype and got.is_contiguous()
        assert err < (1e-5 if dtype == torch.float32 else 2e-3), err


def check_op_routing():
    g = torch.Generator().manual_seed(1)
    for keys in (fused_attention.KERNEL_KEYS, fused_attention.KERNEL_KEYS + 88):
        q, k, v = inputs(2, 20, keys, 2, 16, torch.float32, g)
        got = fused_attention.attention(q, k, v, 2)
        want = written_out(q, k, v, 2)
        err = ((got.double() - want).norm() / want.norm()).item()
        print("op", keys, "keys", f"relative L2 {err:.1e}")
        assert err < 1e-5, err


def check_networks():
    check_through_op("attention layers through the op:", fused_attention.use_fused_attention)


if __name__ == "__main__":
    import triton  # noqa: F401  (the interpreter must be what triton.jit gives)
    from triton.runtime.interpreter import InterpretedFunction
    from sdcanny.attention_kernel import attention_kernel
    assert isinstance(attention_kernel, InterpretedFunction), "run with TRITON_INTERPRET=1"
    fused_attention.register_op()
    check_kernel()
    check_op_routing()
    check_networks()
