from __future__ import annotations

import pytest
import torch

from sdcanny import compat
from sdcanny.checkpoint import load_networks
from sdcanny.config import TINY
from sdcanny.networks import UnionModel


def unet_inputs(seed: int, timestep: int):
    """The tiny UNet's inputs at an 8x8 latent for both guidance branches, seeded, and the generator
    for any further draws."""
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([timestep, timestep])
    return x, t, torch.randn(2, 77, TINY.clip.width, generator=g), g


def test_union_equals_separate_controlnet_and_unet_calls(tiny_checkpoint):
    nets = load_networks(tiny_checkpoint, TINY)
    union = UnionModel(nets.controlnet, nets.unet)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([951, 951])
    ctx = torch.randn(2, 77, TINY.clip.width, generator=g)
    hint = torch.rand(2, 3, 64, 64, generator=g)
    scales = torch.tensor([[0.825 ** (12 - i) for i in range(13)], [0.0] * 13])
    with torch.no_grad():
        feats = nets.controlnet.embed_hint(hint)
        got = union(x, t, ctx, feats, scales)
        controls = nets.controlnet(x[:1], t[:1], ctx[:1], feats[:1])
        cond = nets.unet(x[:1], t[:1], ctx[:1], [c * s for c, s in zip(controls, scales[0].tolist())])
        uncond = nets.unet(x[1:], t[1:], ctx[1:])  # scales 0: the plain UNet, as guess mode's uncond
    torch.testing.assert_close(got, torch.cat([cond, uncond]), rtol=1e-5, atol=1e-5)
    assert (cond - nets.unet(x[:1], t[:1], ctx[:1])).abs().max() > 1e-3  # the control matters


def test_both_branches_doubles_shared_rows_and_refuses_others():
    from sdcanny.networks import both_branches
    x = torch.arange(6.0).reshape(3, 2)
    assert both_branches(x, 3) is x
    torch.testing.assert_close(both_branches(x, 6), torch.cat([x, x]))
    with pytest.raises(ValueError, match="3 rows"):
        both_branches(x, 4)


@pytest.mark.parametrize("folded", [False, True])
def test_shared_latents_give_what_each_branch_gets_on_its_own(tiny_checkpoint, folded):
    """The ControlNet's residuals and the UNet's output for N latents that both branches share
    equal those for the 2N rows [x, x], plain and with the cross-attentions' keys and values made
    ahead and folded (the fast back-end's form); the residual of the shared layers has N rows."""
    from sdcanny.networks import cross_attention_keys_values, fold_cross_attention, index_cross_attention
    nets = load_networks(tiny_checkpoint, TINY)
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([601])
    ctx = torch.randn(4, 77, TINY.clip.width, generator=g)
    feats = torch.randn(2, TINY.unet.model_channels, 8, 8, generator=g)
    contexts = {"controlnet": ctx, "unet": ctx}
    if folded:
        for name, net in (("controlnet", nets.controlnet), ("unet", nets.unet)):
            index_cross_attention(net)
            fold_cross_attention(net, 77)
            contexts[name] = cross_attention_keys_values(net, ctx)
    with torch.no_grad():
        shared = nets.controlnet(x, t, contexts["controlnet"], feats)
        doubled = nets.controlnet(torch.cat([x, x]), t, contexts["controlnet"], torch.cat([feats, feats]))
        eps_shared = nets.unet(x, t, contexts["unet"], shared)
        eps_doubled = nets.unet(torch.cat([x, x]), t, contexts["unet"], doubled)
    assert shared[0].shape[0] == 2 and all(c.shape[0] == 4 for c in shared[1:])
    torch.testing.assert_close(torch.cat([shared[0], shared[0]]), doubled[0])
    for a, b in zip(shared[1:], doubled[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps_shared, eps_doubled, rtol=1e-5, atol=1e-5)
    assert (eps_doubled[:2] - eps_doubled[2:]).abs().max() > 1e-3  # the branches' contexts differ


def test_clip_is_causal(tiny_checkpoint):
    clip = load_networks(tiny_checkpoint, TINY).clip
    tokens = torch.full((2, 77), 49407)
    tokens[:, 0] = 49406
    tokens[0, 1:4] = torch.tensor([320, 3329, 49407])
    tokens[1, 1:4] = torch.tensor([320, 1929, 49407])  # differs from position 2 on
    with torch.no_grad():
        out = clip(tokens)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, :2], out[1, :2])
    assert (out[0, 2:] - out[1, 2:]).abs().max() > 1e-3


