"""3x3 convolutions (stride 1, padding 1, channels-last fp16) through our CUDA kernel for Hopper,
sdcanny/conv3x3_sm90.cu (warpgroup tensor-core products, each tile's input read once with its
border), compiled at run time by NVRTC (sdcanny/cuda_kernels.py).

`shape_mismatch` says which inputs the kernel takes; `launch_for` picks the tile for a shape. The
machine code is sm_90a (Hopper's wgmma), which runs on compute capability 9.0 only.
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from . import cuda_kernels

SOURCE, ENTRY = "conv3x3_sm90.cu", "conv3x3_sm90"
CAPABILITY = (9, 0)
TILE_COLUMNS = 8
MAX_SHARED = 227 * 1024  # the H100's largest dynamic shared memory a block


@dataclass(frozen=True)
class Launch:
    """One compiled form of the kernel: tile rows (8 a warpgroup), output channels a block, input
    channels a pipeline stage, stages in flight; whether a stage's products may still run while
    the next stage's are issued (then a stage is loaded stages - 2 ahead, else stages - 1)."""
    rows: int = 16
    out_channels: int = 64
    chunk: int = 32
    stages: int = 4
    asynchronous: bool = True
    diagnostic: str = ""  # scratch: NO_FENCE, NO_LOADS or NO_MMA
    bulk_weights: bool = False  # the weights laid out as a stage holds them (stage_layout), one bulk copy a stage

    @property
    def shared_bytes(self) -> int:
        halo = self.chunk // 8 * (self.rows + 2) * (TILE_COLUMNS + 2) * 16
        return self.stages * (halo + 9 * self.chunk // 8 * self.out_channels * 16 + 8 * self.bulk_weights)

    @property
    def threads(self) -> int:
        return 128 * self.rows // 8


def shape_mismatch(x: torch.Tensor, weight: torch.Tensor, launch: Launch) -> str | None:
    """None where the kernel takes x (N, C, H, W) and weight (O, C, 3, 3) with `launch`, else what
    it does not take."""
    if x.dim() != 4 or weight.dim() != 4 or tuple(weight.shape[1:]) != (x.shape[1], 3, 3):
        return f"x {tuple(x.shape)} and weight {tuple(weight.shape)} are not (N, C, H, W) and (O, C, 3, 3)"
    n, c, h, w = x.shape
    if h % launch.rows or w % TILE_COLUMNS:
        return f"{h}x{w} is not whole tiles of {launch.rows}x{TILE_COLUMNS}"
    if c % launch.chunk or weight.shape[0] % launch.out_channels:
        return f"{c} -> {weight.shape[0]} channels are not whole chunks of {launch.chunk} -> {launch.out_channels}"
    if x.dtype != torch.float16 or weight.dtype != torch.float16:
        return "not fp16"
    if x.stride(1) != 1 or x.data_ptr() % 16 or any(s % 8 for s in (x.stride(0), x.stride(2), x.stride(3))):
        return "x is not channels-last with 16-byte aligned pixels"
    if launch.stages < (3 if launch.asynchronous else 2):
        return f"{launch} has too few stages"
    if launch.shared_bytes > MAX_SHARED:
        return f"{launch} needs {launch.shared_bytes} bytes of shared memory"
    return None


@functools.lru_cache(maxsize=None)
def kernel(capability: tuple[int, int], launch: Launch, overlap: bool) -> cuda_kernels.Kernel:
    macros = (("ASYNC", int(launch.asynchronous)), ("BN", launch.out_channels), ("BULK_WEIGHTS", int(launch.bulk_weights)), ("CHUNK", launch.chunk),
              ("OVERLAP", int(overlap)),
              ("STAGES", launch.stages), ("TH", launch.rows)) + ((("DIAG_" + launch.diagnostic, 1),) if launch.diagnostic else ())
    return cuda_kernels.load_kernel(SOURCE, ENTRY, macros, capability, launch.threads, launch.shared_bytes,
                                    arch_specific=True)


def taps_last(weight: torch.Tensor) -> torch.Tensor:
    """(O, C, 3, 3) as the kernel reads it, (O, 3, 3, C) contiguous: a view of a channels-last weight."""
    return weight.permute(0, 2, 3, 1).contiguous()


def stage_layout(weight: torch.Tensor, launch: Launch) -> torch.Tensor:
    """(O, C, 3, 3) as bulk copies read it: [O / BN][C / CHUNK][tap][group of 8 channels][BN][8]."""
    o, c = weight.shape[:2]
    w = weight.permute(0, 2, 3, 1).reshape(o // launch.out_channels, launch.out_channels, 9, c // launch.chunk,
                                           launch.chunk // 8, 8)
    return w.permute(0, 3, 2, 4, 1, 5).contiguous()


# The networks' weights are laid out once for this tile of output channels and chunk of input
# channels (stage_layout); each shape then takes the launch of `launch_for`.
LAYOUT = Launch(rows=16, out_channels=64, chunk=16, stages=6, bulk_weights=True)


def launch_for(n: int, h: int, w: int, out_channels: int) -> Launch | None:
    """The launch for an (n, ., h, w) input of LAYOUT's weights, or None where no tile fits. Two
    warpgroups (16 rows) a block where that still gives about a block per multiprocessor, else one
    (on the H100, 32x48 x 320 and 16x24 x 640 outputs of two samples: 15.4-16.4 and 21.6 µs against
    cuDNN's 23.0 and 25.0)."""
    if h % 8 or w % TILE_COLUMNS or out_channels % LAYOUT.out_channels:
        return None
    blocks_of_16 = n * h // 16 * w // TILE_COLUMNS * out_channels // LAYOUT.out_channels
    if h % 16 == 0 and blocks_of_16 >= 100:
        return LAYOUT
    return Launch(rows=8, out_channels=LAYOUT.out_channels, chunk=LAYOUT.chunk, stages=4, bulk_weights=True)


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, launch: Launch,
            addend: torch.Tensor | None = None, overlap: bool = False, prepared: torch.Tensor | None = None) -> torch.Tensor:
    """conv2d(x, weight, bias, padding=1) (+ addend), channels-last fp16 out. `overlap`: launched
    with programmatic dependent launch."""
    problem = shape_mismatch(x, weight, launch)
    if problem is not None:
        raise ValueError(f"the 3x3 convolution kernel does not take these inputs: {problem}")
    n, c, h, w = x.shape
    o = weight.shape[0]
    out = torch.empty((n, o, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    if prepared is None:  # the weight as the kernel reads it: callers that run it often make it once
        prepared = stage_layout(weight, launch) if launch.bulk_weights else taps_last(weight)
    w_taps = prepared
    if addend is not None and (addend.shape != out.shape or addend.stride(1) != 1):
        raise ValueError(f"addend {tuple(addend.shape)} is not channels-last {tuple(out.shape)}")
    a = addend if addend is not None else out
    longs = [ctypes.c_longlong(s) for s in (x.stride(0), x.stride(2), x.stride(3), out.stride(0), out.stride(2),
                                            out.stride(3), a.stride(0), a.stride(2), a.stride(3))]
    args = [ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(w_taps.data_ptr()),
            ctypes.c_void_p(bias.data_ptr() if bias is not None else 0),
            ctypes.c_void_p(addend.data_ptr() if addend is not None else 0), ctypes.c_void_p(out.data_ptr()),
            ctypes.c_int(h), ctypes.c_int(w), ctypes.c_int(c), *longs]
    grid = (n * h // launch.rows * w // TILE_COLUMNS, o // launch.out_channels, 1)
    with torch.cuda.device(x.device):
        kernel(tuple(torch.cuda.get_device_capability(x.device)), launch, overlap).launch(grid, args, overlap)
    return out
