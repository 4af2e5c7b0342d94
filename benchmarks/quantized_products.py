"""The step's matrix products of at most MAX_ROWS rows (the 8x12 and 4x6 latents' linear layers,
and their 3x3 convolutions as the patch products the fast back-end makes of them) read 2.1 GB of
fp16 weights a step, 85% of what a step reads: could 8-bit weights stream faster? Each shape is
timed on the GPU with its weights cold (copies in rotation past the L2 cache), as the step reads
them:

    cuBLAS fp16     F.linear, as the step runs today
    cuBLAS fp8      torch._scaled_mm, e4m3 x e4m3, one scale per tensor (the input's cast not counted)
    cuBLAS fp8, two terms   the same with twice the rows and an fp32 result: the input as two e4m3
                    terms stacked, the value and its rounding residual (sdcanny.fp8.two_terms),
                    the weights read once (the terms' making and the halves' sum not counted)
    two terms, whole        two_term_product compiled by TorchInductor: the terms made, the product,
                    the halves summed and scaled; with the input's scale from a reduction over it
                    ("dynamic") or known ahead ("static"), for weights of 6 MB or more
    cuBLAS int8     torch._int_mm, int8 x int8 (the input's rounding and the output's scaling not counted)
    kernel          a Triton kernel of our own (below): fp16 weights, or uint8 ones (int8 + 128, one
                    scale per output channel) turned into fp16 in registers, the best of LAUNCHES

    python3 benchmarks/quantized_products.py [--kernel-min-mb 6] [--out outputs/quantized_products.md]

benchmarks/quantization_fidelity.py says what each rounding does to the graded images. CUDA-graph
replays (benchmarks/graph_timing.py) of one call per weight copy, µs per call.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from graph_timing import replay_us  # noqa: E402
from row_quantization import quantize_rows, save_report, tensor_scale  # noqa: E402
from sdcanny import fp8  # noqa: E402
from sdcanny.metrics import relative_l2  # noqa: E402

MAX_ROWS = 192  # the 8x12 latent's pixels for two samples; the 16x24 latent's 768 rows are compute-bound
MODES = {"fp16": 0, "int8": 1, "uint8": 2}  # the kernel's weights
L2_BYTES = 150e6  # more than the H100's 50 MB L2: copies of a weight in rotation fill this much


@triton.jit
def as_fp16(w, MODE: tl.constexpr):
    if MODE == 0:
        return w
    if MODE == 1:
        return w.to(tl.float16)
    # uint8 b = q + 128: 0x6400 | b is the fp16 1024 + b exactly, so minus 1152 is q
    return (w.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1152.0


@triton.jit
def weight_only_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, part_ptr, count_ptr, M, N, K, sx, sw, k_per_split,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                       MODE: tl.constexpr, W_FIRST: tl.constexpr, HAS_BIAS: tl.constexpr):
    """out (M, N) = x (M, K) @ (w (N, K) * scale[:, None])^T + bias, K a multiple of BLOCK_K and N of
    BLOCK_N. A program takes one (BLOCK_M, BLOCK_N) tile over one K slice; with SPLIT_K slices each
    stores its fp32 partial, and the last of a tile to count itself in (a counter per tile, which
    it resets) adds them up and writes the tile. W_FIRST: the weights are the dot's first operand."""
    pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k_start = pid_k * k_per_split
    acc = tl.zeros([BLOCK_N, BLOCK_M] if W_FIRST else [BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in tl.range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        kk = tl.max_contiguous(tl.multiple_of(k + tl.arange(0, BLOCK_K), BLOCK_K), BLOCK_K)
        if W_FIRST:
            w = tl.load(w_ptr + rn[:, None].to(tl.int64) * sw + kk[None, :])
            xt = tl.load(x_ptr + rm[None, :] * sx + kk[:, None], mask=rm[None, :] < M, other=0.0)
            acc = tl.dot(as_fp16(w, MODE), xt, acc)
        else:
            wt = tl.load(w_ptr + rn[None, :].to(tl.int64) * sw + kk[:, None])
            x = tl.load(x_ptr + rm[:, None] * sx + kk[None, :], mask=rm[:, None] < M, other=0.0)
            acc = tl.dot(x, as_fp16(wt, MODE), acc)
    column = rn[:, None] if W_FIRST else rn[None, :]
    row = rm[None, :] if W_FIRST else rm[:, None]
    tile, inside = row * N + column, row < M
    if SPLIT_K > 1:
        tl.store(part_ptr + pid_k * M * N + tile, acc, mask=inside)
        tl.debug_barrier()  # the whole partial is stored before the count says so
        counter = count_ptr + pid_n * tl.num_programs(1) + pid_m
        if tl.atomic_add(counter, 1, sem="acq_rel") == SPLIT_K - 1:
            acc = tl.zeros_like(acc)
            for s in range(SPLIT_K):  # from L2 (.cg): other programs wrote them
                acc += tl.load(part_ptr + s * M * N + tile, mask=inside, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(counter, 0)
            store_tile(acc, column, tile, inside, scale_ptr, bias_ptr, out_ptr, MODE, HAS_BIAS)
    else:
        store_tile(acc, column, tile, inside, scale_ptr, bias_ptr, out_ptr, MODE, HAS_BIAS)


@triton.jit
def store_tile(acc, column, tile, inside, scale_ptr, bias_ptr, out_ptr, MODE: tl.constexpr, HAS_BIAS: tl.constexpr):
    if MODE != 0:
        acc = acc * tl.load(scale_ptr + column)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + column).to(tl.float32)
    tl.store(out_ptr + tile, acc.to(out_ptr.dtype.element_ty), mask=inside)


_COUNTERS: dict = {}  # per device: the tiles' counters, zero between calls


def weight_only_product(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None,
                        scale: Optional[torch.Tensor] = None, mode: str = "fp16", w_first: bool = True,
                        block_n: int = 64, block_k: int = 128, split_k: int = 4, warps: int = 4,
                        out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (M, K) fp16 @ w (N, K)^T (fp16, or int8 / uint8 with `scale` per row) + bias -> (M, N) fp16."""
    (m, k), n = x.shape, w.shape[0]
    if k % block_k or n % block_n or w.shape[1] != k or x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(f"x {tuple(x.shape)}, w {tuple(w.shape)}: K must be a multiple of {block_k}, N of "
                         f"{block_n}, rows contiguous")
    if (scale is None) != (mode == "fp16"):
        raise ValueError("8-bit weights take a scale per row, fp16 ones none")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device) if out is None else out
    k_per_split = triton.cdiv(k // block_k, split_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    grid = (n // block_n, triton.cdiv(m, 64), split_k)
    part = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if split_k > 1 else out
    counters = _COUNTERS.get(x.device)
    if counters is None:
        counters = _COUNTERS[x.device] = torch.zeros(4096, dtype=torch.int32, device=x.device)
    if grid[0] * grid[1] > counters.numel():
        raise ValueError(f"{grid[0] * grid[1]} tiles: more than the {counters.numel()} counters")
    weight_only_kernel[grid](x, w, out if scale is None else scale, out if bias is None else bias, out, part, counters,
                             m, n, k, x.stride(0), w.stride(0), k_per_split, BLOCK_M=64, BLOCK_N=block_n,
                             BLOCK_K=block_k, SPLIT_K=split_k, MODE=MODES[mode], W_FIRST=w_first,
                             HAS_BIAS=bias is not None, num_warps=warps)
    return out


def two_term_product(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     x_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (M, K) @ (w8 (N, K) e4m3 times w_scale (N,), a scale per row)^T + bias, fp16: the terms of
    x (fp8.two_terms) made, then fp8.two_term_product. x_scale: a scale known ahead (a bound on
    max |x| / 448), or None for tensor_scale(x), a reduction over x first."""
    scale = tensor_scale(x) if x_scale is None else x_scale
    unit = torch.ones((), dtype=torch.float32, device=x.device)
    return fp8.two_term_product(fp8.two_terms(x, scale), w8, w_scale * scale, unit, bias, torch.float16)


def launches(k: int) -> list[dict]:
    """The kernel's launches tried per shape: operand order, tile width, K block, slices, warps."""
    splits = (1, 2) if k <= 1280 else (2, 4, 8)
    return [dict(w_first=wf, block_n=bn, block_k=bk, split_k=sk, warps=wp)
            for wf, bn, bk, sk, wp in itertools.product((True, False), (64, 128), (128, 256), splits, (4, 8))]


def low_row_products(ops: Counter, max_rows: int = MAX_ROWS) -> Counter:
    """(M, K, N, bias) -> count a step, from benchmarks/step_shapes.py's record of a step: its matrix
    products of at most `max_rows` rows, and its 3x3 convolutions of at most that many output
    pixels (samples included) as patch products (K = 9 x input channels)."""
    out: Counter = Counter()
    for op, count in ops.items():
        if op[0] == "gemm" and op[1] <= max_rows:
            out[op[1:]] += count
        elif op[0] == "conv":
            _, batch, channels, height, width, filters, stride = op
            rows = batch * ((height - 1) // stride + 1) * ((width - 1) // stride + 1)
            if rows <= max_rows:
                out[(rows, 9 * channels, filters, True)] += count
    return out


def rotating_us(calls: list[Callable[[], object]]) -> float:
    """Median µs per call of `calls` (one per weight copy) in a row, as graph_timing replays them."""
    return replay_us(lambda: [call() for call in calls], per_graph=len(calls))


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """metrics.relative_l2 of two GPU tensors."""
    return relative_l2(got.float().cpu().numpy(), expected.float().cpu().numpy())


def best_kernel(x, weights: list, bias, outs: list, mode: str) -> tuple[float, dict]:
    """The fastest of `launches` for these weights ((w, scale) pairs) and its µs; launches whose
    tiles need more shared memory than the GPU has are left out."""
    best = (float("inf"), {})
    for launch in launches(x.shape[1]):
        if weights[0][0].shape[0] % launch["block_n"] or x.shape[1] % launch["block_k"]:
            continue
        try:
            us = rotating_us([lambda w=w, s=s, o=o: weight_only_product(x, w, bias, s, mode, out=o, **launch)
                              for (w, s), o in zip(weights, outs)])
        except OutOfResources:
            continue
        best = min(best, (us, launch), key=lambda t: t[0])
    return best


def cold_operands(m: int, k: int, n: int, has_bias: bool) -> tuple:
    """(x (M, K), copies of a weight (N, K) enough to fill L2_BYTES, bias (N,) or None), fp16 on the
    GPU: a product timed over the copies in rotation reads its weights cold, as the step does."""
    dev = torch.device("cuda")
    copies = max(2, int(L2_BYTES / (n * k * 2)) + 1)
    x = torch.randn(m, k, device=dev, dtype=torch.float16)
    ws = [torch.randn(n, k, device=dev, dtype=torch.float16) / k ** 0.5 for _ in range(copies)]
    return x, ws, torch.randn(n, device=dev, dtype=torch.float16) if has_bias else None


def time_shape(m: int, k: int, n: int, has_bias: bool, kernel: bool) -> dict:
    """One shape's row: µs of each path, and the errors (see main's header)."""
    dev = torch.device("cuda")
    x, ws, bias = cold_operands(m, k, n, has_bias)
    exact = F.linear(x.float(), ws[0].float(), None if bias is None else bias.float())
    row = {"cuBLAS fp16": rotating_us([lambda w=w: F.linear(x, w, bias) for w in ws])}
    one = torch.ones((), device=dev)
    x8, w8 = x.to(torch.float8_e4m3fn), [w.to(torch.float8_e4m3fn) for w in ws]
    row["cuBLAS fp8"] = rotating_us([lambda w=w: torch._scaled_mm(x8, w.t(), one, one, out_dtype=torch.float16)
                                     for w in w8])
    terms = fp8.two_terms(x, tensor_scale(x))
    row["cuBLAS fp8 two terms"] = rotating_us([lambda w=w: torch._scaled_mm(terms, w.t(), one, one,
                                                                             out_dtype=torch.float32) for w in w8])
    xi = torch.randint(-127, 128, (m, k), device=dev, dtype=torch.int8)
    wi = [quantize_rows(w, "int8")[0] for w in ws]
    row["cuBLAS int8"] = rotating_us([lambda w=w: torch._int_mm(xi, w.t()) for w in wi])
    uint8 = [quantize_rows(w, "uint8") for w in ws]
    stored, scale = uint8[0]
    rounded = F.linear(x.float(), (stored.float() - 128) * scale[:, None], None if bias is None else bias.float())
    row["uint8 rounding error"] = relative_error(rounded, exact)
    if kernel:
        fp8_rows = [quantize_rows(w, "fp8") for w in ws]
        for mode, x_scale in (("dynamic", None), ("static", 4 * tensor_scale(x))):  # a bound, 4x loose
            torch._dynamo.reset()  # a compilation per shape, not recompilations of one function
            whole = torch.compile(two_term_product, dynamic=False)
            row[f"two terms, whole, {mode}"] = rotating_us([lambda w=w, s=s: whole(x, w, s, bias, x_scale)
                                                            for w, s in fp8_rows])
        w8_0, s_0 = fp8_rows[0]
        # against exact maths on the rounded weights: what the input's two terms and the fp16 output cost
        on_rounded = F.linear(x.double(), w8_0.double() * s_0.double()[:, None], None if bias is None else bias.double())
        row["two terms error"] = relative_error(two_term_product(x, w8_0, s_0, bias), on_rounded)
        outs = [torch.empty(m, n, device=dev, dtype=torch.float16) for _ in ws]
        row["kernel fp16"], _ = best_kernel(x, [(w, None) for w in ws], bias, outs, "fp16")
        row["kernel uint8"], launch = best_kernel(x, uint8, bias, outs, "uint8")
        row["uint8 launch"] = launch
        int8 = [quantize_rows(w, "int8") for w in ws]
        row["kernel int8"] = rotating_us([lambda w=w, s=s, o=o: weight_only_product(x, w, bias, s, "int8", out=o, **launch)
                                          for (w, s), o in zip(int8, outs)])
        got = weight_only_product(x, stored, bias, scale, "uint8", **launch)
        row["kernel error"] = relative_error(got, rounded)  # against its own rounded weights: the kernel's maths
    return row


def main() -> None:
    import step_shapes  # builds the sd15 networks; imported here so that the kernel imports lightly

    from sdcanny.config import CONFIGS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel-min-mb", type=float, default=6.0,
                    help="time our kernel only for weights of at least this many MB (fp16)")
    ap.add_argument("--out", type=Path, default=Path("outputs/quantized_products.md"))
    args = ap.parse_args()
    start = time.perf_counter()
    ops = low_row_products(step_shapes.step_operations(CONFIGS["sd15"], torch.device("cuda"), torch.float16))
    cols = ["cuBLAS fp16", "cuBLAS fp8", "cuBLAS fp8 two terms", "two terms, whole, dynamic", "two terms, whole, static",
            "cuBLAS int8", "kernel fp16", "kernel uint8", "kernel int8"]
    lines = [f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}; weights cold", "",
             "| M x K -> N | a step | MB fp16 | " + " | ".join(f"{c} µs" for c in cols)
             + " | uint8 launch (weights first, BLOCK_N, BLOCK_K, slices, warps) | uint8 rounding error | kernel error "
             "| two terms error |",
             "|---|---|---|" + "---|" * (len(cols) + 4)]
    totals = Counter()
    for (m, k, n, has_bias), count in sorted(ops.items(), key=lambda item: -item[1] * item[0][1] * item[0][2]):
        mb = n * k * 2 / 1e6
        row = time_shape(m, k, n, has_bias, kernel=mb >= args.kernel_min_mb)
        for c in cols:
            totals[c] += count * min(row.get(c, row["cuBLAS fp16"]), row["cuBLAS fp16"])  # the better of it and today's
        launch = row.get("uint8 launch")
        cells = [f"{row[c]:.1f}" if c in row else "-" for c in cols]
        cells += ["-" if launch is None else str(tuple(launch.values())), f"{row['uint8 rounding error']:.1e}",
                  f"{row['kernel error']:.1e}" if "kernel error" in row else "-",
                  f"{row['two terms error']:.1e}" if "two terms error" in row else "-"]
        lines.append(f"| {m} x {k} -> {n}{' + bias' if has_bias else ''} | {count} | {mb:.1f} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    lines.append(f"| a step (each the better of it and cuBLAS fp16) | {sum(ops.values())} | | "
                 + " | ".join(f"{totals[c]:.0f}" for c in cols) + " | | | | |")
    lines.append(f"\n({time.perf_counter() - start:.0f} s)")
    save_report(lines, args.out)


if __name__ == "__main__":
    main()
