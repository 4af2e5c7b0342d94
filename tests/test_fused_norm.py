"""The fused GroupNorm: GroupNorm.normalize's maths, the op's torch path and tracing, and the Triton
kernel against float64 torch (in Triton's interpreter on a CPU, on the GPU where there is one)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sdcanny import compat, fp8, fused_norm
from sdcanny.checkpoint import load_networks
from sdcanny.config import TINY
from sdcanny.networks import GroupNorm, ResBlock, patch_matrix, use_patch_products
from sdcanny.optional import installed

ROOT = Path(__file__).resolve().parents[1]
needs_custom_ops = pytest.mark.skipif(not compat.CUSTOM_OPS, reason=f"torch {torch.__version__} has no custom_op (2.4+)")


def expected(x, norm, silu, add):
    """GroupNorm (then SiLU) of x + add, in float64, from the functional form."""
    h = x.double() + (add.double()[:, :, None, None] if add is not None else 0)
    out = F.group_norm(h, norm.num_groups, norm.weight.double(), norm.bias.double(), norm.eps)
    return F.silu(out) if silu else out


@pytest.mark.parametrize("silu, with_add", [(False, False), (True, False), (True, True)])
def test_normalize_is_group_norm_of_the_sum_then_silu(silu, with_add):
    g = torch.Generator().manual_seed(7)
    norm = GroupNorm(4, 12, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(generator=g)
        norm.bias.normal_(generator=g)
    x = torch.randn(2, 12, 3, 5, generator=g) * 3 + 2
    add = torch.randn(2, 12, generator=g) if with_add else None
    torch.testing.assert_close(norm.normalize(x, silu=silu, add=add).double(), expected(x, norm, silu, add),
                               rtol=1e-5, atol=1e-5)


def test_unavailable_off_cuda():
    assert "needs a CUDA device" in fused_norm.unavailable_reason(torch.device("cpu"))


@needs_custom_ops
def test_fused_networks_keep_their_state_dict_and_outputs(tiny_checkpoint):
    """Swapped in (the op's torch path on a CPU), the ControlNet and the UNet give the same outputs
    and keep the checkpoint's layout; every GroupNorm of theirs is swapped."""
    nets = load_networks(tiny_checkpoint, TINY)
    g = torch.Generator().manual_seed(8)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([601, 601])
    ctx = torch.randn(2, 77, TINY.clip.width, generator=g)
    feats = torch.randn(2, TINY.unet.model_channels, 8, 8, generator=g)
    keys = list(nets.unet.state_dict())
    with torch.no_grad():
        want = nets.unet(x, t, ctx), nets.controlnet(x, t, ctx, feats)
        for net in (nets.unet, nets.controlnet):
            assert fused_norm.use_fused_group_norm(net) == sum(isinstance(m, GroupNorm) for m in net.modules()) > 0
        got = nets.unet(x, t, ctx), nets.controlnet(x, t, ctx, feats)
    # the op's output is channels-last, so the convolutions after it sum in another order: fp32 rounding
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)
    assert list(nets.unet.state_dict()) == keys


@needs_custom_ops
@pytest.mark.skipif(compat.compile_unavailable_reason("cpu") is not None, reason="torch.compile unavailable here")
def test_the_op_traces_into_a_compiled_resblock():
    """torch.compile takes the op as one call (its fake gives the output's shape and strides) and
    the compiled block computes what the eager one does."""
    fused_norm.register_op()
    block = ResBlock(32, 64, 12).eval()
    for m in block.modules():
        if isinstance(m, GroupNorm):
            m.fused = True
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 32, 6, 10, generator=g).contiguous(memory_format=torch.channels_last)
    emb = torch.randn(2, 12, generator=g)
    with torch.no_grad():
        want = block(x, emb)
        got = torch.compile(block, fullgraph=True, dynamic=False)(x, emb)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_custom_ops
