"""The folded cross-attentions' weights through one Triton kernel each (sdcanny/scores_kernel.py), as
the custom op `sdcanny::scores_softmax`: an opaque call to torch.compile, ahead-of-time programs and
CUDA graphs.

A folded cross-attention (networks.CrossAttention.attend_folded) weighs its value rows with each
head's softmax of x against its score rows. The op makes those weights in one kernel: the scores
product with the softmax in its epilogue, so the scores are never written. It needs
torch.library.custom_op (torch 2.4+), triton and a GPU with tensor-memory descriptors (Hopper or
later); elsewhere the layers keep cuBLAS's batched product and TorchInductor's softmax
(`unavailable_reason`). Under Triton's interpreter (TRITON_INTERPRET=1) the kernel runs on CPU
tensors too: that is how the tests check it without a GPU.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from . import compat, tma
from .networks import CrossAttention, folded_attention_weights

MAX_TOKENS = 128  # a head's tokens, padded to a power of two, fill one tile of the kernel


def scores_softmax(x: torch.Tensor, score_rows: torch.Tensor, heads: int, overlap: bool = False) -> torch.Tensor:
    """networks.folded_attention_weights: x (B, N, C), score rows (B, heads T, C) -> (B, N, heads T),
    contiguous. The kernel on a GPU (with `overlap`, launched with programmatic dependent launch
    where compat.kernel_launches_overlap allows), torch's maths elsewhere."""
    if x.dim() != 3 or score_rows.dim() != 3 or score_rows.shape[0] != x.shape[0] or score_rows.shape[2] != x.shape[2] \
            or score_rows.shape[1] % heads or not 0 < score_rows.shape[1] // heads <= MAX_TOKENS \
            or x.dtype != score_rows.dtype:
        raise ValueError(f"the scores op needs x (B, N, C) and score rows (B, heads x T, C) of one dtype with T at most "
                         f"{MAX_TOKENS}; got x {tuple(x.shape)} {x.dtype}, score rows {tuple(score_rows.shape)} "
                         f"{score_rows.dtype}, {heads} heads")
    if not compat.our_kernels_run_on(x):
        return folded_attention_weights(x, score_rows, heads)
    from .scores_kernel import scores_softmax as kernel
    return kernel(x, score_rows, heads, overlap=overlap and compat.kernel_launches_overlap(x.device))


def _scores_softmax_shape(x: torch.Tensor, score_rows: torch.Tensor, heads: int, overlap: bool = False) -> torch.Tensor:
    """The op's output for tracing: (B, N, heads T), contiguous, no data."""
    return x.new_empty((x.shape[0], x.shape[1], score_rows.shape[1]))


def unavailable_reason(device: torch.device) -> str | None:
    """None if the op can run on `device` and is used there, else why not in one line."""
    return tma.unavailable_reason(device, "the scores kernel",
                                  "folded cross-attentions keep cuBLAS's product and TorchInductor's softmax")


@functools.lru_cache(maxsize=None)
def register_op() -> None:
    """Defines `torch.ops.sdcanny.scores_softmax` once per process. Programs that call it need it
    defined before they load (programs.load calls this)."""
    op = torch.library.custom_op("sdcanny::scores_softmax", scores_softmax, mutates_args=())
    op.register_fake(_scores_softmax_shape)


def use_fused_scores(net: nn.Module, overlap: bool = True) -> int:
    """Every folded cross-attention of `net` makes its weights through the op (launched overlapped
    where `overlap`); returns how many."""
    register_op()
    layers = [m for m in net.modules() if isinstance(m, CrossAttention) and m.folded_tokens is not None]
    for layer in layers:
        layer.fused_scores = True
        layer.scores_overlap = overlap
    return len(layers)
