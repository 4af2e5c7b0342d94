"""The step's low-resolution 3x3 convolutions (4x6 and 8x12 latents, 1280 output channels, batch 2:
48 or 192 output rows) as weight-streaming Triton kernels, timed against cuDNN and against the
bandwidth the weights need (issue 11).

At these sizes a convolution is bound by reading its weights (29.5 MB at 1280 -> 1280): 9.8 µs at
3 TB/s, where cuDNN takes 23-31 µs in the step. The kernel splits K = 9 x C into slices so that
every SM streams a share of the weights; each program computes all the rows (or one 64-row tile of
them) for BN output channels over one slice, and writes fp32 partial sums that a second kernel adds
up with the bias (in the step TorchInductor would fold that sum into the next element-wise kernel).
Variants: the weights as the (CO, 9C) matrix or packed tile by tile (each [BN, BK] tile contiguous,
so that a load is one 8-32 KB run), read through pointers or through a TMA descriptor. Three
reference rows per shape: cuDNN, cuBLAS on the patches matrix made beforehand (what a library
skinny product streams), and a kernel that only reads the packed weights with the same grid. That
last one came out slower than the convolution (18.1 against 14.9 µs at 4x6 on the H100): Triton
pipelines only the loads that feed a product, so it is no ceiling. Weights rotate through enough
copies to leave L2.

    python3 benchmarks/low_res_conv_sweep.py [SECONDS_PER_SHAPE]   # on a GPU: the table (and $OUT/low_res_conv.md)
    TRITON_INTERPRET=1 python3 benchmarks/low_res_conv_sweep.py --interpret-check   # indexing, on a CPU
"""
import itertools
import os
import sys
import time

import torch
import triton
import triton.language as tl

from triton_conv_sweep import check_problem, conv_problem, time_replays


