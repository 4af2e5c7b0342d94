"""One way to time a chain of GPU work for the kernel benchmarks: CUDA-graph replays."""
import statistics

import torch


def replay_us(fn, per_graph: int, reps: int = 7, replays: int = 20) -> float:
    """Median µs per unit of work of fn, which runs `per_graph` units: warmed up on a side stream
    (compiles and lazy set-up stay out of the capture), captured once as a CUDA graph, replayed
    `replays` times back to back per sample, `reps` samples."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return statistics.median(graph_us(graph, replays) / per_graph for _ in range(reps))


def graph_us(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """µs a replay of a captured graph: `replays` back to back between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / replays
