"""The ControlNet's and UNet's ResBlock 3x3 convolutions through our CUDA kernel for Hopper
(sdcanny/conv3x3.py), as the custom op `sdcanny::conv3x3`: an opaque call to torch.compile,
ahead-of-time programs and CUDA graphs.

The op takes the channels-last fp16 input, the convolution's weights laid out as the kernel's
stages hold them (conv3x3.stage_layout, made once here), and the bias or None; it returns the
channels-last output. Shapes the kernel has no tile for (conv3x3.launch_for) go to F.conv2d. It is
used where the GPU has compute capability 9.0 exactly (the kernel is sm_90a machine code, measured
on the H100) and NVRTC can compile it; elsewhere the networks keep cuDNN (`unavailable_reason`).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import compat, conv3x3
from .cuda_kernels import CudaKernelError
from .networks import ResBlock


def unavailable_reason(device: torch.device) -> str | None:
    """None where the op can run on `device` and is used there, else why not in one line. Compiles
    and loads the kernel (one NVRTC compilation, not timed on the device), so that no call compiles
    it later, inside a capture."""
    if device.type != "cuda":
        return f"the convolution kernel needs a CUDA device, not {device.type}"
    if not compat.CUSTOM_OPS:
        return f"torch {torch.__version__} has no torch.library.custom_op (2.4+): the ResBlocks' convolutions stay cuDNN's"
    capability = tuple(torch.cuda.get_device_capability(device))
    if capability != conv3x3.CAPABILITY:
        return (f"the convolution kernel is Hopper machine code (sm_90a), not for this "
                f"{'.'.join(map(str, capability))} GPU: the ResBlocks' convolutions stay cuDNN's")
    try:
        with torch.cuda.device(device):
            conv3x3.kernel(capability, conv3x3.LAUNCH)
    except CudaKernelError as e:
        return f"the convolution kernel is not available ({str(e).splitlines()[0]}): the ResBlocks' convolutions stay cuDNN's"
    return None


# The op's annotations are typing's Optional: torch reads them to make its schema, and "X | None" does
# not evaluate before Python 3.10.
def convolution(x: torch.Tensor, laid_out: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """conv2d(x, weight, bias, padding=1) (+ residual, an fp16 sum after the convolution's fp16
    output), channels-last: through the kernel on `laid_out` (weight as conv3x3.stage_layout gives
    it) where conv3x3.launch_for has a launch for x, else F.conv2d and torch's sum."""
    n, _, h, w = x.shape
    o = weight.shape[0]
    launch = conv3x3.launch_for(n, h, w, o)
    if launch is None or not x.is_cuda or conv3x3.inputs_mismatch(x, laid_out, o, launch, residual) is not None:
        out = F.conv2d(x, weight, bias, padding=1)
        return (out if residual is None else out + residual).contiguous(memory_format=torch.channels_last)
    return conv3x3.conv3x3(x, laid_out, bias, o, launch, residual)


def _convolution_shape(x: torch.Tensor, laid_out: torch.Tensor, weight: torch.Tensor,
                       bias: Optional[torch.Tensor], residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The op's output for tracing: channels-last, no data."""
    n, _, h, w = x.shape
    return torch.empty((n, weight.shape[0], h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


@functools.lru_cache(maxsize=None)
def register_op() -> None:
    """Defines `torch.ops.sdcanny.conv3x3` once per process. Programs that call it need it defined
    before they load (programs.load calls this)."""
    op = torch.library.custom_op("sdcanny::conv3x3", convolution, mutates_args=())
    op.register_fake(_convolution_shape)


# The ResBlocks of the graded 32x48 latent. The 640-channel ones of the 16x24 latent were slower
# through the kernel than through cuDNN in the step (30 against 21 µs, one warpgroup a block), so
# they keep cuDNN; wider ones run as patch products at the graded size.
MAX_CHANNELS = 320


def takes_block(block: ResBlock, max_channels: int = MAX_CHANNELS) -> bool:
    """Whether `block`'s two convolutions have a layout for the kernel (whole tiles of its output
    and input channels) and at most `max_channels` outputs."""
    convs = (block.in_layers[2], block.out_layers[3])
    return (convs[1].out_channels <= max_channels
            and all(c.out_channels % conv3x3.OUT_CHANNELS == 0 and c.in_channels % conv3x3.LAUNCH.chunk == 0
                    for c in convs))


def use_conv_kernel(net: nn.Module, max_channels: int = MAX_CHANNELS, adds_skip: bool = True) -> int:
    """Every ResBlock of `net` that takes_block runs its two 3x3 convolutions through the op where
    they are not patch products: each gets its weights laid out for the kernel, as buffers that are
    not saved (a second copy of those weights, 3.7 MB a block at 320 channels). `adds_skip`: the
    second convolution's epilogue adds the block's skip (ResBlock.kernel_adds_skip); off only to
    measure what it buys. Returns how many ResBlocks."""
    register_op()
    blocks = [m for m in net.modules() if isinstance(m, ResBlock) and takes_block(m, max_channels)]
    for block in blocks:
        block.in_kernel_weight = conv3x3.stage_layout(block.in_layers[2].weight.detach())
        block.out_kernel_weight = conv3x3.stage_layout(block.out_layers[3].weight.detach())
        block.kernel_adds_skip = adds_skip
    return len(blocks)
