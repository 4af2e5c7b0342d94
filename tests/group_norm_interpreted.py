"""The fused GroupNorm's Triton kernel on a CPU, in Triton's interpreter: run by
tests/test_fused_norm.py as a subprocess with TRITON_INTERPRET=1 (the variable must be set before
triton is imported). Prints one line per check; exits non-zero on the first that fails.

1. The kernel against float64 torch: both input layouts and a channel slice, with and without the
   addend (columns of a wider tensor; one row per sample, or one row for both plus a bias, or a
   bias alone) and the SiLU, a group held in registers and one read in two passes, a mean far from zero; and the
   kernel's 3x3 patches of its output (padding zeros included) the same, bit for bit, as
   networks.patch_matrix gathers from it, and their two e4m3 terms under a scale 4x the largest
   value's the same values as fp8.two_terms makes of those patches.
2. The tiled kernels (the VAE decoder's) against float64 torch: one sample and two, groups of
   several widths, tiles of one load and of several, a part-filled last tile, a mean far from
   zero, an input not channels-last, with and without a bias added first (a convolution's); and the
   op with `tiles` taking them where the channels are a power of two, one program per group where
   they are not, the bias in both.
3. The kernel reading an fp8 product's halves (hi channels, then lo; fp8.two_term_halves as an
   image), one pass and two, into fp8 terms: the terms the kernel writes of the halves' sum
   (fp8.sum_halves), the same values.
4. A ResBlock whose time embedding is one row for two samples, as in the step.
5. The tiny ControlNet and UNet, channels-last, time projections stacked (each ResBlock's addend
   columns of one wider row), with every GroupNorm through the op, and the tiny VAE decoder with
   every GroupNorm through the tiled kernels and each ResBlock's first convolution's bias added by
   the norm after it: the same outputs as with torch's GroupNorm.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdcanny import fp8, fused_norm  # noqa: E402
from sdcanny.config import TINY  # noqa: E402
from sdcanny.group_norm_kernel import (MAX_TILES, ONE_PASS_LIMIT, group_norm_act, tiled_group_norm_act,  # noqa: E402
                                       tiling)
from sdcanny.networks import GroupNorm, ResBlock, patch_matrix, stack_time_projections  # noqa: E402
from tiny_networks_through import check_through_op  # noqa: E402

# (channels, height, width, groups, layout, addend rows, SiLU): an addend is columns 5..5+C of a
# wider tensor; addend rows 1 is one row for both samples (broadcast, as the step's time rows
# are), with a per-channel bias added as the step's ResBlocks fold their first convolution's bias;
# "bias" is that bias alone, as the VAE decoder's ResBlocks add theirs.
# (60, 24, 24, 3) is one pass of 11520 elements; the groups of (48, 48, 48, 3) and
# (128, 47, 49, 32) x 16 are over ONE_PASS_LIMIT: two passes.
KERNEL_CASES = ((40, 4, 6, 4, "channels-last", 2, True), (60, 3, 5, 4, "contiguous", 0, False),
                (64, 40, 41, 32, "channels-last", 0, True), (64, 5, 7, 32, "slice", 2, True),
                (40, 4, 6, 4, "channels-last", 1, True),
                (60, 24, 24, 3, "contiguous", 0, True), (48, 48, 48, 3, "channels-last", 1, False),
                (128, 47, 49, 2, "channels-last", 1, True), (128, 47, 49, 2, "contiguous", 2, False),
                (160, 48, 48, 32, "slice", 0, True), (60, 3, 5, 4, "contiguous", "bias", False),
                (48, 48, 48, 3, "channels-last", "bias", True))
ADD_COLUMN = 5


def reference(x, weight, bias, groups, eps, silu, add):
    h = x if add is None else x + add.to(x.dtype)[:, :, None, None]
    out = F.group_norm(h.double(), groups, weight.double(), bias.double(), eps)
    return F.silu(out) if silu else out


def check_kernel():
    assert 16 * 48 * 48 > ONE_PASS_LIMIT and 64 * 47 * 49 > ONE_PASS_LIMIT >= 20 * 24 * 24
    g = torch.Generator().manual_seed(0)
    for channels, height, width, groups, layout, rows, silu in KERNEL_CASES:
        x = torch.randn(2, channels + 32 * (layout == "slice"), height, width, generator=g) * 0.5 + 100
        if layout != "contiguous":
            x = x.contiguous(memory_format=torch.channels_last)
        if layout == "slice":  # channels 16..16+C of a wider channels-last tensor: not dense
            x = x[:, 16:16 + channels]
        weight, bias = torch.randn(channels, generator=g), torch.randn(channels, generator=g)
        add = torch.randn(rows, channels + 2 * ADD_COLUMN, generator=g) if rows in (1, 2) else None
        add_bias = torch.randn(channels, generator=g) if rows in (1, "bias") else None
        got = group_norm_act(x, weight, bias, groups, 1e-5, silu, add, ADD_COLUMN, add_bias)
        total = None if add is None else add[:, ADD_COLUMN:ADD_COLUMN + channels] + (0 if add_bias is None else add_bias)
        total = add_bias[None] if add is None and add_bias is not None else total
        err = (got.double() - reference(x, weight, bias, groups, 1e-5, silu, total)).abs().max().item()
        print("kernel", (channels, height, width, groups), layout, f"add {rows} rows" * (add is not None),
              ("and bias" if add is not None else "bias") * (add_bias is not None), "silu" * silu,
              f"max abs err {err:.1e}")
        assert err < 1e-4, err
        assert got.is_contiguous(memory_format=torch.channels_last), got.stride()
        patches = group_norm_act(x, weight, bias, groups, 1e-5, silu, add, ADD_COLUMN, add_bias, patches=True)
        assert torch.equal(patches, patch_matrix(got)), "the patches are not the output's"
        scale = (got.abs().amax() * 4 / fp8.FP8_MAX).reshape(())  # a bound known ahead is looser than exact
        terms = group_norm_act(x, weight, bias, groups, 1e-5, silu, add, ADD_COLUMN, add_bias, patches=True,
                               term_scale=scale)
        assert terms.dtype == torch.float8_e4m3fn and terms.shape == (2 * patches.shape[0], patches.shape[1])
        assert torch.equal(terms.float(), fp8.two_terms(patches, scale).float()), "the terms are not the patches'"


# (samples, channels, height, width, layout, SiLU, bias) for the tiled kernels, 32 groups 2 to 16
# wide; (1, 256, 72, 120) has more row blocks than MAX_TILES, so each tile takes several loads
TILED_CASES = ((1, 128, 20, 30, "channels-last", False, False), (2, 512, 13, 17, "channels-last", True, True),
               (1, 256, 72, 120, "channels-last", True, True), (2, 64, 9, 11, "contiguous", True, False),
               (2, 64, 9, 11, "contiguous", False, True))


def check_tiled():
    rows, loads, _ = tiling(72 * 120, 256)
    assert loads > 1 and 72 * 120 > rows * MAX_TILES, (rows, loads)
    g = torch.Generator().manual_seed(3)
    for batch, channels, height, width, layout, silu, with_bias in TILED_CASES:
        x = torch.randn(batch, channels, height, width, generator=g) * 0.5 + 100
        if layout == "channels-last":
            x = x.contiguous(memory_format=torch.channels_last)
        weight, bias = torch.randn(channels, generator=g), torch.randn(channels, generator=g)
        add_bias = torch.randn(channels, generator=g) * 50 if with_bias else None  # moves each channel's mean
        got = tiled_group_norm_act(x, weight, bias, 32, 1e-6, silu, False, add_bias)
        total = add_bias[None] if with_bias else None
        err = (got.double() - reference(x, weight, bias, 32, 1e-6, silu, total)).abs().max().item()
        print("tiled", (batch, channels, height, width), layout, "silu" * silu, "bias" * with_bias,
              f"max abs err {err:.1e}")
        assert err < 1e-4, err
        assert got.is_contiguous(memory_format=torch.channels_last), got.stride()
    for channels in (128, 96):  # the tiled kernels, then (not a power of two) one program per group
        x = torch.randn(1, channels, 40, 44, generator=g).contiguous(memory_format=torch.channels_last)
        weight, bias, add_bias = (torch.randn(channels, generator=g) for _ in range(3))
        got = group_norm_act(x, weight, bias, 32, 1e-6, True, add_bias=add_bias, tiles=True)
        if channels == 128:
            assert torch.equal(got, tiled_group_norm_act(x, weight, bias, 32, 1e-6, True, False, add_bias))
        else:
            assert torch.equal(got, group_norm_act(x, weight, bias, 32, 1e-6, True, add_bias=add_bias))
        err = (got.double() - reference(x, weight, bias, 32, 1e-6, True, add_bias[None])).abs().max().item()
        print("tiled" if channels == 128 else "untiled", (1, channels, 40, 44), "the op with tiles",
              f"max abs err {err:.1e}")
        assert err < 1e-4, err


def check_halves():
    g = torch.Generator().manual_seed(4)
    for channels, height, width in ((40, 4, 6), (48, 48, 48)):  # 4 groups: one pass; 3 groups: two passes
        groups = 4 if channels == 40 else 3
        halves = torch.randn(2, 2 * channels, height, width, generator=g).contiguous(memory_format=torch.channels_last)
        x_scale = torch.rand(channels, generator=g) + 0.5
        weight, bias = torch.randn(channels, generator=g), torch.randn(channels, generator=g)
        add, add_bias = torch.randn(1, channels + 2 * ADD_COLUMN, generator=g), torch.randn(channels, generator=g)
        term_scale = torch.tensor(0.05)
        got = group_norm_act(halves, weight, bias, groups, 1e-5, True, add, ADD_COLUMN, add_bias, patches=True,
                             term_scale=term_scale, x_scale=x_scale)
        summed = fp8.sum_halves(halves, x_scale)
        want = group_norm_act(summed, weight, bias, groups, 1e-5, True, add, ADD_COLUMN, add_bias, patches=True,
                              term_scale=term_scale)
        same = (got.float() == want.float()).float().mean().item()
        print("halves", (channels, height, width, groups), f"terms the same {same:.6f}")
        assert same == 1.0, same


def check_resblock_with_one_time_row():
    """A ResBlock of two samples whose time embedding is one row, as the step's stacked time rows
    are: the op's addend broadcasts as torch's sum does."""
    g = torch.Generator().manual_seed(2)
    block = ResBlock(32, 64, 12).eval()
    x = torch.randn(2, 32, 6, 10, generator=g).contiguous(memory_format=torch.channels_last)
    emb = torch.randn(1, 12, generator=g)
    with torch.no_grad():
        want = block(x, emb)
        for m in block.modules():
            if isinstance(m, GroupNorm):
                m.fused = True
        got = block(x, emb)
    err = ((got - want).norm() / want.norm()).item()
    print("network resblock, one time row", tuple(got.shape), f"relative L2 {err:.1e}")
    assert err < 1e-5, err


def as_the_fast_back_end_has_them(net):
    """Channels-last, each ResBlock's time projection a block of columns of one product."""
    net.to(memory_format=torch.channels_last)
    stack_time_projections(net)


