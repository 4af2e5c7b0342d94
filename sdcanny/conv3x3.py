"""3x3 convolutions (stride 1, padding 1, channels-last fp16) through our CUDA kernel for Hopper,
sdcanny/conv3x3_sm90.cu (warpgroup tensor-core products, each tile's input read once with its
border, the weights in one bulk copy a stage), compiled at run time by NVRTC
(sdcanny/cuda_kernels.py).

The kernel reads the weights laid out as its stages hold them (`stage_layout`, made once per
weight); `launch_for` says whether a shape gets the kernel; `shape_mismatch` what an input must be.
The machine code is sm_90a (Hopper's wgmma), which runs on compute capability 9.0 only.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from . import cuda_kernels

SOURCE, ENTRY = "conv3x3_sm90.cu", "conv3x3_sm90"
CAPABILITY = (9, 0)
TILE_COLUMNS = 8
OUT_CHANNELS = 64  # output channels a block (the kernel's BN)
MULTIPROCESSORS = 132  # the H100's


@dataclass(frozen=True)
class Launch:
    """One compiled form of the kernel: image rows a tile (8 a warpgroup), input channels a pipeline
    stage, stages in flight."""
    rows: int = 16
    chunk: int = 16
    stages: int = 6

    @property
    def shared_bytes(self) -> int:
        halo = self.chunk // 8 * (self.rows + 2) * (TILE_COLUMNS + 2) * 16
        weights = 9 * self.chunk // 8 * OUT_CHANNELS * 16
        return self.stages * (halo + weights + 8)  # and a barrier a stage

    @property
    def threads(self) -> int:
        return 128 * self.rows // 8


# Alone on the H100 (docs/benchmarks.md), two samples of 32x48 x 320 -> 320: 16.2-16.6 µs at 6
# stages, 16.4-16.7 at 4, 18.2 at 3; chunks of 32 channels 15.4, but a layout of its own.
LAUNCH = Launch(rows=16, chunk=16, stages=6)


def launch_for(n: int, h: int, w: int, out_channels: int) -> Launch | None:
    """LAUNCH where an (n, ., h, w) input to `out_channels` makes one or two waves of blocks on the
    H100 (measured at 120 blocks: 32x48 x 320 of two samples), else None (cuDNN runs it). With fewer
    blocks one warpgroup a block was slower than cuDNN (16x24 x 640: 30 against 21 µs in the step)."""
    if h % LAUNCH.rows or w % TILE_COLUMNS or out_channels % OUT_CHANNELS:
        return None
    blocks = n * h // LAUNCH.rows * w // TILE_COLUMNS * out_channels // OUT_CHANNELS
    return LAUNCH if 100 <= blocks <= 2 * MULTIPROCESSORS else None


def shape_mismatch(x: torch.Tensor, laid_out: torch.Tensor, out_channels: int, launch: Launch) -> str | None:
    """None where the kernel takes x (N, C, H, W) and weights laid out by stage_layout for `launch`,
    else what it does not take."""
    if x.dim() != 4:
        return f"x {tuple(x.shape)} is not (N, C, H, W)"
    n, c, h, w = x.shape
    if h % launch.rows or w % TILE_COLUMNS:
        return f"{h}x{w} is not whole tiles of {launch.rows}x{TILE_COLUMNS}"
    if c % launch.chunk or out_channels % OUT_CHANNELS:
        return f"{c} -> {out_channels} channels are not whole chunks of {launch.chunk} -> {OUT_CHANNELS}"
    expected = (out_channels // OUT_CHANNELS, c // launch.chunk, 9, launch.chunk // 8, OUT_CHANNELS, 8)
    if tuple(laid_out.shape) != expected or not laid_out.is_contiguous():
        return f"laid-out weights {tuple(laid_out.shape)} are not a contiguous {expected}"
    if x.dtype != torch.float16 or laid_out.dtype != torch.float16:
        return "not fp16"
    if x.stride(1) != 1 or x.data_ptr() % 16 or any(s % 8 for s in (x.stride(0), x.stride(2), x.stride(3))):
        return "x is not channels-last with 16-byte aligned pixels"
    return None


def stage_layout(weight: torch.Tensor, chunk: int = LAUNCH.chunk) -> torch.Tensor:
    """(O, C, 3, 3) as the kernel's bulk copies read it, contiguous:
    [O / 64][C / chunk][tap][group of 8 input channels][64 output channels][8]."""
    o, c = weight.shape[:2]
    w = weight.permute(0, 2, 3, 1).reshape(o // OUT_CHANNELS, OUT_CHANNELS, 9, c // chunk, chunk // 8, 8)
    return w.permute(0, 3, 2, 4, 1, 5).contiguous()


def kernel(capability: tuple[int, int], launch: Launch) -> cuda_kernels.Kernel:
    """The kernel for the current device (load_kernel caches it per device)."""
    macros = (("CHUNK", launch.chunk), ("STAGES", launch.stages), ("TH", launch.rows))
    return cuda_kernels.load_kernel(SOURCE, ENTRY, macros, capability, launch.threads, launch.shared_bytes,
                                    arch_specific=True)


def residual_mismatch(residual: torch.Tensor, out_shape: tuple[int, int, int, int]) -> str | None:
    """None where the kernel's epilogue can add `residual` to an output of `out_shape`, else why not."""
    if tuple(residual.shape) != out_shape or residual.dtype != torch.float16:
        return f"residual {tuple(residual.shape)} {residual.dtype} is not fp16 {out_shape}"
    if residual.stride(1) != 1 or residual.data_ptr() % 4 or any(residual.stride(i) % 2 for i in (0, 2, 3)):
        return "the residual is not channels-last with 4-byte aligned channel pairs"
    return None


