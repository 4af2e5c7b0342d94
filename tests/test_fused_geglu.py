"""The fused GEGLU: the op's torch path and checks, its trace, and the Triton kernel against float64
torch (in Triton's interpreter on a CPU, on the GPU where there is one)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdcanny import compat, fused_geglu
from sdcanny.networks import GEGLU, FeedForward, geglu_torch
from sdcanny.optional import installed

ROOT = Path(__file__).resolve().parents[1]
needs_custom_ops = pytest.mark.skipif(not compat.CUSTOM_OPS, reason=f"torch {torch.__version__} has no custom_op (2.4+)")


def test_geglu_is_the_value_times_the_gelu_of_the_gate():
    """The original's GEGLU written out: the Linear's first half times the exact GELU of its second."""
    g = torch.Generator().manual_seed(4)
    layer = GEGLU(6, 5).double()
    x = torch.randn(3, 7, 6, generator=g).double()
    projected = x @ layer.proj.weight.T + layer.proj.bias
    gate = projected[..., 5:]
    want = projected[..., :5] * 0.5 * gate * (1 + torch.erf(gate / 2 ** 0.5))
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)


def test_the_op_off_the_gpu_is_geglu_and_checks_its_weights():
    g = torch.Generator().manual_seed(5)
    x, weight, bias = torch.randn(2, 9, 8, generator=g), torch.randn(12, 8, generator=g), torch.randn(12, generator=g)
    torch.testing.assert_close(fused_geglu.geglu(x, weight, bias), geglu_torch(x, weight, bias))
    for bad_weight, bad_bias in ((weight[:11], bias[:11]), (weight[:, :7], bias), (weight, bias[:10])):
        with pytest.raises(ValueError, match="GEGLU needs a"):
            fused_geglu.geglu(x, bad_weight, bad_bias)
    assert fused_geglu._geglu_shape(x, weight, bias).shape == (2, 9, 6)


def test_unavailable_off_cuda():
    assert "needs a CUDA device" in fused_geglu.unavailable_reason(torch.device("cpu"))


@needs_custom_ops
@pytest.mark.skipif(compat.compile_unavailable_reason("cpu") is not None, reason="torch.compile unavailable here")
def test_the_op_traces_into_a_compiled_feed_forward():
    """torch.compile takes the op as one call and the compiled feed-forward computes what the eager
    one does; the op is what it calls."""
    fused_geglu.register_op()
    ff = FeedForward(16).eval()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 10, 16, generator=g)
    with torch.no_grad():
        want = ff(x)
        assert fused_geglu.use_fused_geglu(ff) == 1
        got = torch.compile(ff, fullgraph=True, dynamic=False)(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        ff.net[0].proj.bias.add_(1.0)  # the fused layer reads the Linear's own parameters
        assert (ff(x) - want).abs().max() > 1e-3


@pytest.mark.skipif(not installed("triton") or not installed("triton.runtime.interpreter"),
                    reason="needs triton with its interpreter (3.0+)")
def test_the_kernel_and_the_fused_networks_in_the_interpreter():
    """tests/geglu_interpreted.py under TRITON_INTERPRET=1: the kernel within 1e-5 of float64 torch
    (partial tiles, both tile configurations, 3-D and strided inputs), and the tiny ControlNet and
    UNet with every GEGLU through it give torch's outputs."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "geglu_interpreted.py")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("kernel ") == 5 and run.stdout.count("network ") == 14
    assert "GEGLUs through the op: [7, 16]" in run.stdout


@pytest.mark.skipif(not torch.cuda.is_available() or fused_geglu.unavailable_reason(torch.device("cuda")) is not None,
                    reason="needs a CUDA GPU, torch 2.4+ and triton")
@pytest.mark.parametrize("rows, channels", [(3072, 320), (768, 640), (192, 1280), (48, 1280)])
def test_gpu_fused_geglu_matches_float64(rows, channels):
    """The op on the GPU in fp16 at the step's shapes (batch 2 x pixels, the transformer's width)
    against float64 torch, as close as cuBLAS's product and torch's GEGLU are."""
    fused_geglu.register_op()
    g = torch.Generator(device="cuda").manual_seed(11)
    x = torch.randn(2, rows // 2, channels, device="cuda", generator=g).half()
    weight = (torch.randn(8 * channels, channels, device="cuda", generator=g) * channels ** -0.5).half()
    bias = (torch.randn(8 * channels, device="cuda", generator=g) * 0.1).half()
    want = geglu_torch(x.double(), weight.double(), bias.double())
    got = torch.ops.sdcanny.geglu(x, weight, bias)
    library = geglu_torch(x, weight, bias)
    errors = [((out.double() - want).norm() / want.norm()).item() for out in (got, library)]
    assert got.shape == want.shape and errors[0] < 1e-3 and errors[0] <= 1.5 * errors[1], errors
