"""OpenCV's Canny edges (`cv2.Canny(image, low, high)`: 3x3 Sobel, L1 gradient, a colour image as
OpenCV takes one) computed from tensors, bit for bit, so that the canny map can be made on the GPU
instead of the host (where the GPU waits for it).

As OpenCV's canny.cpp computes them: the Sobel derivatives in integers with replicated borders;
each pixel's L1 magnitude |dx| + |dy| of the first channel with the largest one, and that channel's
dx, dy; non-maximum suppression by the integer tangent test (tan 22.5 degrees in Q15) against the
two neighbours across the gradient (magnitudes 0 outside the image; the first neighbour compared
strictly, the second not, but both strictly on diagonals); candidates above the low threshold,
strong ones above the high (thresholds swapped if low > high, each floored). Then hysteresis: the
candidates 8-connected through candidates to a strong one. `candidates` is tensor operations
(TorchInductor fuses them); the hysteresis is `hysteresis_steps` (tensor operations, repeated
dilation until nothing changes: the CPU's path and the tests' oracle) or, on a GPU, one CUDA kernel
of one block that iterates on bit masks (sdcanny/hysteresis.cu), launched from Python (the fast
back-end runs these operations eagerly inside its captured hint part, not through torch.compile).
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import math

import torch
import torch.nn.functional as F

from . import cuda_kernels

TG22 = int(math.tan(math.pi / 8) * (1 << 15) + 0.5)  # OpenCV's CANNY_SHIFT 15
SOURCE, ENTRY = "hysteresis.cu", "hysteresis"
THREADS = 1024
MAX_SHARED = 48 * 1024  # the kernel's masks (8 bytes a word) within the default shared memory


def thresholds(low: float, high: float) -> tuple[int, int]:
    """(low, high) as cv2.Canny uses them: ordered, then floored."""
    low, high = min(low, high), max(low, high)
    return math.floor(low), math.floor(high)


def _replicated(x: torch.Tensor) -> torch.Tensor:
    """(C, H, W) -> (C, H + 2, W + 2), the border pixels repeated (cv2.BORDER_REPLICATE)."""
    h, w = x.shape[-2:]
    rows = torch.arange(-1, h + 1, device=x.device).clamp(0, h - 1)
    cols = torch.arange(-1, w + 1, device=x.device).clamp(0, w - 1)
    return x[:, rows][:, :, cols]


def candidates(image: torch.Tensor, low, high) -> tuple[torch.Tensor, torch.Tensor]:
    """(candidates, strong), bool (H, W), of a uint8 (H, W, C) image for integer thresholds as
    `thresholds` gives them (ints, or integer tensors of one value: a CUDA graph then reads them):
    the pixels that pass non-maximum suppression and the low threshold, and those of them above the
    high one."""
    x = _replicated(image.permute(2, 0, 1).to(torch.int32))
    across = x[:, :, 2:] - x[:, :, :-2]
    dx = across[:, :-2] + 2 * across[:, 1:-1] + across[:, 2:]
    down = x[:, 2:] - x[:, :-2]
    dy = down[:, :, :-2] + 2 * down[:, :, 1:-1] + down[:, :, 2:]
    norm = dx.abs() + dy.abs()
    pick = norm.argmax(dim=0, keepdim=True)  # the first channel of the largest magnitude, as OpenCV
    m, sx, sy = (t.gather(0, pick)[0] for t in (norm, dx, dy))
    p = F.pad(m, (1, 1, 1, 1))  # magnitudes are 0 outside the image
    ax, ay = sx.abs(), sy.abs() << 15
    tg22x = ax * TG22
    tg67x = tg22x + (ax << 16)  # |dx| tan(67.5 degrees) in Q15: tan 22.5 + 2
    same_signs = (sx ^ sy) >= 0
    diagonal = torch.where(same_signs, (m > p[:-2, :-2]) & (m > p[2:, 2:]), (m > p[:-2, 2:]) & (m > p[2:, :-2]))
    vertical = (m > p[:-2, 1:-1]) & (m >= p[2:, 1:-1])
    horizontal = (m > p[1:-1, :-2]) & (m >= p[1:-1, 2:])
    peak = torch.where(ay < tg22x, horizontal, torch.where(ay > tg67x, vertical, diagonal))
    cand = peak & (m > low)
    return cand, cand & (m > high)


def _grow(edges: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    return cand & (F.max_pool2d(edges[None, None].float(), 3, 1, 1)[0, 0] > 0)


def hysteresis_steps(cand: torch.Tensor, strong: torch.Tensor) -> torch.Tensor:
    """The candidates 8-connected through candidates to a strong one, bool (H, W): dilation steps
    until one changes nothing (a host check each step)."""
    edges = strong & cand
    while True:
        grown = _grow(edges, cand)
        if torch.equal(grown, edges):
            return edges
        edges = grown


def pack_rows(mask: torch.Tensor) -> torch.Tensor:
    """bool (H, W) -> int32 (H, ceil(W / 32)): bit i of word j is column 32 j + i (columns past W 0)."""
    h, w = mask.shape
    words = -(-w // 32)
    bits = F.pad(mask.to(torch.int64), (0, 32 * words - w)).reshape(h, words, 32)
    values = (bits << torch.arange(32, device=mask.device)).sum(dim=-1)
    return torch.where(values >= 2 ** 31, values - 2 ** 32, values).to(torch.int32)


def unpack_rows(words: torch.Tensor, width: int) -> torch.Tensor:
    """pack_rows' inverse: int32 (H, words) -> bool (H, width)."""
    h = words.shape[0]
    bits = (words.to(torch.int64)[:, :, None] >> torch.arange(32, device=words.device)) & 1
    return bits.reshape(h, -1)[:, :width].bool()


