// 3x3 convolution, stride 1, padding 1, channels-last fp16, on Hopper's warpgroup tensor-core
// instructions (wgmma, sm_90a), as an implicit matrix product: output pixels x output channels,
// summed over (tap, input channel).
//
// A block owns a tile of TH image rows x 8 columns of one image (64 pixels a warpgroup) and 64
// output channels. The input channels stream through shared memory CHUNK at a time, STAGES chunks
// in flight. A stage holds the tile's input with its one-pixel border ("halo", zeros outside the
// image) once, and the nine taps' weights; each tap's operand is the halo read at the tap's offset,
// so a tile reads its input once instead of nine times. The halo comes by cp.async, 16 bytes a
// thread; the weights, laid out on the host as the stages hold them, by one bulk copy a stage whose
// arrival an mbarrier counts (with cp.async for them too, the loads alone took longer than cuDNN's
// whole convolution: docs/benchmarks.md). A chunk's products still run while the next chunk's are
// issued, so a stage is loaded STAGES - 2 chunks ahead.
//
// Both operands use the canonical no-swizzle layout of 8 x 8 core matrices (128 contiguous bytes,
// one row's 8 channels after another):
//   halo    [channel group][halo row][halo column][8 channels]: a core matrix is 8 neighbouring
//           pixels of one image row, so the next 8 output pixels (next image row) are HW * 16
//           bytes on and the next 8 channels HH * HW * 16 bytes on, whatever the tap;
//   weights [tap][channel group][output channel][8 channels].
//
// Compiled at run time by NVRTC for sm_90a (sdcanny/cuda_kernels.py); no CUDA headers. Macros:
// TH (a multiple of 8), CHUNK (a multiple of 16), STAGES (3 or more).

#define BN 64
#define TW 8
#define HH (TH + 2)
#define HW (TW + 2)
#define WGS (TH / 8)
#define THREADS (128 * WGS)
#define GROUPS (CHUNK / 8)
#define KSTEPS (CHUNK / 16)
#define HALO_BYTES (GROUPS * HH * HW * 16)
#define TAP_BYTES (GROUPS * BN * 16)
#define STAGE_BYTES (HALO_BYTES + 9 * TAP_BYTES)
#define AHEAD (STAGES - 2)

typedef unsigned short half_bits;

__device__ __forceinline__ unsigned shared_address(const void* p) {
    unsigned long long a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (unsigned)a;
}

