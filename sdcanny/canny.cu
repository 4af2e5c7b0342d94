// cv2.Canny(image, low, high) of a uint8 (rows, cols, channels) image (3x3 Sobel, L1 gradient), bit
// for bit, as two kernels: sdcanny/gpu_canny.py says what OpenCV computes and holds these kernels
// to its tensor form. No CUDA headers and nothing architecture-specific: NVRTC compiles this at run
// time (sdcanny/cuda_kernels.py) for any CUDA GPU.
//
// Masks are rows x words 32-bit words, bit i of word j column 32 j + i; bits past the image's width
// are 0.

#define CHANNELS 3     // the work image is HWC3's
#define TILE_ROWS 8   // canny_candidates: a block is 8 warps, a warp is one row's 32-column word
#define TILE_COLS 32
#define TG22 13573    // tan(22.5 degrees) in Q15, OpenCV's CANNY_SHIFT

// The candidates (pixels past non-maximum suppression and above the low threshold) and the strong
// ones among them (above the high threshold), one word a warp by __ballot_sync. The block reads its
// 8 x 32 pixels with a border of two (replicated past the image's edges, as OpenCV's Sobel), makes
// the L1 magnitude of the border of one around them (0 outside the image, as OpenCV pads it), and
// keeps the derivatives of the channel with the largest magnitude (the first of equals).
// thresholds: int32 (low, high), ordered and floored as gpu_canny.thresholds gives them.
extern "C" __global__ void __launch_bounds__(TILE_ROWS * TILE_COLS) canny_candidates(
        const unsigned char* __restrict__ image, const int* __restrict__ thresholds,
        unsigned* __restrict__ candidates, unsigned* __restrict__ strong, int rows, int cols, int words) {
    __shared__ unsigned char pixel[TILE_ROWS + 4][TILE_COLS + 4][CHANNELS];
    __shared__ int magnitude[TILE_ROWS + 2][TILE_COLS + 2];
    __shared__ int gradient[TILE_ROWS][TILE_COLS][2];
    const int row0 = blockIdx.y * TILE_ROWS, col0 = blockIdx.x * TILE_COLS;
    for (int i = threadIdx.x; i < (TILE_ROWS + 4) * (TILE_COLS + 4); i += blockDim.x) {
        const int ty = i / (TILE_COLS + 4), tx = i % (TILE_COLS + 4);
        const int r = min(max(row0 + ty - 2, 0), rows - 1), c = min(max(col0 + tx - 2, 0), cols - 1);
        for (int ch = 0; ch < CHANNELS; ++ch) pixel[ty][tx][ch] = image[(r * cols + c) * CHANNELS + ch];
    }
    __syncthreads();
    // magnitude[ty][tx] is the pixel (row0 + ty - 1, col0 + tx - 1), centred on pixel[ty + 1][tx + 1]
    for (int i = threadIdx.x; i < (TILE_ROWS + 2) * (TILE_COLS + 2); i += blockDim.x) {
        const int ty = i / (TILE_COLS + 2), tx = i % (TILE_COLS + 2);
        const int r = row0 + ty - 1, c = col0 + tx - 1;
        int best = 0, best_dx = 0, best_dy = 0;
        if (r >= 0 && r < rows && c >= 0 && c < cols) {
            for (int ch = 0; ch < CHANNELS; ++ch) {
                const int dx = (pixel[ty][tx + 2][ch] - pixel[ty][tx][ch])
                             + 2 * (pixel[ty + 1][tx + 2][ch] - pixel[ty + 1][tx][ch])
                             + (pixel[ty + 2][tx + 2][ch] - pixel[ty + 2][tx][ch]);
                const int dy = (pixel[ty + 2][tx][ch] - pixel[ty][tx][ch])
                             + 2 * (pixel[ty + 2][tx + 1][ch] - pixel[ty][tx + 1][ch])
                             + (pixel[ty + 2][tx + 2][ch] - pixel[ty][tx + 2][ch]);
                const int norm = abs(dx) + abs(dy);
                if (ch == 0 || norm > best) {
                    best = norm;
                    best_dx = dx;
                    best_dy = dy;
                }
            }
        }
        magnitude[ty][tx] = best;
        if (ty >= 1 && ty <= TILE_ROWS && tx >= 1 && tx <= TILE_COLS) {
            gradient[ty - 1][tx - 1][0] = best_dx;
            gradient[ty - 1][tx - 1][1] = best_dy;
        }
    }
    __syncthreads();
    const int y = threadIdx.x / TILE_COLS, x = threadIdx.x % TILE_COLS;  // a warp a row
    const int r = row0 + y, c = col0 + x;
    const int m = magnitude[y + 1][x + 1], sx = gradient[y][x][0], sy = gradient[y][x][1];
    const int ax = abs(sx), ay = abs(sy) << 15;
    const int tg22x = ax * TG22, tg67x = tg22x + (ax << 16);
    bool peak;
    if (ay < tg22x) {  // across the row: left strictly, right not
        peak = m > magnitude[y + 1][x] && m >= magnitude[y + 1][x + 2];
    } else if (ay > tg67x) {  // down the column: above strictly, below not
        peak = m > magnitude[y][x + 1] && m >= magnitude[y + 2][x + 1];
    } else if ((sx ^ sy) >= 0) {  // the diagonal the gradient runs along, both strictly
        peak = m > magnitude[y][x] && m > magnitude[y + 2][x + 2];
    } else {
        peak = m > magnitude[y][x + 2] && m > magnitude[y + 2][x];
    }
    const bool candidate = r < rows && c < cols && peak && m > thresholds[0];
    const unsigned candidate_word = __ballot_sync(0xffffffffu, candidate);
    const unsigned strong_word = __ballot_sync(0xffffffffu, candidate && m > thresholds[1]);
    if (x == 0 && r < rows) {
        candidates[r * words + blockIdx.x] = candidate_word;
        strong[r * words + blockIdx.x] = strong_word;
    }
}