def check_networks():
    nets, g = check_through_op("GroupNorms through the op:", fused_norm.use_fused_group_norm,
                               prepare=as_the_fast_back_end_has_them, seed=1, channels_last=True)
    cl = torch.channels_last
    z = torch.randn(1, TINY.vae.embed_dim, 6, 10, generator=g).contiguous(memory_format=cl)
    with torch.no_grad():
        nets.vae.to(memory_format=cl)
        want = nets.vae(z)
        count = fused_norm.use_fused_group_norm(nets.vae, tiles=True)
        blocks = fused_norm.conv_biases_in_norms(nets.vae)
        got = nets.vae(z)
    err = ((got - want).norm() / want.norm()).item()
    print("network vae", tuple(got.shape), f"relative L2 {err:.1e}", "GroupNorms through the op with tiles:", count,
          "ResBlocks adding conv1's bias in the norm:", blocks)
    assert err < 1e-5, err


if __name__ == "__main__":
    import triton  # noqa: F401  (the interpreter must be what triton.jit gives)
    from triton.runtime.interpreter import InterpretedFunction
    from sdcanny.group_norm_kernel import group_norm_kernel
    assert isinstance(group_norm_kernel, InterpretedFunction), "run with TRITON_INTERPRET=1"
    fused_norm.register_op()
    check_kernel()
    check_tiled()
    check_halves()
    check_resblock_with_one_time_row()
    check_networks()
