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
and `hysteresis_steps` (repeated dilation until nothing changes) are the tensor form: OpenCV's
algorithm written to be read, the CPU's path and what the tests hold the kernels to. On a GPU two
CUDA kernels of our own (sdcanny/canny.cu) make the map: the candidates as bit masks, then the
hysteresis in one block iterating on them in shared memory, writing the map; the fast back-end
launches them inside its captured hint part.
"""
from __future__ import annotations

import ctypes
import dataclasses
import math

import torch
import torch.nn.functional as F

from . import cuda_kernels

TG22 = int(math.tan(math.pi / 8) * (1 << 15) + 0.5)  # OpenCV's CANNY_SHIFT 15
SOURCE = "canny.cu"
CANDIDATE_TILE = (8, 32)  # canny_candidates: rows and columns a block (a warp a row)
HYSTERESIS_THREADS = 1024
MAX_SHARED = 48 * 1024  # the hysteresis kernel's masks (8 bytes a word) within the default shared memory


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
    `thresholds` gives them: the pixels that pass non-maximum suppression and the low threshold,
    and those of them above the high one."""
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


def words_per_row(width: int) -> int:
    return -(-width // 32)


def kernel_fits(height: int, width: int) -> bool:
    """Whether the hysteresis kernel's masks for an image of this size fit its shared memory."""
    return 8 * height * words_per_row(width) <= MAX_SHARED


def _kernels(capability: tuple[int, int]) -> tuple[cuda_kernels.Kernel, cuda_kernels.Kernel]:
    """The two kernels for the current device (load_kernel caches them per device)."""
    rows, cols = CANDIDATE_TILE
    return (cuda_kernels.load_kernel(SOURCE, "canny_candidates", (), capability, rows * cols, 0),
            cuda_kernels.load_kernel(SOURCE, "canny_hysteresis", (), capability, HYSTERESIS_THREADS, MAX_SHARED))


def unavailable_reason(device: torch.device) -> str | None:
    """None where the kernels run on `device` (a CUDA GPU and an NVRTC library), else why not in
    one line. Compiles and loads them, so that no call compiles them inside a capture."""
    if device.type != "cuda":
        return f"the canny map's kernels need a CUDA device, not {device.type}"
    try:
        with torch.cuda.device(device):
            _kernels(tuple(torch.cuda.get_device_capability(device)))
    except cuda_kernels.CudaKernelError as e:
        return f"the canny map's kernels are not available ({str(e).splitlines()[0]}): the canny map stays on the host"
    return None


def _pointer(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def candidate_words(image: torch.Tensor, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`candidates` by canny.cu's first kernel, as int32 words (rows, words_per_row(W)), bit i of
    word j column 32 j + i: (candidates, strong). `image` uint8 (H, W, 3) and `thresholds` int32
    (low, high), as `thresholds` gives them, on one GPU."""
    h, w, channels = image.shape
    if channels != 3 or image.dtype != torch.uint8 or thresholds.dtype != torch.int32:
        raise ValueError(f"the kernel takes a uint8 (H, W, 3) image and int32 thresholds, got {image.dtype} "
                         f"{tuple(image.shape)} and {thresholds.dtype}")
    words = words_per_row(w)
    cand, strong = (torch.empty(h, words, dtype=torch.int32, device=image.device) for _ in range(2))
    image, thresholds = image.contiguous(), thresholds.contiguous()
    with torch.cuda.device(image.device):
        kernel = _kernels(tuple(torch.cuda.get_device_capability(image.device)))[0]
        kernel.launch((words, -(-h // CANDIDATE_TILE[0]), 1),
                      [_pointer(image), _pointer(thresholds), _pointer(cand), _pointer(strong),
                       ctypes.c_int(h), ctypes.c_int(w), ctypes.c_int(words)])
    return cand, strong


def hysteresis_into(out: torch.Tensor, cand_words: torch.Tensor, strong_words: torch.Tensor) -> None:
    """The map (0 or 255) from the candidates' and the strong pixels' words (candidate_words' layout)
    into `out`, uint8 (..., H, W), contiguous, the same map in every (H, W) plane: canny.cu's
    second kernel, one block with the masks in its shared memory."""
    rows, words = cand_words.shape
    h, w = out.shape[-2:]
    if 8 * rows * words > MAX_SHARED:
        raise ValueError(f"{rows} x {words} words of masks exceed the kernel's {MAX_SHARED} bytes of shared memory")
    if (h, words_per_row(w)) != (rows, words) or out.dtype != torch.uint8 or not out.is_contiguous():
        raise ValueError(f"out must be contiguous uint8 (..., {rows}, W) with {words} words a row, "
                         f"got {out.dtype} {tuple(out.shape)}")
    cand_words, strong_words = cand_words.contiguous(), strong_words.contiguous()
    with torch.cuda.device(out.device):
        kernel = _kernels(tuple(torch.cuda.get_device_capability(out.device)))[1]
        dataclasses.replace(kernel, shared_bytes=8 * rows * words).launch(
            (1, 1, 1), [_pointer(cand_words), _pointer(strong_words), _pointer(out), ctypes.c_int(rows),
                        ctypes.c_int(w), ctypes.c_int(words), ctypes.c_int(out.numel() // (h * w))])


def canny_into(out: torch.Tensor, image: torch.Tensor, thresholds: torch.Tensor) -> None:
    """The canny map of a uint8 (H, W, 3) GPU image for int32 (low, high) thresholds (as
    `thresholds` gives them) into every (H, W) plane of `out` (uint8, contiguous): two kernel
    launches, reading both inputs on the device, so a CUDA graph can hold them."""
    hysteresis_into(out, *candidate_words(image, thresholds))


def canny(image: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """cv2.Canny(image, low, high) of a uint8 (H, W, C) tensor: uint8 (H, W), 0 or 255, on the
    image's device; by the kernels where the image is a 3-channel one on a GPU and fits them, else
    by the tensor form."""
    low, high = thresholds(low, high)
    h, w, channels = image.shape
    if image.is_cuda and channels == 3 and kernel_fits(h, w):
        out = torch.empty(h, w, dtype=torch.uint8, device=image.device)
        canny_into(out, image, torch.tensor([low, high], dtype=torch.int32, device=image.device))
        return out
    return hysteresis_steps(*candidates(image, low, high)).to(torch.uint8) * 255