def test_fused_attention_projections_compute_the_same(tiny_checkpoint):
    from sdcanny.networks import BasicTransformerBlock
    nets = load_networks(tiny_checkpoint, TINY)
    x, t, ctx, _ = unet_inputs(2, 501)
    with torch.no_grad():
        before = nets.unet(x, t, ctx)
        blocks = [m for m in nets.unet.modules() if isinstance(m, BasicTransformerBlock)]
        for block in blocks:
            block.fuse_projections()
        after = nets.unet(x, t, ctx)
    assert blocks and all(b.attn1.fused_weight.shape[0] == 3 * b.attn1.to_q.out_features for b in blocks)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert "attn1.fused_weight" not in "".join(nets.unet.state_dict())  # checkpoint layout unchanged


def test_stacked_time_projections_compute_the_same(tiny_checkpoint):
    """One matrix product of every ResBlock's stacked timestep Linear gives each block the columns
    its own Linear gives: UNet and ControlNet outputs unchanged, the checkpoint layout too."""
    from sdcanny.networks import ResBlock, stack_time_projections
    nets = load_networks(tiny_checkpoint, TINY)
    x, t, ctx, g = unet_inputs(3, 751)
    feats = torch.randn(2, TINY.unet.model_channels, 8, 8, generator=g)
    keys = {name: list(net.state_dict()) for name, net in (("unet", nets.unet), ("controlnet", nets.controlnet))}
    with torch.no_grad():
        before = nets.unet(x, t, ctx), nets.controlnet(x, t, ctx, feats)
        for net in (nets.unet, nets.controlnet):
            stack_time_projections(net)
        after = nets.unet(x, t, ctx), nets.controlnet(x, t, ctx, feats)
    torch.testing.assert_close(after[0], before[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after[1], before[1], rtol=1e-5, atol=1e-5)
    for name, net in (("unet", nets.unet), ("controlnet", nets.controlnet)):
        blocks = [m for m in net.modules() if isinstance(m, ResBlock)]
        columns = [b.emb_columns for b in blocks]
        assert columns[0][0] == 0 and all(a[1] == b[0] for a, b in zip(columns, columns[1:]))  # side by side
        assert columns[-1][1] == net.stacked_time_weight.shape[0] == sum(b.emb_layers[1].out_features for b in blocks)
        assert list(net.state_dict()) == keys[name]  # the stacked copy is not in the checkpoint layout
    with torch.no_grad():  # and the blocks do read the stacked copy, not their own Linear
        nets.unet.stacked_time_weight *= 2  # (a bias shift the same for every channel would cancel in GroupNorm)
        assert (nets.unet(x, t, ctx) - after[0]).abs().max() > 1e-3


def test_upsampling_phases_of_a_constant_kernel():
    """Worked by hand for a 3x3 kernel of ones: an even output row takes one 3x3 row from the input
    row above and two from its own row, an odd one two from its own row and one from the row
    below; columns the same; so each phase's 2x2 kernel is the outer product of (1, 2) or (2, 1)."""
    from sdcanny.networks import upsampling_phases
    weight, bias = torch.ones(1, 1, 3, 3), torch.tensor([0.5])
    phases, biases = upsampling_phases(weight, bias)
    even, odd = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0])
    want = [torch.outer(r, c) for r in (even, odd) for c in (even, odd)]  # (row, column) parity order
    assert phases.shape == (4, 1, 2, 2)
    for got, expected in zip(phases[:, 0], want):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert biases.tolist() == [0.5] * 4


def test_folded_upsampling_computes_the_same():
    """Upsample with the doubling folded into 2x2 phase kernels equals nearest doubling then the
    3x3 convolution (in float64, to rounding), at odd sizes and one pixel too, and gives a
    channels-last result; the checkpoint layout is unchanged."""
    from sdcanny.networks import Upsample
    g = torch.Generator().manual_seed(5)
    for channels, height, width in ((8, 3, 5), (4, 1, 1), (6, 4, 6)):
        layer = Upsample(channels).double()
        keys = list(layer.state_dict())
        x = torch.randn(2, channels, height, width, generator=g, dtype=torch.float64)
        with torch.no_grad():
            want = layer(x)
            layer.fold_upsampling()
            got = layer(x)
        assert got.shape == want.shape == (2, channels, 2 * height, 2 * width)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert list(layer.state_dict()) == keys


