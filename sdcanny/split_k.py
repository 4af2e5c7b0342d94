"""The step's small 3x3 convolutions through Triton kernels split along K (sdcanny/triton_conv.py).

At the graded size the ControlNet's and the UNet's 24 convolutions at the lowest resolution (4x6
latents, 1280 or 2560 input channels, batch 2) have 48 output rows. cuDNN covers them with 20
blocks of the H100's 132 SMs, each walking a K of 11520-23040: 25.8-37.5 µs each with the weights
coming from memory, against 18.2-30.6 µs for the same convolution split into K slices that fill
the GPU (docs/benchmarks.md). At 192 rows (8x12) the split-K kernels were slower than cuDNN at
two of the four shapes and at most 10% faster at the others, so larger convolutions stay with
cuDNN.

The choice is made per convolution by its output rows when the module runs or is traced
(SplitKConv3x3); the kernels are one custom op (`sdcanny::conv3x3`), an opaque call to
torch.compile, ahead-of-time programs and CUDA graphs.
The op needs torch.library.custom_op (torch 2.4+) and triton; without them, or off a CUDA device,
the networks keep torch's convolutions (`unavailable_reason`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import compat
from .optional import installed

MAX_ROWS = 64  # output rows (batch x height x width) up to which the split-K kernels run
BLOCK_K = 64  # K tile: input channels must be a multiple of it


@dataclass(frozen=True)
class ConvTiles:
    """One launch configuration: output tile rows x columns, K tile, K slices, warps, stages."""
    block_m: int
    block_n: int
    block_k: int = BLOCK_K
    split: int = 1
    warps: int = 4
    stages: int = 4


def output_size(size: int, stride: int) -> int:
    return (size - 1) // stride + 1


def tiles_for(rows: int, channels: int, out_channels: int, sms: int) -> ConvTiles | None:
    """The split-K launch for a convolution with this many output rows, or None where cuDNN
    serves it better. 64x128 tiles, and as many K slices as fill the SMs once (at most 16, and
    at least 4 K tiles a slice): within 2% of the best of 9 tile shapes and 8 slice counts at
    the graded size's 48-row shapes on the H100 (docs/benchmarks.md)."""
    if rows > MAX_ROWS or channels % BLOCK_K:
        return None
    tiles = -(-rows // 64) * -(-out_channels // 128)
    k_tiles = 9 * channels // BLOCK_K
    split = max(1, min(16, round(sms / tiles), k_tiles // 4))
    return ConvTiles(64, 128, BLOCK_K, split)


def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def weight_as_matrix(weight_matrix: torch.Tensor) -> torch.Tensor:
    """(out, 9 x C) -> the (out, C, 3, 3) convolution weight it holds."""
    out_channels = weight_matrix.shape[0]
    return weight_matrix.reshape(out_channels, 3, 3, -1).permute(0, 3, 1, 2)


def conv3x3(x: torch.Tensor, weight_matrix: torch.Tensor, bias: torch.Tensor, stride: int, split: int) -> torch.Tensor:
    """conv2d(x, weight, bias, stride, padding=1), channels-last, the weight as an (out, 9 x C)
    matrix (sdcanny/triton_conv.py): the split-K kernels in `split` K slices on a GPU, torch's
    convolution elsewhere."""
    if not x.is_cuda:
        return F.conv2d(x, weight_as_matrix(weight_matrix), bias, stride, 1).contiguous(memory_format=torch.channels_last)
    from .triton_conv import conv3x3_split_k
    return conv3x3_split_k(x, weight_matrix, bias, stride, ConvTiles(64, 128, BLOCK_K, split))


def _conv3x3_shape(x: torch.Tensor, weight_matrix: torch.Tensor, bias: torch.Tensor, stride: int,
                   split: int) -> torch.Tensor:
    """The op's output for tracing: shape, dtype and channels-last strides, no data."""
    batch, _, height, width = x.shape
    out = x.new_empty((batch, output_size(height, stride), output_size(width, stride), weight_matrix.shape[0]))
    return out.permute(0, 3, 1, 2)
def unavailable_reason(device: torch.device) -> str | None:
    """None if the op can run on `device`, else why not in one line."""
    if device.type != "cuda":
        return f"the split-K convolutions need a CUDA device, not {device.type}"
    if not compat.CUSTOM_OPS:
        return f"torch {torch.__version__} has no torch.library.custom_op (2.4+) for the split-K convolutions"
    if not installed("triton"):
        return "triton is not installed, so the split-K convolutions are off"
    return None


@functools.lru_cache(maxsize=None)
def register_op() -> None:
    """Defines `torch.ops.sdcanny.conv3x3` once per process. Programs that call it need it
    defined before they load (programs.load calls this)."""
    tags = compat.custom_op_layout_tags()  # the input stays channels-last, as the kernels read it
    op = torch.library.custom_op("sdcanny::conv3x3", conv3x3, mutates_args=(), **({"tags": tags} if tags else {}))
    op.register_fake(_conv3x3_shape)


class SplitKConv3x3(nn.Module):
    """A 3x3, padding-1 Conv2d that calls the op where tiles_for picks the split-K kernels for its
    input size, and torch's convolution (which TorchInductor fuses around) elsewhere. The size is
    known when the module is traced at a fixed size; traced with symbolic sizes (programs for a
    range of sizes) it takes torch's convolution, so no guard on the size is added. It shares the
    convolution's weight and bias, so the state dict is unchanged; `packed` keeps a second copy
    of the weight with output channels innermost, only to measure which layout the kernels read
    faster."""

    def __init__(self, conv: nn.Conv2d, sms: int, packed: bool = False):
        super().__init__()
        self.weight, self.bias, self.stride, self.sms = conv.weight, conv.bias, conv.stride[0], sms
        packed_weight = conv.weight.detach().permute(2, 3, 1, 0).reshape(-1, conv.out_channels).contiguous() if packed else None
        self.register_buffer("packed_weight", packed_weight, persistent=False)

    def tiles(self, size: torch.Size) -> ConvTiles | None:
        rows = size[0] * output_size(size[2], self.stride) * output_size(size[3], self.stride)
        if not isinstance(rows, int):  # symbolic
            return None
        return tiles_for(rows, size[1], self.weight.shape[0], self.sms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tiles = self.tiles(x.shape) if x.is_cuda else None
        if tiles is None:
            return F.conv2d(x, self.weight, self.bias, self.stride, 1)
        if self.packed_weight is not None:
            matrix = self.packed_weight.t()
        else:  # a view where the weight is channels-last, as the back-end makes it
            matrix = self.weight.permute(0, 2, 3, 1).reshape(self.weight.shape[0], -1)
        return torch.ops.sdcanny.conv3x3(x, matrix, self.bias, self.stride, tiles.split)


def eligible(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.bias is not None
            and conv.stride[0] == conv.stride[1] in (1, 2) and conv.in_channels % BLOCK_K == 0)


def use_split_k(net: nn.Module, sms: int, packed: bool = False) -> int:
    """Every eligible 3x3 convolution of `net` replaced by SplitKConv3x3 for a GPU of `sms` SMs;
    returns how many."""
    register_op()
    replaced = 0
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if eligible(child):
                setattr(parent, name, SplitKConv3x3(child, sms, packed))
                replaced += 1
    return replaced
