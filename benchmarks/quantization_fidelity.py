"""Fidelity of 8-bit weights where the step reads most of its weight bytes, simulated in fp32:
the reference back-end on the synthetic checkpoint against itself with the weights of every
ControlNet and UNet layer of at most MAX_ROWS rows at the graded size rounded per output channel
(benchmarks/row_quantization.py). At the graded 256x384 those are the layers at the 8x12 and 4x6
latents (at most 96 pixels a sample, two samples for the guidance), which the step reads as
2.1 GB of its 2.5 GB of fp16 weights (benchmarks/quantized_products.py). With `fp8-activations`
those products' other operand is rounded to e4m3 too, one scale per tensor, as a fp8 x fp8
product (cuBLAS's) takes it. With `fp8-two-terms` it is rounded to two e4m3 terms instead (the
value, then its rounding residual; sdcanny.fp8.two_terms): what one fp8 x fp8 product of the
rows of both terms stacked gives back once its two halves are summed, the weights read once;
`fp8-two-terms-loose` does so under a scale LOOSENESS times the tensor's own, as a bound known
ahead of the product (no reduction over its input) would be.

    python3 benchmarks/quantization_fidelity.py [--kinds int8,fp8,fp8-activations,fp8-two-terms,...] [--photos 1]
        [--min-rows N --max-rows M]   (other layers than the short ones: 3072 3072 for the 32x48 latent's)

Left out, as the fast back-end computes them once per image or per schedule, not every step: the
time embedding (its MLP and the ResBlocks' projections) and the cross-attentions' keys and values
of the text. Issue 11's fidelity targets: final latents within 1% relative L2 of the fp32
reference and 45 dB PSNR on every image. About 100 s a generation on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpu_benchmark import graded_photos  # noqa: E402
from row_quantization import round_rows, round_to_fp8, round_to_two_fp8_terms, save_report  # noqa: E402
from sdcanny.checkpoint import load_state_networks  # noqa: E402
from sdcanny.config import CONFIGS  # noqa: E402
from sdcanny.metrics import psnr, relative_l2  # noqa: E402
from sdcanny.pipeline import GRADED_CALL, Canny2Image  # noqa: E402
from sdcanny.reference import ReferenceBackend  # noqa: E402
from sdcanny.synthetic import synthetic_state_dict  # noqa: E402

MAX_ROWS = 192  # benchmarks/quantized_products.py's bound: products this short stream their weights
GUIDANCE_BATCH = 2  # the fast back-end runs both guidance branches as one batch, the reference one at a time
KINDS = ("int8", "fp8", "fp8-activations", "fp8-two-terms", "fp8-two-terms-loose")
LOOSENESS = 64.0  # fp8-two-terms-loose: a bound far above max |x| (a GroupNorm's: sqrt(group size) x its weights)
ONCE_PER_IMAGE = ("emb_layers", "time_embed", "attn2.to_k", "attn2.to_v")  # see the docstring


class WeightProducts(TorchDispatchMode):
    """Sees every convolution and matrix product whose weight is one of `names`' tensors (by
    storage: F.linear hands the product a transposed view), however the network calls it (the
    ResBlocks call F.conv2d with a module's weight), and records its rows: output pixels times
    samples, or tokens times samples. With `round_inputs` (row_quantization's round_to_fp8 or
    round_to_two_fp8_terms), rounds those products' other operand with it first."""

    def __init__(self, names: dict[int, str], round_inputs=None):
        super().__init__()
        self.names, self.round_inputs = names, round_inputs
        self.rows: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        pair = OPERANDS.get(func)
        at = None if pair is None else next((i for i in pair if self.names.get(storage(args[i])) is not None), None)
        if at is None:
            return func(*args, **kwargs)
        data = pair[0] if at == pair[1] else pair[1]  # the other operand
        if self.round_inputs is not None:
            args = args[:data] + (self.round_inputs(args[data]),) + args[data + 1:]
        out = func(*args, **kwargs)
        if func is torch.ops.aten.convolution.default:
            rows = out.numel() // out.shape[1]
        else:  # x @ w^T: x's rows; w @ x: x's columns
            rows = args[data].shape[0] if data < at else args[data].shape[1]
        name = self.names[storage(args[at])]
        self.rows[name] = max(self.rows.get(name, 0), rows)
        return out


# (input, weight) of a convolution, the two matrices of a product: either may be the weight
OPERANDS = {torch.ops.aten.convolution.default: (0, 1), torch.ops.aten.mm.default: (0, 1),
            torch.ops.aten.addmm.default: (1, 2)}


def storage(t) -> int | None:
    return t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else None


INPUT_ROUNDINGS = {"fp8-activations": round_to_fp8, "fp8-two-terms": round_to_two_fp8_terms,
                   "fp8-two-terms-loose": lambda x: round_to_two_fp8_terms(x, LOOSENESS)}


def step_weights(nets) -> dict[str, torch.Tensor]:
    """The ControlNet's and UNet's weights of two dimensions or more ("controlnet.<key>",
    "unet.<key>"), less ONCE_PER_IMAGE."""
    return {f"{net_name}.{key}": p for net_name in ("controlnet", "unet")
            for key, p in getattr(nets, net_name).named_parameters()
            if p.dim() >= 2 and not any(s in key for s in ONCE_PER_IMAGE)}


def by_storage(weights: dict[str, torch.Tensor]) -> dict[int, str]:
    return {storage(p): name for name, p in weights.items()}


def weight_rows(pipe: Canny2Image, image: np.ndarray) -> dict[str, int]:
    """step_weights' names -> the most rows of a product with that weight in a one-step graded call."""
    mode = WeightProducts(by_storage(step_weights(pipe.backend.nets)))
    with mode:
        pipe.process(image, **dict(GRADED_CALL, ddim_steps=1))  # one step shows every layer's rows
    return mode.rows


def weights_by_rows(pipe: Canny2Image, rows: dict[str, int], max_rows: int = MAX_ROWS,
                    min_rows: int = 0) -> dict[str, torch.Tensor]:
    """The weights of weight_rows' answer whose products have min_rows to max_rows rows in the
    fast back-end's batch (GUIDANCE_BATCH times the reference's)."""
    weights = step_weights(pipe.backend.nets)
    return {name: weights[name] for name, count in rows.items() if min_rows <= GUIDANCE_BATCH * count <= max_rows}


def generate(pipe: Canny2Image, image: np.ndarray, call: dict = GRADED_CALL) -> tuple[np.ndarray, torch.Tensor]:
    images = pipe.process(image, **call)
    return np.asarray(images[0]), pipe.backend.last_latents.detach().cpu().clone()


def measure(kind: str, pipe: Canny2Image, weights: dict[str, torch.Tensor], photos: dict, reference: dict,
            call: dict = GRADED_CALL) -> dict:
    """`call` (the graded one) per photo with `kind`'s rounding applied to `weights` (and, for the
    kinds in INPUT_ROUNDINGS, to their products' inputs), against `reference`'s (image, latents)
    per photo: (latents' relative L2, PSNR dB) per photo. The weights are put back afterwards."""
    kept = {name: w.detach().clone() for name, w in weights.items()}
    rounding = INPUT_ROUNDINGS.get(kind)
    inputs = nullcontext() if rounding is None else WeightProducts(by_storage(weights), rounding)
    try:
        with torch.no_grad():
            for w in weights.values():
                w.copy_(round_rows(w, "fp8" if kind.startswith("fp8") else kind))
        rows = {}
        for name, image in photos.items():
            with inputs:
                got_image, got_latents = generate(pipe, image, call)
            ref_image, ref_latents = reference[name]
            rows[name] = (relative_l2(got_latents.numpy(), ref_latents.numpy()), psnr(ref_image, got_image))
        return rows
    finally:
        with torch.no_grad():
            for name, w in weights.items():
                w.copy_(kept[name])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    ap.add_argument("--photos", type=int, default=1, help="graded photographs (benchmarks/gpu_benchmark.py's)")
    ap.add_argument("--config", default="sd15", choices=sorted(CONFIGS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("outputs/quantization_fidelity.md"))
    ap.add_argument("--max-rows", type=int, default=MAX_ROWS, help="round the layers of at most this many rows")
    ap.add_argument("--min-rows", type=int, default=0, help="... and at least this many (3072: the 32x48 latent's)")
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    if not set(kinds) <= set(KINDS):
        ap.error(f"--kinds takes {', '.join(KINDS)}, got {args.kinds}")
    cfg = CONFIGS[args.config]
    pipe = Canny2Image(ReferenceBackend(load_state_networks(synthetic_state_dict(cfg, seed=0), cfg), args.device), cfg)
    photos = graded_photos(args.photos)
    weights = weights_by_rows(pipe, weight_rows(pipe, next(iter(photos.values()))), args.max_rows, args.min_rows)
    size = sum(w.numel() for w in weights.values())
    lines = [f"{args.config} synthetic checkpoint (seed 0), fp32 reference on {args.device}; the weights of "
             f"{len(weights)} layers of {args.min_rows} to {args.max_rows} rows rounded, {size * 2 / 1e9:.2f} GB as fp16", "",
             "| rounding | photo | final latents, relative L2 | PSNR dB |", "|---|---|---|---|"]
    start = time.perf_counter()
    reference = {name: generate(pipe, image) for name, image in photos.items()}
    for kind in kinds:
        for name, (rel, db) in measure(kind, pipe, weights, photos, reference).items():
            lines.append(f"| {kind} | {name} | {rel:.3e} | {db:.1f} |")
            print(lines[-1], flush=True)
    lines.append(f"\n({time.perf_counter() - start:.0f} s)")
    save_report(lines, args.out)


if __name__ == "__main__":
    main()
