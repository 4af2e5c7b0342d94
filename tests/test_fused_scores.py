"""The scores op (a folded cross-attention's weights): its torch path, checks and tracing on a CPU,
the Triton kernel against the softmax written out in float64 (in Triton's interpreter on a CPU, on
the GPU where there is one)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdcanny import compat, fused_scores
from sdcanny.networks import CrossAttention
from sdcanny.optional import installed

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from scores_interpreted import inputs, written_out  # noqa: E402

needs_custom_ops = pytest.mark.skipif(not compat.CUSTOM_OPS, reason=f"torch {torch.__version__} has no custom_op (2.4+)")


def test_the_torch_path_is_each_heads_softmax():
    x, score_rows = inputs(2, 11, 3, 5, 16, torch.float32, False, torch.Generator().manual_seed(1))
    got = fused_scores.scores_softmax(x, score_rows, 3)
    torch.testing.assert_close(got.double(), written_out(x, score_rows, 3), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.reshape(2, 11, 3, 5).sum(-1), torch.ones(2, 11, 3))


@pytest.mark.parametrize("x_shape, rows_shape, heads, dtype", [
    ((2, 5, 8), (2, 6, 8), 4, torch.float32), ((2, 5, 8), (3, 6, 8), 3, torch.float32),
    ((2, 5, 8), (2, 6, 9), 3, torch.float32), ((2, 5, 8), (2, 258, 8), 2, torch.float32),
    ((2, 5, 8), (2, 6, 8), 3, torch.float16)])
def test_the_op_refuses_what_does_not_fit(x_shape, rows_shape, heads, dtype):
    with pytest.raises(ValueError, match="the scores op needs"):
        fused_scores.scores_softmax(torch.zeros(x_shape), torch.zeros(rows_shape, dtype=dtype), heads)


def test_unavailable_off_cuda():
    assert "needs a CUDA device" in fused_scores.unavailable_reason(torch.device("cpu"))


@pytest.mark.skipif(not compat.CUSTOM_OPS or not installed("triton"), reason="needs torch 2.4+ and triton")
@pytest.mark.parametrize("capability, used", [((8, 6), False), ((9, 0), True), ((10, 0), True)])
def test_used_only_on_gpus_with_tensor_memory_descriptors(monkeypatch, capability, used):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    reason = fused_scores.unavailable_reason(torch.device("cuda"))
    assert (reason is None) == used
    if not used:
        assert "compute capability 9.0+), not on this 8.6 GPU: folded cross-attentions keep" in reason


@needs_custom_ops
@pytest.mark.skipif(compat.compile_unavailable_reason("cpu") is not None, reason="torch.compile unavailable here")
def test_the_op_traces_into_a_compiled_folded_layer():
    """A folded cross-attention with its weights through the op: torch.compile takes the op as one
    call, and the compiled layer computes what the layer as written does; unfolded layers are left
    as they are."""
    torch.manual_seed(4)
    layer = CrossAttention(48, 16, 4).eval()
    layer.context_index = 0
    assert fused_scores.use_fused_scores(layer) == 0  # not folded: nothing to switch
    layer.fold(6)
    x, context = torch.randn(2, 20, 48), torch.randn(2, 6, 16)
    with torch.no_grad():
        rows = layer.keys_values(context)
        want = layer(x, rows)
        assert fused_scores.use_fused_scores(layer) == 1
        got = torch.compile(layer, fullgraph=True, dynamic=False)(x, rows)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not installed("triton") or not installed("triton.runtime.interpreter"),
                    reason="needs triton with its interpreter (3.0+)")
def test_the_kernel_and_a_layer_in_the_interpreter():
    """tests/scores_interpreted.py under TRITON_INTERPRET=1: the kernel within 1e-5 (fp32) and 2e-3
    (fp16) of float64 softmaxes written out (partial row tiles, 77 tokens padded, several K blocks, a
    strided input); a folded layer through the op gives attend_folded's output."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "scores_interpreted.py")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("kernel ") == 5 and run.stdout.count("layer ") == 1


@pytest.mark.skipif(not torch.cuda.is_available() or fused_scores.unavailable_reason(torch.device("cuda")) is not None,
                    reason="needs a Hopper GPU, torch 2.4+ and triton")
@pytest.mark.parametrize("rows, channels", [(384, 640), (96, 1280), (24, 1280), (1536, 640)])
def test_gpu_scores_op_matches_float64(rows, channels):
    """The op on the GPU, fp16, at the graded step's three folded shapes (batch 2, 8 heads, 77 tokens)
    and a 512x768 image's 16x24 one, against float64; launched overlapped (programmatic dependent
    launch, where the GPU has it) it gives the same output bit for bit."""
    fused_scores.register_op()
    x, score_rows = (t.cuda() for t in inputs(2, rows, 8, 77, channels, torch.float16, False,
                                               torch.Generator().manual_seed(5)))
    got = torch.ops.sdcanny.scores_softmax(x, score_rows, 8)
    want = written_out(x, score_rows, 8)
    assert got.shape == (2, rows, 8 * 77) and got.is_contiguous()
    assert ((got.double() - want).norm() / want.norm()).item() < 2e-3
    assert torch.equal(torch.ops.sdcanny.scores_softmax(x, score_rows, 8, True), got)
