"""Each 3x3 convolution of one sampler step at the graded size, timed three ways on the GPU:

    cudnn        F.conv2d, fp16 channels-last, cuDNN timing its first --benchmark-limit candidates
                 (10, torch's default, is what runs today; 0 times every algorithm cuDNN has)
    im2col + mm  the 3x3 patches gathered into a matrix (one fused kernel), then one matrix product

The step's convolutions are the largest share of its GPU time (docs/benchmarks.md, kernel
profile), and the low-resolution ones have few output tiles for long reductions; this says per
shape whether another formulation would pay before the networks are changed.

    python3 benchmarks/conv_shapes.py --out results/
    python3 benchmarks/conv_shapes.py --out results/ --benchmark-limit 0 --no-im2col

(cuDNN keeps its choice per shape for the process, so each limit needs a process of its own.)

Times are CUDA-graph replays of 20 calls (no launch gaps), median of 7 replays, per call.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdcanny.config import CONFIGS  # noqa: E402
from sdcanny.networks import ControlNet, UNet  # noqa: E402
from sdcanny.programs import GRADED_LATENT  # noqa: E402


def step_convolutions(cfg, device, dtype) -> Counter:
    """(batch, in channels, height, width, out channels, stride) -> count, for every 3x3
    convolution of the UNet and the ControlNet at the graded size (batch 2: cond and uncond)."""
    unet, controlnet = UNet(cfg.unet), ControlNet(cfg.unet)
    for net in (unet, controlnet):
        net.to(device, dtype).to(memory_format=torch.channels_last)
    seen: Counter = Counter()

    def record(module, inputs):
        if module.kernel_size == (3, 3):
            b, c, h, w = inputs[0].shape
            seen[(b, c, h, w, module.out_channels, module.stride[0])] += 1

    hooks = [m.register_forward_pre_hook(record) for net in (unet, controlnet)
             for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    h, w = GRADED_LATENT
    x = torch.randn(2, cfg.unet.in_channels, h, w, device=device, dtype=dtype)
    t = torch.full((2,), 500.0, device=device)
    context = torch.randn(2, 77, cfg.unet.context_dim, device=device, dtype=dtype)
    hint = torch.randn(2, cfg.unet.model_channels, h, w, device=device, dtype=dtype)
    with torch.no_grad():
        unet(x, t, context)
        controlnet(x, t, context, hint)
    for hook in hooks:
        hook.remove()
    return seen


def im2col_conv(x, weight, bias, stride: int):
    """3x3 convolution, padding 1, as patches @ weight: the nine shifted views side by side in
    channels-last order, so the patch matrix is one gather and the product one GEMM."""
    b, c, h, w = x.shape
    nhwc = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    patches = torch.cat([nhwc[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
                         for i in range(3) for j in range(3)], dim=3)
    out = patches.reshape(b * ho * wo, 9 * c) @ weight.permute(0, 2, 3, 1).reshape(weight.shape[0], 9 * c).t()
    return (out + bias).view(b, ho, wo, -1).permute(0, 3, 1, 2)


def graph_us(fn, calls: int = 20, replays: int = 7) -> float:
    """Median microseconds per call over CUDA-graph replays of `calls` back-to-back calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return sorted(times)[len(times) // 2]


def time_shape(shape, device, dtype, im2col: bool) -> dict:
    b, c, h, w, cout, stride = shape
    x = torch.randn(b, c, h, w, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(cout, c, 3, 3, device=device, dtype=dtype) / (9 * c) ** 0.5).contiguous(
        memory_format=torch.channels_last)
    bias = torch.randn(cout, device=device, dtype=dtype)
    row = {"cudnn": graph_us(lambda: F.conv2d(x, weight, bias, stride, 1))}
    if im2col:
        reference = F.conv2d(x.float(), weight.float(), bias.float(), stride, 1)
        compiled = torch.compile(im2col_conv, fullgraph=True, dynamic=False)
        row["im2col rel L2"] = float((compiled(x, weight, bias, stride).float() - reference).norm() / reference.norm())
        row["im2col + mm"] = graph_us(lambda: compiled(x, weight, bias, stride))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="sd15", choices=sorted(CONFIGS))
    ap.add_argument("--benchmark-limit", type=int, default=10, help="cuDNN algorithms timed per shape (0: all)")
    ap.add_argument("--no-im2col", action="store_true", help="time cuDNN only")
    ap.add_argument("--out", type=Path, default=Path("outputs/conv_shapes"))
    args = ap.parse_args()
    device, dtype = torch.device("cuda"), torch.float16
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.benchmark_limit = args.benchmark_limit
    for limit in ("cache_size_limit", "recompile_limit"):  # one compile per shape; the name varies by torch
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 256)
    shapes = step_convolutions(CONFIGS[args.config], device, dtype)
    methods = ("cudnn",) if args.no_im2col else ("cudnn", "im2col + mm")
    lines = [f"cuDNN benchmark_limit {args.benchmark_limit}; torch {torch.__version__}, {torch.cuda.get_device_name()}", "",
             "| batch x in x h x w -> out, stride | per step | GFLOP each | " + " | ".join(f"{m} µs" for m in methods)
             + " | TFLOP/s (best) | im2col rel L2 |", "|---|---|---|" + "---|" * (len(methods) + 2)]
    totals = dict.fromkeys(methods, 0.0)
    for shape, count in sorted(shapes.items(), key=lambda item: -item[0][1] * item[0][4] * item[0][2] * item[0][3]):
        b, c, h, w, cout, stride = shape
        gflop = 2 * b * (h // stride) * (w // stride) * cout * 9 * c / 1e9
        row = time_shape(shape, device, dtype, not args.no_im2col)
        for m in methods:
            totals[m] += count * row[m]
        best = min(row[m] for m in methods)
        error = f"{row['im2col rel L2']:.1e}" if "im2col rel L2" in row else "-"
        lines.append(f"| {b}x{c}x{h}x{w} -> {cout}, {stride} | {count} | {gflop:.2f} | "
                     + " | ".join(f"{row[m]:.1f}" for m in methods) + f" | {gflop / best * 1e3:.0f} | {error} |")
        print(lines[-1], flush=True)
    lines.append(f"| per step (µs) | {sum(shapes.values())} | | " + " | ".join(f"{totals[m]:.0f}" for m in methods) + " | | |")
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"conv_shapes_limit{args.benchmark_limit}.md"
    (args.out / name).write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:4] + lines[-1:]))


if __name__ == "__main__":
    main()
