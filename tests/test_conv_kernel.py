"""The 3x3 convolution kernel (sdcanny/conv3x3.py, sdcanny/conv3x3_sm90.cu), its op and the ResBlocks
that use it (sdcanny/fused_conv.py), and the run-time compiler it goes through (sdcanny/cuda_kernels.py):
the weights' layout, which shapes and GPUs it takes, and the op off the GPU, on any machine; NVRTC's
compilation where an NVRTC library is found; the kernel against float64, in a CUDA graph and inside a
ResBlock, on a Hopper GPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdcanny import compat, conv3x3, cuda_kernels, fused_conv
from sdcanny.networks import ResBlock


def channels_last(*shape, device="cpu", scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).half().to(device).contiguous(memory_format=torch.channels_last)


def test_stage_layout_puts_every_weight_where_the_kernel_reads_it():
    """laid_out[tile, chunk, tap, group, o, e] is weight[64 tile + o, 16 chunk + 8 group + e, tap // 3, tap % 3]."""
    weight = torch.arange(128 * 32 * 9, dtype=torch.float32).reshape(128, 32, 3, 3)
    laid = conv3x3.stage_layout(weight)
    assert laid.shape == (2, 2, 9, 2, 64, 8) and laid.is_contiguous()
    tile, chunk, tap, group, o, e = torch.meshgrid(*(torch.arange(s) for s in laid.shape), indexing="ij")
    want = weight[64 * tile + o, 16 * chunk + 8 * group + e, tap // 3, tap % 3]
    assert torch.equal(laid, want)


@pytest.mark.parametrize("n, h, w, out_channels, taken", [
    (2, 32, 48, 320, True),    # the graded 32x48 latent, two guidance branches: 120 blocks
    (1, 32, 48, 320, False),   # 60 blocks: fewer than a wave
    (2, 16, 24, 640, False),   # the 16x24 latent: 60 blocks
    (2, 8, 12, 1280, False),   # 12 columns: not whole tiles of 8
    (2, 64, 64, 320, False),   # a 512x512 image: 320 blocks, past two waves (not measured)
    (2, 32, 48, 300, False)])  # output channels not whole tiles of 64
def test_launch_for(n, h, w, out_channels, taken):
    assert (conv3x3.launch_for(n, h, w, out_channels) == conv3x3.LAUNCH) is taken
    if not taken:
        assert conv3x3.launch_for(n, h, w, out_channels) is None


def test_the_launch_fits_an_h100_block():
    assert conv3x3.LAUNCH.shared_bytes <= 227 * 1024 and conv3x3.LAUNCH.threads == 256


# each case: what it changes in (input, laid-out weights, output channels), and the refusal's words
INPUT_CHANGES = {
    "height": (lambda x, laid, o: (x[:, :, :24], laid, o), "is not whole tiles"),
    "fp32": (lambda x, laid, o: (x.float(), laid, o), "not fp16"),
    "contiguous": (lambda x, laid, o: (x.contiguous(), laid, o), "not channels-last"),
    "layout": (lambda x, laid, o: (x, laid[:, :, :, :, :, :4], o), "are not a contiguous"),
    "channels": (lambda x, laid, o: (x, laid, 300), "not whole chunks"),
}


@pytest.mark.parametrize("change", INPUT_CHANGES)
def test_what_the_kernel_does_not_take(change):
    alter, message = INPUT_CHANGES[change]
    x, laid, out_channels = alter(channels_last(2, 320, 32, 48),
                                  conv3x3.stage_layout(torch.zeros(320, 320, 3, 3, dtype=torch.float16)), 320)
    assert message in conv3x3.shape_mismatch(x, laid, out_channels, conv3x3.LAUNCH)
    with pytest.raises(ValueError, match=message):
        conv3x3.conv3x3(x, laid, None, out_channels)


RESIDUALS = {  # a residual the epilogue refuses for a (2, 320, 32, 48) output, and the refusal's words
    "shape": (lambda: channels_last(2, 320, 32, 48)[:, :, :16], "is not fp16 (2, 320, 32, 48)"),
    "fp32": (lambda: channels_last(2, 320, 32, 48).float(), "is not fp16"),
    "contiguous": (lambda: channels_last(2, 320, 32, 48).contiguous(), "not channels-last"),
    "misaligned": (lambda: channels_last(2, 321, 32, 48)[:, 1:], "4-byte aligned"),
}


@pytest.mark.parametrize("change", RESIDUALS)
def test_what_the_epilogue_does_not_add(change):
    make, message = RESIDUALS[change]
    residual = make()
    assert message in conv3x3.residual_mismatch(residual, (2, 320, 32, 48))
    assert conv3x3.residual_mismatch(channels_last(2, 640, 32, 48)[:, 320:], (2, 320, 32, 48)) is None
    laid = conv3x3.stage_layout(torch.zeros(320, 320, 3, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match="does not take these inputs"):
        conv3x3.conv3x3(channels_last(2, 320, 32, 48), laid, None, 320, residual=residual)


def test_unavailable_off_cuda():
    assert "needs a CUDA device" in fused_conv.unavailable_reason(torch.device("cpu"))


@pytest.mark.skipif(not compat.CUSTOM_OPS, reason="the op needs torch.library.custom_op (torch 2.4+)")
@pytest.mark.parametrize("capability", [(8, 6), (10, 0)])
def test_only_hopper_takes_its_machine_code(monkeypatch, capability):
    """sm_90a code runs on compute capability 9.0 alone: an A10 (8.6) and a Blackwell (10.0) keep cuDNN."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert f"not for this {capability[0]}.{capability[1]} GPU" in fused_conv.unavailable_reason(torch.device("cuda"))


def resblock(channels: int, out_channels: int, seed: int = 0) -> ResBlock:
    torch.manual_seed(seed)
    return ResBlock(channels, out_channels, 64).eval().requires_grad_(False)


@pytest.mark.skipif(not compat.CUSTOM_OPS, reason="the op needs torch.library.custom_op (torch 2.4+)")
def test_use_conv_kernel_lays_out_the_320_channel_resblocks_only():
    """Not the 640-channel ones, nor those without whole tiles of channels (the tiny test model's 32)."""
    net = torch.nn.Sequential(resblock(320, 320), resblock(320, 640), resblock(960, 320), resblock(32, 32),
                              resblock(64, 96))
    saved = set(net.state_dict())
    assert fused_conv.use_conv_kernel(net) == 2  # 32 and 96 outputs are not whole tiles of 64
    assert all(block.in_kernel_weight is None for block in net[3:])
    assert torch.equal(net[0].in_kernel_weight, conv3x3.stage_layout(net[0].in_layers[2].weight))
    assert torch.equal(net[2].out_kernel_weight, conv3x3.stage_layout(net[2].out_layers[3].weight))
    assert net[1].in_kernel_weight is None and net[1].out_kernel_weight is None
    assert set(net.state_dict()) == saved  # the laid-out copies are not part of the checkpoint


@pytest.mark.skipif(not compat.CUSTOM_OPS, reason="the op needs torch.library.custom_op (torch 2.4+)")
@pytest.mark.parametrize("compiled, channels, adds_skip", [(False, 960, True), (True, 960, True), (True, 320, True),
                                                           (True, 320, False)])
def test_off_the_gpu_a_resblock_through_the_op_is_cudnns(compiled, channels, adds_skip):
    """Off the GPU the op is F.conv2d on the checkpoint's weight (and the skip added after it,
    where the op adds it): the block's output does not move."""
    block = resblock(channels, 320)
    x, emb = torch.randn(2, channels, 32, 48), torch.randn(2, 64)
    want = block(x, emb)
    fused_conv.use_conv_kernel(block, adds_skip=adds_skip)
    assert block.kernel_adds_skip is adds_skip
    run = torch.compile(block, fullgraph=True) if compiled else block
    torch.testing.assert_close(run(x, emb), want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not compat.CUSTOM_OPS, reason="the op needs torch.library.custom_op (torch 2.4+)")
def test_off_the_gpu_the_op_adds_the_residual_after_the_convolution():
    """The op's residual is torch's sum of the convolution's output and the skip, bit for bit."""
    fused_conv.register_op()
    x, residual = torch.randn(2, 320, 8, 16), torch.randn(2, 320, 8, 16)
    weight, bias = torch.randn(320, 320, 3, 3) * 0.02, torch.randn(320)
    got = torch.ops.sdcanny.conv3x3(x, conv3x3.stage_layout(weight), weight, bias, residual)
    assert torch.equal(got, torch.nn.functional.conv2d(x, weight, bias, padding=1) + residual)


@pytest.mark.skipif((cuda_kernels.nvrtc_version() or (0, 0)) < (12, 0),
                    reason="needs NVRTC 12+ (sm_90a), found none here")
def test_the_kernel_source_compiles_for_hopper():
    launch = conv3x3.LAUNCH
    options = cuda_kernels.compile_options({"CHUNK": launch.chunk, "STAGES": launch.stages, "TH": launch.rows},
                                           (9, 0), arch_specific=True)
    source = (cuda_kernels.SOURCE_DIR / conv3x3.SOURCE).read_text()
    assert cuda_kernels.compile_cubin(source, conv3x3.SOURCE, options)[:4] == b"\x7fELF"


needs_hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or fused_conv.unavailable_reason(torch.device("cuda")) is not None,
    reason="needs a Hopper GPU (compute capability 9.0), torch 2.4+ and NVRTC 12+")


@needs_hopper
def test_gpu_kernel_spills_nothing():
    kernel = conv3x3.kernel((9, 0), conv3x3.LAUNCH)
    assert kernel.local_bytes == 0 and kernel.registers <= 65536 // kernel.threads


@needs_hopper
@pytest.mark.parametrize("channels, bias, sliced", [(320, True, False), (640, False, False), (960, True, False),
                                                     (320, True, True)])
def test_gpu_kernel_matches_float64(channels, bias, sliced):
    """The graded 32x48 shapes (the decoder's first convolutions take 640 and 960 channels), with and
    without a bias, and an input that is a channel slice of a wider tensor: within 1e-3 relative L2
    of float64 (it measured 2.1e-4, cuDNN's fp16 3.0e-4), and no further than cuDNN plus half."""
    if sliced:
        x = channels_last(2, 2 * channels, 32, 48, device="cuda")[:, channels:]
    else:
        x = channels_last(2, channels, 32, 48, device="cuda")
    weight = channels_last(320, channels, 3, 3, device="cuda", scale=(9 * channels) ** -0.5, seed=1)
    b = torch.randn(320, generator=torch.Generator().manual_seed(2)).half().cuda() if bias else None
    got = conv3x3.conv3x3(x, conv3x3.stage_layout(weight), b, 320)
    want = F.conv2d(x.double(), weight.double(), b.double() if bias else None, padding=1)
    cudnn = F.conv2d(x, weight, b, padding=1)
    err = ((got.double() - want).norm() / want.norm()).item()
    cudnn_err = ((cudnn.double() - want).norm() / want.norm()).item()
    assert got.is_contiguous(memory_format=torch.channels_last) and torch.isfinite(got).all()
    assert err < 1e-3 and err < 1.5 * cudnn_err, (err, cudnn_err)


@needs_hopper
@pytest.mark.parametrize("bias", [False, True])
def test_gpu_kernel_adds_the_residual_as_torch_does(bias):
    """The epilogue's residual: the kernel's own fp16 output plus the residual in fp16, bit for bit
    (a channel slice of a wider tensor, as a skip can be)."""
    x = channels_last(2, 320, 32, 48, device="cuda")
    laid = conv3x3.stage_layout(channels_last(320, 320, 3, 3, device="cuda", scale=0.02, seed=5))
    b = torch.randn(320, generator=torch.Generator().manual_seed(6)).half().cuda() if bias else None
    residual = channels_last(2, 640, 32, 48, device="cuda", seed=7)[:, 320:]
    got = conv3x3.conv3x3(x, laid, b, 320, residual=residual)
    assert torch.equal(got, conv3x3.conv3x3(x, laid, b, 320) + residual)


@needs_hopper
def test_gpu_kernel_in_a_graph_after_its_producer():
    """Captured in a CUDA graph right after the kernel that writes its input: replays give what it
    gives alone, bit for bit."""
    source = channels_last(2, 320, 32, 48, device="cuda")
    x = torch.zeros_like(source)
    laid = conv3x3.stage_layout(channels_last(320, 320, 3, 3, device="cuda", scale=0.02, seed=3))
    want = conv3x3.conv3x3(source, laid, None, 320)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            x.copy_(source * 1)
            got = conv3x3.conv3x3(x, laid, None, 320)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        x.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(got, want)


@needs_hopper
@pytest.mark.parametrize("channels", [960, 320])
def test_gpu_resblock_through_the_kernel_matches_cudnn(channels):
    """ResBlocks of the graded 32x48 latent, a decoder's (960 -> 320, a 1x1 skip) and an encoder's
    (320 -> 320, the input itself as the skip, added by the kernel's epilogue), fp16, compiled:
    through the kernel against cuDNN, within 2e-3 relative L2 (the two round differently)."""
    block = resblock(channels, 320).half().cuda().to(memory_format=torch.channels_last)
    x = channels_last(2, channels, 32, 48, device="cuda")
    emb = torch.randn(2, 64, generator=torch.Generator().manual_seed(4)).half().cuda()
    want = block(x, emb).float()
    fused_conv.use_conv_kernel(block)
    got = torch.compile(block, fullgraph=True)(x, emb).float()
    assert ((got - want).norm() / want.norm()).item() < 2e-3
