"""The convolution kernel on a CPU, in Triton's interpreter: run by tests/test_fused_conv.py as a
subprocess with TRITON_INTERPRET=1 (the variable must be set before triton is imported). Prints
one line per check; exits non-zero on the first that fails.

1. The kernel's partial sums, added up, against a 3x3 convolution written out tap by tap in
   float64: channels-last and contiguous inputs, fp32 and fp16, a last slice shorter than the
   others, every column block of 16 to 64, rows up to the kernel's 64, images of 1x1 to 5x7.
2. The op's traced shape (its slice count) is the real call's.
3. The tiny ControlNet and UNet with their few-row convolutions through the op: the same outputs
   as with torch's convolutions, to fp32 rounding.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdcanny import fused_conv  # noqa: E402
from sdcanny.checkpoint import load_state_networks  # noqa: E402
from sdcanny.config import TINY  # noqa: E402
from sdcanny.synthetic import synthetic_state_dict  # noqa: E402

# (batch, channels, height, width, out channels, dtype, channels-last)
KERNEL_CASES = ((2, 64, 4, 6, 64, torch.float32, True), (1, 48, 5, 7, 32, torch.float32, False),
                (2, 32, 4, 6, 48, torch.float16, True), (4, 16, 1, 1, 16, torch.float32, True),
                (2, 256, 2, 3, 128, torch.float16, True))


def written_out(x, weight):
    """conv2d(x, weight, padding=1) tap by tap in float64."""
    n, c, h, w = x.shape
    padded = torch.zeros(n, c, h + 2, w + 2, dtype=torch.float64)
    padded[:, :, 1:-1, 1:-1] = x.double()
    out = torch.zeros(n, weight.shape[0], h, w, dtype=torch.float64)
    for dy in range(3):
        for dx in range(3):
            out += torch.einsum("nchw,oc->nohw", padded[:, :, dy:dy + h, dx:dx + w], weight[:, :, dy, dx].double())
    return out


def check_kernel():
    from sdcanny.conv_kernel import conv3x3_slices, launch_for  # triton: not on every stack that imports this file
    g = torch.Generator().manual_seed(0)
    for n, c, h, w, co, dtype, channels_last in KERNEL_CASES:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.randn(n, c, h, w, generator=g).to(dtype).contiguous(memory_format=fmt)
        weight = (torch.randn(co, c, 3, 3, generator=g) / (3 * c ** 0.5)).to(dtype).contiguous(memory_format=fmt)
        launch = launch_for(n * h * w, c, co, multiprocessors=132)
        partials = conv3x3_slices(x, weight, launch)
        k_tiles = 9 * c // launch.block_k
        assert partials.shape == (launch.slices, n * h * w, co) and partials.dtype == torch.float32
        got = partials.double().sum(0).view(n, h, w, co).permute(0, 3, 1, 2)
        want = written_out(x, weight)
        err = ((got - want).norm() / want.norm()).item()
        print("kernel", (n, c, h, w, co), dtype, launch, f"{k_tiles} K tiles", f"relative L2 {err:.1e}")
        assert err < 1e-6, err  # products of the rounded operands, summed in fp32


def check_traced_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode
    fused_conv.register_op()
    x, weight = torch.randn(2, 64, 4, 6), torch.randn(64, 64, 3, 3)
    real = torch.ops.sdcanny.conv3x3_slices(x, weight)
    with FakeTensorMode() as mode:
        fake = torch.ops.sdcanny.conv3x3_slices(mode.from_tensor(x), mode.from_tensor(weight))
    print("traced shape", tuple(fake.shape), "real", tuple(real.shape))
    assert fake.shape == real.shape and real.shape[0] > 1


def check_networks():
    nets = load_state_networks(synthetic_state_dict(TINY, seed=0), TINY)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t, ctx = torch.tensor([601, 601]), torch.randn(2, 77, TINY.clip.width, generator=g)
    feats = torch.randn(2, TINY.unet.model_channels, 8, 8, generator=g)
    with torch.no_grad():
        want = nets.controlnet(x, t, ctx, feats), nets.unet(x, t, ctx)
        counts = [fused_conv.use_conv_kernel(net) for net in (nets.controlnet, nets.unet)]
        got = nets.controlnet(x, t, ctx, feats), nets.unet(x, t, ctx)
    print("ResBlocks through the op:", counts)
    for a, b in zip([*got[0], got[1]], [*want[0], want[1]]):
        err = ((a - b).norm() / b.norm()).item()
        print("network", tuple(a.shape), f"relative L2 {err:.1e}")
        assert err < 1e-4, err  # fp32 rounding in another order, grown through the ControlNet's middle (~2e-5)


if __name__ == "__main__":
    check_kernel()
    check_traced_shape()
    check_networks()
