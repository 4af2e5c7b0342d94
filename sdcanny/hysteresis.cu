// Canny's hysteresis on one image as bit masks, in one block: the edges are the candidates
// (pixels that passed non-maximum suppression and the low threshold) 8-connected, through
// candidates, to a strong one (above the high threshold). Every pass sets each word of the edge
// mask to its candidates AND the 3x3 dilation of the edges around it; the block repeats passes
// until one changes nothing (__syncthreads_or), so the result is the fixed point whatever the
// longest chain: exact, and one launch a CUDA graph can hold.
//
// Masks: rows x words 32-bit words, bit i of word j is column 32 j + i (columns past the image's
// width are 0 in the candidates, so nothing grows into them). Passes update the edge mask in place:
// a word may read a neighbour from this pass or the last, and either is within the fixed point
// (the edges only grow), so the passes still end there, and a pass that changes nothing read
// final values only. Shared memory: the candidates and the edges, 8 bytes a word.
//
// Compiled at run time by NVRTC (sdcanny/cuda_kernels.py); no CUDA headers, nothing
// architecture-specific.

extern "C" __global__ void __launch_bounds__(1024) hysteresis(const unsigned* __restrict__ candidates,
                                                             const unsigned* __restrict__ strong,
                                                             unsigned* __restrict__ edges, int rows, int words) {
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
    for (;;) {
        int changed = 0;
        for (int i = threadIdx.x; i < total; i += blockDim.x) {
            const int r = i / words, j = i % words;
            const unsigned mid = column(r, j), left = column(r, j - 1), right = column(r, j + 1);
            const unsigned grown = mid | (mid << 1) | (left >> 31) | (mid >> 1) | (right << 31);
            const unsigned next = cand[i] & grown;
            if (next != edge[i]) {
                edge[i] = next;
                changed = 1;
            }
        }
        if (!__syncthreads_or(changed)) break;
    }
    for (int i = threadIdx.x; i < total; i += blockDim.x) edges[i] = edge[i];
}
