"""The quantisation study's tools on the CPU (benchmarks/row_quantization.py,
quantized_products.py, quantization_fidelity.py): the roundings' known values and bounds, the step's
short products found from its record, the layers the fidelity simulation rounds, and the
weight-only kernel in Triton's interpreter."""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from sdcanny.config import CONFIGS
from sdcanny.optional import installed

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from row_quantization import (dequantize_rows, quantize_rows, round_rows, round_to_fp8,  # noqa: E402
                              round_to_two_fp8_terms, tensor_scale)

HAS_FP8 = hasattr(torch, "float8_e4m3fn")  # torch 2.1+
# benchmarks/quantized_products.py is written for Triton 3 (tl.range, triton.runtime.errors), which
# also brought the interpreter; the docker's torch 2.0.1 comes with Triton 2.0
TRITON_3 = installed("triton") and installed("triton.runtime.interpreter")


def test_int8_rows_round_half_to_even_with_the_rows_largest_at_127():
    w = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [-2.0, 1.0, 0.5, 0.001]])
    stored, scale = quantize_rows(w, "int8")
    assert stored.dtype == torch.int8
    # -0.5 * 127 = -63.5 and 0.25 * 127 = 31.75; 0.5 / 2 * 127 = 31.75; 0.001 / 2 * 127 = 0.0635
    assert stored.tolist() == [[127, -64, 32, 0], [0, 0, 0, 0], [-127, 64, 32, 0]]
    torch.testing.assert_close(scale, torch.tensor([1 / 127, torch.finfo(torch.float32).tiny / 127, 2 / 127]))
    uint8, _ = quantize_rows(w, "uint8")
    assert uint8.dtype == torch.uint8 and (uint8.int() - 128).tolist() == stored.tolist()
    assert torch.equal(dequantize_rows(uint8, scale, "uint8"), dequantize_rows(stored, scale, "int8"))


@pytest.mark.parametrize("kind", ["int8", "uint8"])
def test_8_bit_rows_are_within_half_a_step_of_the_weights(kind):
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rounded = round_rows(w, kind)
    assert rounded.shape == w.shape and rounded.dtype == w.dtype
    step = w.reshape(16, -1).abs().amax(dim=1) / 127
    assert bool(((rounded - w).reshape(16, -1).abs() <= step[:, None] / 2 + 1e-12).all())
    # each row's largest magnitude is kept exactly (it is 127 steps)
    big = w.reshape(16, -1).abs().argmax(dim=1)
    assert torch.allclose(rounded.reshape(16, -1).gather(1, big[:, None]), w.reshape(16, -1).gather(1, big[:, None]))


@pytest.mark.skipif(not HAS_FP8, reason="torch.float8_e4m3fn needs torch 2.1+")
def test_fp8_rows_scale_to_448_and_keep_e4m3_values():
    w = torch.tensor([[448.0, -224.0, 1.0, 0.013671875], [8.0, 0.0, -1.0, 0.5]])
    stored, scale = quantize_rows(w, "fp8")
    assert stored.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(scale, torch.tensor([1.0, 8 / 448]))
    # row 0 is its own e4m3 values (0.013671875 = 7 x 2^-9, a subnormal) and comes back exactly
    assert torch.equal(dequantize_rows(stored, scale, "fp8")[0], w[0])
    # e4m3 keeps 3 mantissa bits: relative rounding error at most 2^-4 for normal values
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rel = ((round_rows(x, "fp8") - x).abs() / x.abs()).masked_select(x.abs() > x.abs().amax() / 448 * 2 ** -6)
    assert float(rel.max()) <= 2 ** -4 + 1e-12


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="int8"):
        quantize_rows(torch.ones(2, 2), "int4")


@pytest.mark.skipif(not TRITON_3, reason="benchmarks/quantized_products.py needs Triton 3")
def test_short_products_and_convolutions_of_a_step_record():
    import quantized_products as qp
    ops = Counter({("gemm", 192, 1280, 10240, True): 7, ("gemm", 768, 640, 5120, True): 5,
                   ("conv", 2, 1280, 4, 6, 1280, 1): 19, ("conv", 2, 1280, 8, 12, 1280, 2): 2,
                   ("conv", 2, 640, 16, 24, 640, 2): 2, ("conv", 2, 320, 16, 24, 320, 1): 3})
    assert qp.low_row_products(ops) == Counter({(192, 1280, 10240, True): 7, (48, 11520, 1280, True): 21,
                                                (192, 5760, 640, True): 2})
    assert all(launch["split_k"] in (2, 4, 8) for launch in qp.launches(11520))
    assert {launch["split_k"] for launch in qp.launches(1280)} == {1, 2}


