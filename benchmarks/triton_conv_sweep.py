"""The step's 3x3 convolutions (stride 1, padding 1, NHWC fp16, batch 2) as Triton implicit GEMMs,
timed against cuDNN: what a convolution kernel of our own would have to beat (issue 11).

Two kernels. "plain": one output tile of BH x BW pixels by BN channels per program, K walked
channel chunk by chunk, each chunk's nine taps read through L2 (tap-inner or tap-outer order, an
optional L1 cache hint). "halo": each chunk's input tile with its one-pixel border read once and
the nine taps' operands gathered from it with tl.gather, which would cut the input's L2 traffic
about ninefold. Weights rotate over enough copies to leave L2 (as in the step, where the layers
before evicted them); every launch of a CUDA graph reads the next copy. Each configuration is
checked against fp32 torch first.

    python3 benchmarks/triton_conv_sweep.py                 # on the GPU: the table (and $OUT/conv_l1.md)
    TRITON_INTERPRET=1 python3 benchmarks/triton_conv_sweep.py --interpret-check   # indexing, on a CPU
"""
import itertools, os, sys, time
import torch
import triton
import triton.language as tl


@triton.jit
def tile_origin(H, W, BH: tl.constexpr, BW: tl.constexpr):
    """(image, first row, first column) of this program's BH x BW pixel tile."""
    pid_m = tl.program_id(0)
    tiles_w = tl.cdiv(W, BW)
    tiles_hw = tl.cdiv(H, BH) * tiles_w
    rem = pid_m % tiles_hw
    return pid_m // tiles_hw, (rem // tiles_w) * BH, (rem % tiles_w) * BW


@triton.jit
def store_tile(acc, b_ptr, out_ptr, n, y, x, cols, H, W, CO):
    """acc plus the bias, fp16, into the NHWC output where the pixel is inside the image."""
    acc += tl.load(b_ptr + cols).to(tl.float32)[None, :]
    keep = (y < H) & (x < W)
    tl.store(out_ptr + (((n * H + y) * W + x) * CO)[:, None] + cols[None, :], acc.to(tl.float16), mask=keep[:, None])


