"""The step's 3x3 convolutions (stride 1, padding 1, NHWC fp16, batch 2) as Triton implicit GEMMs
whose operands come through TMA tensor descriptors (Hopper), timed against cuDNN (issue 11): the
input as a 4-D [N, H, W, C] descriptor read at each tap's shifted origin (the one-pixel border
comes back as the descriptor's zero fill), the weights as [CO, 9C]; optionally split along K, the
fp32 slices summed with the bias by torch afterwards (counted in the time). Every configuration is
checked against fp32 torch; weights rotate out of L2 as in triton_conv_sweep.py.

    python3 benchmarks/tma_conv_sweep.py [SECONDS]      # on a Hopper GPU: the table (and $OUT/tma_conv.md)
    TRITON_INTERPRET=1 python3 benchmarks/tma_conv_sweep.py --interpret-check   # indexing, on a CPU
"""
import itertools, os, sys, time
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor
from triton_conv_sweep import check_problem, conv_problem, time_replays


@triton.jit
def conv3x3_tma_kernel(x_desc, w_desc, b_ptr, o_desc, p_desc, H, W, C, N,
                       BNI: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                       SPLIT: tl.constexpr):
    pid_m = tl.program_id(0)
    tiles_w = tl.cdiv(W, BW)
    per_img = tl.cdiv(H, BH) * tiles_w
    n0 = (pid_m // per_img) * BNI
    rem = pid_m % per_img
    y0 = (rem // tiles_w) * BH
    x0 = (rem % tiles_w) * BW
    co0 = tl.program_id(1) * BN
    chunks = C // BK
    total = 9 * chunks
    per = tl.cdiv(total, SPLIT)
    start = tl.program_id(2) * per
    end = tl.minimum(start + per, total)
    acc = tl.zeros((BNI * BH * BW, BN), dtype=tl.float32)
    for t in range(start, end):
        tap = t // chunks
        c0 = (t - tap * chunks) * BK
        a = x_desc.load([n0, y0 + tap // 3 - 1, x0 + tap % 3 - 1, c0]).reshape(BNI * BH * BW, BK)
        b = w_desc.load([co0, tap * C + c0])
        acc = tl.dot(a, b.T, acc)
    if SPLIT == 1:
        acc += tl.load(b_ptr + co0 + tl.arange(0, BN)).to(tl.float32)[None, :]
        o_desc.store([n0, y0, x0, co0], acc.to(tl.float16).reshape(BNI, BH, BW, BN))
    else:
        p_desc.store([tl.program_id(2) * N + n0, y0, x0, co0], acc.reshape(BNI, BH, BW, BN))


def conv3x3_tma(x_nhwc, w_flat, bias, cfg, out=None, partials=None):
    """x_nhwc (N, H, W, C) with C innermost; w_flat (CO, 9C); cfg (BNI, BH, BW, BN, BK, SPLIT, stages, warps)."""
    n, h, w, c = x_nhwc.shape
    co = w_flat.shape[0]
    bni, bh, bw, bn, bk, split, stages, warps = cfg
    if out is None:
        out = torch.empty((n, h, w, co), dtype=x_nhwc.dtype, device=x_nhwc.device)
    x_desc = TensorDescriptor(x_nhwc, list(x_nhwc.shape), list(x_nhwc.stride()), [bni, bh, bw, bk])
    w_desc = TensorDescriptor.from_tensor(w_flat, [bn, bk])
    o_desc = TensorDescriptor.from_tensor(out, [bni, bh, bw, bn])
    if split > 1:
        if partials is None:
            partials = torch.empty((split * n, h, w, co), dtype=torch.float32, device=x_nhwc.device)
        p_desc = TensorDescriptor.from_tensor(partials, [bni, bh, bw, bn])
    else:
        p_desc = o_desc
    grid = (triton.cdiv(n, bni) * triton.cdiv(h, bh) * triton.cdiv(w, bw), co // bn, split)
    conv3x3_tma_kernel[grid](x_desc, w_desc, bias, o_desc, p_desc, h, w, c, n, BNI=bni, BH=bh, BW=bw, BN=bn, BK=bk,
                             SPLIT=split, num_stages=stages, num_warps=warps)
    if split > 1:
        torch.add(partials.view(split, n, h, w, co).sum(0), bias, out=out)  # stand-in for a fused epilogue
    return out


def check(device, shapes_cfgs):
    torch.manual_seed(0)
    for (n, h, w, c, co), cfg in shapes_cfgs:
        b, want, xh, wf = check_problem(n, h, w, c, co, device)
        got = conv3x3_tma(xh, wf, b.half(), cfg).permute(0, 3, 1, 2).float()
        err = ((got - want).norm() / want.norm()).item()
        print("check", (n, h, w, c, co), cfg, "rel err", f"{err:.2e}", flush=True)
        assert err < 3e-3, err


if __name__ == "__main__" and "--interpret-check" in sys.argv:
    check("cpu", [((2, 5, 7, 32, 32), (1, 4, 4, 16, 16, 1, 1, 4)),
                  ((2, 4, 6, 32, 32), (2, 4, 8, 16, 16, 3, 1, 4)),
                  ((1, 8, 12, 32, 64), (1, 8, 16, 32, 16, 1, 1, 4))])


# (N, H, W, C, CO): calls a step
SHAPES = {(2, 32, 48, 320, 320): 11, (2, 32, 48, 640, 320): 2, (2, 32, 48, 960, 320): 1,
          (2, 16, 24, 640, 640): 9, (2, 16, 24, 320, 640): 2, (2, 16, 24, 1280, 640): 1, (2, 16, 24, 960, 640): 1,
          (2, 16, 24, 1920, 640): 1,
          (2, 8, 12, 1280, 1280): 9, (2, 8, 12, 640, 1280): 2, (2, 8, 12, 2560, 1280): 2, (2, 8, 12, 1920, 1280): 1,
          (2, 4, 6, 1280, 1280): 19, (2, 4, 6, 2560, 1280): 3}


def geometries(h, w):
    if h >= 32:
        return [(1, 8, 16), (1, 4, 16), (1, 16, 16)]
    if h >= 16:
        return [(1, 16, 8), (1, 8, 8), (1, 8, 16)]
    if h >= 8:
        return [(1, 8, 16), (1, 8, 8), (2, 8, 8)]
    return [(2, 4, 8)]


def splits(h, c):
    if h >= 32:
        return (1,)
    if h >= 16:
        return (1, 2, 3)
    if h >= 8:
        return (1, 2, 4, 6)
    return (4, 8, 12, 18)


def configs(n, h, w, c, co):
    out = []
    for (bni, bh, bw), bn, split, stages in itertools.product(
            geometries(h, w), (64, 128, 256), splits(h, c), (3, 4) if h >= 32 else (4,)):
        m = bni * bh * bw
        if co % bn or m * bn > 256 * 128 or (bn == 256 and m > 64):
            continue
        warps = 4 if m * bn <= 128 * 64 else 8
        out.append((bni, bh, bw, bn, 64, split, stages, warps))
    return out


def sweep(limit_s):
    torch.backends.cudnn.benchmark = True
    dev = "cuda"
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
    check(dev, [((2, 4, 6, 128, 128), (2, 4, 8, 64, 64, 4, 3, 4)), ((2, 8, 12, 128, 128), (1, 8, 16, 64, 64, 1, 3, 4)),
                ((2, 32, 48, 128, 128), (1, 8, 16, 128, 64, 1, 3, 8))])
    lines = ["| shape (N, H, W, C, CO) | a step | cuDNN µs | best TMA µs | config (BNI, BH, BW, BN, BK, split, stages, warps) | rel err | configs |",
             "|---|---|---|---|---|---|---|"]
    start = time.time()
    tot_cudnn = tot_best = 0.0
    for (n, h, w, c, co), per_step in SHAPES.items():
        x, ws, b, want, cudnn_us = conv_problem(n, h, w, c, co, dev)
        copies = len(ws)
        x_nhwc = x.permute(0, 2, 3, 1)
        wf = [wi.permute(0, 2, 3, 1).reshape(co, 9 * c) for wi in ws]
        assert x_nhwc.is_contiguous() and wf[0].is_contiguous()
        out = torch.empty((n, h, w, co), dtype=torch.float16, device=dev)
        results = []
        for cfg in configs(n, h, w, c, co):
            if time.time() - start > limit_s:
                print("time limit", flush=True)
                break
            try:
                partials = torch.empty((cfg[5] * n, h, w, co), dtype=torch.float32, device=dev) if cfg[5] > 1 else None
                got = conv3x3_tma(x_nhwc, wf[0], b, cfg, out, partials).permute(0, 3, 1, 2).float()
                err = ((got - want).norm() / want.norm()).item()
                us = time_replays(lambda i: conv3x3_tma(x_nhwc, wf[i], b, cfg, out, partials), copies)
                results.append((us, cfg, err))
            except Exception as e:
                print((n, h, w, c, co), cfg, type(e).__name__, str(e)[:120], flush=True)
        if not results:
            continue
        results.sort(key=lambda r: r[0])
        best = results[0]
        bad = [r for r in results if not r[2] < 3e-3]
        tot_cudnn += cudnn_us * per_step
        tot_best += min(cudnn_us, best[0]) * per_step
        lines.append(f"| {(n, h, w, c, co)} | {per_step} | {cudnn_us:.1f} | {best[0]:.1f} | {best[1]} | "
                     f"{best[2]:.1e}{' BAD ' + str(len(bad)) if bad else ''} | {len(results)} |")
        print(lines[-1], f"({time.time() - start:.0f} s)", flush=True)
        for r in results[:4]:
            print("   ", f"{r[0]:.1f}", r[1], f"{r[2]:.1e}", flush=True)
    lines.append(f"\nper step, weighted: cuDNN {tot_cudnn:.0f} µs, better of the two per shape {tot_best:.0f} µs")
    print("\n".join(lines), flush=True)
    out_dir = os.environ.get("OUT")
    if out_dir:
        open(os.path.join(out_dir, "tma_conv.md"), "w").write("\n".join(lines) + "\n")


if __name__ == "__main__" and "--interpret-check" not in sys.argv:
    sweep(float(sys.argv[1]) if len(sys.argv) > 1 else 300)