def test_folded_upsampling_in_the_unet_and_the_vae(tiny_checkpoint):
    """fold_upsampling reaches every Upsample of the UNet and the VAE decoder, whose outputs
    keep to fp32 rounding, and the layers do use the folded weights."""
    from sdcanny.networks import fold_upsampling
    nets = load_networks(tiny_checkpoint, TINY)
    x, t, ctx, _ = unet_inputs(6, 401)
    with torch.no_grad():
        want = nets.unet(x, t, ctx), nets.vae(x[:1])
        assert fold_upsampling(nets.unet) == len(TINY.unet.channel_mult) - 1
        assert fold_upsampling(nets.vae) == len(TINY.vae.ch_mult) - 1
        got = nets.unet(x, t, ctx), nets.vae(x[:1])
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
        for layer in (m for m in nets.vae.modules() if hasattr(m, "phase_weight")):
            layer.phase_weight.zero_()
        assert (nets.vae(x[:1]) - got[1]).abs().max() > 1e-3


def test_padded_output_convolutions_compute_the_same(tiny_checkpoint):
    """pad_output_channels gives the UNet's and the VAE decoder's last convolutions 8 filters (4 and 3
    of them the checkpoint's, the rest zeros): the outputs keep their channels and values, the
    state dict its keys and shapes, and the layers do use the padded weights."""
    from sdcanny.networks import OutputConv, pad_output_channels
    nets = load_networks(tiny_checkpoint, TINY)
    x, t, ctx, _ = unet_inputs(9, 301)
    shapes = {k: v.shape for k, v in nets.unet.state_dict().items()}
    with torch.no_grad():
        want = nets.unet(x, t, ctx), nets.vae(x[:1])
        assert pad_output_channels(nets.unet) == 1 and pad_output_channels(nets.vae) == 1
        got = nets.unet(x, t, ctx), nets.vae(x[:1])
        layers = [m for net in (nets.unet, nets.vae) for m in net.modules() if isinstance(m, OutputConv)]
        assert [tuple(m.padded_weight.shape[:2]) for m in layers] == [(8, TINY.unet.model_channels), (8, TINY.vae.ch)]
        assert all(m.padded_weight[m.out_channels:].abs().sum() == 0 for m in layers)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
        assert got[0].shape[1] == 4 and got[1].shape[1] == 3
        assert {k: v.shape for k, v in nets.unet.state_dict().items()} == shapes
        layers[1].padded_weight[:3].zero_()
        assert (nets.vae(x[:1]) - got[1]).abs().max() > 1e-3


@pytest.mark.parametrize("masked", [False, True])
def test_attention_written_out_is_sdpa(masked):
    """The written-out attention (the ONNX export's, and the VAE's up to VAE_WRITTEN_ATTENTION_PIXELS)
    against float64 maths, as SDPA is."""
    from sdcanny.networks import attention
    g = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=g) for _ in range(3))
    mask = torch.randn(40, 40, generator=g) if masked else None
    scores = q.double() @ k.double().transpose(-1, -2) / 4 + (mask.double() if masked else 0)
    want = scores.softmax(-1) @ v.double()
    for written_out in (False, True):
        torch.testing.assert_close(attention(q, k, v, mask, written_out).double(), want, rtol=1e-5, atol=1e-5)


