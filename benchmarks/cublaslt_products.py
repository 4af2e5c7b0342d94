"""Does cuBLASLt hold faster algorithms for the step's matrix products than the one its heuristic
picks for torch? Every product of a graded step (linear layers, 1x1 convolutions, and the 4x6
and 8x12 latents' 3x3 convolutions as the patch products the fast back-end makes of them) is
timed with its weights cold (copies in rotation past the L2 cache), through F.linear as the step
runs it and through each of the first --algorithms candidates cuBLASLt's heuristic returns
(benchmarks/cublaslt.py, a 32 MiB workspace). Each candidate's output is checked against
F.linear's.

    python3 benchmarks/cublaslt_products.py [--algorithms 32] [--out outputs/cublaslt_products.md]

CUDA-graph replays (benchmarks/graph_timing.py) of one call per weight copy, µs per call. A
product's time alone is not its share of a step (two streams overlap): the sums bound what a
better choice could save.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cublaslt import CublasLt  # noqa: E402
from quantized_products import cold_operands, low_row_products, relative_error, rotating_us  # noqa: E402
from row_quantization import save_report  # noqa: E402
from sdcanny.fast import PATCH_PRODUCT_ROWS  # noqa: E402

WRONG = 1e-2  # relative L2 from F.linear's output past which a candidate is reported wrong


def step_products(ops: Counter, patch_rows: int = PATCH_PRODUCT_ROWS) -> Counter:
    """(M, K, N, bias) -> count a step, from benchmarks/step_shapes.py's record of a step: every
    matrix product, and the 3x3 convolutions of at most `patch_rows` output pixels (samples
    included) as the patch products the fast back-end makes of them."""
    products = Counter({op[1:]: count for op, count in ops.items() if op[0] == "gemm"})
    return products + low_row_products(Counter({op: count for op, count in ops.items() if op[0] == "conv"}), patch_rows)


def time_shape(lt: CublasLt, m: int, k: int, n: int, has_bias: bool, algorithms: int) -> dict:
    """F.linear's µs, the heuristic's first candidate's, and the best candidate's (with its rank)."""
    x, ws, bias = cold_operands(m, k, n, has_bias)
    expected = F.linear(x, ws[0], bias)
    row = {"torch": rotating_us([lambda w=w: F.linear(x, w, bias) for w in ws]), "wrong": 0}
    plan = lt.plan(m, k, n, bias, algorithms)
    outs = [torch.empty_like(expected) for _ in ws]
    timings = []
    for rank, algo in enumerate(plan.candidates):
        got = lt.run(plan, x, ws[0], outs[0], algo)
        torch.cuda.synchronize()
        if relative_error(got, expected) > WRONG:
            row["wrong"] += 1
            continue
        us = rotating_us([lambda w=w, o=o: lt.run(plan, x, w, o, algo) for w, o in zip(ws, outs)])
        timings.append((us, rank, algo.waves_count))
    row["candidates"] = len(plan.candidates)
    if timings:
        row["first"] = next((us for us, rank, _ in timings if rank == 0), float("nan"))
        row["best"], row["rank"], row["waves"] = min(timings)
    return row


def main() -> None:
    import step_shapes  # builds the sd15 networks

    from sdcanny.config import CONFIGS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--algorithms", type=int, default=32, help="candidates asked of the heuristic per shape")
    ap.add_argument("--out", type=Path, default=Path("outputs/cublaslt_products.md"))
    args = ap.parse_args()
    start = time.perf_counter()
    ops = step_products(step_shapes.step_operations(CONFIGS["sd15"], torch.device("cuda"), torch.float16))
    lt = CublasLt()
    lines = [f"torch {torch.__version__}, {torch.cuda.get_device_name()}; weights cold; "
             f"{args.algorithms} candidates asked per shape", "",
             "| M x K -> N | a step | MB fp16 | F.linear µs | heuristic's first µs | best µs | best's rank | "
             "its waves | candidates (wrong) |", "|---|---|---|---|---|---|---|---|---|"]
    totals = Counter()
    for (m, k, n, has_bias), count in sorted(ops.items(), key=lambda item: -item[1] * item[0][1] * item[0][2]):
        row = time_shape(lt, m, k, n, has_bias, args.algorithms)
        best = min(row["torch"], row.get("best", float("inf")))
        totals["torch"] += count * row["torch"]
        totals["best"] += count * best
        totals["rows<=192 torch"] += count * row["torch"] * (m <= 192)
        totals["rows<=192 best"] += count * best * (m <= 192)
        cells = [f"{row[c]:.1f}" if c in row else "-" for c in ("torch", "first", "best")]
        cells += [str(row.get("rank", "-")), f"{row['waves']:.2f}" if "waves" in row else "-",
                  f"{row['candidates']} ({row['wrong']})"]
        lines.append(f"| {m} x {k} -> {n}{' + bias' if has_bias else ''} | {count} | {n * k * 2 / 1e6:.1f} | "
                     + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    lines.append(f"| a step, {sum(ops.values())} products (best: the better of it and F.linear) | | | "
                 f"{totals['torch']:.0f} | | {totals['best']:.0f} | | | |")
    lines.append(f"| of which at most 192 rows | | | {totals['rows<=192 torch']:.0f} | | "
                 f"{totals['rows<=192 best']:.0f} | | | |")
    lines.append(f"\n({time.perf_counter() - start:.0f} s)")
    save_report(lines, args.out)


if __name__ == "__main__":
    main()
