"""The scores kernel on a CPU, in Triton's interpreter: run by tests/test_fused_scores.py as a
subprocess with TRITON_INTERPRET=1 (the variable must be set before triton is imported). Prints
one line per check; exits non-zero on the first that fails.

1. The kernel against each head's softmax of x score_rows^T written out in float64: rows not a
   whole number of row tiles (and fewer rows than one tile), the text's 77 tokens (padded to 128
   in the tile, the next head's rows masked out) and fewer, channels in several K blocks and not a
   whole number of them, a strided input (copied to what the descriptor reads), fp32 and fp16, both
   of launch_config's configurations (fewer and more than 256 rows) and one given.
2. A folded cross-attention layer with its weights through the op: the same output as attend_folded
   with cuBLAS's product and torch's softmax.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdcanny import fused_scores  # noqa: E402
from sdcanny.networks import CrossAttention  # noqa: E402

# (batch, rows, heads, tokens, channels, dtype, launch or None for launch_config's, input strided)
KERNEL_CASES = ((2, 40, 2, 7, 32, torch.float32, None, False), (2, 130, 3, 77, 96, torch.float32, None, True),
                (1, 24, 8, 77, 128, torch.float16, None, False), (1, 300, 2, 77, 160, torch.float16, None, False),
                (2, 70, 4, 16, 48, torch.float16, (32, 16, 2, 4), False))


def written_out(x, score_rows, heads):
    """Each head's softmax over its tokens of x score_rows^T, in float64, head by head."""
    tokens = score_rows.shape[1] // heads
    scores = x.double() @ score_rows.double().transpose(1, 2)
    return torch.cat([scores[..., h * tokens:(h + 1) * tokens].softmax(dim=-1) for h in range(heads)], dim=-1)


def inputs(batch, rows, heads, tokens, channels, dtype, strided, g):
    x = (torch.randn(batch, rows, 2 * channels if strided else channels, generator=g) * 2).to(dtype)
    score_rows = (torch.randn(batch, heads * tokens, channels, generator=g) / channels ** 0.5).to(dtype)
    return x[..., ::2] if strided else x, score_rows


def check_kernel():
    from sdcanny.scores_kernel import scores_softmax  # triton: not on every stack that imports this file
    g = torch.Generator().manual_seed(0)
    for batch, rows, heads, tokens, channels, dtype, launch, strided in KERNEL_CASES:
        x, score_rows = inputs(batch, rows, heads, tokens, channels, dtype, strided, g)
        assert x.is_contiguous() != strided
        got = scores_softmax(x, score_rows, heads, config=launch)
        want = written_out(x, score_rows, heads)
        err = ((got.double() - want).norm() / want.norm()).item()
        print("kernel", batch, rows, heads, tokens, channels, dtype, launch, strided, f"relative L2 {err:.1e}")
        assert got.shape == (batch, rows, heads * tokens) and got.dtype == dtype and got.is_contiguous()
        assert err < (1e-5 if dtype == torch.float32 else 2e-3), err


def check_layer():
    torch.manual_seed(3)
    layer = CrossAttention(64, 24, 4).eval()
    layer.context_index = 0
    layer.fold(9)  # 4 heads x 9 tokens <= 64 channels
    x, context = torch.randn(2, 50, 64), torch.randn(2, 9, 24)
    with torch.no_grad():
        rows = layer.keys_values(context)
        want = layer(x, rows)
        assert fused_scores.use_fused_scores(layer) == 1
        got = layer(x, rows)
    err = ((got - want).norm() / want.norm()).item()
    print("layer", tuple(got.shape), f"relative L2 {err:.1e}")
    assert err < 1e-5, err


if __name__ == "__main__":
    import triton  # noqa: F401  (the interpreter must be what triton.jit gives)
    from triton.runtime.interpreter import InterpretedFunction
    from sdcanny.scores_kernel import scores_softmax_kernel
    assert isinstance(scores_softmax_kernel, InterpretedFunction), "run with TRITON_INTERPRET=1"
    fused_scores.register_op()
    check_kernel()
    check_layer()
