"""The matrix products and 3x3 convolutions of one sampler step at the graded size, each timed on
the GPU in isolation, against other ways to compute it:

    convs   3x3 convolutions: cuDNN (fp16 channels-last, timing its first --benchmark-limit
            algorithms: 10, torch's default, is what runs today; 0 times all of them) against
            im2col + GEMM (the patches gathered by one fused kernel, then one matrix product)
    gemms   matrix products (linear layers and 1x1 convolutions): cuBLAS, as today, against
            TorchInductor's max-autotune choice (Triton templates timed against cuBLAS per shape)

The step is the back-end's own (FastTorchBackend's stages: fused projections, stacked time
projections, keys and values made once per image), run once under a dispatch recorder; sizes
and counts per step come from that run. A layer's time alone is not its share of a step: two
streams overlap, and a fused epilogue saves the element-wise kernel after it, which no row here
shows. These tables say where another formulation could pay before the networks change.

    python3 benchmarks/step_shapes.py convs --out results/
    python3 benchmarks/step_shapes.py convs --out results/ --benchmark-limit 0 --no-alternative
    python3 benchmarks/step_shapes.py gemms --out results/

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
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdcanny.checkpoint import Networks, build_networks  # noqa: E402
from sdcanny.config import CONFIGS  # noqa: E402
from sdcanny.fast import FastTorchBackend  # noqa: E402
from sdcanny.programs import GRADED_LATENT, example_inputs  # noqa: E402

STEP_STAGES = ("control", "unet_encode", "unet_decode")


class _Recorder(TorchDispatchMode):
    """Counts matrix products as ("gemm", M, K, N, bias) and 3x3 convolutions as ("conv", batch,
    in channels, height, width, out channels, stride); a 1x1 convolution is a matrix product."""

    def __init__(self):
        super().__init__()
        self.seen: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm"):
            a, b = args[1:3] if name == "addmm" else args[:2]
            self.seen[("gemm", a.shape[0], a.shape[1], b.shape[1], name == "addmm")] += 1
        elif name == "convolution":
            x, w, bias, stride = args[:4]
            if w.shape[2:] == (1, 1):
                self.seen[("gemm", x.shape[0] * x.shape[2] * x.shape[3], w.shape[1], w.shape[0], bias is not None)] += 1
            else:
                self.seen[("conv", *x.shape, w.shape[0], stride[0])] += 1
        return func(*args, **(kwargs or {}))


def step_operations(cfg, device, dtype) -> Counter:
    """Every matrix product and convolution of one step at the graded size, with its count."""
    with torch.device("cpu"):
        nets = build_networks(cfg)
    backend = FastTorchBackend(Networks(**nets, dropped={}), device, dtype=dtype, compile=None)
    stages = backend.stages
    inputs = example_inputs(stages, cfg, backend.device, dtype, 1, GRADED_LATENT)
    recorder = _Recorder()
    with torch.no_grad(), recorder:
        for name in STEP_STAGES:
            getattr(stages, name)(*inputs[name])
    return recorder.seen


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


def linear(a, weight_t, bias):
    return torch.addmm(bias, a, weight_t) if bias is not None else a @ weight_t


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


def conv3x3(x, weight, bias, stride: int):
    return F.conv2d(x, weight, bias, stride, 1)


def compare(today, alternative, args: tuple) -> dict:
    """µs per call of today's path and, where `alternative` is given, of that one too, with its
    relative L2 error against today's path in fp32."""
    row = {"today": graph_us(lambda: today(*args))}
    if alternative is not None:
        reference = today(*(a.float() if torch.is_tensor(a) else a for a in args))
        row["rel L2"] = float((alternative(*args).float() - reference).norm() / reference.norm())
        row["other"] = graph_us(lambda: alternative(*args))
    return row


def time_conv(op, device, dtype, alternative: bool) -> dict:
    """cuDNN and, with `alternative`, im2col + GEMM compiled by TorchInductor."""
    _, b, c, h, w, cout, stride = op
    x = torch.randn(b, c, h, w, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(cout, c, 3, 3, device=device, dtype=dtype) / (9 * c) ** 0.5).contiguous(
        memory_format=torch.channels_last)
    bias = torch.randn(cout, device=device, dtype=dtype)
    other = torch.compile(im2col_conv, fullgraph=True, dynamic=False) if alternative else None
    return compare(conv3x3, other, (x, weight, bias, stride))


