"""Where a process() call's GPU time goes: its CUDA kernels grouped by kind, and how much of the
span from the first kernel to the last the GPU was busy at all.

A step at the graded size runs hundreds of small kernels; whether the time is in the kernels
themselves (convolutions, matrix products, attention, Triton's fused element-wise and
normalisation code) or between them (an idle GPU waiting for the next launch) decides which
change can pay. Works on any torch from 2.0 (only FunctionEvent.time_range and device_type).
"""
from __future__ import annotations

from dataclasses import dataclass

# (kind, lower-case name fragments); the first kind with a fragment in the kernel's name wins.
# Triton comes first: Inductor names its fused kernels after the ops they hold, and a bias add
# folded in from a convolution puts "convolution" in a Triton kernel's name. Then cuDNN's
# "fprop ... implicit_gemm" convolutions count as convolutions, not matrix products.
KERNEL_KINDS = (
    ("Triton reductions (norms)", ("triton_per_", "triton_red_")),
    ("Triton element-wise", ("triton",)),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("convolution", ("conv", "fprop", "implicit_gemm", "winograd")),
    ("matrix product", ("gemm", "cutlass", "nvjet", "cublas", "matmul")),
    ("copy, fill", ("memcpy", "memset", "copy", "fill")),
)
OTHER = "other"
KIND_ORDER = tuple(kind for kind, _ in KERNEL_KINDS) + (OTHER,)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, fragments in KERNEL_KINDS:
        if any(fragment in lowered for fragment in fragments):
            return kind
    return OTHER


@dataclass(frozen=True)
class Kernel:
    name: str
    start_us: float
    duration_us: float


def busy_us(kernels: list[Kernel]) -> float:
    """Microseconds in which at least one kernel ran (kernels on two streams may overlap)."""
    total, end = 0.0, float("-inf")
    for k in sorted(kernels, key=lambda k: k.start_us):
        k_end = k.start_us + k.duration_us
        if k_end > end:
            total += k_end - max(k.start_us, end)
            end = k_end
    return total


def summarize(kernels: list[Kernel]) -> dict:
    """Count and summed milliseconds per kind, the busy time and the span (ms)."""
    by_kind = {kind: {"count": 0, "ms": 0.0} for kind in KIND_ORDER}
    for k in kernels:
        entry = by_kind[kernel_kind(k.name)]
        entry["count"] += 1
        entry["ms"] += k.duration_us / 1000
    span = (max(k.start_us + k.duration_us for k in kernels) - min(k.start_us for k in kernels)) if kernels else 0.0
    return {"kinds": by_kind, "kernels": len(kernels), "busy_ms": busy_us(kernels) / 1000, "span_ms": span / 1000}


def by_name(kernels: list[Kernel]) -> list[tuple[str, int, float]]:
    """(name, launches, summed ms) per kernel name, the most GPU time first."""
    totals: dict[str, list] = {}
    for k in kernels:
        entry = totals.setdefault(k.name, [0, 0.0])
        entry[0] += 1
        entry[1] += k.duration_us / 1000
    return sorted(((name, n, ms) for name, (n, ms) in totals.items()), key=lambda row: -row[2])


def name_table(kernels: list[Kernel], steps: int) -> str:
    """Every kernel name with its kind, launches per step and ms per call, the most time first:
    what a change to one kind of kernel can buy."""
    lines = ["| ms | launches / step | µs each | kind | kernel |", "|---|---|---|---|---|"]
    for name, n, ms in by_name(kernels):
        lines.append(f"| {ms:.3f} | {n / steps:.1f} | {ms * 1000 / n:.1f} | {kernel_kind(name)} | `{name}` |")
    return "\n".join(lines) + "\n"


def cuda_kernels(profiler) -> list[Kernel]:
    """The CUDA kernels (and copies) of a finished torch.profiler.profile."""
    from torch.autograd import DeviceType
    return [Kernel(e.name, e.time_range.start, e.time_range.elapsed_us())
            for e in profiler.events() if e.device_type == DeviceType.CUDA]


def table(summaries: dict[str, dict], steps: int) -> str:
    """One column per profiled variant: ms per call and kernels per call by kind, then busy / span."""
    names = list(summaries)
    lines = ["| kernel kind | " + " | ".join(f"{n}: ms | {n}: kernels" for n in names) + " |",
             "|---|" + "---|---|" * len(names)]
    for kind in KIND_ORDER:
        cells = [f"{s['kinds'][kind]['ms']:.2f} | {s['kinds'][kind]['count']}" for s in summaries.values()]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines.append("| all kernels | " + " | ".join(f"{sum(e['ms'] for e in s['kinds'].values()):.2f} | {s['kernels']}"
                                              for s in summaries.values()) + " |")
    lines.append("| GPU busy / span (ms), all kernels / steps | " + " | ".join(
        f"{s['busy_ms']:.2f} / {s['span_ms']:.2f} | {s['kernels'] / steps:.0f}" for s in summaries.values()) + " |")
    return "\n".join(lines) + "\n"