@pytest.mark.skipif(compat.compile_unavailable_reason("cpu") is not None, reason="torch.compile unavailable here")
def test_a_compiled_resblock_takes_its_patches_from_the_op():
    """Compiled at a patch-product bound that takes its convolutions, a ResBlock with fused norms
    asks the op itself for both convolutions' patches (no convolution and no gather left: two op
    calls with the SiLU and patches on); below the bound it keeps its two convolutions. Both compute what the
    eager block does."""
    from torch._inductor.utils import run_and_get_code
    fused_norm.register_op()
    block = ResBlock(32, 32, 8).eval()  # an identity skip: the block's only convolutions are its two 3x3
    assert fused_norm.use_fused_group_norm(block, patches=True, overlap=False) == 2
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 32, 4, 6, generator=g).contiguous(memory_format=torch.channels_last)
    emb = torch.randn(2, 8, generator=g)
    with torch.no_grad():
        want = block(x, emb)
        codes = {}
        for bound in (47, 48):
            use_patch_products(block, bound)
            torch._dynamo.reset()
            got, code = run_and_get_code(torch.compile(block, fullgraph=True, dynamic=False), x, emb)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            codes[bound] = "\n".join(code)
    op_calls = [line for line in codes[48].splitlines() if "sdcanny.group_norm_act.default(" in line]
    assert len(op_calls) == 2 and all("1e-05, True, True" in line for line in op_calls), op_calls
    assert codes[48].count("extern_kernels.convolution(") == 0
    assert codes[47].count("extern_kernels.convolution(") == 2


@pytest.mark.skipif(not installed("triton") or not installed("triton.runtime.interpreter"),
                    reason="needs triton with its interpreter (3.0+)")
def test_the_kernel_and_the_fused_networks_in_the_interpreter():
    """tests/group_norm_interpreted.py under TRITON_INTERPRET=1: the kernel within 1e-4 of float64
    torch (both layouts, a channel slice, the addend per sample or one row for both, the SiLU, one
    program per group in one pass and in two, a mean far from zero), its output channels-last; the
    tiled kernels the same (one sample and two, several loads a tile), and the op
    taking them for power-of-two channels only; the kernel reading an fp8 product's halves into
    fp8 terms, those of the halves' sum; a
    ResBlock with one time row for two samples, and the tiny channels-last ControlNet and UNet,
    with every GroupNorm through it, and the tiny VAE decoder through the tiled kernels (each
    ResBlock's first convolution's bias added by the norm after it), give torch's GroupNorm's outputs."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "group_norm_interpreted.py")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    starts = [line.split(" ")[0] for line in run.stdout.splitlines()]
    assert starts.count("kernel") == 12 and starts.count("tiled") == 6 and starts.count("untiled") == 1
    assert starts.count("halves") == 2
    assert starts.count("network") == 16
    assert "GroupNorms through the op: [27, 61]" in run.stdout
    assert "GroupNorms through the op with tiles: 22 ResBlocks adding conv1's bias in the norm: 10" in run.stdout


@pytest.mark.parametrize("rows, columns, column, add_bias, message", [
    (2, 8, 0, None, "3 rows or 1 and 8 columns from column 0"), (3, 4, 0, None, "8 columns"),
    (1, 10, 3, None, "8 columns from column 3"), (1, 8, 0, (4,), r"add_bias must be \(8,\)"),
    (0, 0, 0, (5,), r"add_bias must be \(8,\)")])
def test_the_op_refuses_addends_it_cannot_read(rows, columns, column, add_bias, message):
    add = torch.ones(rows, columns) if rows else None
    with pytest.raises(ValueError, match=message):
        fused_norm.group_norm_act(torch.randn(3, 8, 2, 2), torch.ones(8), torch.zeros(8), add, column,
                                  torch.ones(add_bias) if add_bias else None, 4, 1e-5, False)


@pytest.mark.parametrize("rows", [0, 1, 3])
def test_the_torch_path_adds_the_columns_and_the_bias(rows):
    """Off the GPU the op is torch's maths: columns 2..2+C of the addend plus add_bias, broadcast
    over the samples (or, with no addend, add_bias alone), against float64 from the functional form."""
    g = torch.Generator().manual_seed(11)
    x, add, add_bias = torch.randn(3, 8, 4, 5, generator=g), torch.randn(rows, 12, generator=g), torch.randn(8, generator=g)
    w, b = torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)
    got = fused_norm.group_norm_act(x, w, b, add if rows else None, 2, add_bias, 4, 1e-5, True)
    total = (add[:, 2:10].double() + add_bias.double()) if rows else add_bias.double()[None]
    h = x.double() + total[:, :, None, None]
    want = F.silu(F.group_norm(h, 4, w.double(), b.double(), 1e-5))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@needs_custom_ops
def test_the_op_gives_channels_last_for_any_input_layout():
    """Its traced output and its torch path agree on the layout: channels-last, whatever x's."""
    fused_norm.register_op()
    x = torch.randn(2, 8, 3, 5)
    w, b = torch.ones(8), torch.zeros(8)
    eager = torch.ops.sdcanny.group_norm_act(x, w, b, None, 0, None, 4, 1e-5, True)
    traced = fused_norm._group_norm_act_shape(x, w, b, None, 0, None, 4, 1e-5, True)
    assert eager.stride() == traced.stride() == torch.empty_like(x, memory_format=torch.channels_last).stride()
    torch.testing.assert_close(eager, F.silu(F.group_norm(x, 4, w, b, 1e-5)))


