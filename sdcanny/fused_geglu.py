"""The transformers' folded feed-forward input through one Triton kernel each
(sdcanny/geglu_kernel.py), as the custom op `sdcanny::geglu`: an opaque call to torch.compile,
ahead-of-time programs and CUDA graphs.

Where a SpatialTransformer's output projection is folded (networks.SpatialTransformer.
fold_output_projection), its last product takes [value * gelu(gate), r]. The op makes that input
in one kernel: the GEGLU Linear's product, the gating in its epilogue, r copied beside it. Alone at
the graded step's shapes, 355 against 526 µs a step for cuBLAS's product and TorchInductor's
GEGLU and copy (docs/benchmarks.md). It needs torch.library.custom_op (torch 2.4+), triton and a GPU
with tensor-memory descriptors (Hopper or later, where it was measured); elsewhere the networks keep
the Linear and the element-wise GEGLU (`unavailable_reason`). Under Triton's interpreter
(TRITON_INTERPRET=1) the kernel runs on CPU tensors too: that is how the tests check it without a GPU.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import compat, tma
from .networks import SpatialTransformer



def interleave_rows(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GEGLU's Linear (2I, K) weight and (2I,) bias, [value rows; gate rows], reordered so that value
    row j and gate row j are rows 2j and 2j + 1: the op's layout (one product tile then holds the
    value and gate columns that its epilogue multiplies)."""
    def paired(t: torch.Tensor) -> torch.Tensor:  # [a; b] -> a0, b0, a1, b1, ... along the first axis
        return torch.stack(t.chunk(2), dim=1).reshape(t.shape).contiguous()
    return paired(weight), paired(bias)


def geglu_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The op's maths in torch's ops: h = x w^T + b with (value j, gate j) in columns (2j, 2j + 1),
    then [value * gelu(gate), residual] along the last axis."""
    h = F.linear(x, weight, bias)
    return torch.cat([h[..., 0::2] * F.gelu(h[..., 1::2]), residual], dim=-1)


def geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor,
          overlap: bool = False) -> torch.Tensor:
    """x (..., K), residual (..., C), weight (2I, K) and bias (2I,) interleaved (interleave_rows)
    -> (..., I + C): [value * gelu(gate), residual], in x's dtype, contiguous. The kernel on a GPU
    (with `overlap`, launched with programmatic dependent launch where
    compat.kernel_launches_overlap allows), torch's maths elsewhere."""
    k, c = x.shape[-1], residual.shape[-1]
    if weight.shape[0] % 2 or weight.shape[1] != k or tuple(bias.shape) != (weight.shape[0],) \
            or residual.shape[:-1] != x.shape[:-1] or len({t.dtype for t in (x, weight, bias, residual)}) != 1:
        raise ValueError(f"the GEGLU op needs x (..., K), a (2I, K) weight, a (2I,) bias and a residual of x's "
                         f"rows, all of one dtype; got x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} "
                         f"{weight.dtype}, bias {tuple(bias.shape)} {bias.dtype}, residual {tuple(residual.shape)} "
                         f"{residual.dtype}")
    if not compat.our_kernels_run_on(x):
        return geglu_torch(x, weight, bias, residual).contiguous()
    from .geglu_kernel import geglu_with_residual
    out = geglu_with_residual(x.reshape(-1, k), weight, bias, residual.reshape(-1, c),
                              overlap=overlap and compat.kernel_launches_overlap(x.device))
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _geglu_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor,
                 overlap: bool = False) -> torch.Tensor:
    """The op's output for tracing: (..., I + C), contiguous, no data."""
    return x.new_empty((*x.shape[:-1], weight.shape[0] // 2 + residual.shape[-1]))


def unavailable_reason(device: torch.device) -> str | None:
    """None if the op can run on `device` and is used there, else why not in one line."""
    return tma.unavailable_reason(device, "the GEGLU kernel", "GEGLUs stay cuBLAS's products and TorchInductor's")


@functools.lru_cache(maxsize=None)
def register_op() -> None:
    """Defines `torch.ops.sdcanny.geglu` once per process. Programs that call it need it defined
    before they load (programs.load calls this)."""
    op = torch.library.custom_op("sdcanny::geglu", geglu, mutates_args=())
    op.register_fake(_geglu_shape)


def use_fused_geglu(net: nn.Module, overlap: bool = True) -> int:
    """Every SpatialTransformer of `net` whose output projection is folded makes its last product's
    input through the op (launched overlapped where `overlap`); returns how many."""
    register_op()
    layers = [m for m in net.modules() if isinstance(m, SpatialTransformer) and m.folded_out_weight is not None]
    for layer in layers:
        layer.use_geglu_op(*interleave_rows(layer.transformer_blocks[-1].ff.net[0].proj.weight,
                                            layer.transformer_blocks[-1].ff.net[0].proj.bias), overlap)
    return len(layers)
