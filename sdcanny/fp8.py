"""fp8 x fp8 patch products: a ResBlock's 3x3 convolution of few rows as one e4m3 x e4m3 matrix
product (Hopper's fp8 tensor cores), its input written in two e4m3 terms so that it keeps about
fp16's precision where one term would not.

The weights: each output channel's row of the patch matrix (networks.patch_product's layout)
divided by its largest magnitude over 448 (e4m3's largest value) and rounded to e4m3.
The input: the GroupNorm (+ SiLU) before the convolution writes its patches as two e4m3 terms,

    hi = e4m3(x / s),  lo = e4m3(2^4 (x / s - hi)),  x ~ s (hi + 2^-4 lo)

each row of hi followed by its row of lo, so that one product reads the weights once for both;
the two halves of each pair of its fp32 rows, the second times 2^-4, sum to the product of x so
rounded. Where the next layer is another ResBlock convolution's GroupNorm, that norm's kernel
reads the pair and sums it itself (networks.ResBlock.fp8_products): no kernel of its own for the
sum. The scale s is fixed ahead, from the norm's own weights (group_norm_bound), so that no
kernel has to find the input's largest value first: e4m3 is floating point, so a scale larger than needed costs precision only
below its normal range (benchmarks/quantization_fidelity.py: a scale 64x looser than the
largest value kept the graded images as close to the fp32 reference as an exact one).

The step's products at the 4x6 and 8x12 latents are bound by reading their weights; fp8 weights
halve that (benchmarks/quantized_products.py, docs/benchmarks.md). Needs a GPU with fp8 tensor
cores (compute capability 8.9+), torch 2.5+ (torch._scaled_mm as it is now,
compat.fp8_product_unavailable_reason), custom ops (2.4+) and triton (`unavailable_reason`);
elsewhere the products stay fp16.
"""
from __future__ import annotations

import math

import torch

from . import compat

FP8_MAX = 448.0  # e4m3's largest finite value, torch.finfo(torch.float8_e4m3fn).max
# e4m3 keeps 3 mantissa bits, so a normal value's rounding residual is at most 2^-4 of it: scaled by
# 2^4 the residual stays within the value's own range and keeps 3 bits of its own
LOW_TERM_SHIFT = 4
LOW_TERM_WEIGHT = 2.0 ** -LOW_TERM_SHIFT


def unavailable_reason(device: torch.device) -> str | None:
    """None where fp8 patch products can run on `device`, else why not in one line."""
    otherwise = "the patch products stay fp16"
    reason = compat.custom_kernel_unavailable_reason(device, "the fp8 patch products' GroupNorm kernel", otherwise,
                                                     (8, 9), "writes for fp8 tensor cores")
    if reason is not None:
        return reason
    reason = compat.fp8_product_unavailable_reason(device)
    return None if reason is None else f"{reason}: {otherwise}"


def check_modes(patches: bool, tiles: bool, term_scale: torch.Tensor | None, x_scale: torch.Tensor | None) -> None:
    """What the GroupNorm op (and GroupNorm.normalize) take: fp8 terms are written for patches
    only, and an fp8 product's halves are read only where the output is fp8 terms again (the
    output's dtype is then not x's); the tiled kernels do neither."""
    if tiles and (term_scale is not None or x_scale is not None):
        raise ValueError("the tiled GroupNorm kernels neither read halves nor write fp8 terms")
    if term_scale is not None and not patches:
        raise ValueError("fp8 terms are written for patches only")
    if x_scale is not None and term_scale is None:
        raise ValueError("an fp8 product's halves are read only to write fp8 terms")


def weight_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 rows, fp32 scale per row) of a (rows, ...) weight: each row over its largest
    magnitude / 448, so that w ~ rows * scale[:, None]."""
    flat = w.detach().float().reshape(w.shape[0], -1)
    scale = flat.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / FP8_MAX
    return (flat / scale[:, None]).to(torch.float8_e4m3fn), scale


def two_terms(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """x's rows as one e4m3 tensor of twice as many (2M, ...), each row's hi = e4m3(x / scale)
    followed by its lo = e4m3(2^4 (x / scale - hi)), so that x ~ scale (hi + 2^-4 lo), within 2^-8
    of each normal value. `scale` may be any at least max |x| / 448 (a bound known ahead)."""
    scaled = x.float() / scale
    hi = scaled.to(torch.float8_e4m3fn).float()
    pairs = torch.stack([hi, (scaled - hi) * 2.0 ** LOW_TERM_SHIFT], dim=1)
    return pairs.reshape(2 * x.shape[0], *x.shape[1:]).to(torch.float8_e4m3fn)


def group_norm_bound(weight: torch.Tensor, bias: torch.Tensor, group_elements: int) -> float:
    """A bound on |GroupNorm(x)| (and so on |SiLU(GroupNorm(x))|, which is never larger) over groups
    of at most `group_elements` values: a group normalised to mean 0 and variance 1 has no value
    beyond sqrt(n - 1) (all but one equal), which the affine map takes to at most
    |weight| sqrt(n - 1) + |bias| per channel."""
    reach = math.sqrt(max(group_elements - 1, 1))
    return float((weight.detach().float().abs() * reach + bias.detach().float().abs()).max())


def two_term_halves(terms: torch.Tensor, weight: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """(M, 2N) fp32: the product of the two_terms rows `terms` (2M, K) and the e4m3 weight rows (N, K),
    each input row's pair of output rows side by side: the hi term's N products, then the lo
    term's. `unit`: an fp32 1 on the device (the product's own scales; a constant made inside
    compiled code would cost a kernel a call)."""
    y = torch._scaled_mm(terms, weight.t(), unit, unit, out_dtype=torch.float32)
    return y.view(terms.shape[0] // 2, 2 * weight.shape[0])


def sum_halves(halves: torch.Tensor, out_scale: torch.Tensor) -> torch.Tensor:
    """fp32 (..., N) of two_term_halves' (..., 2N) on the last axis, or of those as an image (N, 2C, H, W)
    on the second: the hi half plus the lo half times 2^-4, times out_scale (the terms' scale
    times each weight row's)."""
    image = halves.dim() == 4
    hi, lo = halves.chunk(2, dim=1 if image else -1)
    return (hi + lo * LOW_TERM_WEIGHT) * (out_scale[:, None, None] if image else out_scale)


def two_term_product(terms: torch.Tensor, weight: torch.Tensor, out_scale: torch.Tensor, unit: torch.Tensor,
                     bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """(M, N) in `dtype`: two_term_halves summed (sum_halves), plus bias."""
    y = sum_halves(two_term_halves(terms, weight, unit), out_scale)
    return (y if bias is None else y + bias.float()).to(dtype)
