"""fp8 patch products (sdcanny/fp8.py): the two terms' known values, the GroupNorm bound that fixes
their scale ahead, the product against float64 maths on its operands, and a compiled ResBlock
taking its convolutions as fp8 products. The kernel's terms are checked in
tests/group_norm_interpreted.py (Triton's interpreter) and on the GPU (tests/test_fused_norm.py)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from sdcanny import compat, fp8, fused_norm
from sdcanny.optional import installed
from sdcanny.networks import (Fp8PatchWeights, GroupNorm, ResBlock, patch_matrix, patch_weight_matrix,
                              use_fp8_patch_products, use_patch_products)

FP8_ON_CPU = compat.fp8_product_unavailable_reason(torch.device("cpu"))
needs_fp8 = pytest.mark.skipif(FP8_ON_CPU is not None, reason=str(FP8_ON_CPU))


def test_unavailable_off_cuda():
    assert "needs a CUDA device" in fp8.unavailable_reason(torch.device("cpu"))


@pytest.mark.skipif(not compat.CUSTOM_OPS or not installed("triton"), reason="needs torch 2.4+ and triton")
def test_unavailable_without_fp8_tensor_cores(monkeypatch):
    """An A10 (8.6) keeps fp16 patch products and says why, naming its compute capability."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    reason = fp8.unavailable_reason(torch.device("cuda"))
    assert "writes for fp8 tensor cores (compute capability 8.9+), not on this 8.6 GPU: the patch products stay fp16" in reason


@needs_fp8
def test_two_terms_known_values():
    """Under scale 1 (448 the largest e4m3): 300 is 288 (e4m3 steps by 32 there) plus 12, which
    the low term holds as 192 = 16 x 12; -301 is -288 and -13 x 16 = -208; 1e-4 is below e4m3's
    smallest step (2^-9) and rounds to 0, its residual 1.6e-3 then to 2^-9 (1.95e-3, the nearer
    of 0 and 2^-9). Each row of high terms is followed by its row of low terms."""
    terms = fp8.two_terms(torch.tensor([[448.0, 300.0], [-301.0, 1e-4]]), 1.0)
    assert terms.dtype == torch.float8_e4m3fn and terms.shape == (4, 2)
    assert terms.float().tolist() == [[448.0, 288.0], [0.0, 192.0], [-288.0, 0.0], [-208.0, 2.0 ** -9]]


def test_the_group_norm_bound_is_reached_by_one_outlier_and_never_passed():
    """A group of n values all equal but one normalises that one to sqrt(n - 1): the bound
    |weight| sqrt(n - 1) + |bias| is what the affine map then gives; random groups stay inside it,
    and with the SiLU after the norm too."""
    norm = GroupNorm(2, 4, eps=1e-12)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.5, -3.0, 1.0, 2.0]))
        norm.bias.copy_(torch.tensor([0.25, -0.5, -1.0, 0.0]))
    x = torch.zeros(1, 4, 3, 4, dtype=torch.float64)
    x[0, 1, 2, 3] = 7.0  # channel 1's group (channels 0 and 1, 24 values) has one outlier
    x[0, 2:] = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = F.group_norm(x, 2, norm.weight.double(), norm.bias.double(), 1e-12)
    bound = fp8.group_norm_bound(norm.weight, norm.bias, 24)
    assert bound == pytest.approx(3.0 * math.sqrt(23) + 0.5)
    assert out.abs().max().item() == pytest.approx(bound, rel=1e-6)
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        x = torch.randn(3, 4, 3, 4, generator=g, dtype=torch.float64) ** 3  # heavy tails
        out = F.group_norm(x, 2, norm.weight.double(), norm.bias.double(), 1e-6)
        assert out.abs().max().item() <= bound and F.silu(out).abs().max().item() <= bound


