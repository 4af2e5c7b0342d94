"""The split-K 3x3 convolutions (sdcanny/split_k.py, sdcanny/triton_conv.py): the kernels against
torch's convolution (on the CPU in Triton's interpreter, on a GPU compiled), the launch choice,
the op's dispatch and tracing, and the module swap."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdcanny import compat, split_k
from sdcanny.checkpoint import build_networks
from sdcanny.config import TINY
from sdcanny.optional import installed

needs_triton = pytest.mark.skipif(not installed("triton"), reason="triton is not installed")
needs_custom_ops = pytest.mark.skipif(not compat.CUSTOM_OPS, reason=f"torch {torch.__version__} has no custom_op")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (batch, channels, height, width, out channels, stride, tiles): one K slice and several, a short
# last slice (9 * 128 / 64 = 18 tiles in 4 slices of 5), stride 2 on odd sides, out channels that
# do not fill a tile, rows that do not fill a tile
INTERPRETER_CASES = [
    (2, 64, 4, 6, 32, 1, (16, 32, 64, 1)),
    (2, 128, 4, 6, 48, 1, (16, 32, 64, 4)),
    (1, 64, 5, 7, 20, 2, (16, 16, 64, 2)),
    (3, 64, 3, 3, 40, 1, (32, 32, 64, 3)),
]

_INTERPRETER_SCRIPT = """
import json, sys, torch, torch.nn.functional as F
from sdcanny.split_k import ConvTiles
from sdcanny.triton_conv import conv3x3_split_k
torch.manual_seed(0)
errors = []
for b, c, h, w, n, stride, tiles in json.loads(sys.argv[1]):
    x = torch.randn(b, c, h, w).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(n, c, 3, 3), torch.randn(n)
    matrix = weight.permute(0, 2, 3, 1).reshape(n, -1)  # K innermost, as from a channels-last weight
    if len(errors) % 2:  # and output channels innermost, as a packed weight
        matrix = matrix.t().contiguous().t()
    y = conv3x3_split_k(x, matrix, bias, stride, ConvTiles(*tiles))
    expected = F.conv2d(x, weight, bias, stride, 1)
    errors.append([list(y.shape) == list(expected.shape), y.is_contiguous(memory_format=torch.channels_last),
                   float((y - expected).norm() / expected.norm())])
