"""The transformers' GEGLU (feed-forward Linear, then value * gelu(gate)) through one Triton matrix
product each (sdcanny/geglu_kernel.py), as the custom op `sdcanny::geglu`: an opaque call to
torch.compile, ahead-of-time programs and CUDA graphs. Alone, at the graded step's shapes, it takes
394 µs a step against 481 for cuBLAS's product and TorchInductor's GEGLU (docs/benchmarks.md).
Needs torch.library.custom_op (torch 2.4+) and triton on a CUDA device; elsewhere the networks keep
the Linear and the element-wise GEGLU (`unavailable_reason`). Under Triton's interpreter
(TRITON_INTERPRET=1) the kernel runs on CPU tensors too, which is how the tests check it.
"""
from __future__ import annotations

import functools
import os

import torch
from torch import nn

from . import compat
from .networks import GEGLU, geglu_torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton runs kernels on the CPU, in numpy


def geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """value * gelu(gate) of F.linear(x, weight, bias) = [value, gate], in x's dtype: the Triton
    kernel on a GPU, torch's maths (GEGLU's) elsewhere."""
    if weight.shape[0] % 2 or weight.shape[1] != x.shape[-1] or tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"GEGLU needs a (2N, {x.shape[-1]}) weight and a (2N,) bias, got {tuple(weight.shape)} "
                         f"and {tuple(bias.shape)}")
    if x.is_cuda or INTERPRETED:
        from .geglu_kernel import geglu as kernel
        return kernel(x, weight, bias)
    return geglu_torch(x, weight, bias).contiguous()


def _geglu_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The op's output for tracing: (..., N), contiguous, no data."""
    return x.new_empty((*x.shape[:-1], weight.shape[0] // 2))


def unavailable_reason(device: torch.device) -> str | None:
    """None if the op can run on `device`, else why not in one line."""
    reason = compat.triton_op_unavailable_reason(device)
    return None if reason is None else f"the fused GEGLU kernel {reason}: GEGLUs stay cuBLAS's and TorchInductor's"


@functools.lru_cache(maxsize=None)
def register_op() -> None:
    """Defines `torch.ops.sdcanny.geglu` once per process. Programs that call it need it defined
    before they load (programs.load calls this)."""
    op = torch.library.custom_op("sdcanny::geglu", geglu, mutates_args=())
    op.register_fake(_geglu_shape)


def use_fused_geglu(net: nn.Module) -> int:
    """Every GEGLU of `net` (the ControlNet, the UNet) computes through the op; returns how many."""
    register_op()
    layers = [m for m in net.modules() if isinstance(m, GEGLU)]
    for layer in layers:
        layer.fused = True
    return len(layers)