// The bits of `mask` joined to `seeds` (a subset of it) through set bits of `mask` inside the word,
// both ways along the row (prefix doubling, five steps a way).
__device__ unsigned fill_runs(unsigned seeds, unsigned mask) {
    unsigned up = seeds, up_mask = mask, down = seeds, down_mask = mask;
    for (int d = 1; d < 32; d <<= 1) {
        up |= up_mask & (up << d);
        up_mask &= up_mask << d;
        down |= down_mask & (down >> d);
        down_mask &= down_mask >> d;
    }
    return up | down;
}

// Hysteresis in one block: the edges are the candidates 8-connected, through candidates, to a
// strong one. Updating a word sets it to its candidates AND the 3x3 dilation of the edges around
// it, then fills the word's runs of candidates from those bits. A thread owns a band of BAND rows
// of one word column and updates it down the band and back up, each row reading the one just
// updated, so one pass carries a chain along a word's runs and across its band; passes repeat until
// one changes nothing (__syncthreads_or), so the result is the fixed point whatever the chains:
// exact, and one launch a CUDA graph can hold. Words are updated in place, so a word may read a
// neighbour from this pass or the last, both within the fixed point (edges only grow): the passes
// still end there, and a pass that changes nothing read final values only. Shared memory: the
// candidates and the edges, 8 bytes a word. Writes the map (0 or 255) into `samples` consecutive
// rows x cols images.
#define BAND 16

extern "C" __global__ void __launch_bounds__(1024) canny_hysteresis(
        const unsigned* __restrict__ candidates, const unsigned* __restrict__ strong,
        unsigned char* __restrict__ out, int rows, int cols, int words, int samples) {
    extern __shared__ unsigned shared[];
    const int total = rows * words;
    unsigned* cand = shared;
    unsigned* edge = shared + total;
    for (int i = threadIdx.x; i < total; i += blockDim.x) {
        cand[i] = candidates[i];
        edge[i] = strong[i] & candidates[i];
    }
    __syncthreads();
    // the OR of rows r - 1, r, r + 1 of the edge mask at word j (0 outside the mask)
    auto column = [&](int r, int j) -> unsigned {
        if (j < 0 || j >= words) return 0u;
        unsigned v = edge[r * words + j];
        if (r > 0) v |= edge[(r - 1) * words + j];
        if (r + 1 < rows) v |= edge[(r + 1) * words + j];
        return v;
    };
    // whether the word changed
    auto update = [&](int r, int j) -> bool {
        const int i = r * words + j;
        const unsigned c = cand[i];
        if (c == edge[i]) return false;  // every candidate an edge already (or none at all)
        const unsigned mid = column(r, j), left = column(r, j - 1), right = column(r, j + 1);
        const unsigned grown = mid | (mid << 1) | (left >> 31) | (mid >> 1) | (right << 31);
        const unsigned next = fill_runs(c & grown, c);
        if (next == edge[i]) return false;
        edge[i] = next;
        return true;
    };
    const int bands = (rows + BAND - 1) / BAND;
    for (;;) {
        int changed = 0;
        for (int task = threadIdx.x; task < bands * words; task += blockDim.x) {
            const int j = task % words, first = (task / words) * BAND, last = min(first + BAND, rows) - 1;
            for (int r = first; r <= last; ++r) changed |= update(r, j);
            for (int r = last - 1; r >= first; --r) changed |= update(r, j);
        }
        if (!__syncthreads_or(changed)) break;
    }
    // the map, a word's 32 pixels by one thread: four at a time where rows are whole aligned 4-byte words
    const int pixels = rows * cols;
    for (int i = threadIdx.x; i < total; i += blockDim.x) {
        const int r = i / words, c0 = (i % words) * 32, n = min(32, cols - c0);
        const unsigned bits = edge[i];
        for (int s = 0; s < samples; ++s) {
            unsigned char* row = out + s * pixels + r * cols + c0;
            if ((cols & 3) == 0 && (reinterpret_cast<unsigned long long>(out) & 3) == 0) {
                for (int k = 0; k < n; k += 4) {
                    const unsigned quad = (bits >> k) & 15u;  // bit b -> byte b
                    const unsigned spread = (quad & 1u) | (quad & 2u) << 7 | (quad & 4u) << 14 | (quad & 8u) << 21;
                    *reinterpret_cast<unsigned*>(row + k) = spread * 255u;
                }
            } else {
                for (int k = 0; k < n; ++k) row[k] = (bits >> k) & 1u ? 255 : 0;
            }
        }
    }
}