@pytest.mark.skipif(not torch.cuda.is_available() or fused_norm.unavailable_reason(torch.device("cuda")) is not None,
                    reason="needs a CUDA GPU, torch 2.4+ and triton")
@pytest.mark.parametrize("channels, height, width, add_rows, silu", [
    (320, 32, 48, 1, True), (640, 16, 24, 0, True), (1280, 8, 12, 0, False), (2560, 4, 6, 2, True),
    (960, 32, 48, 0, True)])
def test_gpu_fused_group_norm_matches_float64(channels, height, width, add_rows, silu):
    """The op on the GPU, fp16 channels-last at the step's shapes (960 x 32 x 48: two passes), the
    addend one row for both samples plus a bias as in the step, or one per sample, against float64
    torch; launched overlapped (programmatic dependent launch, where the GPU has it) too, the same
    output bit for bit, and the patches it writes are those of its output, bit for bit."""
    fused_norm.register_op()
    g = torch.Generator(device="cuda").manual_seed(10)
    x = (torch.randn(2, channels, height, width, device="cuda", generator=g) * 2 + 1).half()
    x = x.contiguous(memory_format=torch.channels_last)
    norm = GroupNorm(32, channels).cuda().half()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=g)
        norm.bias.normal_(generator=g)
    add = torch.randn(add_rows, channels, device="cuda", generator=g).half() if add_rows else None
    add_bias = torch.randn(channels, device="cuda", generator=g).half() if add_rows == 1 else None
    args = (x, norm.weight, norm.bias, add, 0, add_bias, 32, norm.eps, silu)
    got = torch.ops.sdcanny.group_norm_act(*args)
    want = expected(x, norm, silu, add if add_bias is None else add + add_bias)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-3
    overlapped = torch.ops.sdcanny.group_norm_act(*args, False, True)
    patches = torch.ops.sdcanny.group_norm_act(*args, True, True)
    assert torch.equal(overlapped, got)
    assert torch.equal(patches, patch_matrix(got))


@pytest.mark.skipif(not torch.cuda.is_available() or fp8.unavailable_reason(torch.device("cuda")) is not None,
                    reason="needs a CUDA GPU with fp8 tensor cores, torch 2.5+ and triton")