def test_the_vae_attention_is_written_out_up_to_the_bound(monkeypatch):
    """VAEAttnBlock asks for the written-out form up to VAE_WRITTEN_ATTENTION_PIXELS pixels, SDPA's
    beyond."""
    from sdcanny import networks
    calls = []
    real = networks.attention
    monkeypatch.setattr(networks, "attention", lambda *a, written_out=False: calls.append(written_out) or real(*a))
    block = networks.VAEAttnBlock(32).eval()
    bound = networks.VAE_WRITTEN_ATTENTION_PIXELS
    with torch.no_grad():
        for height, width in ((8, bound // 8), (8, bound // 8 + 1)):
            block(torch.randn(1, 32, height, width))
    assert calls == [True, False]


def test_cross_attention_keys_values_made_ahead_compute_the_same(tiny_checkpoint):
    """Keys and values of the text made once (as the text stage does) and taken by index give
    the outputs of projecting the context in every layer, fused projections or not."""
    from sdcanny.networks import (BasicTransformerBlock, cross_attention_keys_values, cross_attentions,
                                  index_cross_attention)
    nets = load_networks(tiny_checkpoint, TINY)
    x, t, ctx, g = unet_inputs(4, 301)
    feats = torch.randn(2, TINY.unet.model_channels, 8, 8, generator=g)
    with torch.no_grad():
        assert cross_attention_keys_values(nets.unet, ctx) is ctx  # not indexed: the context itself
        want = nets.unet(x, t, ctx), nets.controlnet(x, t, ctx, feats)
        for fused in (False, True):
            for net in (nets.unet, nets.controlnet):
                if fused:
                    for block in (m for m in net.modules() if isinstance(m, BasicTransformerBlock)):
                        block.fuse_projections()
                index_cross_attention(net)
            kv_unet, kv_control = (cross_attention_keys_values(n, ctx) for n in (nets.unet, nets.controlnet))
            assert len(kv_unet) == 2 * len(cross_attentions(nets.unet)) and all(p.is_contiguous() for p in kv_unet)
            torch.testing.assert_close(nets.unet(x, t, kv_unet), want[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(nets.controlnet(x, t, kv_control, feats), want[1], rtol=1e-5, atol=1e-5)
        swapped = kv_unet[2:4] + kv_unet[:2] + kv_unet[4:]  # the layers do take their own entries
        assert (nets.unet(x, t, swapped) - want[0]).abs().max() > 1e-3


def test_folded_cross_attention_is_the_attention_written_out():
    """One layer: the folded rows (query projection in the keys, output projection in the values)
    against the attention written out head by head in float64, context of another batch's rows."""
    from sdcanny.networks import CrossAttention
    torch.manual_seed(7)
    attn = CrossAttention(query_dim=24, context_dim=16, heads=3).double()
    x, context = torch.randn(2, 10, 24).double(), torch.randn(2, 77, 16).double()
    heads = []
    for h in range(3):
        rows = slice(8 * h, 8 * (h + 1))
        q, k, v = (layer.weight[rows] @ inp.transpose(1, 2) for layer, inp in
                   ((attn.to_q, x), (attn.to_k, context), (attn.to_v, context)))
        weights = torch.softmax(q.transpose(1, 2) @ k / 8 ** 0.5, dim=-1)
        heads.append(weights @ v.transpose(1, 2))
    want = attn.to_out[0](torch.cat(heads, dim=-1))
    attn.context_index = 0
    attn.fold(tokens=77)
    score_rows, value_rows = attn.keys_values(context)
    assert score_rows.shape == value_rows.shape == (2, 3 * 77, 24)
    torch.testing.assert_close(attn(x, [score_rows, value_rows]), want, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="folded for 77"):
        attn.keys_values(context[:, :76])


def test_folded_cross_attention_and_transformer_outputs_compute_the_same(tiny_checkpoint):
    """Both folds over whole networks in float64: the same outputs, the folded weights are what the
    layers use, and the cross-attentions folded are those whose rows (8 heads x 6 tokens) are no
    more than their channels: the 64-channel layers, not the 32-channel ones."""
    from sdcanny.networks import (SpatialTransformer, cross_attention_keys_values, cross_attentions,
                                  fold_cross_attention, fold_transformer_outputs, index_cross_attention)
    nets = load_networks(tiny_checkpoint, TINY)
    unet, controlnet = nets.unet.double(), nets.controlnet.double()
    g = torch.Generator().manual_seed(8)
    x, t = torch.randn(2, 4, 8, 8, generator=g).double(), torch.tensor([201, 201])
    ctx = torch.randn(2, 6, TINY.clip.width, generator=g).double()
    feats = torch.randn(2, TINY.unet.model_channels, 8, 8, generator=g).double()
    with torch.no_grad():
        want = unet(x, t, ctx), controlnet(x, t, ctx, feats)
        with pytest.raises(ValueError, match="index_cross_attention first"):
            fold_cross_attention(unet, 6)
        for net in (unet, controlnet):
            index_cross_attention(net)
            wide = [attn for attn in cross_attentions(net) if attn.to_q.in_features >= 8 * 6]
            assert 0 < len(wide) < len(cross_attentions(net))
            assert fold_cross_attention(net, 6) == len(wide)
            assert all((attn.folded_tokens is not None) == (attn in wide) for attn in cross_attentions(net))
            assert fold_transformer_outputs(net) == sum(isinstance(m, SpatialTransformer) for m in net.modules())
        rows_unet, rows_control = (cross_attention_keys_values(n, ctx) for n in (unet, controlnet))
        torch.testing.assert_close(unet(x, t, rows_unet), want[0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(controlnet(x, t, rows_control, feats), want[1], rtol=1e-9, atol=1e-9)
        for layer in (m for m in unet.modules() if isinstance(m, SpatialTransformer)):
            layer.folded_out_bias.add_(1.0)
        assert (unet(x, t, rows_unet) - want[0]).abs().max() > 1e-3


def direct_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int) -> torch.Tensor:
    """A 3x3 convolution with padding 1 written out tap by tap (an independent second path)."""
    n, c, h, w = x.shape
    out_h, out_w = (h - 1) // stride + 1, (w - 1) // stride + 1
    padded = torch.zeros(n, c, h + 2, w + 2, dtype=x.dtype)
    padded[:, :, 1:-1, 1:-1] = x
    out = bias[None, :, None, None].expand(n, -1, out_h, out_w).clone()
    for dy in range(3):
        for dx in range(3):
            window = padded[:, :, dy:dy + stride * (out_h - 1) + 1:stride, dx:dx + stride * (out_w - 1) + 1:stride]
            out += torch.einsum("nchw,oc->nohw", window, weight[:, :, dy, dx])
    return out


@pytest.mark.parametrize("shape, stride", [((2, 8, 4, 6), 1), ((1, 3, 5, 7), 1), ((2, 8, 8, 12), 2), ((3, 4, 7, 5), 2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_3x3_convolution_as_patches_times_weights(shape, stride, channels_last):
    from sdcanny.networks import conv3x3_as_product
    g = torch.Generator().manual_seed(8)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    weight = torch.randn(5, shape[1], 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(5, generator=g, dtype=torch.float64)
    if channels_last:
        x, weight = (t.contiguous(memory_format=torch.channels_last) for t in (x, weight))
    want = direct_conv3x3(x, weight, bias, stride)
    got = conv3x3_as_product(x, weight, bias, stride)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv3x3_as_product(x, weight, None, stride), want - bias[None, :, None, None],
                               rtol=1e-12, atol=1e-12)
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_patch_products_are_set_on_every_layer_and_lifted_for_a_while(tiny_checkpoint):
    """use_patch_products sets the bound on every ResBlock, Downsample and Upsample of the UNet and
    the ControlNet; without_patch_products lifts it for a while; run eager, the networks ignore it
    (the same outputs, bit for bit)."""
    from sdcanny import networks
    nets = load_networks(tiny_checkpoint, TINY)
    x, t, ctx, _ = unet_inputs(9, 301)
    with torch.no_grad():
        want = nets.unet(x, t, ctx)
        for net in (nets.unet, nets.controlnet):
            networks.use_patch_products(net, 128)
        kinds = (networks.ResBlock, networks.Downsample, networks.Upsample)
        layers = networks.patch_product_layers(nets.unet)
        assert {type(layer) for layer in layers} == set(kinds) and all(layer.product_rows == 128 for layer in layers)
        assert torch.equal(nets.unet(x, t, ctx), want)
        with networks.without_patch_products(nets.unet):  # as programs compile symbolic sizes
            assert all(layer.product_rows == 0 for layer in layers)
        assert all(layer.product_rows == 128 for layer in layers)


def can_read_compiled_code() -> bool:
    """torch.compile runs on this CPU and TorchInductor hands back its code (run_and_get_code, 2.1+)."""
    if compat.compile_unavailable_reason("cpu") is not None:
        return False
    import torch._inductor.utils
    return hasattr(torch._inductor.utils, "run_and_get_code")


def compiled_code(layer: torch.nn.Module, *args) -> tuple[torch.Tensor, str]:
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    with torch.no_grad():
        out, code = run_and_get_code(torch.compile(layer, fullgraph=True, dynamic=False), *args)
    return out, "\n".join(code)


@pytest.mark.skipif(not can_read_compiled_code(), reason="needs torch.compile with TorchInductor's run_and_get_code (2.1+)")
@pytest.mark.parametrize("kind", ["resblock", "downsample", "upsample"])
def test_compiled_layers_take_the_patch_product_up_to_the_bound(kind):
    """Compiled, a ResBlock's two 3x3 convolutions, a Downsample's and a folded Upsample's (48 output
    rows each) become products at a bound of 48 and stay convolutions at 47; the outputs are the
    eager layer's."""
    from sdcanny import networks
    g = torch.Generator().manual_seed(11)
    if kind == "resblock":
        layer, args, convolutions = networks.ResBlock(32, 64, 8), (torch.randn(2, 32, 4, 6, generator=g),
                                                                   torch.randn(2, 8, generator=g)), 2
    elif kind == "downsample":
        layer, args, convolutions = networks.Downsample(32), (torch.randn(2, 32, 8, 12, generator=g),), 1
    else:
        layer, args, convolutions = networks.Upsample(32), (torch.randn(2, 32, 2, 3, generator=g),), 1
        layer.fold_upsampling()
    layer.eval()
    with torch.no_grad():
        want = layer(*args)
    counts = {}
    for bound in (47, 48):
        networks.use_patch_products(layer, bound)
        got, code = compiled_code(layer, *args)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        counts[bound] = code.count("extern_kernels.convolution(")
    assert counts[47] - counts[48] == convolutions, counts