@needs_fp8
def test_the_two_term_product_is_the_product_of_its_operands():
    """fp8.two_term_product against float64 maths: on the operands as their e4m3 values stand
    for them (terms hi + lo / 16 times the scale, weight rows times theirs) within fp32
    accumulation; against the exact input and weights within what the weights' rounding costs."""
    g = torch.Generator().manual_seed(4)
    x, w, bias = torch.randn(24, 288, generator=g), torch.randn(40, 288, generator=g), torch.randn(40, generator=g)
    scale = torch.tensor(4 * x.abs().max().item() / fp8.FP8_MAX)  # a bound, looser than the exact one
    terms = fp8.two_terms(x, scale)
    w8, row_scale = fp8.weight_rows(w)
    unit = torch.ones(())
    got = fp8.two_term_product(terms, w8, row_scale * scale, unit, bias.half(), torch.float32)
    assert got.shape == (24, 40) and got.dtype == torch.float32
    hi, lo = terms.double()[0::2], terms.double()[1::2]
    rounded_x = (hi + lo * fp8.LOW_TERM_WEIGHT) * scale.double()
    rounded_w = w8.double() * row_scale.double()[:, None]
    on_operands = rounded_x @ rounded_w.t() + bias.half().double()
    exact = x.double() @ w.double().t() + bias.half().double()
    assert ((got.double() - on_operands).norm() / on_operands.norm()).item() < 1e-6
    assert ((rounded_x - x.double()).abs() <= x.double().abs() * 2.0 ** -8 + scale.item() * 2.0 ** -13).all()
    assert ((got.double() - exact).norm() / exact.norm()).item() < 3e-2


@needs_fp8
def test_the_patch_weights_scale_the_norms_bound_for_their_rows():
    """Fp8PatchWeights: the weight rows in the patch matrix's layout, the terms' scale the norm's
    bound over groups of max_rows pixels x its channels per group, over 448."""
    conv = torch.nn.Conv2d(8, 6, 3, padding=1)
    norm = GroupNorm(4, 8)
    with torch.no_grad():
        norm.weight.fill_(2.0)
        norm.bias.fill_(-1.0)
    weights = Fp8PatchWeights(conv, norm, max_rows=48)
    assert weights.term_scale.item() == pytest.approx((2.0 * math.sqrt(48 * 2 - 1) + 1.0) / fp8.FP8_MAX)
    w8, row_scale = fp8.weight_rows(patch_weight_matrix(conv.weight))
    assert torch.equal(weights.weight.float(), w8.float())
    torch.testing.assert_close(weights.out_scale, row_scale * weights.term_scale)
    # a module's buffers, not saved: prepared programs take them as inputs; the state dict stays the checkpoint's
    assert set(dict(weights.named_buffers())) == {"weight", "term_scale", "out_scale", "unit"}
    assert weights.state_dict() == {}


@needs_fp8
@pytest.mark.skipif(not compat.CUSTOM_OPS, reason=f"torch {torch.__version__} has no custom_op (2.4+)")
@pytest.mark.skipif(compat.compile_unavailable_reason("cpu") is not None, reason="torch.compile unavailable here")
def test_a_compiled_resblock_takes_its_convolutions_as_fp8_products():
    """Compiled with fused norms that write patches and fp8 weights for 48 rows, a ResBlock of 48
    output rows asks the op for both convolutions' patches as fp8 terms and multiplies them in
    two e4m3 products, the second norm reading the first product's halves: within the inputs' two terms (2^-8 a value) of the block with its weights
    rounded as the fp8 rows round them, and within that rounding (2.6% RMS a weight, two
    convolutions) of the fp32 block. With the patch products' bound below its rows, it keeps its
    convolutions, the same as the fp32 block to rounding."""
    from torch._inductor.utils import run_and_get_code
    fused_norm.register_op()
    block = ResBlock(32, 32, 8).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for norm in (block.in_layers[0], block.out_layers[0]):
            norm.weight.uniform_(0.5, 1.5, generator=g)
            norm.bias.normal_(generator=g)
    x = torch.randn(2, 32, 4, 6, generator=g).contiguous(memory_format=torch.channels_last)
    emb = torch.randn(2, 8, generator=g)
    fused_norm.use_fused_group_norm(block, patches=True, overlap=False)
    assert use_fp8_patch_products(block, 48) == 2
    rounded = copy.deepcopy(block)
    with torch.no_grad():
        for conv in (rounded.in_layers[2], rounded.out_layers[3]):
            w8, row_scale = fp8.weight_rows(patch_weight_matrix(conv.weight))
            conv.weight.copy_((w8.float() * row_scale[:, None]).view(32, 3, 3, 32).permute(0, 3, 1, 2))
        on_rounded = rounded(x, emb) - x  # eager: the convolutions in fp32 (the identity skip adds x back)
        want = block(x, emb)
        residual = want - x
        results = {}
        for bound in (47, 48):
            use_patch_products(block, bound)
            torch._dynamo.reset()
            got, code = run_and_get_code(torch.compile(block, fullgraph=True, dynamic=False), x, emb)
            results[bound] = (((got - x) - residual).norm() / residual.norm()).item(), "\n".join(code), got - x
    error, code, got = results[48]
    assert code.count("_scaled_mm") >= 2 and code.count("extern_kernels.convolution(") == 0
    op_calls = [line for line in code.splitlines() if "sdcanny.group_norm_act.default(" in line]
    assert len(op_calls) == 2 and all("True, True" in line for line in op_calls), op_calls
    # the second norm reads the first product's output as it is (its halves: no kernel sums them first)
    reading_halves = [line for line in op_calls if "x_scale=None" not in line]
    assert len(reading_halves) == 1 and "group_norm_act.default(reinterpret_tensor(buf" in reading_halves[0]
    assert ((got - on_rounded).norm() / on_rounded.norm()).item() < 4e-3
    assert 1e-3 < error < 5e-2, error
    error, code, _ = results[47]
    assert "_scaled_mm" not in code and code.count("extern_kernels.convolution(") == 2
    assert error < 1e-5, error