def inputs_mismatch(x: torch.Tensor, laid_out: torch.Tensor, out_channels: int, launch: Launch,
                    residual: torch.Tensor | None) -> str | None:
    """shape_mismatch, then residual_mismatch where a residual is given: None where the kernel takes
    all of them."""
    problem = shape_mismatch(x, laid_out, out_channels, launch)
    if problem is None and residual is not None:
        n, _, h, w = x.shape
        problem = residual_mismatch(residual, (n, out_channels, h, w))
    return problem


def conv3x3(x: torch.Tensor, laid_out: torch.Tensor, bias: torch.Tensor | None, out_channels: int,
            launch: Launch = LAUNCH, residual: torch.Tensor | None = None) -> torch.Tensor:
    """conv2d(x, weight, bias, padding=1) for the weight that stage_layout laid out, plus `residual`
    where given (added to the fp16 output in fp16, as torch adds a ResBlock's skip): channels-last
    fp16 out, a new tensor."""
    problem = inputs_mismatch(x, laid_out, out_channels, launch, residual)
    n, c, h, w = x.shape
    if problem is not None:
        raise ValueError(f"the 3x3 convolution kernel does not take these inputs: {problem}")
    if bias is not None and (bias.shape != (out_channels,) or bias.dtype != torch.float16 or not bias.is_contiguous()):
        raise ValueError(f"bias {tuple(bias.shape)} {bias.dtype} is not a contiguous fp16 ({out_channels},)")
    out = torch.empty((n, out_channels, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    longs = [ctypes.c_longlong(s) for s in (x.stride(0), x.stride(2), x.stride(3), out.stride(0), out.stride(2),
                                            out.stride(3))]
    residual_strides = [ctypes.c_longlong(residual.stride(i) if residual is not None else 0) for i in (0, 2, 3)]
    args = [ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(laid_out.data_ptr()),
            ctypes.c_void_p(bias.data_ptr() if bias is not None else 0), ctypes.c_void_p(out.data_ptr()),
            ctypes.c_int(h), ctypes.c_int(w), ctypes.c_int(c), *longs,
            ctypes.c_void_p(residual.data_ptr() if residual is not None else 0), *residual_strides]
    grid = (n * h // launch.rows * w // TILE_COLUMNS, out_channels // OUT_CHANNELS, 1)
    with torch.cuda.device(x.device):
        kernel(tuple(torch.cuda.get_device_capability(x.device)), launch).launch(grid, args)
    return out