@triton.jit
def stream_conv_kernel(x_ptr, w_ptr, w_desc, part_ptr, M, H, W, C, CO, sxn, sxh, sxw, sxc, K_TILES, PER_SPLIT,
                       M_TILES: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                       PACKED: tl.constexpr, TMA: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_tile = pid // M_TILES
    rows = (pid % M_TILES) * BM + tl.arange(0, BM)
    row_ok = rows < M
    pixels = H * W
    image = rows // pixels
    y = (rows % pixels) // W
    x = rows % W
    kk = tl.arange(0, BK)
    nn = tl.arange(0, BN)
    chunks = C // BK
    t_start = split * PER_SPLIT
    t_end = tl.minimum(t_start + PER_SPLIT, K_TILES)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for t in range(t_start, t_end):
        tap = t // chunks
        c0 = (t - tap * chunks) * BK
        yy = y + tap // 3 - 1
        xx = x + tap % 3 - 1
        inside = row_ok & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        a = tl.load(x_ptr + (image * sxn + yy * sxh + xx * sxw)[:, None] + (c0 + kk)[None, :] * sxc,
                    mask=inside[:, None], other=0.0)
        if TMA:
            if PACKED:
                w = w_desc.load([(n_tile * K_TILES + t) * BN, 0])
            else:
                w = w_desc.load([n_tile * BN, t * BK])
        else:
            if PACKED:
                w = tl.load(w_ptr + (n_tile * K_TILES + t) * (BN * BK) + nn[:, None] * BK + kk[None, :])
            else:
                w = tl.load(w_ptr + (n_tile * BN + nn)[:, None] * (K_TILES * BK) + (t * BK + kk)[None, :])
        acc = tl.dot(a, w.T, acc)
    cols = n_tile * BN + nn
    tl.store(part_ptr + (split * M + rows)[:, None] * CO + cols[None, :], acc, mask=row_ok[:, None])


@triton.jit
def stream_read_kernel(w_ptr, out_ptr, K_TILES, PER_SPLIT, BN: tl.constexpr, BK: tl.constexpr):
    """Reads the packed weights with the convolution's grid and K loop and nothing else."""
    n_tile = tl.program_id(0)
    split = tl.program_id(1)
    t_start = split * PER_SPLIT
    t_end = tl.minimum(t_start + PER_SPLIT, K_TILES)
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for t in range(t_start, t_end):
        acc += tl.load(w_ptr + (n_tile * K_TILES + t) * (BN * BK) + tl.arange(0, BN)[:, None] * BK
                       + tl.arange(0, BK)[None, :]).to(tl.float32)
    tl.store(out_ptr + (split * tl.num_programs(0) + n_tile) * BN + tl.arange(0, BN), tl.sum(acc, axis=1))


@triton.jit
def sum_slices_kernel(part_ptr, bias_ptr, out_ptr, MN, N, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < MN
    acc = tl.load(bias_ptr + offsets % N, mask=ok, other=0.0).to(tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(part_ptr + s * MN + offsets, mask=ok, other=0.0)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=ok)


def pack_weights(w_mat, bn, bk):
    """(CO, K) -> (CO/BN, K/BK, BN, BK) contiguous: each tile one run of memory."""
    co, k = w_mat.shape
    return w_mat.view(co // bn, bn, k // bk, bk).permute(0, 2, 1, 3).contiguous()


def weight_operand(w_mat, cfg):
    """The weight tensor and (on a GPU, for TMA) its descriptor as the kernel reads them."""
    bn, bk = cfg["bn"], cfg["bk"]
    w = pack_weights(w_mat, bn, bk) if cfg["packed"] else w_mat
    if not cfg["tma"]:
        return w, None
    from triton.tools.tensor_descriptor import TensorDescriptor
    flat = w.view(-1, bk) if cfg["packed"] else w
    return w, TensorDescriptor.from_tensor(flat, [bn, bk])


def stream_conv(x_nhwc, w, w_desc, bias, cfg, partials, out):
    """conv2d(x, weight, bias, padding=1) of a channels-last (N, H, W, C) input into out (M, CO):
    partial sums of cfg's slices, then their sum with the bias."""
    n, h, wd, c = x_nhwc.shape
    m, co = out.shape[-2:]
    k_tiles = 9 * c // cfg["bk"]
    per = triton.cdiv(k_tiles, cfg["split"])
    m_tiles = triton.cdiv(m, cfg["bm"])
    grid = (m_tiles * (co // cfg["bn"]), triton.cdiv(k_tiles, per))
    sxn, sxh, sxw, sxc = x_nhwc.stride()
    stream_conv_kernel[grid](x_nhwc, w, w_desc if w_desc is not None else w, partials, m, h, wd, c, co,
                             sxn, sxh, sxw, sxc, k_tiles, per, M_TILES=m_tiles, BM=cfg["bm"], BN=cfg["bn"],
                             BK=cfg["bk"], PACKED=cfg["packed"], TMA=cfg["tma"], num_stages=cfg["stages"],
                             num_warps=cfg["warps"])
    if partials is not out:
        block = 1024
        sum_slices_kernel[(triton.cdiv(m * co, block),)](partials, bias, out, m * co, co, SPLIT=grid[1],
                                                          BLOCK=block, num_warps=4)
    return out


def config_list(m, c, co, sms):
    """Launches to try, the likelier first: slices that give one to three programs per SM."""
    out = []
    bms = (64,) if m <= 64 else (64, 256)
    for stages, packed, waves, bn, bk, bm in itertools.product((4, 3, 5), (True, False), (1, 2, 3), (128, 64), (64, 128),
                                                              bms):
        k_tiles = 9 * c // bk
        programs = triton.cdiv(m, bm) * co // bn
        split = max(1, min(k_tiles // 2, round(waves * sms / programs)))
        smem = stages * (bm * bk + bn * bk) * 2
        if smem > 200 * 1024 or (bm == 256 and bn == 128):
            continue
        warps = 8 if bm * bn >= 256 * 64 or bn * bk >= 128 * 128 else 4
        out.append(dict(bm=bm, bn=bn, bk=bk, split=split, stages=stages, warps=warps, packed=packed, tma=False))
    return out


def check(device, cases):
    torch.manual_seed(0)
    for (n, h, w, c, co), cfg in cases:
        b, want, xh, w_mat = check_problem(n, h, w, c, co, device)
        want = want.permute(0, 2, 3, 1).reshape(-1, co)
        operand, desc = weight_operand(w_mat, cfg)
        m = n * h * w
        partials = torch.empty((cfg["split"], m, co), dtype=torch.float32, device=device)
        got = stream_conv(xh, operand, desc, b.half(), cfg, partials,
                          torch.empty((m, co), dtype=torch.float16, device=device)).float()
        err = ((got - want).norm() / want.norm()).item()
        print("check", (n, h, w, c, co), cfg, f"rel err {err:.2e}", flush=True)
        assert err < 3e-3, err


if __name__ == "__main__" and "--interpret-check" in sys.argv:
    base = dict(bm=64, bn=16, bk=16, split=3, stages=1, warps=4, packed=False, tma=False)
    check("cpu", [((2, 4, 6, 32, 32), base), ((2, 4, 6, 32, 32), dict(base, packed=True, split=7)),
                  ((2, 8, 12, 32, 16), dict(base, packed=True, split=1)), ((1, 5, 7, 48, 32), dict(base, bn=32))])
    sys.exit()

# (N, H, W, C, CO): calls a step
SHAPES = {(2, 4, 6, 1280, 1280): 19, (2, 4, 6, 2560, 1280): 3, (2, 8, 12, 1280, 1280): 9,
          (2, 8, 12, 2560, 1280): 2, (2, 8, 12, 1920, 1280): 1, (2, 8, 12, 640, 1280): 2}


def reference_rows(x, ws, c, co, dev):
    """cuBLAS on the patches matrix (tap-major K, as the kernels' weights), µs a call."""
    n, _, h, w = x.shape
    patches = torch.nn.functional.unfold(x, 3, padding=1).view(n, c, 9, h * w).permute(0, 3, 2, 1).reshape(-1, 9 * c)
    mats = [wi.permute(0, 2, 3, 1).reshape(co, 9 * c) for wi in ws]
    return time_replays(lambda i: torch.mm(patches, mats[i].t()), len(ws))


def read_ceiling(packed_copies, cfg, co, k_tiles, dev):
    per = triton.cdiv(k_tiles, cfg["split"])
    grid = (co // cfg["bn"], triton.cdiv(k_tiles, per))
    sink = torch.empty(grid[0] * grid[1] * cfg["bn"], device=dev)
    return time_replays(lambda i: stream_read_kernel[grid](packed_copies[i], sink, k_tiles, per, BN=cfg["bn"],
                                                            BK=cfg["bk"], num_stages=cfg["stages"],
                                                            num_warps=4), len(packed_copies))


def sweep(limit_s):
    torch.backends.cudnn.benchmark = True
    dev = "cuda"
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), sms, "SMs", flush=True)
    check(dev, [((2, 4, 6, 256, 256), dict(bm=64, bn=64, bk=64, split=5, stages=3, warps=4, packed=True, tma=True)),
                ((2, 8, 12, 256, 256), dict(bm=64, bn=64, bk=64, split=5, stages=3, warps=4, packed=False,
                                            tma=True))])
    lines = ["| shape (N, H, W, C, CO) | a step | weights MB | cuDNN µs | cuBLAS on patches µs | best kernel µs "
             "(with the slices' sum) | kernel alone µs | TB/s of weights | read-only kernel µs | config | rel err | configs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    totals = [0.0, 0.0]
    for (n, h, w, c, co), per_step in SHAPES.items():
        start = time.time()
        x, ws, b, want, cudnn_us = conv_problem(n, h, w, c, co, dev)
        m = n * h * w
        want = want.permute(0, 2, 3, 1).reshape(m, co)
        x_nhwc = x.permute(0, 2, 3, 1)
        mats = [wi.permute(0, 2, 3, 1).reshape(co, 9 * c) for wi in ws]
        cublas_us = reference_rows(x, ws, c, co, dev)
        out = torch.empty((m, co), dtype=torch.float16, device=dev)
        results = []
        for cfg in config_list(m, c, co, sms):
            if time.time() - start > limit_s:
                break
            for tma in (False, True) if cfg["packed"] else (False,):
                cfg = dict(cfg, tma=tma)
                try:
                    operands = [weight_operand(mat, cfg) for mat in mats]
                    partials = torch.empty((cfg["split"], m, co), dtype=torch.float32, device=dev)
                    got = stream_conv(x_nhwc, *operands[0], b, cfg, partials, out).float()
                    err = ((got - want).norm() / want.norm()).item()
                    us = time_replays(lambda i: stream_conv(x_nhwc, *operands[i], b, cfg, partials, out), len(mats))
                    results.append((us, cfg, err, operands))
                except Exception as e:  # a launch that does not fit (shared memory, registers): reported, skipped
                    print((n, h, w, c, co), cfg, type(e).__name__, str(e)[:160], flush=True)
        results.sort(key=lambda r: r[0])
        best_us, best, err, operands = results[0]
        k_tiles = 9 * c // best["bk"]
        alone = dict(best)
        partials = torch.empty((best["split"], m, co), dtype=torch.float32, device=dev)
        kernel_us = time_replays(lambda i: stream_conv(x_nhwc, *operands[i], b, alone, partials, partials), len(mats))
        packed = [pack_weights(mat, best["bn"], best["bk"]) for mat in mats]
        ceiling_us = read_ceiling(packed, best, co, k_tiles, dev)
        mb = co * 9 * c * 2 / 1e6
        bad = sum(1 for r in results if not r[2] < 3e-3)
        totals[0] += cudnn_us * per_step
        totals[1] += min(cudnn_us, best_us) * per_step
        shown = {k: v for k, v in best.items()}
        lines.append(f"| {(n, h, w, c, co)} | {per_step} | {mb:.1f} | {cudnn_us:.1f} | {cublas_us:.1f} | "
                     f"**{best_us:.1f}** | {kernel_us:.1f} | {mb / kernel_us:.2f} | {ceiling_us:.1f} | {shown} | "
                     f"{err:.1e}{' BAD ' + str(bad) if bad else ''} | {len(results)} |")
        print(lines[-1], f"({time.time() - start:.0f} s)", flush=True)
        for r in results[:6]:
            print("   ", f"{r[0]:.1f}", r[1], f"{r[2]:.1e}", flush=True)
        del ws, mats, results, operands, packed
        torch.cuda.empty_cache()
    lines.append(f"\nper step, weighted: cuDNN {totals[0]:.0f} µs, better of cuDNN and the best kernel per shape "
                 f"{totals[1]:.0f} µs")
    print("\n".join(lines), flush=True)
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "low_res_conv.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sweep(float(sys.argv[1]) if len(sys.argv) > 1 else 60)
