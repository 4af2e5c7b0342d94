"""The fused GEGLU's Triton kernel on a CPU, in Triton's interpreter: run by tests/test_fused_geglu.py
as a subprocess with TRITON_INTERPRET=1 (the variable must be set before triton is imported).
Prints one line per check; exits non-zero on the first that fails.

1. The kernel against float64 torch: rows, columns and depths that are not multiples of the tiles,
   both tile configurations (64 and 128 rows), inputs with three dimensions and with rows wider
   than their values (a slice of a wider tensor).
2. The tiny ControlNet and UNet with every GEGLU through the op: the same outputs as torch's.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdcanny import fused_geglu  # noqa: E402
from sdcanny.checkpoint import load_state_networks  # noqa: E402
from sdcanny.config import TINY  # noqa: E402
from sdcanny.geglu_kernel import geglu  # noqa: E402
from sdcanny.networks import geglu_torch  # noqa: E402
from sdcanny.synthetic import synthetic_state_dict  # noqa: E402

# (input shape, outputs N, layout): K is the input's last dimension; "slice" takes the values from
# a tensor 8 columns wider. 800 rows take the 128-row tiles.
KERNEL_CASES = (((40, 64), 96, "dense"), ((2, 21, 40), 128, "dense"), ((800, 32), 64, "dense"),
                ((37, 80), 72, "slice"), ((3, 5, 16), 200, "dense"))


def check_kernel():
    g = torch.Generator().manual_seed(3)
    for shape, n, layout in KERNEL_CASES:
        k = shape[-1]
        x = torch.randn(*shape[:-1], k + (8 if layout == "slice" else 0), generator=g)[..., :k]
        weight = torch.randn(2 * n, k, generator=g) * k ** -0.5
        bias = torch.randn(2 * n, generator=g) * 0.5
        got = geglu(x, weight, bias)
        want = geglu_torch(x.double(), weight.double(), bias.double())
        err = ((got.double() - want).norm() / want.norm()).item()
        print("kernel", shape, n, layout, tuple(got.shape), f"relative L2 {err:.1e}")
        assert got.shape == want.shape and err < 1e-5, err


def check_networks():
    nets = load_state_networks(synthetic_state_dict(TINY, seed=0), TINY)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 16, 24, generator=g), torch.tensor([601, 601])
    ctx = torch.randn(2, 77, TINY.clip.width, generator=g)
    feats = torch.randn(2, TINY.unet.model_channels, 16, 24, generator=g)
    with torch.no_grad():
        want = nets.controlnet(x, t, ctx, feats), nets.unet(x, t, ctx)
        counts = [fused_geglu.use_fused_geglu(net) for net in (nets.controlnet, nets.unet)]
        got = nets.controlnet(x, t, ctx, feats), nets.unet(x, t, ctx)
    for name, a, b in (*(("controlnet", p, q) for p, q in zip(got[0], want[0])), ("unet", got[1], want[1])):
        err = ((a - b).norm() / b.norm()).item()
        print("network", name, tuple(a.shape), f"relative L2 {err:.1e}")
        assert err < 1e-5, err
    print("networks", "GEGLUs through the op:", counts)


if __name__ == "__main__":
    from triton.runtime.interpreter import InterpretedFunction
    from sdcanny.geglu_kernel import geglu_kernel
    assert isinstance(geglu_kernel, InterpretedFunction), "run with TRITON_INTERPRET=1"
    fused_geglu.register_op()
    check_kernel()
    check_networks()
