"""The step's GroupNorms (with the SiLU after them and the time embedding's addend before them) as
our one-kernel op (sdcanny/group_norm_kernel.py), timed against TorchInductor's code for the same
maths (issue 11).

TorchInductor writes a channels-last GroupNorm as two or three kernels (partial statistics, their
sum, the normalisation); ours is one launch, one program per group and sample. Each of the step's
GroupNorm shapes (batch 2, fp16, channels-last) is timed in two chains of CUDA-graph replays:
twenty GroupNorms alone, and twenty (convolution, GroupNorm) pairs as in the step. Each is first
checked against float64 torch.

    python3 benchmarks/group_norm_sweep.py          # on the GPU: one line per shape, a weighted sum per step
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from graph_timing import replay_us

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdcanny.group_norm_kernel import group_norm_act  # noqa: E402

CHAIN = 20  # GroupNorms (or convolution + GroupNorm pairs) per timed graph


def reference(x, weight, bias, groups, eps, silu, add=None):
    h = x if add is None else x + add.to(x.dtype)[:, :, None, None]
    out = F.group_norm(h.double(), groups, weight.double(), bias.double(), eps)
    return F.silu(out) if silu else out


# (channels, height, width, addend, SiLU, eps, GroupNorms a step): the ControlNet and the UNet's encoder
# half each (ENCODER, counted twice), then the decoder half, at the graded size (32x48 latents)
ENCODER = [(320, 32, 48, 0, 1, 1e-5, 2), (320, 32, 48, 1, 1, 1e-5, 2), (320, 32, 48, 0, 0, 1e-6, 2),
           (320, 16, 24, 0, 1, 1e-5, 1), (640, 16, 24, 1, 1, 1e-5, 2), (640, 16, 24, 0, 1, 1e-5, 1),
           (640, 16, 24, 0, 0, 1e-6, 2), (640, 8, 12, 0, 1, 1e-5, 1), (1280, 8, 12, 1, 1, 1e-5, 2),
           (1280, 8, 12, 0, 1, 1e-5, 1), (1280, 8, 12, 0, 0, 1e-6, 2), (1280, 4, 6, 0, 1, 1e-5, 4),
           (1280, 4, 6, 1, 1, 1e-5, 4), (1280, 4, 6, 0, 0, 1e-6, 1)]
DECODER = [(2560, 4, 6, 0, 1, 1e-5, 3), (1280, 4, 6, 1, 1, 1e-5, 3), (2560, 8, 12, 0, 1, 1e-5, 2),
           (1920, 8, 12, 0, 1, 1e-5, 1), (1280, 8, 12, 1, 1, 1e-5, 3), (1280, 8, 12, 0, 0, 1e-6, 3),
           (1920, 16, 24, 0, 1, 1e-5, 1), (1280, 16, 24, 0, 1, 1e-5, 1), (960, 16, 24, 0, 1, 1e-5, 1),
           (640, 16, 24, 1, 1, 1e-5, 3), (640, 16, 24, 0, 0, 1e-6, 3), (960, 32, 48, 0, 1, 1e-5, 1),
           (640, 32, 48, 0, 1, 1e-5, 2), (320, 32, 48, 1, 1, 1e-5, 3), (320, 32, 48, 0, 0, 1e-6, 3),
           (320, 32, 48, 0, 1, 1e-5, 1)]


def inductor_group_norm(add, silu, eps):
    def group_norm(x, t, weight, bias):
        out = F.group_norm(x + t[:, :, None, None] if add else x, 32, weight, bias, eps)
        return F.silu(out) if silu else out
    return torch.compile(group_norm, fullgraph=True, dynamic=False, options={"triton.enable_pdl": True})


def time_shape(channels, height, width, add, silu, eps):
    torch.manual_seed(0)
    x = (torch.randn(2, channels, height, width, device="cuda") * 2 + 0.5).half().contiguous(memory_format=torch.channels_last)
    t = torch.randn(2, channels, device="cuda").half()
    weight, bias = (torch.rand(channels, device="cuda") + 0.5).half(), torch.randn(channels, device="cuda").half()
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1).cuda().half().to(memory_format=torch.channels_last)
    ours = lambda y: group_norm_act(y, weight, bias, 32, eps, bool(silu), t if add else None)
    compiled = inductor_group_norm(add, silu, eps)
    theirs = lambda y: compiled(y, t, weight, bias)
    want = reference(x, weight, bias, 32, eps, silu, t if add else None)
    errors = {name: ((fn(x).double() - want).norm() / want.norm()).item() for name, fn in (("ours", ours), ("inductor", theirs))}

    def chain(op, with_conv):
        def run():
            y = x
            for _ in range(CHAIN):
                y = op(conv(y) if with_conv else y)
        return run
    with torch.no_grad():
        runs = {"inductor": chain(theirs, False), "ours": chain(ours, False), "conv": chain(lambda y: y, True),
                "conv+inductor": chain(theirs, True), "conv+ours": chain(ours, True)}
        times = {name: replay_us(run, CHAIN) for name, run in runs.items()}
    return times, errors


def main():
    torch.backends.cudnn.benchmark = True
    torch._dynamo.config.recompile_limit = 256  # one compile per shape, all of one function
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
    totals, seen = {}, {}
    for part, shapes, networks in (("encoder", ENCODER, 2), ("decoder", DECODER, 1)):
        for channels, height, width, add, silu, eps, count in shapes:
            key = (channels, height, width, add, silu, eps)
            if key not in seen:
                seen[key] = time_shape(*key)
            times, errors = seen[key]
            for name, us in times.items():
                totals[name] = totals.get(name, 0.0) + us * count * networks
            print(f"{part} {channels}x{height}x{width} add={add} silu={silu} x{count * networks}/step: "
                  + ", ".join(f"{name} {us:.2f}" for name, us in times.items())
                  + f" µs; rel L2 ours {errors['ours']:.1e}, inductor {errors['inductor']:.1e}", flush=True)
    print("per step, weighted by count (µs):", {name: round(us, 1) for name, us in totals.items()})


if __name__ == "__main__":
    main()
