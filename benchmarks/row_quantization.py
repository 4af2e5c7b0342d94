"""Weights rounded to 8 bits with one scale per output channel (a row of the (out, in...) weight),
symmetric: what benchmarks/quantized_products.py times and benchmarks/quantization_fidelity.py
simulates. Plain torch. The fp8 rounding is sdcanny.fp8's, which the fast back-end's ResBlock
products use; the 8-bit integer ones are in no product (docs/benchmarks.md says why).

    int8   round(w / s) in -127..127, s = max |row| / 127
    uint8  the int8 value + 128 (a kernel turns it into fp16 with one OR and one subtraction)
    fp8    w / s cast to float8_e4m3fn, s = max |row| / 448 (e4m3's largest finite value)

and the fp8 x fp8 products' other operand with one scale per tensor: one e4m3 term, or two (the
value and its rounding residual, sdcanny.fp8.two_terms, which the fast back-end's fp8 patch
products use).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdcanny.fp8 import FP8_MAX, LOW_TERM_WEIGHT, two_terms, weight_rows  # noqa: E402

KINDS = ("int8", "uint8", "fp8")


def quantize_rows(w: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored values, fp32 scale per row) for `kind`; w is (rows, ...) of any float dtype."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "fp8":  # the fast back-end's fp8 patch products' weights
        rows, scale = weight_rows(w)
        return rows.reshape(w.shape), scale
    flat = w.detach().float().reshape(w.shape[0], -1)
    scale = flat.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
    q = (flat / scale[:, None]).round().clamp(-127, 127)
    stored = (q + 128).to(torch.uint8) if kind == "uint8" else q.to(torch.int8)
    return stored.reshape(w.shape), scale


def dequantize_rows(stored: torch.Tensor, scale: torch.Tensor, kind: str) -> torch.Tensor:
    """The fp32 weights the stored values stand for."""
    values = stored.float() - (128.0 if kind == "uint8" else 0.0)
    return values * scale.reshape(-1, *([1] * (stored.dim() - 1)))


def round_rows(w: torch.Tensor, kind: str) -> torch.Tensor:
    """w as its `kind` rounding gives it back, in w's dtype and shape."""
    return dequantize_rows(*quantize_rows(w, kind), kind).to(w.dtype)


def tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """One fp32 scale for a tensor: its largest magnitude at e4m3's largest value."""
    return x.detach().abs().amax().float().clamp_min(torch.finfo(torch.float32).tiny) / FP8_MAX


def round_to_fp8(x: torch.Tensor) -> torch.Tensor:
    """x as one e4m3 term under tensor_scale gives it back, in x's dtype."""
    scale = tensor_scale(x)
    return ((x.float() / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


def round_to_two_fp8_terms(x: torch.Tensor, looseness: float = 1.0) -> torch.Tensor:
    """x as fp8.two_terms under tensor_scale (times `looseness`, as a bound known ahead would be)
    give it back, in x's dtype."""
    scale = tensor_scale(x) * looseness
    terms = two_terms(x, scale).float()
    hi, lo = terms[0::2], terms[1::2]
    return ((hi + lo * LOW_TERM_WEIGHT) * scale).to(x.dtype)


def save_report(lines: list[str], path: Path) -> None:
    """The study's two scripts' tables: written to `path` (its folder made) and printed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