@triton.jit
def conv3x3_kernel(x_ptr, w_ptr, b_ptr, out_ptr, H, W, C, CO, chunks: tl.constexpr,
                   BH: tl.constexpr, BW: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   TAP_INNER: tl.constexpr, CACHE: tl.constexpr):
    n, y0, x0 = tile_origin(H, W, BH, BW)
    i = tl.arange(0, BH * BW)
    y = y0 + i // BW
    x = x0 + i % BW
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    kk = tl.arange(0, BK)
    acc = tl.zeros((BH * BW, BN), dtype=tl.float32)
    for t in range(0, 9 * chunks):
        if TAP_INNER:
            tap = t % 9
            c0 = (t // 9) * BK
        else:
            tap = t // chunks
            c0 = (t % chunks) * BK
        yy = y + tap // 3 - 1
        xx = x + tap % 3 - 1
        ok = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        a = tl.load(x_ptr + (((n * H + yy) * W + xx) * C + c0)[:, None] + kk[None, :], mask=ok[:, None], other=0.0,
                    cache_modifier=CACHE)
        b = tl.load(w_ptr + (cols * (9 * C) + tap * C + c0)[None, :] + kk[:, None])
        acc = tl.dot(a, b, acc)
    store_tile(acc, b_ptr, out_ptr, n, y, x, cols, H, W, CO)


@triton.jit
def conv3x3_halo_kernel(x_ptr, w_ptr, b_ptr, out_ptr, H, W, C, CO, chunks: tl.constexpr,
                        BH: tl.constexpr, BW: tl.constexpr, HALO: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Each channel chunk's input tile with its one-pixel border (the halo) is read once; the nine
    taps' operands are gathered from it on the SM instead of nine reads through L2."""
    n, y0, x0 = tile_origin(H, W, BH, BW)
    r = tl.arange(0, HALO)
    iy = y0 - 1 + r // (BW + 2)
    ix = x0 - 1 + r % (BW + 2)
    hok = (r < (BH + 2) * (BW + 2)) & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    i = tl.arange(0, BH * BW)
    base = (i // BW) * (BW + 2) + i % BW
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    kk = tl.arange(0, BK)
    acc = tl.zeros((BH * BW, BN), dtype=tl.float32)
    for chunk in range(0, chunks):
        c0 = chunk * BK
        halo = tl.load(x_ptr + (((n * H + iy) * W + ix) * C + c0)[:, None] + kk[None, :], mask=hok[:, None], other=0.0)
        for tap in tl.static_range(9):
            idx = base + (tap // 3) * (BW + 2) + tap % 3
            a = tl.gather(halo, tl.broadcast_to(idx[:, None], (BH * BW, BK)), axis=0)
            b = tl.load(w_ptr + (cols * (9 * C) + tap * C + c0)[None, :] + kk[:, None])
            acc = tl.dot(a, b, acc)
    store_tile(acc, b_ptr, out_ptr, n, y0 + i // BW, x0 + i % BW, cols, H, W, CO)


def conv3x3_halo(x_nhwc, w_okkc, bias, cfg):
    n, h, w, c = x_nhwc.shape
    co = w_okkc.shape[0]
    _, bh, bw, bn, bk, stages, warps = cfg
    halo = triton.next_power_of_2((bh + 2) * (bw + 2))
    out = torch.empty((n, h, w, co), dtype=x_nhwc.dtype, device=x_nhwc.device)
    grid = (n * triton.cdiv(h, bh) * triton.cdiv(w, bw), co // bn)
    conv3x3_halo_kernel[grid](x_nhwc, w_okkc, bias, out, h, w, c, co, c // bk, BH=bh, BW=bw, HALO=halo, BN=bn, BK=bk,
                              num_stages=stages, num_warps=warps)
    return out


def run_conv(x_nhwc, w_okkc, bias, cfg):
    return (conv3x3_halo if cfg[0] == "halo" else conv3x3)(x_nhwc, w_okkc, bias, cfg)


def conv3x3(x_nhwc, w_okkc, bias, cfg):
    n, h, w, c = x_nhwc.shape
    co = w_okkc.shape[0]
    bh, bw, bn, bk, tap_inner, cache, stages, warps = cfg
    out = torch.empty((n, h, w, co), dtype=x_nhwc.dtype, device=x_nhwc.device)
    grid = (n * triton.cdiv(h, bh) * triton.cdiv(w, bw), co // bn)
    conv3x3_kernel[grid](x_nhwc, w_okkc, bias, out, h, w, c, co, c // bk, BH=bh, BW=bw, BN=bn, BK=bk, TAP_INNER=tap_inner,
                         CACHE=cache, num_stages=stages, num_warps=warps)
    return out


def check_interpreted():
    torch.manual_seed(0)
    for (n, h, w, c, co), cfg in [((2, 5, 7, 32, 32), (4, 4, 16, 16, True, "", 1, 4)),
                                  ((1, 8, 12, 32, 64), (8, 16, 32, 16, False, "", 1, 4)),
                                  ((2, 5, 7, 32, 32), ("halo", 4, 4, 16, 16, 1, 4)),
                                  ((1, 8, 12, 32, 64), ("halo", 8, 8, 32, 16, 1, 4))]:
        x = torch.randn(n, c, h, w)
        wt = torch.randn(co, c, 3, 3) / (3 * c ** 0.5)
        b = torch.randn(co)
        want = torch.nn.functional.conv2d(x, wt, b, padding=1)
        got = run_conv(x.permute(0, 2, 3, 1).contiguous().half(), wt.permute(0, 2, 3, 1).contiguous().half(),
                      b.half(), cfg).permute(0, 3, 1, 2).float()
        err = ((got - want).norm() / want.norm()).item()
        print("interpreted", (n, h, w, c, co), cfg, "rel err", err)
        assert err < 2e-3


SHAPES = {"32x48 320>320": (2, 32, 48, 320, 320), "32x48 640>320": (2, 32, 48, 640, 320),
          "16x24 640>640": (2, 16, 24, 640, 640), "8x12 1280>1280": (2, 8, 12, 1280, 1280)}
L2_BYTES = 50 << 20


def time_replays(fn_for, copies, reps=5):
    """median µs per call of fn_for(i) over a CUDA graph that calls it for i in range(copies)."""
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for i in range(copies):
            fn_for(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(copies):
            fn_for(i)
    g.replay(); torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(); g.replay(); g.replay(); e1.record(); torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) * 1000 / (2 * copies))
    return sorted(times)[len(times) // 2]


def check_problem(n, h, w, c, co, device):
    """A seeded fp32 convolution for the kernels' correctness checks: (bias, the fp32 result with the
    bias, the input as fp16 NHWC, the weight as the fp16 (out, 9 x in) matrix, tap-major)."""
    x = torch.randn(n, c, h, w, device=device)
    wt = torch.randn(co, c, 3, 3, device=device) / (3 * c ** 0.5)
    b = torch.randn(co, device=device)
    want = torch.nn.functional.conv2d(x, wt, b, padding=1)
    return (b, want, x.half().permute(0, 2, 3, 1).contiguous(),
            wt.half().permute(0, 2, 3, 1).reshape(co, 9 * c).contiguous())


def conv_problem(n, h, w, c, co, dev):
    """One 3x3 convolution shape's inputs (fp16 channels-last, seeded), its weights in enough copies to
    leave L2 between calls, the fp32 result, and cuDNN's µs a call: (x, weights, bias, want, cudnn_us)."""
    torch.manual_seed(0)
    x = torch.randn(n, c, h, w, device=dev, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    copies = max(4, min(64, 2 * L2_BYTES // (co * c * 9 * 2) + 1))
    ws = [(torch.randn(co, c, 3, 3, device=dev) / (3 * c ** 0.5)).half().contiguous(memory_format=torch.channels_last)
          for _ in range(copies)]
    b = torch.randn(co, device=dev, dtype=torch.float16)
    want = torch.nn.functional.conv2d(x.float(), ws[0].float(), b.float(), padding=1)
    return x, ws, b, want, time_replays(lambda i: torch.nn.functional.conv2d(x, ws[i], b, padding=1), copies)


def configs(h, w, co):
    out = [("halo", bh, bw, bn, bk, stages, warps) for (bh, bw), bn, bk, stages, warps in itertools.product(
        [(8, 16), (4, 16), (8, 8)], (64, 128), (32, 64), (2, 3), (4, 8)) if co % bn == 0]
    for (bh, bw), bn, bk, (tap_inner, cache), stages in itertools.product(
            [(4, 16)], (64,), (64,), ((False, ""),), (3, 4)):
        if co % bn:
            continue
        warps = 8 if bh * bw * bn >= 128 * 128 else 4
        out.append((bh, bw, bn, bk, tap_inner, cache, stages, warps))
    return out


def main():
    torch.backends.cudnn.benchmark = True
    dev = "cuda"
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
    lines = ["| shape | cuDNN µs | best Triton µs | config (BH, BW, BN, BK, tap-inner, cache, stages, warps) | "
             "best plain µs | best halo µs | rel err |", "|---|---|---|---|---|---|---|"]
    start = time.time()
    for name, (n, h, w, c, co) in SHAPES.items():
        x, ws, b, want, cudnn_us = conv_problem(n, h, w, c, co, dev)
        copies = len(ws)
        x_nhwc = x.permute(0, 2, 3, 1)  # a view: channels-last memory is NHWC
        wk = [wi.permute(0, 2, 3, 1) for wi in ws]  # (CO, 3, 3, C) views, contiguous in memory
        assert x_nhwc.is_contiguous() and wk[0].is_contiguous()
        results = []
        for cfg in configs(h, w, co):
            if time.time() - start > 500:
                break
            try:
                got = run_conv(x_nhwc, wk[0], b, cfg).permute(0, 3, 1, 2).float()
                err = ((got - want).norm() / want.norm()).item()
                us = time_replays(lambda i: run_conv(x_nhwc, wk[i], b, cfg), copies)
                results.append((us, cfg, err))
            except Exception as e:  # out of shared memory and the like: that config is not a candidate
                print(name, cfg, type(e).__name__, str(e)[:80])
        results.sort(key=lambda r: r[0])
        best = results[0]
        outer = min((r for r in results if r[1][0] != "halo"), key=lambda r: r[0])
        inner = min((r for r in results if r[1][0] == "halo"), key=lambda r: r[0])
        bad = [r for r in results if not r[2] < 3e-3]
        lines.append(f"| {name} | {cudnn_us:.1f} | {best[0]:.1f} | {best[1]} | {outer[0]:.1f} | {inner[0]:.1f} | "
                     f"{best[2]:.1e}{' BAD ' + str(len(bad)) if bad else ''} |")
        print(lines[-1], f"({len(results)} configs, {time.time() - start:.0f} s)", flush=True)
        for r in results[:5]:
            print("   ", f"{r[0]:.1f}", r[1], f"{r[2]:.1e}")
    print("\n".join(lines))
    out = os.environ.get("OUT")
    if out:
        open(os.path.join(out, "conv_l1.md"), "w").write("\n".join(lines) + "\n")


if __name__ == "__main__":
    if "--interpret-check" in sys.argv:
        check_interpreted()
    else:
        main()
