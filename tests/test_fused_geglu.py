"""The GEGLU op: the interleaved layout, its torch path and checks, the transformer that calls it and
its tracing on a CPU; the Triton kernel against GEGLU written out in float64 (in Triton's interpreter
on a CPU, on the GPU where there is one)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdcanny import compat, fused_geglu
from sdcanny.networks import GEGLU, SpatialTransformer
from sdcanny.optional import installed

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from geglu_interpreted import inputs, written_out  # noqa: E402

needs_custom_ops = pytest.mark.skipif(not compat.CUSTOM_OPS, reason=f"torch {torch.__version__} has no custom_op (2.4+)")


def test_interleave_rows_puts_each_gate_row_after_its_value_row():
    weight = torch.arange(8.0).reshape(4, 2)  # value rows 0, 1; gate rows 2, 3
    w, b = fused_geglu.interleave_rows(weight, torch.tensor([10.0, 11.0, 12.0, 13.0]))
    assert w.tolist() == [[0.0, 1.0], [4.0, 5.0], [2.0, 3.0], [6.0, 7.0]]
    assert b.tolist() == [10.0, 12.0, 11.0, 13.0]


def test_the_torch_path_is_the_networks_geglu_beside_the_residual():
    """Off the GPU the op on interleaved weights gives networks.GEGLU's output on the checkpoint's
    own weights, with the residual beside it, for 3-D token tensors."""
    layer = GEGLU(12, 20)
    x, r = torch.randn(2, 7, 12), torch.randn(2, 7, 12)
    got = fused_geglu.geglu(x, *fused_geglu.interleave_rows(layer.proj.weight, layer.proj.bias), r)
    with torch.no_grad():
        want = torch.cat([layer(x), r], dim=-1)
    assert got.shape == (2, 7, 32) and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shapes", [((5, 8), (9, 8), (9,), (5, 4)), ((5, 8), (10, 6), (10,), (5, 4)),
                                    ((5, 8), (10, 8), (8,), (5, 4)), ((5, 8), (10, 8), (10,), (6, 4))])
def test_the_op_refuses_what_does_not_fit(shapes):
    x, weight, bias, residual = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match="the GEGLU op needs"):
        fused_geglu.geglu(x, weight, bias, residual)


def test_the_op_refuses_mixed_dtypes():
    x, weight, bias, residual = torch.zeros(5, 8), torch.zeros(10, 8), torch.zeros(10), torch.zeros(5, 4)
    with pytest.raises(ValueError, match="all of one dtype; got x .* torch.float16"):
        fused_geglu.geglu(x.half(), weight, bias, residual)


def test_unavailable_off_cuda():
    assert "needs a CUDA device" in fused_geglu.unavailable_reason(torch.device("cpu"))


@pytest.mark.skipif(not compat.CUSTOM_OPS or not installed("triton"), reason="needs torch 2.4+ and triton")
@pytest.mark.parametrize("capability, used", [((8, 6), False), ((9, 0), True), ((10, 0), True)])
def test_used_only_on_gpus_with_tensor_memory_descriptors(monkeypatch, capability, used):
    """An A10 (8.6) keeps cuBLAS's product and TorchInductor's GEGLU and says why; Hopper (9.0) and later
    take the kernel."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    reason = fused_geglu.unavailable_reason(torch.device("cuda"))
    assert (reason is None) == used
    if not used:
        assert "compute capability 9.0+), not on this 8.6 GPU" in reason


def test_the_op_needs_a_folded_output_first():
    layer = SpatialTransformer(32, 8, 2)
    with pytest.raises(ValueError, match="fold_output_projection first"):
        layer.use_geglu_op(torch.zeros(256, 32), torch.zeros(256), False)


@needs_custom_ops
@pytest.mark.skipif(compat.compile_unavailable_reason("cpu") is not None, reason="torch.compile unavailable here")
def test_the_op_traces_into_a_compiled_transformer():
    """A folded SpatialTransformer with its feed-forward input through the op: torch.compile takes the op
    as one call, and the compiled layer computes what the layer as written does."""
    torch.manual_seed(4)
    layer = SpatialTransformer(32, 16, 4).eval()
    x, context = torch.randn(2, 32, 4, 6), torch.randn(2, 7, 16)
    with torch.no_grad():
        want = layer(x, context)
        layer.fold_output_projection()
        assert fused_geglu.use_fused_geglu(layer) == 1
        got = torch.compile(layer, fullgraph=True, dynamic=False)(x, context)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not installed("triton") or not installed("triton.runtime.interpreter"),
                    reason="needs triton with its interpreter (3.0+)")
def test_the_kernel_and_the_networks_in_the_interpreter():
    """tests/geglu_interpreted.py under TRITON_INTERPRET=1: the kernel within 1e-5 (fp32) and 2e-3
    (fp16) of float64 GEGLU written out, the residual copied exactly (partial row, column and copy
    tiles, a strided input, each launch configuration); the tiny ControlNet and UNet with their
    folded transformers through the op give the written networks' outputs."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "geglu_interpreted.py")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("kernel ") == 5 and run.stdout.count("network ") == 14
    assert "transformers through the op: [7, 16]" in run.stdout


@pytest.mark.skipif(not torch.cuda.is_available() or fused_geglu.unavailable_reason(torch.device("cuda")) is not None,
                    reason="needs a Hopper GPU, torch 2.4+ and triton")
@pytest.mark.parametrize("rows, channels", [(3072, 320), (768, 640), (192, 1280), (48, 1280), (12288, 320)])
def test_gpu_geglu_op_matches_float64(rows, channels):
    """The op on the GPU, fp16, at the graded step's four feed-forward shapes (batch 2) and a
    512x768 image's 32x48 one, against float64; launched overlapped (programmatic dependent launch,
    where the GPU has it) it gives the same output bit for bit."""
    fused_geglu.register_op()
    x, weight, bias, residual = (t.cuda() for t in inputs(rows, channels, 4 * channels, channels, torch.float16,
                                                          False, torch.Generator().manual_seed(5)))
    w, b = fused_geglu.interleave_rows(weight, bias)
    got = torch.ops.sdcanny.geglu(x, w, b, residual)
    want = written_out(x, weight, bias, residual)
    assert got.shape == (rows, 5 * channels) and got.is_contiguous()
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-3
    assert torch.equal(torch.ops.sdcanny.geglu(x, w, b, residual, True), got)
