"""The ControlNet's and UNet's GroupNorms (with the SiLU after them and, in the ResBlocks, the time
embedding's projection and the first convolution's bias added before them) through one Triton
kernel each (sdcanny/group_norm_kernel.py), as the custom op `sdcanny::group_norm_act`: an opaque
call to torch.compile, ahead-of-time programs and CUDA graphs.

Where the graded step's GroupNorms follow a cuDNN convolution, TorchInductor wrote each as about
three kernels; as one, the graded call's sampling loop is 1.3-2.9 ms shorter on the H100
(docs/benchmarks.md). The op needs torch.library.custom_op (torch 2.4+) and triton;
without them, or off a CUDA device, the networks keep torch's GroupNorm (`unavailable_reason`).

The op's output is channels-last whatever its input's layout (what the networks' convolutions
want), on every device: its traced form then holds however TorchInductor lays the input out. Under
Triton's interpreter (TRITON_INTERPRET=1) the kernel runs on CPU tensors too: that is how the tests
check it, in whole networks, without a GPU.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from . import compat, fp8
from .networks import GroupNorm, VAEResnetBlock, group_norm_act_torch, patch_terms



def group_norm_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, add: Optional[torch.Tensor],
                   add_column: int, add_bias: Optional[torch.Tensor], groups: int, eps: float,
                   silu: bool, patches: bool = False, overlap: bool = False, tiles: bool = False,
                   term_scale: Optional[torch.Tensor] = None, x_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu?(group_norm(x + addend[:, :, None, None])), the addend add's columns
    add_column..add_column+C (one row, or one per sample) plus add_bias (C,) where given (or
    add_bias alone: a convolution's bias), in x's dtype; with `patches`, its 3x3 patches
    (networks.patch_matrix), and with a `term_scale` (an fp32 scalar at least the output's largest
    magnitude / 448) those as the rows of their two e4m3 terms (fp8.two_terms; the kernel makes them
    from its fp32 values). With an `x_scale` (C,), x is an fp8 product's halves, (N, 2C, H, W) fp32
    (fp8.two_term_halves as an image), read as fp8.sum_halves sums them; only into fp8 terms. The
    Triton kernel on a GPU (with `overlap`, launched with programmatic dependent launch where
    compat.kernel_launches_overlap allows; with `tiles`, through the tiled kernels, for the VAE
    decoder's large groups), torch's maths (GroupNorm.normalize's) elsewhere."""
    check_addends(x, add, add_column, add_bias, x_scale is not None)
    if compat.our_kernels_run_on(x):  # the kernel's wrapper checks the modes itself, for its other callers too
        from .group_norm_kernel import group_norm_act as kernel
        return kernel(x, weight, bias, groups, eps, silu, add, add_column, add_bias, patches,
                      overlap and compat.kernel_launches_overlap(x.device), tiles, term_scale, x_scale)
    fp8.check_modes(patches, tiles, term_scale, x_scale)
    if x_scale is not None:
        x = fp8.sum_halves(x, x_scale)
    out = group_norm_act_torch(x, weight, bias, groups, eps, silu, add, add_column, add_bias)
    return patch_terms(out, term_scale) if patches else out.contiguous(memory_format=torch.channels_last)


def check_addends(x: torch.Tensor, add: Optional[torch.Tensor], add_column: int,
                  add_bias: Optional[torch.Tensor], halves: bool = False) -> None:
    batch, channels = x.shape[0], x.shape[1] // (2 if halves else 1)
    if add is not None and (add.dim() != 2 or add.shape[0] not in (1, batch)
                            or not 0 <= add_column <= add.shape[1] - channels):
        raise ValueError(f"the addend must have {batch} rows or 1 and {channels} columns from column "
                         f"{add_column}, got {tuple(add.shape)}")
    if add_bias is not None and tuple(add_bias.shape) != (channels,):
        raise ValueError(f"add_bias must be ({channels},), got {tuple(add_bias.shape)}")


def _group_norm_act_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, add: Optional[torch.Tensor],
                          add_column: int, add_bias: Optional[torch.Tensor], groups: int, eps: float,
                          silu: bool, patches: bool = False, overlap: bool = False,
                          tiles: bool = False, term_scale: Optional[torch.Tensor] = None,
                          x_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The op's output for tracing: x's shape and dtype, channels-last, no data (or the patches'
    matrix, (N x H x W, 9 x C), or its two e4m3 terms' rows, (2 x N x H x W, 9 x C), C half x's
    channels where x holds an fp8 product's halves)."""
    if patches:
        n, c, h, w = x.shape
        c //= 2 if x_scale is not None else 1
        if term_scale is not None:
            return torch.empty((2 * n * h * w, 9 * c), dtype=torch.float8_e4m3fn, device=x.device)
        return torch.empty((n * h * w, 9 * c), dtype=x.dtype, device=x.device)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


def unavailable_reason(device: torch.device) -> str | None:
    """None if the op can run on `device`, else why not in one line."""
    return compat.custom_kernel_unavailable_reason(device, "the fused GroupNorm kernel", "GroupNorms stay TorchInductor's")


@functools.lru_cache(maxsize=None)
def register_op() -> None:
    """Defines `torch.ops.sdcanny.group_norm_act` once per process. Programs that call it need it
    defined before they load (programs.load calls this)."""
    tags = compat.custom_op_layout_tags()  # the input stays in the layout the kernel was traced with
    op = torch.library.custom_op("sdcanny::group_norm_act", group_norm_act, mutates_args=(),
                                 **({"tags": tags} if tags else {}))
    op.register_fake(_group_norm_act_shape)


def use_fused_group_norm(net: nn.Module, patches: bool = True, overlap: bool = True, tiles: bool = False) -> int:
    """Every GroupNorm of `net` (the ControlNet, the UNet, the VAE decoder) normalises through the
    op; returns how many. `patches`: where a ResBlock's convolution is a patch product, the op
    writes its patches (networks.norm_conv3x3). `overlap`: the kernel launched with programmatic
    dependent launch where the GPU and triton have it. `tiles`: through the tiled kernels (the VAE
    decoder's, whose groups are large and whose norms take no addend but a convolution's bias)."""
    register_op()
    norms = [m for m in net.modules() if isinstance(m, GroupNorm)]
    for norm in norms:
        norm.fused = True
        norm.writes_patches = patches
        norm.overlap = overlap
        norm.tiled = tiles
    return len(norms)


def conv_biases_in_norms(net: nn.Module) -> int:
    """Each VAE ResBlock of `net` whose second norm goes through the op adds its first convolution's
    bias in that op (VAEResnetBlock.conv1_bias_in_norm): TorchInductor adds a CUDA convolution's
    bias in an element-wise kernel of its own, which reads and writes the whole output (about 30 µs
    at 256x384 on the H100, docs/benchmarks.md), where the op reads one number a channel. Returns
    how many blocks."""
    blocks = [m for m in net.modules() if isinstance(m, VAEResnetBlock) and m.norm2.fused]
    for block in blocks:
        block.conv1_bias_in_norm = True
    return len(blocks)