def kernel_fits(height: int, width: int) -> bool:
    """Whether the hysteresis kernel's masks for an image of this size fit its shared memory."""
    return 8 * height * -(-width // 32) <= MAX_SHARED


@functools.lru_cache(maxsize=None)
def _kernel(capability: tuple[int, int]) -> cuda_kernels.Kernel:
    return cuda_kernels.load_kernel(SOURCE, ENTRY, (), capability, THREADS, MAX_SHARED)


def unavailable_reason(device: torch.device) -> str | None:
    """None where the hysteresis kernel runs on `device` (a CUDA GPU and an NVRTC library),
    else why not in one line. Compiles and loads it, so that no call compiles it inside a capture."""
    if device.type != "cuda":
        return f"the canny map's kernel needs a CUDA device, not {device.type}"
    try:
        with torch.cuda.device(device):
            _kernel(tuple(torch.cuda.get_device_capability(device)))
    except cuda_kernels.CudaKernelError as e:
        return f"the canny map's kernel is not available ({str(e).splitlines()[0]}): the canny map stays on the host"
    return None


def hysteresis_kernel(cand_words: torch.Tensor, strong_words: torch.Tensor) -> torch.Tensor:
    """The edges' words (int32, pack_rows' layout) from the candidates' and the strong pixels' words,
    by sdcanny/hysteresis.cu on their GPU (one block, the whole image in its shared memory)."""
    rows, words = cand_words.shape
    if 8 * rows * words > MAX_SHARED:
        raise ValueError(f"{rows} x {words} words of masks exceed the kernel's {MAX_SHARED} bytes of shared memory")
    cand_words, strong_words = cand_words.contiguous(), strong_words.contiguous()
    edges = torch.empty_like(cand_words)
    args = [ctypes.c_void_p(cand_words.data_ptr()), ctypes.c_void_p(strong_words.data_ptr()),
            ctypes.c_void_p(edges.data_ptr()), ctypes.c_int(rows), ctypes.c_int(words)]
    with torch.cuda.device(cand_words.device):
        kernel = _kernel(tuple(torch.cuda.get_device_capability(cand_words.device)))
        dataclasses.replace(kernel, shared_bytes=8 * rows * words).launch((1, 1, 1), args)
    return edges


def canny(image: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """cv2.Canny(image, low, high) of a uint8 (H, W, C) tensor: uint8 (H, W), 0 or 255, on the
    image's device; the hysteresis through the kernel where the image is on a GPU and fits it."""
    return canny_with(image, *thresholds(low, high))


def canny_with(image: torch.Tensor, low, high) -> torch.Tensor:
    """canny for thresholds as `thresholds` gives them (ints, or integer tensors of one value)."""
    cand, strong = candidates(image, low, high)
    h, w = cand.shape
    if image.is_cuda and kernel_fits(h, w):
        edges = unpack_rows(hysteresis_kernel(pack_rows(cand), pack_rows(strong)), w)
    else:
        edges = hysteresis_steps(cand, strong)
    return edges.to(torch.uint8) * 255
