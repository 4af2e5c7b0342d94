"""Triton split-K 3x3 convolutions against cuDNN, per convolution shape of the graded step: 9 tile
shapes x 8 K-slice counts each, weights output-channels innermost, the same weights every call
(so from L2). Run on the H100 as a scratch script before this commit, with the kernel taking that
packed matrix directly; here it takes the same memory as the transposed view.

    python3 benchmarks/split_k_sweep.py [SECONDS]   # writes $OUT/conv_sweep.md
"""
import itertools
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from step_shapes import graph_us  # noqa: E402
from sdcanny.split_k import ConvTiles, output_size  # noqa: E402
from sdcanny.triton_conv import conv3x3_split_k  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp/sweep"))
OUT.mkdir(parents=True, exist_ok=True)
print("triton", triton.__version__, flush=True)
torch.backends.cudnn.benchmark = True
SHAPES = [  # (batch, C, H, W, N, stride, count per step)
    (2, 1280, 4, 6, 1280, 1, 19), (2, 2560, 4, 6, 1280, 1, 3), (2, 1280, 8, 12, 1280, 2, 2),
    (2, 1280, 8, 12, 1280, 1, 10), (2, 640, 8, 12, 1280, 1, 2), (2, 1920, 8, 12, 1280, 1, 1), (2, 2560, 8, 12, 1280, 1, 2),
    (2, 640, 16, 24, 640, 2, 2), (2, 640, 16, 24, 640, 1, 9), (2, 320, 16, 24, 640, 1, 2), (2, 960, 16, 24, 640, 1, 1),
    (2, 1280, 16, 24, 640, 1, 1), (2, 1280, 16, 24, 1280, 1, 1), (2, 1920, 16, 24, 640, 1, 1),
    (2, 320, 32, 48, 320, 2, 2), (2, 320, 32, 48, 320, 1, 11), (2, 640, 32, 48, 320, 1, 2), (2, 640, 32, 48, 640, 1, 1),
    (2, 960, 32, 48, 320, 1, 1)]
TILES = [(16, 128, 64, 4, 4), (32, 128, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 64, 8, 3),
         (64, 256, 64, 8, 3), (128, 64, 64, 4, 4), (128, 256, 64, 8, 3), (64, 128, 128, 4, 3)]
SPLITS = (1, 2, 3, 4, 6, 8, 12, 16)
deadline = time.time() + float(sys.argv[1] if len(sys.argv) > 1 else 400)
lines = ["| shape | per step | cuDNN µs | best Triton µs | tiles | split | rel L2 | runner-up |", "|---|---|---|---|---|---|---|---|"]
tot_c = tot_t = 0.0
for (b, c, h, w, n, stride, count) in SHAPES:
    if time.time() > deadline:
        lines.append(f"| {b}x{c}x{h}x{w}->{n} s{stride} | {count} | out of time |")
        continue
    x = torch.randn(b, c, h, w, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    wt = (torch.randn(n, c, 3, 3, device="cuda") / (3 * c ** 0.5)).half().contiguous(memory_format=torch.channels_last)
    bias = torch.randn(n, device="cuda", dtype=torch.float16)
    ref = F.conv2d(x.float(), wt.float(), bias.float(), stride, 1)
    cudnn = graph_us(lambda: F.conv2d(x, wt, bias, stride, 1))
    packed = wt.permute(2, 3, 1, 0).reshape(9 * c, n).contiguous().t()  # (out, 9C), out innermost
    m = b * output_size(h, stride) * output_size(w, stride)
    results = []
    for (bm, bn, bk, warps, stages), split in itertools.product(TILES, SPLITS):
        k_tiles = 9 * c // bk
        ctas = triton.cdiv(m, bm) * triton.cdiv(n, bn) * split
        if c % bk or k_tiles // split < 3 or ctas > 4 * 132 or (bm > 16 and m <= bm // 2):
            continue
        tiles = ConvTiles(bm, bn, bk, split, warps, stages)
        try:
            y = conv3x3_split_k(x, packed, bias, stride, tiles)
            err = float((y.float() - ref).norm() / ref.norm())
            us = graph_us(lambda: conv3x3_split_k(x, packed, bias, stride, tiles), calls=10, replays=5)
        except Exception as exc:  # a configuration that does not compile (shared memory)
            print(f"  {tiles}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            continue
        results.append((us, tiles, err))
    results.sort(key=lambda r: r[0])
    best = results[0]
    tot_c += cudnn * count
    tot_t += min(best[0], cudnn) * count
    t = best[1]
    second = results[1] if len(results) > 1 else None
    lines.append(f"| {b}x{c}x{h}x{w}->{n} s{stride} | {count} | {cudnn:.1f} | {best[0]:.1f} | {t.block_m}x{t.block_n}x{t.block_k} w{t.warps} s{t.stages} "
                 f"| {t.split} | {best[2]:.1e} | {second[0]:.1f} {second[1].block_m}x{second[1].block_n} split {second[1].split} |")
    print(lines[-1], flush=True)
lines.append(f"\nper step: cuDNN {tot_c:.0f} µs, the better of the two per shape {tot_t:.0f} µs")
print(lines[-1])
(OUT / "conv_sweep.md").write_text("\n".join(lines) + "\n")
