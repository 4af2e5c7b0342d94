"""The GEGLU kernel on a CPU, in Triton's interpreter: run by tests/test_fused_geglu.py as a
subprocess with TRITON_INTERPRET=1 (the variable must be set before triton is imported). Prints
one line per check; exits non-zero on the first that fails.

1. The kernel against GEGLU written out in float64 on the checkpoint's (uninterleaved) weights:
   rows and columns not whole tiles, several column tiles and K blocks, residual widths not a
   whole number of copy loads, a strided input (copied to what the descriptor reads), every
   launch configuration that launch_config picks, fp32 and fp16; with the strided input, a
   column-major weight (copied likewise).
2. The tiny ControlNet and UNet with every folded transformer's feed-forward input through the
   op: the same outputs as with the networks' GEGLU and concatenation.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdcanny import fused_geglu  # noqa: E402
from sdcanny.networks import fold_transformer_outputs  # noqa: E402
from tiny_networks_through import check_through_op  # noqa: E402

# (rows, K, inner, residual width, dtype, launch or None for launch_config's, input strided)
KERNEL_CASES = ((48, 64, 128, 64, torch.float32, None, False), (200, 32, 96, 48, torch.float32, None, True),
                (130, 64, 64, 200, torch.float32, (128, 128, 64, 2, 8), False),
                (770, 40, 80, 40, torch.float16, None, False), (70, 96, 192, 96, torch.float16, (64, 64, 32, 2, 4), True))


def written_out(x, weight, bias, residual):
    """[value * gelu(gate), residual] in float64 from GEGLU's own [value rows; gate rows] weights."""
    value, gate = F.linear(x.double(), weight.double(), bias.double()).chunk(2, dim=-1)
    return torch.cat([value * F.gelu(gate), residual.double()], dim=-1)


def inputs(rows, k, inner, c, dtype, strided, g):
    x = torch.randn(rows, 2 * k if strided else k, generator=g).to(dtype)
    weight = torch.randn(2 * inner, k, generator=g) / k ** 0.5
    bias = torch.randn(2 * inner, generator=g) * 0.5
    residual = torch.randn(rows, c, generator=g)
    return (x[:, ::2] if strided else x, *(t.to(dtype) for t in (weight, bias, residual)))


def check_kernel():
    from sdcanny.geglu_kernel import geglu_with_residual  # triton: not on every stack that imports this file
    g = torch.Generator().manual_seed(0)
    for rows, k, inner, c, dtype, launch, strided in KERNEL_CASES:
        x, weight, bias, residual = inputs(rows, k, inner, c, dtype, strided, g)
        assert x.is_contiguous() != strided
        w, b = fused_geglu.interleave_rows(weight, bias)
        w = w.t().contiguous().t() if strided else w  # column-major: copied to what the descriptor reads
        got = geglu_with_residual(x, w, b, residual, config=launch)
        want = written_out(x, weight, bias, residual)
        err = ((got.double() - want).norm() / want.norm()).item()
        print("kernel", rows, k, inner, c, dtype, launch, strided, f"relative L2 {err:.1e}")
        assert got.shape == (rows, inner + c) and got.dtype == dtype and got.is_contiguous()
        assert torch.equal(got[:, inner:], residual), "the residual is copied as it is"
        assert err < (1e-5 if dtype == torch.float32 else 2e-3), err


def check_networks():
    check_through_op("transformers through the op:", fused_geglu.use_fused_geglu, prepare=fold_transformer_outputs)


if __name__ == "__main__":
    import triton  # noqa: F401  (the interpreter must be what triton.jit gives)
    from triton.runtime.interpreter import InterpretedFunction
    from sdcanny.geglu_kernel import geglu_kernel
    assert isinstance(geglu_kernel, InterpretedFunction), "run with TRITON_INTERPRET=1"
    fused_geglu.register_op()
    check_kernel()
    check_networks()