def time_gemm(op, device, dtype, alternative: bool) -> dict:
    """cuBLAS (F.linear's layout: the weight transposed) and, with `alternative`, the product as
    TorchInductor's max-autotune compiles it."""
    _, m, k, n, has_bias = op
    a = torch.randn(m, k, device=device, dtype=dtype)
    weight_t = (torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5).t()
    bias = torch.randn(n, device=device, dtype=dtype) if has_bias else None
    other = torch.compile(linear, mode="max-autotune-no-cudagraphs", dynamic=False) if alternative else None
    return compare(linear, other, (a, weight_t, bias))


def gflop(op) -> float:
    if op[0] == "gemm":
        return 2 * op[1] * op[2] * op[3] / 1e9
    _, b, c, h, w, cout, stride = op
    return 2 * b * ((h - 1) // stride + 1) * ((w - 1) // stride + 1) * cout * 9 * c / 1e9


def describe(op) -> str:
    if op[0] == "gemm":
        return f"{op[1]}x{op[2]} @ {op[2]}x{op[3]}" + (" + bias" if op[4] else "")
    _, b, c, h, w, cout, stride = op
    return f"{b}x{c}x{h}x{w} -> {cout}, stride {stride}"


def table(kind: str, rows: list[tuple], alternative: str | None, header: str) -> list[str]:
    """Markdown rows: one per shape, most work first, then the per-step sums."""
    cols = ["today µs"] + ([f"{alternative} µs", "rel L2"] if alternative else [])
    lines = [header, "", f"| {kind} | per step | GFLOP | " + " | ".join(cols) + " | TFLOP/s (best) |",
             "|---|---|---|" + "---|" * (len(cols) + 1)]
    totals = {"today": 0.0, "other": 0.0, "best": 0.0}
    for op, count, row in rows:
        best = min(row["today"], row.get("other", float("inf")))
        for key, value in (("today", row["today"]), ("other", row.get("other", 0.0)), ("best", best)):
            totals[key] += count * value
        cells = [f"{row['today']:.1f}"] + ([f"{row['other']:.1f}", f"{row['rel L2']:.1e}"] if alternative else [])
        lines.append(f"| {describe(op)} | {count} | {gflop(op):.2f} | " + " | ".join(cells) + f" | {gflop(op) / best * 1e3:.0f} |")
    sums = [f"{totals['today']:.0f}"] + ([f"{totals['other']:.0f}", f"best of both {totals['best']:.0f}"] if alternative else [])
    lines.append(f"| per step | {sum(c for _, c, _ in rows)} | | " + " | ".join(sums) + " | |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=("convs", "gemms"))
    ap.add_argument("--config", default="sd15", choices=sorted(CONFIGS))
    ap.add_argument("--benchmark-limit", type=int, default=10, help="convs: cuDNN algorithms timed per shape (0: all)")
    ap.add_argument("--no-alternative", action="store_true", help="time today's path only")
    ap.add_argument("--out", type=Path, default=Path("outputs/step_shapes"))
    args = ap.parse_args()
    device, dtype = torch.device("cuda"), torch.float16
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.benchmark_limit = args.benchmark_limit
    for limit in ("cache_size_limit", "recompile_limit"):  # one compile per shape; the name varies by torch
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 1024)
    op_kind = "conv" if args.kind == "convs" else "gemm"
    ops = {op: n for op, n in step_operations(CONFIGS[args.config], device, dtype).items() if op[0] == op_kind}
    timer = time_conv if args.kind == "convs" else time_gemm
    alternative = None if args.no_alternative else ("im2col + GEMM" if args.kind == "convs" else "max-autotune")
    rows = []
    for op, count in sorted(ops.items(), key=lambda item: -gflop(item[0]) * item[1]):
        rows.append((op, count, timer(op, device, dtype, alternative is not None)))
        print(table(args.kind, rows[-1:], alternative, "")[-2], flush=True)
    header = (f"{args.kind}; cuDNN benchmark_limit {args.benchmark_limit}; torch {torch.__version__}, "
              f"{torch.cuda.get_device_name()}")
    lines = table(args.kind, rows, alternative, header)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = f"_limit{args.benchmark_limit}" if args.kind == "convs" else ""
    (args.out / f"step_{args.kind}{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:4] + lines[-1:]))


if __name__ == "__main__":
    main()
