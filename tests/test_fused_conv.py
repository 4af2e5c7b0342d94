"""The few-row convolution op: its launch choice and torch path on a CPU, the Triton kernel against a
convolution written out in float64 (in Triton's interpreter on a CPU, on the GPU where there is one)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdcanny import compat, fused_conv
from sdcanny.optional import installed

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conv_interpreted import written_out  # noqa: E402

needs_triton = pytest.mark.skipif(not installed("triton"), reason="needs triton")


def test_the_torch_path_is_one_slice_of_the_convolution():
    g = torch.Generator().manual_seed(3)
    x, weight = torch.randn(2, 5, 4, 6, generator=g), torch.randn(7, 5, 3, 3, generator=g)
    got = fused_conv.conv3x3_slices(x, weight)
    assert got.shape == (1, 48, 7) and got.dtype == torch.float32
    want = written_out(x, weight).permute(0, 2, 3, 1).reshape(1, 48, 7)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_the_op_refuses_a_weight_that_does_not_fit():
    with pytest.raises(ValueError, match="3x3 weight of 5 input channels"):
        fused_conv.conv3x3_slices(torch.zeros(1, 5, 4, 4), torch.zeros(7, 4, 3, 3))


@needs_triton
@pytest.mark.parametrize("rows, channels, out_channels, launch", [
    (48, 1280, 1280, (64, 128, 13)), (48, 2560, 1280, (64, 128, 13)), (64, 1280, 1280, (64, 128, 13)),
    (65, 1280, 1280, None), (48, 1288, 1280, None), (48, 1280, 1000, None), (48, 48, 32, (32, 16, 27))])
def test_the_launch_fills_the_gpu_twice_over_and_covers_k(rows, channels, out_channels, launch):
    """At the graded 4x6 convolutions: 20 column blocks x 13 slices on 132 SMs (two programs an SM);
    more than one block of rows or channels not a multiple of 16 are not the kernel's."""
    from sdcanny.conv_kernel import launch_for
    got = launch_for(rows, channels, out_channels, multiprocessors=132)
    if launch is None:
        assert got is None
        return
    assert (got.block_n, got.block_k, got.slices) == launch
    k_tiles = 9 * channels // got.block_k
    per_slice = -(-k_tiles // got.slices)
    assert (got.slices - 1) * per_slice < k_tiles <= got.slices * per_slice  # every tile once, no empty slice


def test_unavailable_off_cuda():
    assert "needs a CUDA device" in fused_conv.unavailable_reason(torch.device("cpu"))


@pytest.mark.skipif(not compat.CUSTOM_OPS or not installed("triton"), reason="needs torch 2.4+ and triton")
@pytest.mark.parametrize("capability, used", [((8, 6), False), ((9, 0), True), ((10, 0), True)])
def test_used_only_on_gpus_where_it_was_measured(monkeypatch, capability, used):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    reason = fused_conv.unavailable_reason(torch.device("cuda"))
    assert (reason is None) == used
    if not used:
        assert "measured against cuDNN on compute capability 9.0+ GPUs only, not this 8.6 one" in reason


@pytest.mark.skipif(not compat.CUSTOM_OPS or compat.compile_unavailable_reason("cpu") is not None,
                    reason="needs torch 2.4+ with torch.compile")
def test_the_op_traces_into_a_compiled_resblock():
    """torch.compile takes the op as one call and adds its slices up in the graph; the compiled
    ResBlock computes what it does with torch's convolutions."""
    from sdcanny.networks import ResBlock
    fused_conv.register_op()
    block = ResBlock(32, 64, 8).eval()
    g = torch.Generator().manual_seed(4)
    x, emb = torch.randn(2, 32, 4, 6, generator=g), torch.randn(2, 8, generator=g)
    with torch.no_grad():
        want = block(x, emb)
        assert fused_conv.use_conv_kernel(block) == 1
        got = torch.compile(block, fullgraph=True, dynamic=False)(x, emb)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not installed("triton") or not installed("triton.runtime.interpreter") or not compat.CUSTOM_OPS,
                    reason="needs torch 2.4+ and triton with its interpreter (3.0+)")
def test_the_kernel_and_the_networks_in_the_interpreter():
    """tests/conv_interpreted.py under TRITON_INTERPRET=1: the kernel's slices add up to the float64
    convolution within 1e-6 (fp32 and fp16 operands, channels-last and contiguous inputs, a short
    last slice, column blocks of 16-64); the traced slice count is the real one; the tiny ControlNet
    and UNet give torch's outputs with their 4x4 and smaller convolutions through the op."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "conv_interpreted.py")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("kernel ") == 5 and run.stdout.count("traced shape") == 1
    assert run.stdout.count("network ") == 14 and "ResBlocks through the op: [10, 22]" in run.stdout


@pytest.mark.skipif(not torch.cuda.is_available() or fused_conv.unavailable_reason(torch.device("cuda")) is not None,
                    reason="needs a CUDA GPU of compute capability 9.0+, torch 2.4+ and triton")
@pytest.mark.parametrize("channels", [1280, 2560])
def test_gpu_conv_op_matches_float64(channels):
    """The op on the GPU, fp16 channels-last, at the graded step's 4x6 convolutions (batch 2)."""
    fused_conv.register_op()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, channels, 4, 6, generator=g).half().cuda().contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(1280, channels, 3, 3, generator=g) / (3 * channels ** 0.5)).half().cuda()
    weight = weight.contiguous(memory_format=torch.channels_last)
    partials = torch.ops.sdcanny.conv3x3_slices(x, weight)
    assert partials.shape[0] > 1
    got = partials.sum(0).double().cpu()
    want = written_out(x.cpu(), weight.cpu()).permute(0, 2, 3, 1).reshape(48, 1280)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