@pytest.mark.skipif(not (TRITON_3 and HAS_FP8), reason="benchmarks/quantized_products.py needs Triton 3")
def test_the_two_term_product_is_the_product_of_its_rounded_input():
    """quantized_products.two_term_product (one e4m3 product of the stacked terms, halves summed,
    scaled per output channel) against float64 maths on the same rounded weights: with the input
    rounded as the terms round it, within the fp16 output's rounding; with the exact input, within
    the terms' 2^-8, the scale from the input or a bound four times as loose."""
    import quantized_products as qp
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(24, 96, generator=g).half(), torch.randn(40, 96, generator=g)
    bias = torch.randn(40, generator=g).half()
    w8, w_scale = quantize_rows(w, "fp8")
    weights = dequantize_rows(w8, w_scale, "fp8").double()
    got = qp.two_term_product(x, w8, w_scale, bias)
    assert got.dtype == torch.float16 and got.shape == (24, 40)

    def error(a, b):
        return float((a.double() - b).norm() / b.norm())
    on_terms = torch.nn.functional.linear(round_to_two_fp8_terms(x.float()).double(), weights, bias.double())
    assert error(got, on_terms) < 1e-3
    exact = torch.nn.functional.linear(x.double(), weights, bias.double())
    for x_scale in (None, 4 * tensor_scale(x)):
        assert error(qp.two_term_product(x, w8, w_scale, bias, x_scale), exact) < 2.0 ** -8
    one_term = torch.nn.functional.linear(round_to_fp8(x.float()).double(), weights, bias.double())
    assert error(one_term, exact) > 4 * error(got, exact)


@pytest.mark.skipif(not TRITON_3, reason="benchmarks/cublaslt_products.py takes quantized_products.py's, which needs Triton 3")
def test_every_product_of_a_step_record_and_its_short_convolutions_as_patches():
    """benchmarks/cublaslt_products.py times every matrix product whatever its rows, and the 3x3
    convolutions the back-end runs as patch products (at most 192 output rows at the graded size):
    counts of the same shape add up."""
    import cublaslt_products as cp
    ops = Counter({("gemm", 3072, 320, 320, True): 24, ("gemm", 48, 11520, 1280, True): 2,
                   ("conv", 2, 1280, 4, 6, 1280, 1): 19, ("conv", 2, 1280, 8, 12, 1280, 2): 2,
                   ("conv", 2, 320, 32, 48, 320, 1): 11})
    # the 4x6 convolution and the stride-2 one from 8x12 (both 48 output rows) join the 48-row product
    assert cp.step_products(ops) == Counter({(3072, 320, 320, True): 24, (48, 11520, 1280, True): 2 + 19 + 2})
    assert cp.step_products(ops, patch_rows=0) == Counter({(3072, 320, 320, True): 24, (48, 11520, 1280, True): 2})


@pytest.mark.skipif(not TRITON_3, reason="needs Triton 3 and its interpreter")
def test_the_weight_only_kernel_in_the_interpreter():
    """tests/quantized_products_interpreted.py: fp16, int8 and uint8 weights, both operand orders,
    one K slice and several, with and without a bias, within 1e-3 of float64 (the fp16 output's
    rounding); a repeated call the same bit for bit, every counter back at zero."""
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "quantized_products_interpreted.py")],
                         env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert sum(line.endswith(" ok") for line in run.stdout.splitlines()) == 48