// 16 bytes into shared memory; zeros where `valid` is false (the source is not read then).
__device__ __forceinline__ void copy16_async(unsigned dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ unsigned long long descriptor(unsigned address, unsigned leading, unsigned stride) {
    return (unsigned long long)((address & 0x3FFFF) >> 4) | ((unsigned long long)(leading >> 4) << 16) |
           ((unsigned long long)(stride >> 4) << 32);  // no swizzle, base offset 0
}

template <int N>
__device__ __forceinline__ void keep(float (&r)[N]) {  // the compiler may not move reads or writes across
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

__device__ __forceinline__ unsigned pack_halves(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ unsigned add_half_pairs(unsigned a, unsigned b) {  // rounded to fp16, as torch adds fp16
    unsigned r;
    asm("add.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}

__device__ __forceinline__ float half_to_float(half_bits h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ void mma(float (&d)[32], unsigned long long a, unsigned long long b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(a), "l"(b), "r"(1));
}

// out[n, y, x, o] = bias[o] (where bias is not null) + sum over (dy, dx, c) of
// input[n, y + dy - 1, x + dx - 1, c] * weight[o, dy, dx, c], rounded to fp16, then plus
// residual[n, y, x, o] in fp16 where residual is not null (a ResBlock's skip: the sum torch makes
// after the convolution). input: [N, H, W, C] with channel stride 1 (strides in elements); laid_out:
// the weights as [O / 64][C / CHUNK][tap][channel group][64][8]; out and residual: [N, H, W, O] with
// channel stride 1. Grid: (N * H / TH * W / 8, O / 64). Needs H % TH == 0, W % 8 == 0,
// C % CHUNK == 0, O % 64 == 0.
extern "C" __global__ void __launch_bounds__(THREADS) conv3x3_sm90(
    const half_bits* __restrict__ input, const half_bits* __restrict__ laid_out, const half_bits* __restrict__ bias,
    half_bits* __restrict__ out, int height, int width, int channels, long long si_n, long long si_h, long long si_w,
    long long so_n, long long so_h, long long so_w, const half_bits* __restrict__ residual, long long sr_n,
    long long sr_h, long long sr_w) {
    extern __shared__ __align__(128) unsigned char shared[];  // [STAGES][halo, 9 taps' weights], then a barrier a stage
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wg = threadIdx.x >> 7;
    const int tiles_x = width / TW, tiles_y = height / TH;
    const int tx = blockIdx.x % tiles_x, ty = blockIdx.x / tiles_x % tiles_y, n = blockIdx.x / (tiles_x * tiles_y);
    const int y0 = ty * TH, x0 = tx * TW, o0 = blockIdx.y * BN;
    const unsigned shared_base = shared_address(shared);
    const int chunks = channels / CHUNK;
    const half_bits* image = input + n * si_n;
    auto stage_of = [&](int chunk) { return shared_base + (chunk % STAGES) * STAGE_BYTES; };

    const unsigned barriers = shared_base + STAGES * STAGE_BYTES;
    if (threadIdx.x == 0)
        for (int i = 0; i < STAGES; ++i) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(barriers + 8 * i));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    __syncthreads();
    const half_bits* weights = laid_out + (long long)blockIdx.y * chunks * (9 * CHUNK * BN);
    auto load_weights = [&](int chunk) {  // by one thread: the stage's barrier expects the bytes, one bulk copy brings them
        if (threadIdx.x != 0) return;
        const unsigned bar = barriers + 8 * (chunk % STAGES), bytes = 9 * TAP_BYTES;
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     ::"r"(stage_of(chunk) + HALO_BYTES), "l"(weights + (long long)chunk * (9 * CHUNK * BN)), "r"(bytes),
                     "r"(bar) : "memory");
    };
    auto wait_weights = [&](int chunk) {  // the barrier's phase flips once a use: uses 0, 1, 2 ... of a stage
        const unsigned bar = barriers + 8 * (chunk % STAGES), parity = (chunk / STAGES) & 1;
        unsigned done = 0;
        while (!done)
            asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                         : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    };
    // Consecutive threads copy one pixel's CHUNK channels (contiguous in memory), then the next pixel's.
    auto load_halo = [&](int chunk) {
        const unsigned halo = stage_of(chunk);
        for (int i = threadIdx.x; i < GROUPS * HH * HW; i += THREADS) {
            const int group = i % GROUPS, pixel = i / GROUPS, hx = pixel % HW, hy = pixel / HW;
            const int y = y0 + hy - 1, x = x0 + hx - 1;
            const bool inside = y >= 0 && y < height && x >= 0 && x < width;
            const half_bits* src = inside ? image + y * si_h + x * si_w + chunk * CHUNK + group * 8 : image;
            copy16_async(halo + (group * HH * HW + pixel) * 16, src, inside);
        }
    };

#pragma unroll
    for (int c = 0; c < AHEAD; ++c) {
        if (c < chunks) {
            load_weights(c);
            load_halo(c);
        }
        asm volatile("cp.async.commit_group;");  // group c: chunk c's halo
    }

    float acc[32];  // 64 rows x 64 columns over the warpgroup's 128 threads
#pragma unroll
    for (int i = 0; i < 32; ++i) acc[i] = 0.f;
    for (int c = 0; c < chunks; ++c) {
        asm volatile("cp.async.wait_group %0;" ::"n"(AHEAD - 1));  // chunk c's halo is in (this thread's part)
        wait_weights(c);
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // the copies seen by the tensor cores
        __syncthreads();  // ... everyone's part; and every warpgroup is done with chunk c - 2, whose stage is loaded next
        const int next = c + AHEAD;
        if (next < chunks) {
            load_weights(next);
            load_halo(next);
        }
        asm volatile("cp.async.commit_group;");
        const unsigned halo = stage_of(c) + wg * 8 * HW * 16, taps = stage_of(c) + HALO_BYTES;
        keep(acc);
        asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
        for (int tap = 0; tap < 9; ++tap)
#pragma unroll
            for (int k = 0; k < KSTEPS; ++k)
                mma(acc, descriptor(halo + ((2 * k * HH + tap / 3) * HW + tap % 3) * 16, HH * HW * 16, HW * 16),
                    descriptor(taps + tap * TAP_BYTES + 2 * k * BN * 16, BN * 16, 128));
        asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");  // chunk c - 1's products are done
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    keep(acc);

    // Accumulator layout: warp w of the warpgroup holds rows 16 (w % 4) + g and + 8, columns 8 j + 2 t, + 1.
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int m = (warp & 3) * 16 + g + 8 * half;  // the warpgroup's pixel: image row m / 8, column m % 8
        const int y = y0 + wg * 8 + m / 8, x = x0 + m % 8;
        half_bits* dst = out + n * so_n + y * so_h + x * so_w + o0;
        const half_bits* skip = residual ? residual + n * sr_n + y * sr_h + x * sr_w + o0 : nullptr;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
            const int o = 8 * j + 2 * t;
            float v0 = acc[4 * j + 2 * half], v1 = acc[4 * j + 2 * half + 1];
            if (bias) {
                v0 += half_to_float(bias[o0 + o]);
                v1 += half_to_float(bias[o0 + o + 1]);
            }
            unsigned pair = pack_halves(v0, v1);
            if (skip) pair = add_half_pairs(pair, *(const unsigned*)(skip + o));
            *(unsigned*)(dst + o) = pair;
        }
    }
}