print(json.dumps(errors))
"""


@needs_triton
def test_kernel_matches_conv2d_in_the_interpreter():
    """In a child process: Triton reads TRITON_INTERPRET when its kernels are defined."""
    proc = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT, json.dumps(INTERPRETER_CASES)],
                          capture_output=True, text=True, env={**__import__("os").environ, "TRITON_INTERPRET": "1"},
                          cwd=split_k.__file__.rsplit("/sdcanny/", 1)[0], timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for case, (same_shape, channels_last, error) in zip(INTERPRETER_CASES, json.loads(proc.stdout.splitlines()[-1])):
        assert same_shape and channels_last, case
        assert error < 1e-5, (case, error)


@pytest.mark.parametrize("rows, channels, out_channels, expected_split", [
    (48, 1280, 1280, 13),  # 4x6 latents, batch 2: 1 x 10 tiles, 132 / 10 slices
    (48, 2560, 1280, 13),
    (64, 640, 640, 16),  # 1 x 5 tiles: 26 slices, at most 16
    (16, 64, 32, 2),  # 9 K tiles: at least 4 a slice
    (64, 320, 320, 11),  # 1 x 3 tiles, 45 K tiles
])
def test_tiles_for_fills_the_sms_once(rows, channels, out_channels, expected_split):
    tiles = split_k.tiles_for(rows, channels, out_channels, sms=132)
    assert (tiles.block_m, tiles.block_n, tiles.block_k) == (64, 128, 64)
    assert tiles.split == expected_split


@pytest.mark.parametrize("rows, channels", [(65, 1280), (192, 1280), (3072, 320), (48, 4), (48, 96)])
def test_tiles_for_leaves_large_or_odd_convolutions_to_cudnn(rows, channels):
    assert split_k.tiles_for(rows, channels, 1280, sms=132) is None


def weight_matrix(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight.detach().permute(0, 2, 3, 1).reshape(conv.out_channels, -1)


def test_op_on_the_cpu_is_torch_convolution():
    """Off a GPU the op takes torch's convolution (on the weight rebuilt from the matrix, whose
    strides differ, so to rounding), channels-last out."""
    conv = nn.Conv2d(64, 24, 3, padding=1, stride=2)
    x = torch.randn(2, 64, 5, 7)
    with torch.no_grad():
        y = split_k.conv3x3(x, weight_matrix(conv), conv.bias, 2, 3)
        torch.testing.assert_close(y, conv(x), rtol=1e-5, atol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_unavailable_off_cuda():
    assert "CUDA" in split_k.unavailable_reason(torch.device("cpu"))


def test_module_picks_the_kernels_by_output_rows():
    module = split_k.SplitKConv3x3(nn.Conv2d(1280, 1280, 3, padding=1), sms=132)
    assert module.tiles(torch.Size((2, 1280, 4, 6))).split == 13
    assert module.tiles(torch.Size((2, 1280, 8, 12))) is None  # 192 rows: cuDNN
    strided = split_k.SplitKConv3x3(nn.Conv2d(1280, 1280, 3, padding=1, stride=2), sms=132)
    assert strided.tiles(torch.Size((2, 1280, 8, 12))).split == 13  # 4x6 out: 48 rows


def test_packed_weight_is_the_same_matrix():
    conv = nn.Conv2d(64, 24, 3, padding=1)
    packed = split_k.SplitKConv3x3(conv, sms=132, packed=True).packed_weight
    assert packed.shape == (9 * 64, 24) and packed.is_contiguous()
    assert torch.equal(packed.t(), weight_matrix(conv))
    assert torch.equal(split_k.weight_as_matrix(weight_matrix(conv)), conv.weight.detach())


@needs_custom_ops
def test_swapped_network_keeps_its_state_dict_and_outputs():
    nets = build_networks(TINY)
    unet = nets["unet"].eval()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    expected_swaps = sum(1 for m in unet.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
                         and m.in_channels % 64 == 0)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10.0, 500.0])
    context = torch.randn(2, 77, TINY.unet.context_dim)
    with torch.no_grad():
        reference = unet(x, t, context)
        assert split_k.use_split_k(unet, sms=132) == expected_swaps > 0
        swapped = unet(x, t, context)
    assert not any(type(m) is nn.Conv2d and split_k.eligible(m) for m in unet.modules())
    after = unet.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    torch.testing.assert_close(swapped, reference, rtol=1e-5, atol=1e-5)


@needs_custom_ops
def test_op_traces_with_symbolic_sizes():
    """torch.compile sees the op through its fake implementation: shape and channels-last strides
    for any size."""
    split_k.register_op()
    conv = nn.Conv2d(64, 32, 3, padding=1, stride=2)
    matrix = weight_matrix(conv)

    def call(x):
        return torch.ops.sdcanny.conv3x3(x, matrix, conv.bias, 2, 3)

    compiled = torch.compile(call, backend="eager", fullgraph=True, dynamic=True)
    with torch.no_grad():
        for h, w in ((6, 8), (9, 11)):
            x = torch.randn(2, 64, h, w)
            y = compiled(x)
            torch.testing.assert_close(y, conv(x))
            assert y.is_contiguous(memory_format=torch.channels_last)
            fake = split_k._conv3x3_shape(x, matrix, conv.bias, 2, 3)
            assert fake.shape == y.shape and fake.stride() == y.stride()


# The step's convolutions at the lowest resolution at the graded size, batch 2 (cond, uncond)
GRADED_SMALL_CONVS = [(2, 1280, 4, 6, 1280, 1), (2, 2560, 4, 6, 1280, 1), (2, 1280, 8, 12, 1280, 2)]


@needs_cuda
@needs_triton
@needs_custom_ops
@pytest.mark.parametrize("b, c, h, w, n, stride", GRADED_SMALL_CONVS)
def test_gpu_split_k_matches_fp32_convolution(b, c, h, w, n, stride):
    """fp16 in, fp32 accumulation: as close to the fp32 convolution as cuDNN's fp16 one is, and
    the same when replayed from a CUDA graph."""
    torch.manual_seed(0)
    x = torch.randn(b, c, h, w, device="cuda").half()  # contiguous, as TorchInductor hands it over
    weight = (torch.randn(n, c, 3, 3, device="cuda") / (3 * c ** 0.5)).half().contiguous(memory_format=torch.channels_last)
    bias = torch.randn(n, device="cuda").half()
    rows = b * ((h - 1) // stride + 1) * ((w - 1) // stride + 1)
    module = split_k.SplitKConv3x3(nn.Conv2d(c, n, 3, padding=1, stride=stride), split_k.sm_count(x.device))
    module.weight, module.bias = nn.Parameter(weight), nn.Parameter(bias)
    assert module.tiles(x.shape) is not None  # the Triton path, not cuDNN's
    expected = F.conv2d(x.float(), weight.float(), bias.float(), stride, 1)
    with torch.no_grad():
        y = module(x)
    cudnn_error = float((F.conv2d(x, weight, bias, stride, 1).float() - expected).norm() / expected.norm())
    error = float((y.float() - expected).norm() / expected.norm())
    assert error <= 2 * cudnn_error + 1e-4, (error, cudnn_error)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        replayed = module(x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(replayed, y)