@pytest.mark.skipif(not installed("skimage"), reason="benchmarks/quantization_fidelity.py takes scikit-image's photos")
def test_the_fidelity_simulation_rounds_the_chosen_layers_only():
    import quantization_fidelity as qf
    from gpu_benchmark import graded_photos
    from sdcanny.checkpoint import load_state_networks
    from sdcanny.pipeline import GRADED_CALL, Canny2Image
    from sdcanny.reference import ReferenceBackend
    from sdcanny.synthetic import synthetic_state_dict

    cfg = CONFIGS["tiny"]
    nets = load_state_networks(synthetic_state_dict(cfg, seed=0), cfg)
    pipe = Canny2Image(ReferenceBackend(nets), cfg)
    image = graded_photos(1)["chelsea"]
    rows = qf.weight_rows(pipe, image)
    # every weight of the two networks is seen, however it is called (the ResBlocks' convolutions
    # through F.conv2d, the linear layers through transposed views), the per-image ones left out
    assert set(rows) == set(qf.step_weights(nets)) and not any(s in k for k in rows for s in qf.ONCE_PER_IMAGE)
    h, w = 32, 48  # the graded latent: the input convolution sees all of it, one sample a call
    assert rows["unet.input_blocks.0.0.weight"] == h * w and rows["controlnet.input_blocks.0.0.weight"] == h * w
    assert rows["unet.out.2.weight"] == h * w
    short = qf.weights_by_rows(pipe, rows, max_rows=200)
    assert short and set(short) == {k for k, n in rows.items() if 2 * n <= 200}
    assert any(k.startswith("controlnet.") for k in short) and any(k.startswith("unet.middle_block.") for k in short)
    # the layers of the whole latent instead (--min-rows): the input and output convolutions among them
    full = qf.weights_by_rows(pipe, rows, max_rows=2 * h * w, min_rows=2 * h * w)
    assert set(full) == {k for k, n in rows.items() if n == h * w} and not set(full) & set(short)
    assert {"unet.input_blocks.0.0.weight", "unet.out.2.weight"} <= set(full)
    # rounding to int8 changes those weights only, and measure() puts them back
    before = {k: v.clone() for k, v in nets.unet.state_dict().items()}
    call = dict(GRADED_CALL, ddim_steps=2)
    reference = {"chelsea": qf.generate(pipe, image, call)}
    rel, db = qf.measure("int8", pipe, short, {"chelsea": image}, reference, call)["chelsea"]
    assert 0 < rel < 0.05 and db > 30
    assert all(torch.equal(v, nets.unet.state_dict()[k]) for k, v in before.items())


@pytest.mark.skipif(not installed("skimage"), reason="benchmarks/quantization_fidelity.py takes scikit-image's photos")
def test_the_products_inputs_are_rounded_to_fp8_for_the_chosen_weights_only():
    import quantization_fidelity as qf
    if not HAS_FP8:
        pytest.skip("torch.float8_e4m3fn needs torch 2.1+")
    g = torch.Generator().manual_seed(0)
    lin, conv, other = torch.randn(6, 8, generator=g), torch.randn(5, 3, 3, 3, generator=g), torch.randn(6, 8, generator=g)
    x, image = torch.randn(10, 8, generator=g), torch.randn(2, 3, 4, 6, generator=g)
    mode = qf.WeightProducts({qf.storage(lin): "lin", qf.storage(conv): "conv"}, round_to_fp8)
    with mode:
        got_linear = torch.nn.functional.linear(x, lin)
        got_conv = torch.nn.functional.conv2d(image, conv, padding=1)
        got_other = torch.nn.functional.linear(x, other)
    assert torch.equal(got_linear, torch.nn.functional.linear(round_to_fp8(x), lin))
    assert torch.equal(got_conv, torch.nn.functional.conv2d(round_to_fp8(image), conv, padding=1))
    assert torch.equal(got_other, torch.nn.functional.linear(x, other))  # not a chosen weight: untouched
    assert not torch.equal(round_to_fp8(x), x)
    assert mode.rows == {"lin": 10, "conv": 2 * 4 * 6}


@pytest.mark.skipif(not HAS_FP8, reason="torch.float8_e4m3fn needs torch 2.1+")
def test_two_fp8_terms_keep_what_one_loses():
    """hi = e4m3(x / s) and lo = e4m3(16 (x / s - hi)): with s = 1 (448 the largest), 300 is 288 in
    one term (e4m3 steps by 32 there) and 288 + 192 / 16 exactly in two; 300.5's residual 12.5
    becomes 200, a tie between 192 and 208 that goes to the even 192. On random values the two
    terms stay within 2^-8 of each value's magnitude where one term is off by up to 2^-4."""
    x = torch.tensor([448.0, 300.0, 300.5, -301.0])
    assert round_to_fp8(x).tolist() == [448.0, 288.0, 288.0, -288.0]
    assert round_to_two_fp8_terms(x).tolist() == [448.0, 300.0, 300.0, -301.0]
    g = torch.Generator().manual_seed(1)
    values = torch.randn(4096, generator=g) * 3
    values = values[values.abs() > 0.1]  # away from e4m3's subnormals at this scale
    one, two = (values - round_to_fp8(values)).abs(), (values - round_to_two_fp8_terms(values)).abs()
    assert (two <= values.abs() * 2.0 ** -8).all()
    assert one.max() > 8 * two.max() and (one <= values.abs() * 2.0 ** -4).all()
    # under a scale 64 times the tensor's (a loose bound) the values stay normal down to max |x| / 448
    loose = (values - round_to_two_fp8_terms(values, looseness=64.0)).abs()
    large = values.abs() > values.abs().max() / 16
    assert (loose[large] <= values.abs()[large] * 2.0 ** -8).all()
