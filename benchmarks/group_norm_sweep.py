"""The step's GroupNorms (with the SiLU after them and the time embedding's addend before them) as
one Triton kernel of our own, timed against TorchInductor's code for the same maths (issue 11).

TorchInductor writes a channels-last GroupNorm as two or three kernels (partial statistics, their
sum, the normalisation). The kernel here is one launch: one program per group and sample reads the
group twice (fp32 sums about the group's first value, then the normalised output) and writes it
once. Each of the step's GroupNorm shapes (batch 2, fp16, channels-last) is timed in two chains of
CUDA-graph replays: twenty GroupNorms alone, and twenty (convolution, GroupNorm) pairs as in the
step. Each is first checked against float64 torch.

    python3 benchmarks/group_norm_sweep.py          # on the GPU: one line per shape, a weighted sum per step
    TRITON_INTERPRET=1 python3 benchmarks/group_norm_sweep.py --interpret-check   # the kernel's maths, on a CPU
"""
import sys
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from graph_timing import replay_us

BLOCK = 2048  # elements of a group each step of a program loads
WARPS = 8


@triton.jit
def load_group_block(x_base, add_ptr, sample, first_channel, start, count, pixels, sx_p, sx_c, sa_n, sa_c,
                     GROUP_CHANNELS: tl.constexpr, CHANNELS_INNER: tl.constexpr, HAS_ADD: tl.constexpr,
                     BLOCK: tl.constexpr):
    """Elements start..start+BLOCK of one group in memory order (channels innermost for a
    channels-last tensor, pixels for a contiguous one), as fp32 with the addend added in the
    activation's dtype, as `h + t.to(h.dtype)` in the network."""
    index = start + tl.arange(0, BLOCK)
    mask = index < count
    if CHANNELS_INNER:
        pixel, channel = index // GROUP_CHANNELS, index % GROUP_CHANNELS
    else:
        pixel, channel = index % pixels, index // pixels
    value = tl.load(x_base + pixel * sx_p + channel * sx_c, mask=mask, other=0.0)
    if HAS_ADD:
        addend = tl.load(add_ptr + sample * sa_n + (first_channel + channel) * sa_c, mask=mask, other=0.0)
        value = value + addend.to(value.dtype)
    return value.to(tl.float32), pixel, channel, mask


@triton.jit
def group_norm_kernel(x_ptr, add_ptr, weight_ptr, bias_ptr, y_ptr, pixels, sx_n, sx_p, sx_c, sy_n, sy_p, sy_c,
                      sa_n, sa_c, eps,
                      GROUP_CHANNELS: tl.constexpr, CHANNELS_INNER: tl.constexpr, HAS_ADD: tl.constexpr,
                      SILU: tl.constexpr, BLOCK: tl.constexpr, BLOCKS: tl.constexpr):
    group, sample = tl.program_id(0), tl.program_id(1)
    count = pixels * GROUP_CHANNELS
    first_channel = group * GROUP_CHANNELS
    x_base = x_ptr + sample.to(tl.int64) * sx_n + first_channel * sx_c
    y_base = y_ptr + sample.to(tl.int64) * sy_n + first_channel * sy_c
    shift = tl.load(x_base).to(tl.float32)  # the group's first value: any value would do, a near one cancels less
    if HAS_ADD:
        shift += tl.load(add_ptr + sample * sa_n + first_channel * sa_c).to(tl.float32)
    sum1 = tl.zeros([BLOCK], dtype=tl.float32)
    sum2 = tl.zeros([BLOCK], dtype=tl.float32)
    for block in range(BLOCKS):
        value, _, _, mask = load_group_block(x_base, add_ptr, sample, first_channel, block * BLOCK, count, pixels,
                                             sx_p, sx_c, sa_n, sa_c, GROUP_CHANNELS, CHANNELS_INNER, HAS_ADD, BLOCK)
        centred = tl.where(mask, value - shift, 0.0)
        sum1 += centred
        sum2 += centred * centred
    mean_shifted = tl.sum(sum1, axis=0) / count
    variance = tl.maximum(tl.sum(sum2, axis=0) / count - mean_shifted * mean_shifted, 0.0)
    mean = mean_shifted + shift
    rstd = 1.0 / tl.sqrt(variance + eps)
    for block in range(BLOCKS):
        value, pixel, channel, mask = load_group_block(x_base, add_ptr, sample, first_channel, block * BLOCK, count,
                                                        pixels, sx_p, sx_c, sa_n, sa_c, GROUP_CHANNELS,
                                                        CHANNELS_INNER, HAS_ADD, BLOCK)
        weight = tl.load(weight_ptr + first_channel + channel, mask=mask).to(tl.float32)
        bias = tl.load(bias_ptr + first_channel + channel, mask=mask).to(tl.float32)
        out = (value - mean) * rstd * weight + bias
        if SILU:
            out = out * tl.sigmoid(out)
        tl.store(y_base + pixel * sy_p + channel * sy_c, out.to(y_ptr.dtype.element_ty), mask=mask)