@pytest.mark.parametrize("channels, height, width, add_rows", [(1280, 4, 6, 1), (640, 8, 12, 0), (2560, 4, 6, 2)])
def test_gpu_fp8_terms_are_those_of_the_kernels_output(channels, height, width, add_rows):
    """The op's patches as fp8 terms (a ResBlock's fp8 patch products), compiled for the GPU, under a
    scale from the norm's bound as the back-end sets it: from an fp32 input, the same values as
    fp8.two_terms gives of the op's fp32 output's patches (its rounding to e4m3, in fp32
    arithmetic, is torch's), but for the rare value the kernel holds one fp32 rounding apart
    from what it stores (its multiply-adds fused otherwise: 30 of 1.1 million terms on the H100,
    residuals off a tie by less than that); and within 2^-8 a value of the float64 GroupNorm
    where that is normal in e4m3. Reading an fp8 product's halves, the terms of their sum."""
    fused_norm.register_op()
    g = torch.Generator(device="cuda").manual_seed(11)
    x = torch.randn(2, channels, height, width, device="cuda", generator=g).contiguous(memory_format=torch.channels_last)
    norm = GroupNorm(32, channels).cuda()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=g)
        norm.bias.normal_(generator=g)
    add = torch.randn(add_rows, channels, device="cuda", generator=g) if add_rows else None
    scale = torch.tensor(fp8.group_norm_bound(norm.weight, norm.bias, 192 * channels // 32) / fp8.FP8_MAX,
                         device="cuda")
    args = (x, norm.weight, norm.bias, add, 0, None, 32, norm.eps, True)
    out = torch.ops.sdcanny.group_norm_act(*args)
    terms = torch.ops.sdcanny.group_norm_act(*args, True, True, False, scale)
    assert terms.dtype == torch.float8_e4m3fn and terms.shape == (2 * 2 * height * width, 9 * channels)
    same = terms.float() == fp8.two_terms(patch_matrix(out), scale).float()
    assert same.float().mean().item() > 0.9999, (~same).sum().item()
    hi, lo = terms.double()[0::2], terms.double()[1::2]
    values = (hi + lo * fp8.LOW_TERM_WEIGHT) * scale.double()
    want = patch_matrix(expected(x, norm, True, add))
    normal = want.abs() >= scale.double() * 2.0 ** -6  # e4m3's smallest normal value, scaled
    assert ((values - want).abs()[normal] <= want.abs()[normal] * (2.0 ** -8 + 1e-5)).all()  # and fp32 GroupNorm
    # the same norm reading an fp8 product's halves (hi channels, then lo) writes its sum's terms
    halves = torch.randn(2, 2 * channels, height, width, device="cuda", generator=g)
    halves = halves.contiguous(memory_format=torch.channels_last)
    x_scale = torch.rand(channels, device="cuda", generator=g) + 0.5
    from_halves = torch.ops.sdcanny.group_norm_act(halves, *args[1:], True, True, False, scale, x_scale)
    of_sum = torch.ops.sdcanny.group_norm_act(fp8.sum_halves(halves, x_scale), *args[1:], True, True, False, scale)
    assert (from_halves.float() == of_sum.float()).float().mean().item() > 0.9999


@pytest.mark.skipif(not installed("triton"), reason="needs triton (the kernels' module imports it)")
@pytest.mark.parametrize("add, patches, message", [(True, False, "no addend"), (False, True, "no patches")])
def test_the_op_with_tiles_refuses_addends_and_patches(add, patches, message):
    """The op with `tiles` takes neither addends nor patches, at any size: an error before any kernel
    runs (no GPU needed)."""
    from sdcanny.group_norm_kernel import group_norm_act
    with pytest.raises(ValueError, match=message):
        group_norm_act(torch.randn(1, 96, 4, 4), torch.ones(96), torch.zeros(96), 32, 1e-6, True,
                       torch.ones(1, 96) if add else None, patches=patches, tiles=True)


@pytest.mark.skipif(not installed("triton"), reason="needs triton (the kernels' module imports it)")
@pytest.mark.parametrize("channels, groups", [(96, 24), (96, 32), (128, 24)])
def test_the_tiled_kernels_refuse_counts_not_powers_of_two(channels, groups):
    from sdcanny.group_norm_kernel import tiled_group_norm_act
    with pytest.raises(ValueError, match=f"power-of-two channels and groups, got {channels} and {groups}"):
        tiled_group_norm_act(torch.randn(1, channels, 4, 4), torch.ones(channels), torch.zeros(channels), groups,
                             1e-6, True, False)


@pytest.mark.skipif(not torch.cuda.is_available() or fused_norm.unavailable_reason(torch.device("cuda")) is not None,
                    reason="needs a CUDA GPU, torch 2.4+ and triton")
@pytest.mark.parametrize("channels, height, width, silu", [
    (512, 32, 48, False), (512, 64, 96, True), (256, 128, 192, True), (256, 256, 384, True), (128, 256, 384, True)])
def test_gpu_tiled_group_norm_matches_float64(channels, height, width, silu):
    """The op with `tiles` (the tiled kernels) on the GPU at the VAE decoder's graded shapes (one
    sample, fp16 channels-last, eps 1e-6) against float64 torch; overlapped the same output bit for
    bit."""
    fused_norm.register_op()
    g = torch.Generator(device="cuda").manual_seed(12)
    x = (torch.randn(1, channels, height, width, device="cuda", generator=g) * 2 + 3).half()
    x = x.contiguous(memory_format=torch.channels_last)
    norm = GroupNorm(32, channels, eps=1e-6).cuda().half()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=g)
        norm.bias.normal_(generator=g)
    args = (x, norm.weight, norm.bias, None, 0, None, 32, norm.eps, silu, False)
    got = torch.ops.sdcanny.group_norm_act(*args, False, True)
    want = expected(x, norm, silu, None)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-3
    assert torch.equal(torch.ops.sdcanny.group_norm_act(*args, True, True), got)


