"""The ControlNet's and UNet's 3x3 convolutions of a few output rows (the graded step's 4x6 latent)
through one weight-streaming Triton kernel each (sdcanny/conv_kernel.py), as the custom op
`sdcanny::conv3x3_slices`: an opaque call to torch.compile, ahead-of-time programs and CUDA graphs.

The op returns the kernel's fp32 partial sums, (slices, N*H*W, out); the ResBlock adds them up
(networks.conv3x3), so that TorchInductor folds the sum, the bias and the residual addition into one
element-wise kernel instead of a kernel of its own. The slice count follows from the shapes and the
GPU (conv_kernel.launch_for), on the real tensors and the traced ones alike. Where the kernel does
not take a shape, and off the GPU, the op is torch's convolution as one slice. It needs
torch.library.custom_op (torch 2.4+) and triton, and is used on Hopper GPUs and later, where it was
measured (`unavailable_reason`). Under Triton's interpreter (TRITON_INTERPRET=1) the kernel runs on
CPU tensors too: that is how the tests check it without a GPU.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from . import compat
from .networks import ResBlock

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton runs kernels on the CPU, in numpy
KERNEL_ROWS = 64  # conv_kernel.MAX_ROWS, one block of rows; the graded call's 4x6 latent has 48 (2 x 24)
MEASURED_ON = (9, 0)  # compute capability: the kernel was timed against cuDNN on Hopper (H100, H200) only
INTERPRETED_MULTIPROCESSORS = 132  # what the launch assumes under the interpreter: an H100's


def kernel_launch(x: torch.Tensor, weight: torch.Tensor):
    """The kernel's launch for conv2d(x, weight, padding=1), or None where torch computes it."""
    if not (x.is_cuda or INTERPRETED) or tuple(weight.shape[2:]) != (3, 3):
        return None
    from .conv_kernel import launch_for
    n, c, h, w = x.shape
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else INTERPRETED_MULTIPROCESSORS
    return launch_for(n * h * w, c, weight.shape[0], sms)


def conv3x3_slices(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """conv2d(x, weight, padding=1) of x (N, C, H, W) as (slices, N*H*W, out) fp32 partial sums,
    rows in (n, y, x) order, whose sum over the first axis is the convolution (without a bias)."""
    if x.shape[1] != weight.shape[1] or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"a 3x3 weight of {x.shape[1]} input channels is needed, got {tuple(weight.shape)}")
    launch = kernel_launch(x, weight)
    if launch is not None:
        from .conv_kernel import conv3x3_slices as kernel
        return kernel(x, weight, launch)
    out = F.conv2d(x.float(), weight.float(), padding=1)
    return out.permute(0, 2, 3, 1).reshape(1, -1, weight.shape[0])


def _conv3x3_slices_shape(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The op's output for tracing: the same slice count as the real call, no data."""
    launch = kernel_launch(x, weight)
    n, _, h, w = x.shape
    return torch.empty((launch.slices if launch else 1, n * h * w, weight.shape[0]), dtype=torch.float32,
                       device=x.device)


def unavailable_reason(device: torch.device) -> str | None:
    """None if the op can run on `device` and is used there, else why not in one line."""
    otherwise = "the small convolutions stay cuBLAS's or cuDNN's"
    reason = compat.custom_kernel_unavailable_reason(device, "the convolution kernel", otherwise)
    if reason is not None:
        return reason
    capability = torch.cuda.get_device_capability(device)
    if capability < MEASURED_ON:
        return (f"the convolution kernel was measured against cuDNN on compute capability "
                f"{'.'.join(map(str, MEASURED_ON))}+ GPUs only, not this {'.'.join(map(str, capability))} one: "
                f"{otherwise}")
    return None


@functools.lru_cache(maxsize=None)
def register_op() -> None:
    """Defines `torch.ops.sdcanny.conv3x3_slices` once per process. Programs that call it need it
    defined before they load (programs.load calls this)."""
    tags = compat.custom_op_layout_tags()  # the input stays in the layout the kernel was traced with
    op = torch.library.custom_op("sdcanny::conv3x3_slices", conv3x3_slices, mutates_args=(),
                                 **({"tags": tags} if tags else {}))
    op.register_fake(_conv3x3_slices_shape)


def use_conv_kernel(net: nn.Module, rows: int = KERNEL_ROWS) -> int:
    """The 3x3 convolutions of `net`'s ResBlocks (the ControlNet, the UNet) with at most `rows` output
    rows run through the op; returns how many ResBlocks were switched."""
    register_op()
    blocks = [m for m in net.modules() if isinstance(m, ResBlock)]
    for block in blocks:
        block.kernel_rows = rows
    return len(blocks)
