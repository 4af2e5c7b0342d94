"""The attention op: its torch path and tracing on a CPU, the Triton kernel against attention written
out in float64 (in Triton's interpreter on a CPU, on the GPU where there is one)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdcanny import compat, fused_attention
from sdcanny.networks import CrossAttention
from sdcanny.optional import installed

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from attention_interpreted import inputs, written_out  # noqa: E402

needs_custom_ops = pytest.mark.skipif(not compat.CUSTOM_OPS, reason=f"torch {torch.__version__} has no custom_op (2.4+)")


@pytest.mark.parametrize("keys", [None, 77])
def test_the_torch_path_is_attention_head_by_head(keys):
    """Off the GPU the op is SDPA on the heads of the (B, N, H*d) projections: the same as attention
    written out head by head, for slices of a fused projection and for a text's keys."""
    q, k, v = inputs(2, 12, keys, 3, 8, torch.float32, torch.Generator().manual_seed(3))
    got = fused_attention.attention(q, k, v, 3)
    torch.testing.assert_close(got.double(), written_out(q, k, v, 3), rtol=1e-5, atol=1e-5)


def test_unavailable_off_cuda():
    assert "needs a CUDA device" in fused_attention.unavailable_reason(torch.device("cpu"))


@pytest.mark.skipif(not compat.CUSTOM_OPS or not installed("triton"), reason="needs torch 2.4+ and triton")
@pytest.mark.parametrize("capability, used", [((8, 6), False), ((9, 0), True), ((10, 0), True)])
def test_used_only_on_gpus_where_it_was_measured(monkeypatch, capability, used):
    """An A10 (8.6) keeps SDPA and says why; Hopper (9.0) and later take the kernel."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    reason = fused_attention.unavailable_reason(torch.device("cuda"))
    assert (reason is None) == used
    if not used:
        assert "was measured against SDPA on Hopper GPUs only (compute capability 9.0+), not on this 8.6 GPU" in reason


@pytest.mark.skipif(not installed("triton"), reason="needs triton")
@pytest.mark.parametrize("shapes, message", [
    (((2, 5, 12), (2, 7, 12), (2, 6, 12)), "are not"), (((2, 5, 12), (3, 7, 12), (3, 7, 12)), "are not"),
    (((2, 5, 10), (2, 7, 10), (2, 7, 10)), "are not"), (((2, 5, 12), (2, 7, 12), (2, 7, 12)), "last stride")])
def test_the_kernel_refuses_what_it_cannot_read(shapes, message):
    from sdcanny.attention_kernel import attention
    q, k, v = (torch.zeros(s) for s in shapes)
    if message == "last stride":
        k = torch.zeros(2, 12, 7).transpose(1, 2)
    with pytest.raises(ValueError, match=message):
        attention(q, k, v, 4 if shapes[0][-1] % 4 == 0 else 3)


@needs_custom_ops
@pytest.mark.skipif(compat.compile_unavailable_reason("cpu") is not None, reason="torch.compile unavailable here")
def test_the_op_traces_into_a_compiled_layer():
    """torch.compile takes the op as one call, reading the fused projection's slices, and the
    compiled layer computes what the layer with SDPA does."""
    fused_attention.register_op()
    layer = CrossAttention(24, 24, 3).eval()
    layer.fuse_projections(self_attention=True)
    x = torch.randn(2, 10, 24, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = layer(x, x)
        layer.fused_attention = True
        got = torch.compile(layer, fullgraph=True, dynamic=False)(x, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not installed("triton") or not installed("triton.runtime.interpreter"),
                    reason="needs triton with its interpreter (3.0+)")
def test_the_kernel_and_the_networks_in_the_interpreter():
    """tests/attention_interpreted.py under TRITON_INTERPRET=1: the kernel within 1e-5 (fp32) and
    2e-3 (fp16) of float64 attention written out (slices read in place, 77 keys, partial query
    blocks, widths 40, 80, 160, several key blocks); the op on each side of KERNEL_KEYS; the tiny
    ControlNet and UNet with their attentions through the op give SDPA's outputs."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "attention_interpreted.py")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("kernel ") == 6 and run.stdout.count("op ") == 2 and run.stdout.count("network ") == 14
    assert "attention layers through the op: [14, 32]" in run.stdout


@pytest.mark.skipif(not torch.cuda.is_available() or fused_attention.unavailable_reason(torch.device("cuda")) is not None,
                    reason="needs a CUDA GPU, torch 2.4+ and triton")
@pytest.mark.parametrize("queries, keys, width", [(1536, None, 40), (1536, 77, 40), (384, None, 80), (96, None, 160),
                                                  (24, None, 160), (6144, None, 40)])
def test_gpu_attention_op_matches_float64(queries, keys, width):
    """The op on the GPU, fp16, at the graded step's attention shapes (8 heads, batch 2; 1536 keys
    go to SDPA, the others to the kernel) and at a 512x768 image's 6144 keys, against float64; the
    kernel launched overlapped (programmatic dependent launch, where the GPU has it) gives the same
    output bit for bit, and with the key bound moved to 1536 the long ones go to the kernel too."""
    fused_attention.register_op()
    q, k, v = inputs(2, queries, keys, 8, width, torch.float16, torch.Generator().manual_seed(5), "cuda")
    got = torch.ops.sdcanny.attention(q, k, v, 8)
    want = written_out(q, k, v, 8)
    assert got.shape == q.shape and got.is_contiguous()
    assert ((got.double() - want).norm() / want.norm()).item() < 2e-3
    assert torch.equal(torch.ops.sdcanny.attention(q, k, v, 8, fused_attention.KERNEL_KEYS, True), got)
    through_kernel = torch.ops.sdcanny.attention(q, k, v, 8, 1536, True)
    assert ((through_kernel.double() - want).norm() / want.norm()).item() < 2e-3