@pytest.mark.skipif(not torch.cuda.is_available() or fused_norm.unavailable_reason(torch.device("cuda")) is not None,
                    reason="needs a CUDA GPU, torch 2.4+ and triton")
@pytest.mark.parametrize("channels, height, width", [(512, 32, 48), (256, 128, 192), (128, 256, 384)])
def test_gpu_tiled_group_norm_adds_a_convolution_bias_as_torch_rounds_it(channels, height, width):
    """The tiled op with add_bias alone (a VAE ResBlock's conv1 bias, VAEResnetBlock.conv1_bias_in_norm)
    on the GPU: within an fp16 rounding of the op on torch's fp16 sum x + bias, the sum that a
    convolution with its bias gives TorchInductor's form of it (the kernels compiled with and
    without the bias may sum in other orders: at 512 x 32 x 48 some outputs were one rounding apart,
    H100), and of float64; the bias large enough to move each group's mean."""
    fused_norm.register_op()
    g = torch.Generator(device="cuda").manual_seed(13)
    x = (torch.randn(1, channels, height, width, device="cuda", generator=g) * 2).half()
    x = x.contiguous(memory_format=torch.channels_last)
    conv_bias = (torch.randn(channels, device="cuda", generator=g) * 8).half()
    norm = GroupNorm(32, channels, eps=1e-6).cuda().half()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=g)
        norm.bias.normal_(generator=g)
        summed = (x + conv_bias[:, None, None]).contiguous(memory_format=torch.channels_last)
    got = torch.ops.sdcanny.group_norm_act(x, norm.weight, norm.bias, None, 0, conv_bias, 32, norm.eps, True, False,
                                           False, True)
    want = torch.ops.sdcanny.group_norm_act(summed, norm.weight, norm.bias, None, 0, None, 32, norm.eps, True, False,
                                            False, True)
    torch.testing.assert_close(got, want, rtol=2 ** -9, atol=2 ** -12)
    assert ((got.double() - expected(summed, norm, True, None)).norm() / got.double().norm()).item() < 1e-3


@pytest.mark.skipif(not installed("triton"), reason="needs triton (the kernels' module imports it)")
@pytest.mark.parametrize("pixels, channels", [(1536, 512), (98304, 128), (98304, 256), (884736, 128), (7, 4096)])
def test_the_tiles_cover_every_pixel_in_bounded_loads(pixels, channels):
    """tiling: the tiles' rows cover the image, and a tile takes no more than MAX_LOADS loads of
    TILE_LOAD_ELEMENTS; where it takes fewer there are at most MAX_TILES tiles, and no tile is wholly
    past the image."""
    from sdcanny.group_norm_kernel import MAX_LOADS, MAX_TILES, TILE_LOAD_ELEMENTS, tiling
    rows, loads, tiles = tiling(pixels, channels)
    assert rows * loads * tiles >= pixels > rows * loads * (tiles - 1)
    assert 1 <= loads <= MAX_LOADS and rows * channels <= max(TILE_LOAD_ELEMENTS, channels)
    assert loads == MAX_LOADS or tiles <= MAX_TILES