def group_norm_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                   silu: bool, add: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu?(group_norm(x + add[:, :, None, None])) of an (N, C, H, W) tensor, into
    torch.empty_like(x) (x's layout where x is dense, else contiguous), written with its own strides.
    The kernel walks each tensor's pixels as one axis; an x whose pixels are not one (a view) is
    first copied channels-last."""
    batch, channels, height, width = x.shape
    y = torch.empty_like(x)
    if not pixels_form_one_axis(x):
        x = x.contiguous(memory_format=torch.channels_last)
    assert pixels_form_one_axis(y), y.stride()
    sx_n, sx_c, _, sx_w = x.stride()
    sy_n, sy_c, _, sy_w = y.stride()
    sa_n, sa_c = add.stride() if add is not None else (0, 0)
    count = height * width * channels // groups
    group_norm_kernel[(groups, batch)](
        x, add if add is not None else x, weight, bias, y, height * width, sx_n, sx_w, sx_c, sy_n, sy_w, sy_c,
        sa_n, sa_c, eps,
        GROUP_CHANNELS=channels // groups, CHANNELS_INNER=sx_c == 1, HAS_ADD=add is not None, SILU=silu,
        BLOCK=BLOCK, BLOCKS=triton.cdiv(count, BLOCK), num_warps=WARPS)
    return y


def pixels_form_one_axis(t: torch.Tensor) -> bool:
    """Whether pixel (h, w) of t sits at h * W + w pixel strides: channels-last or contiguous
    tensors, and channel slices of them."""
    return t.shape[2] == 1 or t.stride(2) == t.shape[3] * t.stride(3)


CHAIN = 20  # GroupNorms (or convolution + GroupNorm pairs) per timed graph


def reference(x, weight, bias, groups, eps, silu, add=None):
    h = x if add is None else x + add.to(x.dtype)[:, :, None, None]
    out = F.group_norm(h.double(), groups, weight.double(), bias.double(), eps)
    return F.silu(out) if silu else out


def check_interpreted():
    """Both layouts, with and without the addend and the SiLU, groups spanning several blocks, a
    mean far from zero (where sums of squares about zero would cancel the variance away), and a
    channel slice of a wider channels-last tensor (not dense: the output is then contiguous)."""
    torch.manual_seed(0)
    cases = ((40, 4, 6, "channels-last", True, True), (60, 3, 5, "contiguous", False, False),
             (64, 40, 41, "channels-last", False, True), (64, 40, 41, "contiguous", True, False),
             (64, 5, 7, "slice", True, True))
    for channels, height, width, layout, add, silu in cases:
        x = torch.randn(2, channels + 32 * (layout == "slice"), height, width) * 0.5 + 100
        if layout != "contiguous":
            x = x.contiguous(memory_format=torch.channels_last)
        if layout == "slice":
            x = x[:, 16:16 + channels]
        weight, bias = torch.randn(channels), torch.randn(channels)
        addend = torch.randn(2, channels) if add else None
        groups = 32 if channels % 32 == 0 else 4
        got = group_norm_act(x, weight, bias, groups, 1e-5, silu, addend)
        err = (got.double() - reference(x, weight, bias, groups, 1e-5, silu, addend)).abs().max().item()
        print("interpreted", (channels, height, width), layout, "add" if add else "", "silu" if silu else "",
              "max abs err", err)
        assert err < 1e-4 and got.stride() == torch.empty_like(x).stride()


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
    check_interpreted() if "--interpret-check" in sys.argv else main()