@needs_fp8
@pytest.mark.skipif(not compat.CUSTOM_OPS, reason=f"torch {torch.__version__} has no custom_op (2.4+)")
@pytest.mark.skipif(compat.compile_unavailable_reason("cpu") is not None, reason="torch.compile unavailable here")
def test_a_symbolic_trace_of_a_resblock_with_fp8_weights_serves_every_batch():
    """Patch products off, as in the programs of symbolic sizes: a ResBlock with fp8 weights compiled
    with symbolic sizes serves batches of 2, 3 and 8 without recompiling. Its fp8 row bound is
    never compared there: a comparison of the symbolic rows became a guard, and the samples kind's
    programs refused the very sizes they were prepared for (the GPU tests of test_programs.py)."""
    fused_norm.register_op()
    block = ResBlock(32, 32, 8).eval()
    fused_norm.use_fused_group_norm(block, patches=True, overlap=False)
    assert use_fp8_patch_products(block, 48) == 2
    use_patch_products(block, 0)
    torch._dynamo.reset()
    compiled = torch.compile(block, dynamic=True, fullgraph=True, backend="eager")
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for batch in (2, 3, 8):
            x, emb = torch.randn(batch, 32, 4, 6), torch.randn(batch, 8)
            torch.testing.assert_close(compiled(x, emb), block(x, emb))


def test_the_torch_path_refuses_terms_of_a_whole_tensor():
    with pytest.raises(ValueError, match="patches only"):
        GroupNorm(2, 4).normalize(torch.randn(1, 4, 2, 2), term_scale=torch.ones(()))


@needs_fp8
def test_the_torch_path_writes_the_patches_terms():
    """The op's path off the GPU: the patches of the normalised tensor, then fp8.two_terms."""
    norm = GroupNorm(2, 4)
    x = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(6))
    scale = torch.tensor(0.05)
    terms = norm.normalize(x, silu=True, patches=True, term_scale=scale)
    assert torch.equal(terms.float(), fp8.two_terms(patch_matrix(F.silu(norm(x))), scale).float())


@needs_fp8
def test_the_op_reads_halves_only_into_fp8_terms():
    """The op's output dtype follows from its terms: halves (fp32) in and a plain image out would
    have no dtype the network asked for, so the op refuses it (fp8.check_modes, which the kernel's
    wrapper calls too, for the GPU and the interpreter)."""
    halves, norm = torch.randn(1, 8, 2, 3), GroupNorm(2, 4)
    args = (halves, norm.weight, norm.bias, None, 0, None, 2, 1e-5, True, True)
    with pytest.raises(ValueError, match="only to write fp8 terms"):
        fused_norm.group_norm_act(*args, x_scale=torch.ones(4))
    terms = fused_norm.group_norm_act(*args, term_scale=torch.tensor(0.01), x_scale=torch.ones(4))
    assert terms.shape == (2 * 6, 9 * 4)  # the channels are half the halves'
    with pytest.raises(ValueError, match="only to write fp8 terms"):  # the check the kernel's wrapper makes too
        fp8.check_modes(True, False, None, torch.ones(4))
    with pytest.raises(ValueError, match="patches only"):
        fp8.check_modes(False, False, torch.tensor(0.01), None)
