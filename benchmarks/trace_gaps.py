"""Where a profiled call's GPU time goes between its kernels: reads the Chrome trace that
`gpu_benchmark.py --profile` writes (trace_<label>.json.gz) and reports, per CUDA stream over the
middle of the call, the kernels' busy time, the gaps before each kind of kernel (negative where a
kernel launched with programmatic dependent launch starts before the one ahead ends), and the
kernels on either side of each memset.

    python3 benchmarks/trace_gaps.py outputs/benchmark/trace_jit.json.gz [--from 0.3 --to 0.7]
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from kernel_profile import kernel_kind

GPU_CATEGORIES = ("kernel", "gpu_memset", "gpu_memcpy")


@dataclass(frozen=True)
class GpuEvent:
    stream: str
    name: str
    start_us: float
    duration_us: float

    @property
    def end_us(self) -> float:
        return self.start_us + self.duration_us


def read_events(trace: dict) -> list[GpuEvent]:
    """The trace's GPU work (kernels, memsets, copies), in start order."""
    events = [GpuEvent(f"{e.get('pid')}/{e.get('tid')}", e["name"], float(e["ts"]), float(e["dur"]))
              for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES]
    return sorted(events, key=lambda e: e.start_us)


def window(events: list[GpuEvent], start: float, stop: float) -> list[GpuEvent]:
    """The events that start between fractions `start` and `stop` of the span: the middle of a
    call holds whole sampler steps, without its first and last parts."""
    first, last = events[0].start_us, max(e.end_us for e in events)
    lo, hi = first + start * (last - first), first + stop * (last - first)
    return [e for e in events if lo <= e.start_us < hi]


def stream_report(events: list[GpuEvent], long_gap_us: float = 30.0) -> dict:
    """One stream's busy time, and its gaps shorter than `long_gap_us` (launch gaps; longer ones are
    waits on the other stream or the host) by the kind of kernel that follows them."""
    by_kind = collections.defaultdict(list)
    waits = 0.0
    for before, after in zip(events, events[1:]):
        gap = after.start_us - before.end_us
        if gap < long_gap_us:
            by_kind[kernel_kind(after.name)].append(gap)
        else:
            waits += gap
    return {"kernels": len(events), "busy_us": sum(e.duration_us for e in events), "waits_us": waits,
            "gaps": {kind: {"count": len(g), "sum_us": sum(g), "median_us": statistics.median(g)}
                     for kind, g in by_kind.items()}}


def memset_neighbours(events: list[GpuEvent]) -> collections.Counter:
    """(kernel before, kernel after) around each memset of one stream, counted."""
    return collections.Counter((a.name, c.name) for a, b, c in zip(events, events[1:], events[2:])
                               if "memset" in b.name.lower())


def report(events: list[GpuEvent]) -> str:
    lines = []
    streams = collections.Counter(e.stream for e in events)
    for stream, _ in streams.most_common():
        mine = [e for e in events if e.stream == stream]
        r = stream_report(mine)
        lines += [f"stream {stream}: {r['kernels']} kernels, busy {r['busy_us'] / 1000:.2f} ms, "
                  f"waits of 30 us or more {r['waits_us'] / 1000:.2f} ms", "",
                  "| gap before | count | sum ms | median µs |", "|---|---|---|---|"]
        for kind, g in sorted(r["gaps"].items(), key=lambda kv: -kv[1]["sum_us"]):
            lines.append(f"| {kind} | {g['count']} | {g['sum_us'] / 1000:.3f} | {g['median_us']:.2f} |")
        around = memset_neighbours(mine).most_common(5)
        if around:
            lines += ["", "memsets between (before -> after, count):"]
            lines += [f"- `{a[:70]}` -> `{c[:70]}`: {n}" for (a, c), n in around]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", type=Path, help="trace_<label>.json.gz from gpu_benchmark.py --profile")
    ap.add_argument("--from", dest="start", type=float, default=0.3, help="window start, a fraction of the span")
    ap.add_argument("--to", dest="stop", type=float, default=0.7, help="window end, a fraction of the span")
    args = ap.parse_args()
    with gzip.open(args.trace, "rt") as f:
        events = read_events(json.load(f))
    chosen = window(events, args.start, args.stop)
    span = (max(e.end_us for e in events) - events[0].start_us) / 1000
    print(f"{len(events)} GPU events over {span:.2f} ms; the window {args.start:.2f}-{args.stop:.2f} holds "
          f"{len(chosen)}\n")
    print(report(chosen))


if __name__ == "__main__":
    main()
