"""The four networks of SD1.5 + ControlNet 1.0, read top to bottom.

Module attribute names follow the checkpoint's keys, so each network loads with
`load_state_dict(strict=True)` once its prefix is stripped:

    cond_stage_model.transformer.*   -> ClipTextModel
    model.diffusion_model.*          -> UNet (adds the ControlNet's residuals)
    control_model.*                  -> ControlNet
    first_stage_model.{post_quant_conv,decoder}.* -> VAEDecoder

The maths follows lllyasviel/ControlNet (ldm/, cldm/) and HF transformers' CLIPTextModel:
the same normalisation epsilons, activation functions and order of operations, so that the
fp32 result matches the original to rounding. No TensorRT, no checkpoint I/O in this file.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import compat, fp8
from .config import ClipConfig, UNetConfig, VAEConfig

# A finite stand-in for -inf in the CLIP causal mask: exp() of it underflows to exactly 0 in
# fp32 and fp16, and unlike -inf it cannot turn into NaN (-inf - -inf) in a fused fp16 kernel.
CAUSAL_MASK_VALUE = -1e4


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              written_out: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v over (B, heads, N, d). Running, SDPA picks a fused kernel.
    In an ONNX export, or where `written_out`, the same maths is written out as Mul, MatMul, (Add,)
    Softmax, MatMul: torch 2.0 has no ONNX form of SDPA, and this is the primitive pattern TensorRT
    matches to its fused attention kernels, which wants the scale applied to Q before the first
    MatMul (TensorRT's "Fused Attention" documentation; it also keeps fp16 scores small)."""
    if not (written_out or torch.onnx.is_in_onnx_export()):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = torch.matmul(q * (q.shape[-1] ** -0.5), k.transpose(-1, -2))
    if mask is not None:
        scores = scores + mask
    return torch.matmul(scores.softmax(dim=-1), v)


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """`attention` of (B, N, H*d) and (B, T, H*d) projections, split into their heads, with the heads'
    outputs side by side again: (B, N, H*d)."""
    b, n, c = q.shape
    split = [p.reshape(b, p.shape[1], heads, -1).transpose(1, 2) for p in (q, k, v)]
    return attention(*split).transpose(1, 2).reshape(b, n, c)


class GroupNorm(nn.GroupNorm):
    """Computes in its parameters' dtype. In a network of one dtype that is plain GroupNorm; with
    fp32 parameters in an fp16 network (`to_mixed_precision`) it is ldm's GroupNorm32: statistics
    in fp32, the result cast back to the input's dtype. `fused` (set by the fast back-end,
    sdcanny/fused_norm.py) makes `normalize` one call of the op torch.ops.sdcanny.group_norm_act,
    the addend and the SiLU inside it; `writes_patches` lets the op write a convolution's patches
    itself (norm_conv3x3), as fp8 terms where the convolution is an fp8 patch product
    (ResBlock.fp8_products), `overlap` launches its kernel with programmatic dependent launch,
    `tiled` runs the op's tiled kernels (the VAE decoder's norms)."""
    fused = False
    writes_patches = False
    overlap = False
    tiled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)

    def normalize(self, x: torch.Tensor, silu: bool = False, add: torch.Tensor | None = None, add_column: int = 0,
                  add_bias: torch.Tensor | None = None, patches: bool = False,
                  term_scale: torch.Tensor | None = None, x_scale: torch.Tensor | None = None) -> torch.Tensor:
        """silu?(self(x + addend[:, :, None, None])): how the ResBlocks and the SpatialTransformers
        use their GroupNorms. The addend is add's C columns from add_column (a time embedding's
        block, read in place), plus add_bias (C,) where given (or add_bias alone: a convolution's
        bias), in x's dtype. With `patches`, the
        result's 3x3 patches (patch_matrix) instead: the fused op writes them itself; with a
        `term_scale` too, those patches as fp8 terms under that scale (fp8.two_terms). With an
        `x_scale`, x is an fp8 product's halves (fp8.two_term_halves as an image), summed as
        fp8.sum_halves does."""
        if self.fused:
            return torch.ops.sdcanny.group_norm_act(x, self.weight, self.bias, add, add_column, add_bias,
                                                    self.num_groups, self.eps, silu, patches, self.overlap,
                                                    self.tiled, term_scale, x_scale)
        fp8.check_modes(patches, False, term_scale, x_scale)
        if x_scale is not None:
            x = fp8.sum_halves(x, x_scale)
        out = group_norm_act_torch(x, self.weight, self.bias, self.num_groups, self.eps, silu, add, add_column,
                                   add_bias)
        return patch_terms(out, term_scale) if patches else out


def group_norm_act_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                         silu: bool, add: torch.Tensor | None = None, add_column: int = 0,
                         add_bias: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm.normalize in torch's ops (also the fused op's path off the GPU): the addend (add's
    columns from add_column, plus add_bias) added in x's dtype, the norm in the weight's dtype as
    GroupNorm.forward computes it, then the SiLU."""
    if add is not None:
        columns = add[:, add_column:add_column + x.shape[1]].to(x.dtype)
        x = x + (columns if add_bias is None else columns + add_bias.to(x.dtype))[:, :, None, None]
    elif add_bias is not None:
        x = x + add_bias.to(x.dtype)[:, None, None]
    out = F.group_norm(x.to(weight.dtype), groups, weight, bias, eps).to(x.dtype)
    return F.silu(out) if silu else out


class LayerNorm(nn.LayerNorm):
    """Computes in its parameters' dtype, like GroupNorm above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# CLIP ViT-L/14 text transformer (HF CLIPTextModel layout, last_hidden_state output)
# ----------------------------------------------------------------------------------------------

class ClipAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (p(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = attention(q, k, v, mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class ClipMLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu


class ClipLayer(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.layer_norm1 = LayerNorm(width)
        self.self_attn = ClipAttention(width, heads)
        self.layer_norm2 = LayerNorm(width)
        self.mlp = ClipMLP(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class ClipEmbeddings(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_length, cfg.width)


class ClipEncoder(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.layers = nn.ModuleList(ClipLayer(cfg.width, cfg.heads) for _ in range(cfg.layers))


class ClipTextModel(nn.Module):
    """tokens (B, 77) int -> context (B, 77, width): HF CLIPTextModel's last_hidden_state.
    Attribute names follow the checkpoint (`cond_stage_model.transformer.{embeddings,encoder,
    final_layer_norm}`); the loader also accepts the `transformer.text_model.*` spelling."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.embeddings = ClipEmbeddings(cfg)
        self.encoder = ClipEncoder(cfg)
        self.final_layer_norm = LayerNorm(cfg.width)

    @property
    def max_length(self) -> int:
        """Tokens per prompt: the context's length."""
        return self.embeddings.position_embedding.num_embeddings

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        x = self.embeddings.token_embedding(tokens) + self.embeddings.position_embedding.weight[:n]
        mask = torch.full((n, n), CAUSAL_MASK_VALUE, dtype=x.dtype, device=x.device).triu(1)
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return self.final_layer_norm(x)


# ----------------------------------------------------------------------------------------------
# Building blocks shared by the UNet and the ControlNet (ldm/modules/diffusionmodules/openaimodel.py)
# ----------------------------------------------------------------------------------------------

def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding, cosine half first, as in ldm's util.timestep_embedding."""
    half = dim // 2
    # built on the timesteps' device: no host-to-device copy, so the step can be graph-captured
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def group_norm(channels: int, eps: float = 1e-5) -> GroupNorm:
    return GroupNorm(32, channels, eps=eps)


class TimeEmbed(nn.Sequential):
    """time_embed.0 / time_embed.2: Linear, SiLU, Linear, on the (fp32) sinusoidal embedding cast
    to the network's dtype."""

    def __init__(self, cfg: UNetConfig):
        super().__init__(nn.Linear(cfg.model_channels, cfg.time_embed_dim), nn.SiLU(),
                         nn.Linear(cfg.time_embed_dim, cfg.time_embed_dim))

    def forward(self, t_emb: torch.Tensor) -> torch.Tensor:
        return super().forward(t_emb.to(self[0].weight.dtype))


def patch_matrix(x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """The 3x3 patches (padding 1) of an (N, C, H, W) tensor: one row per output pixel, tap-major,
    channels inner, (N x out_h x out_w, 9 x C)."""
    n, c, h, w = x.shape
    out_h, out_w = (h - 1) // stride + 1, (w - 1) // stride + 1
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # (N, H+2, W+2, C)
    taps = torch.arange(3, device=x.device)
    rows = (torch.arange(out_h, device=x.device) * stride)[:, None, None, None] + taps[None, None, :, None]
    cols = (torch.arange(out_w, device=x.device) * stride)[None, :, None, None] + taps[None, None, None, :]
    # one indexed read, (N, out_h, out_w, 3, 3, C): the compiler makes it (and the padding) one kernel,
    # where nine slices stacked would be a kernel each
    return padded[:, rows, cols, :].reshape(n * out_h * out_w, 9 * c)


def patch_terms(x: torch.Tensor, term_scale: torch.Tensor | None) -> torch.Tensor:
    """x's patch_matrix, as fp8.two_terms under `term_scale` where one is given (what the fused
    GroupNorm op writes, in torch's ops)."""
    return patch_matrix(x) if term_scale is None else fp8.two_terms(patch_matrix(x), term_scale)


def patch_weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 weight (out, in, 3, 3) as the (out, 9 x in) matrix its patch_matrix multiplies: a view
    where the weight is channels-last (as the fast back-end keeps it)."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def pixel_rows_as_image(out: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """(N x h x w, C) rows as the channels-last (N, C, h, w) tensor they are (a view)."""
    return out.view(n, h, w, -1).permute(0, 3, 1, 2)


def patch_product(patches: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n: int, out_h: int,
                  out_w: int) -> torch.Tensor:
    """The convolution whose patch_matrix is `patches`: one matrix product with the 3x3 weight as an
    (out, 9 x in) matrix. The result is channels-last, (N, out, out_h, out_w)."""
    matrix = patch_weight_matrix(weight)
    out = patches @ matrix.t() if bias is None else torch.addmm(bias, patches, matrix.t())
    return pixel_rows_as_image(out, n, out_h, out_w)


def conv3x3_as_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       stride: int = 1) -> torch.Tensor:
    """conv2d(x, weight, bias, stride, padding=1) of a 3x3 weight as one matrix product: the
    input's patches (patch_matrix) times the weights (patch_product). For a few output rows (the
    4x6 and 8x12 latents) the convolution is bound by reading its weights, and cuBLAS's skinny
    products stream them faster than cuDNN's convolutions do (docs/benchmarks.md); the patches are a
    few MB."""
    n, _, h, w = x.shape
    return patch_product(patch_matrix(x, stride), weight, bias, n, (h - 1) // stride + 1, (w - 1) // stride + 1)


def takes_patch_product(rows: int, product_rows: int) -> bool:
    """Whether a 3x3 convolution of `rows` output rows runs as conv3x3_as_product: in compiled code
    only, where the patches are one kernel (run eager, their index grids and gather are several small
    kernels, not measured against cuDNN), and up to the bound."""
    return bool(product_rows) and compat.is_compiling() and rows <= product_rows


def conv3x3(x: torch.Tensor, conv: nn.Conv2d, bias: torch.Tensor | None, product_rows: int,
            kernel_weight: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """conv's 3x3 convolution (padding 1) of x with `bias`, plus `residual` where given: as patches
    times weights where takes_patch_product says so for its output rows (samples x pixels), else
    through our kernel's op where the fast back-end gave `kernel_weight` (sdcanny/fused_conv.py; its
    epilogue adds the residual, where the compiler would add it in a kernel of its own), else
    through F.conv2d."""
    n, _, h, w = x.shape
    stride = conv.stride[0]
    if takes_patch_product(n * ((h - 1) // stride + 1) * ((w - 1) // stride + 1), product_rows):
        out = conv3x3_as_product(x, conv.weight, bias, stride)
    elif kernel_weight is not None and stride == 1:
        return torch.ops.sdcanny.conv3x3(x, kernel_weight, conv.weight, bias, residual)
    else:
        out = F.conv2d(x, conv.weight, bias, conv.stride, conv.padding)
    return plus_residual(out, residual)


def plus_residual(out: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """A convolution's output plus the residual (a ResBlock's skip) where there is one."""
    return out if residual is None else out + residual


class Fp8PatchWeights(nn.Module):
    """A ResBlock convolution's weights for fp8 patch products (sdcanny/fp8.py), made from the
    convolution and the GroupNorm before it: `weight` the e4m3 rows of its patch matrix,
    `term_scale` the scale of the norm's output as fp8 terms (its bound over 448) for groups of
    up to `max_rows` pixels, `out_scale` that times each weight row's scale, `unit` an fp32 1.
    Buffers, not saved: a prepared program takes them as inputs, as it does the weights."""
    def __init__(self, conv: nn.Conv2d, norm: GroupNorm, max_rows: int):
        super().__init__()
        self.max_rows = max_rows
        weight, row_scale = fp8.weight_rows(patch_weight_matrix(conv.weight))
        bound = fp8.group_norm_bound(norm.weight, norm.bias, max_rows * norm.num_channels // norm.num_groups)
        term_scale = torch.tensor(bound / fp8.FP8_MAX, dtype=torch.float32, device=weight.device)
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("term_scale", term_scale, persistent=False)
        self.register_buffer("out_scale", row_scale * term_scale, persistent=False)
        self.register_buffer("unit", torch.ones((), dtype=torch.float32, device=weight.device), persistent=False)


def writes_own_patches(norm: GroupNorm, rows: int, product_rows: int) -> bool:
    """Whether the convolution after `norm`, of `rows` output rows, is a patch product whose patches
    the norm (the fused op) writes itself."""
    return norm.fused and norm.writes_patches and takes_patch_product(rows, product_rows)


def norm_conv3x3(norm: GroupNorm, conv: nn.Conv2d, x: torch.Tensor, bias: torch.Tensor | None, product_rows: int,
                 add: torch.Tensor | None = None, add_column: int = 0, add_bias: torch.Tensor | None = None,
                 kernel_weight: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """conv3x3(silu(norm(x + addend)), conv, bias) (+ residual), a ResBlock's norm and convolution
    (stride 1). Where the convolution is a patch product and the norm is the fused op, the op writes
    the patches itself: no kernel reads the normalised tensor back to gather them."""
    n, _, h, w = x.shape
    if writes_own_patches(norm, n * h * w, product_rows):
        patches = norm.normalize(x, silu=True, add=add, add_column=add_column, add_bias=add_bias, patches=True)
        return plus_residual(patch_product(patches, conv.weight, bias, n, h, w), residual)
    return conv3x3(norm.normalize(x, silu=True, add=add, add_column=add_column, add_bias=add_bias), conv, bias,
                   product_rows, kernel_weight, residual)


def norm_fp8_product(norm: GroupNorm, weights: Fp8PatchWeights, x: torch.Tensor, add: torch.Tensor | None = None,
                     add_column: int = 0, add_bias: torch.Tensor | None = None,
                     x_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The 3x3 convolution (no bias) of silu(norm(x + addend)) as an fp8 patch product (sdcanny/fp8.py):
    the fused norm writes the patches' two e4m3 terms, one product multiplies them by the e4m3
    weight rows. Returns the product's halves (fp8.two_term_halves) as an (N, 2C, H, W) image, for
    the next norm to sum (x_scale = weights.out_scale) or fp8.sum_halves. With `x_scale`, x is
    such halves."""
    n, _, h, w = x.shape
    terms = norm.normalize(x, silu=True, add=add, add_column=add_column, add_bias=add_bias, patches=True,
                           term_scale=weights.term_scale, x_scale=x_scale)
    return pixel_rows_as_image(fp8.two_term_halves(terms, weights.weight, weights.unit), n, h, w)


def patch_product_layers(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, (ResBlock, Downsample, Upsample))]


def use_patch_products(net: nn.Module, rows: int) -> None:
    """Compiled, the 3x3 convolutions of net's ResBlocks, Downsamples and Upsamples that have at
    most `rows` output rows run as patches times weights (takes_patch_product); 0 runs every one
    through F.conv2d. A trace whose sizes are symbolic must have 0 (programs.compile_variant sees to
    it): the compiler would tie the program to sizes on one side of the bound."""
    for layer in patch_product_layers(net):
        layer.product_rows = rows


def use_fp8_patch_products(net: nn.Module, rows: int) -> int:
    """Every ResBlock of `net` (the ControlNet, the UNet) gets Fp8PatchWeights for its two
    convolutions, for up to `rows` output rows: where a convolution is a patch product of at most
    that many rows whose patches the fused GroupNorm writes, it runs as an fp8 x fp8 product
    (ResBlock.fp8_products). Returns how many convolutions."""
    blocks = [m for m in net.modules() if isinstance(m, ResBlock)]
    for block in blocks:
        block.in_fp8 = Fp8PatchWeights(block.in_layers[2], block.in_layers[0], rows)
        block.out_fp8 = Fp8PatchWeights(block.out_layers[3], block.out_layers[0], rows)
    return 2 * len(blocks)


@contextlib.contextmanager
def without_patch_products(net: nn.Module):
    """use_patch_products(net, 0) for the duration, then each layer's bound as it was: for a trace
    whose sizes are symbolic, where the compiler would guard on the comparison."""
    layers = patch_product_layers(net)
    bounds = [layer.product_rows for layer in layers]
    for layer in layers:
        layer.product_rows = 0
    try:
        yield
    finally:
        for layer, bound in zip(layers, bounds):
            layer.product_rows = bound


class ResBlock(nn.Module):
    def __init__(self, channels: int, out_channels: int, emb_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(group_norm(out_channels), nn.SiLU(), nn.Identity(),  # 2: dropout
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if channels == out_channels
                                else nn.Conv2d(channels, out_channels, 1))
        self.emb_columns: tuple[int, int] | None = None  # see stack_time_projections
        self.product_rows = 0  # see use_patch_products
        self.in_fp8: Fp8PatchWeights | None = None  # see use_fp8_patch_products
        self.out_fp8: Fp8PatchWeights | None = None
        # set by the fast back-end (sdcanny/fused_conv.py): the convolutions' weights laid out for our
        # kernel's op, which then runs them where they are not patch products
        self.register_buffer("in_kernel_weight", None, persistent=False)
        self.register_buffer("out_kernel_weight", None, persistent=False)
        self.kernel_adds_skip = True  # the kernel's epilogue adds the skip (off only to measure it)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        in_norm, _, in_conv = self.in_layers  # GroupNorm, SiLU, Conv: the norm applies the SiLU itself
        out_norm, _, _, out_conv = self.out_layers  # GroupNorm, SiLU, dropout, Conv
        if self.emb_columns is None:
            # the timestep's projection computes in its own dtype (fp32 in a mixed-precision network)
            add, column = self.emb_layers(emb.to(self.emb_layers[1].weight.dtype)), 0
        else:  # emb already holds every ResBlock's projection side by side: this block's columns
            add, column = emb, self.emb_columns[0]
        if self.takes_fp8_products(x):
            return self.skip_connection(x) + self.fp8_products(x, add, column)
        if out_norm.fused:
            # h feeds only the fused norm, so in_conv's bias joins its addend: the compiler would add
            # a convolution's bias in a kernel of its own where the next op is not one of its kernels
            h = norm_conv3x3(in_norm, in_conv, x, None, self.product_rows, kernel_weight=self.in_kernel_weight)
            add_bias = in_conv.bias
        else:
            h = norm_conv3x3(in_norm, in_conv, x, in_conv.bias, self.product_rows, kernel_weight=self.in_kernel_weight)
            add_bias = None
        # where out_conv runs through our kernel, its epilogue adds the skip: the compiler would add
        # it in a kernel of its own
        skip = self.skip_connection(x)
        residual = skip if self.kernel_adds_skip else None
        h = norm_conv3x3(out_norm, out_conv, h, out_conv.bias, self.product_rows, add, column, add_bias,
                         self.out_kernel_weight, residual)
        return h if residual is not None else skip + h

    def takes_fp8_products(self, x: torch.Tensor) -> bool:
        """Whether both convolutions run as fp8 patch products at x's size: with fp8 weights
        (use_fp8_patch_products) for at least its rows, compiled as patch products
        (takes_patch_product), after fused norms that write patches. The rows are compared last:
        in a trace of symbolic sizes (no patch products there) a comparison would become a guard
        that refuses the sizes the program is for."""
        n, _, h, w = x.shape
        rows = n * h * w
        return (self.in_fp8 is not None
                and all(writes_own_patches(norm, rows, self.product_rows)
                        for norm in (self.in_layers[0], self.out_layers[0]))
                and rows <= self.in_fp8.max_rows)

    def fp8_products(self, x: torch.Tensor, add: torch.Tensor, column: int) -> torch.Tensor:
        """The block's residual branch through two fp8 patch products (norm_fp8_product). The first
        product's halves go to the second norm as they are, its bias in that norm's addend: the
        norm's kernel sums them as it reads them. The second's are summed here, where the
        compiler joins the sum to the skip connection's addition."""
        in_norm, _, in_conv = self.in_layers
        out_norm, _, _, out_conv = self.out_layers
        halves = norm_fp8_product(in_norm, self.in_fp8, x)
        halves = norm_fp8_product(out_norm, self.out_fp8, halves, add, column, in_conv.bias, self.in_fp8.out_scale)
        out = fp8.sum_halves(halves, self.out_fp8.out_scale) + out_conv.bias.float()[:, None, None]
        return out.to(x.dtype)


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(query_dim, query_dim), nn.Identity())  # 1: dropout
        self.register_buffer("fused_weight", None, persistent=False)  # see fuse_projections
        self.fused_self_attention = False
        self.context_index: int | None = None  # see index_cross_attention
        self.folded_tokens: int | None = None  # see fold
        # set by the fast back-end (sdcanny/fused_attention.py): the attention is one call of the op
        # torch.ops.sdcanny.attention on the projections as they are, not SDPA on their heads; its
        # kernel up to kernel_keys keys (launched overlapped where kernel_overlap), SDPA beyond
        self.fused_attention = False
        self.kernel_keys = 0
        self.kernel_overlap = False
        # set by the fast back-end (sdcanny/fused_scores.py): a folded layer's weights are one call of
        # the op torch.ops.sdcanny.scores_softmax (launched overlapped where scores_overlap)
        self.fused_scores = False
        self.scores_overlap = False

    def fuse_projections(self, self_attention: bool) -> None:
        """Stack the projection weights so that self-attention computes q, k, v of x in one matrix
        product and cross-attention k, v of the context in one: fewer, larger GEMMs for the fast
        back-end, the same maths. The checkpoint's own weights stay as they are."""
        parts = (self.to_q, self.to_k, self.to_v) if self_attention else (self.to_k, self.to_v)
        self.fused_weight = torch.cat([p.weight for p in parts])
        self.fused_self_attention = self_attention

    def fold(self, tokens: int) -> None:
        """From now on keys_values gives the rows of fold_keys_values for a context of `tokens`
        tokens, and the layer attends through attend_folded."""
        self.folded_tokens = tokens

    def keys_values(self, context: torch.Tensor):
        """k, v of the context; once `fold` has run, the pair that attend_folded takes."""
        if self.fused_weight is not None and not self.fused_self_attention:
            k, v = F.linear(context, self.fused_weight).chunk(2, dim=-1)
        else:
            k, v = self.to_k(context), self.to_v(context)
        return self.fold_keys_values(k, v) if self.folded_tokens is not None else (k, v)

    def fold_keys_values(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, C) keys and values -> (score rows, output rows), each (B, heads * T, C). Head h's
        scores are q_h k_h^T / sqrt(d) with q_h = x Wq_h^T, so x (k_h Wq_h / sqrt(d))^T: the query
        projection folds into the keys. Its output o_h = softmax(.) v_h enters the output projection
        as o_h Wo_h^T, so (v_h Wo_h^T) are rows the softmax weighs directly. Made in fp32 at least."""
        b, t, c = k.shape
        if t != self.folded_tokens:
            raise ValueError(f"the context has {t} tokens; this layer was folded for {self.folded_tokens}")
        d = c // self.heads
        heads_first = (b, t, self.heads, d)
        wide = torch.promote_types(k.dtype, torch.float32)
        wq = self.to_q.weight.to(wide).reshape(self.heads, d, -1)  # (H, d, C_in): q_h = x wq[h]^T
        wo = self.to_out[0].weight.to(wide)  # (C_out, C): out = sum_h o_h wo[:, h*d:(h+1)*d]^T
        wo = wo.reshape(wo.shape[0], self.heads, d).permute(1, 2, 0)  # (H, d, C_out)
        scores = torch.matmul(k.to(wide).reshape(heads_first).transpose(1, 2), wq) * d ** -0.5
        values = torch.matmul(v.to(wide).reshape(heads_first).transpose(1, 2), wo)
        return tuple(rows.reshape(b, self.heads * t, -1).to(k.dtype) for rows in (scores, values))

    def attend_folded(self, x: torch.Tensor, score_rows: torch.Tensor, value_rows: torch.Tensor) -> torch.Tensor:
        """The cross-attention from fold_keys_values' rows: two batched products and a softmax per
        head, the same maths as forward's projections and attention."""
        if self.fused_scores:
            weights = torch.ops.sdcanny.scores_softmax(x, score_rows, self.heads, self.scores_overlap)
        else:
            weights = folded_attention_weights(x, score_rows, self.heads)
        return torch.matmul(weights, value_rows) + self.to_out[0].bias

    def project(self, x: torch.Tensor, context):
        if isinstance(context, (list, tuple)):  # keys and values made ahead (cross_attention_keys_values)
            return self.to_q(x), context[2 * self.context_index], context[2 * self.context_index + 1]
        if self.fused_self_attention:
            return F.linear(x, self.fused_weight).chunk(3, dim=-1)
        return (self.to_q(x), *self.keys_values(context))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.folded_tokens is not None:
            return self.attend_folded(x, context[2 * self.context_index], context[2 * self.context_index + 1])
        if self.fused_attention:
            return self.to_out(torch.ops.sdcanny.attention(*self.project(x, context), self.heads, self.kernel_keys,
                                                           self.kernel_overlap))
        return self.to_out(multi_head_attention(*self.project(x, context), self.heads))


def folded_attention_weights(x: torch.Tensor, score_rows: torch.Tensor, heads: int) -> torch.Tensor:
    """A folded cross-attention's weights (CrossAttention.attend_folded): x (B, N, C) and its score
    rows (B, heads T, C) -> (B, N, heads T), each head's T columns the softmax of x score_rows^T."""
    b, n, _ = x.shape
    return torch.matmul(x, score_rows.transpose(1, 2)).reshape(b, n, heads, -1).softmax(dim=-1).reshape(b, n, -1)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def context_rows(context) -> int:
    """Rows of a cross-attention's context: a tensor, or the keys and values made ahead
    (cross_attention_keys_values, a list of tensors of as many rows)."""
    return (context[0] if isinstance(context, (list, tuple)) else context).shape[0]


def both_branches(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x as the batch of `rows` rows [cond, uncond] has it: x itself where it has those rows, else
    [x, x]. The fast back-end gives the ControlNet and the UNet the latents once (N rows, not 2N):
    the two guidance branches differ only in their text, so every layer before the first
    cross-attention computes the same rows for both, and runs once; they part there."""
    if x.shape[0] == rows:
        return x
    if 2 * x.shape[0] != rows:
        raise ValueError(f"{x.shape[0]} rows are neither the batch's {rows} nor the rows both its branches share")
    return torch.cat([x, x])


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm1 = LayerNorm(dim)
        self.norm2 = LayerNorm(dim)
        self.norm3 = LayerNorm(dim)

    def fuse_projections(self) -> None:
        self.attn1.fuse_projections(self_attention=True)
        self.attn2.fuse_projections(self_attention=False)

    def attend(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The block up to its feed-forward: self-attention, then cross-attention, each with its residual."""
        h = self.norm1(x)
        x = both_branches(self.attn1(h, h) + x, context_rows(context))
        return self.attn2(self.norm2(x), context) + x

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attend(x, context)
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, context_dim: int, heads: int):
        super().__init__()
        self.norm = group_norm(channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, context_dim, heads)])
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.register_buffer("folded_out_weight", None, persistent=False)  # see fold_output_projection
        self.register_buffer("folded_out_bias", None, persistent=False)
        # set by the fast back-end (sdcanny/fused_geglu.py): the folded product's input made by the op
        # torch.ops.sdcanny.geglu from the GEGLU's weights with value and gate rows interleaved
        self.register_buffer("geglu_weight", None, persistent=False)
        self.register_buffer("geglu_bias", None, persistent=False)
        self.geglu_overlap = False

    def fold_output_projection(self) -> None:
        """proj_out is linear (a 1x1 convolution), and so is the last block's feed-forward output
        Linear before it: with g the GEGLU's output and r the residual it is added to,
        proj_out(ff(g) + r) = [g, r] [Wp Wf, Wp]^T + (Wp bf + bp), one matrix product of 5C inputs
        instead of two and the sum between them. Made in fp32 at least; the checkpoint's weights stay."""
        out, dtype = self.transformer_blocks[-1].ff.net[2], self.proj_out.weight.dtype
        wide = torch.promote_types(dtype, torch.float32)
        wp = self.proj_out.weight.to(wide).flatten(1)
        self.folded_out_weight = torch.cat([wp @ out.weight.to(wide), wp], dim=1).to(dtype)
        self.folded_out_bias = (wp @ out.bias.to(wide) + self.proj_out.bias.to(wide)).to(dtype)

    def use_geglu_op(self, weight: torch.Tensor, bias: torch.Tensor, overlap: bool) -> None:
        """From now on the folded product's input [GEGLU(norm3(r)), r] is one call of the op
        torch.ops.sdcanny.geglu, with the last block's GEGLU weights interleaved as it takes them."""
        if self.folded_out_weight is None:
            raise ValueError("the GEGLU op makes the folded output product's input: fold_output_projection first")
        self.geglu_weight, self.geglu_bias, self.geglu_overlap = weight, bias, overlap

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        b = context_rows(context)  # x may have half as many (both_branches)
        t = self.proj_in(self.norm.normalize(x)).flatten(2).transpose(1, 2)
        *blocks, last = self.transformer_blocks
        for block in blocks:
            t = block(t, context)
        x = both_branches(x, b)
        if self.folded_out_weight is None:
            return self.proj_out(last(t, context).transpose(1, 2).reshape(b, c, h, w)) + x
        r = last.attend(t, context)
        if self.geglu_weight is not None:
            gr = torch.ops.sdcanny.geglu(last.norm3(r), self.geglu_weight, self.geglu_bias, r, self.geglu_overlap)
        else:
            gr = torch.cat([last.ff.net[0](last.norm3(r)), r], dim=-1)
        out = F.linear(gr, self.folded_out_weight, self.folded_out_bias)
        return out.transpose(1, 2).reshape(b, c, h, w) + x


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.product_rows = 0  # see use_patch_products

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv3x3(x, self.op, self.op.bias, self.product_rows)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.register_buffer("phase_weight", None, persistent=False)  # see fold_upsampling
        self.register_buffer("phase_bias", None, persistent=False)
        self.product_rows = 0  # see use_patch_products

    def fold_upsampling(self) -> None:
        """Folds the nearest-neighbour doubling into the convolution's weights. A 3x3 convolution
        of the doubled image gives each of its four output phases (even or odd row, even or odd
        column) a 2x2 convolution of the image itself, whose taps are sums of the 3x3 taps
        (upsampling_phases): 16 multiply-adds per input pixel and channel pair instead of 36, and
        no doubled image written or read. The same maths up to rounding of the summed weights; the
        checkpoint's own weights stay as they are."""
        self.phase_weight, self.phase_bias = upsampling_phases(self.conv.weight, self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        if self.phase_weight is None or takes_patch_product(n * 4 * h * w, self.product_rows):
            # few rows: the doubled image's patches come in one indexed read (conv3x3), and its
            # weights are 9/16 of the phases' (the convolution is bound by reading them)
            return conv3x3(F.interpolate(x, scale_factor=2, mode="nearest"), self.conv, self.conv.bias,
                           self.product_rows)
        return interleave_phases(F.conv2d(x, self.phase_weight, self.phase_bias, padding=1))


# For the even (0) and the odd (1) output rows of a nearest-neighbour doubling, which rows of a 3x3
# kernel each of the two input rows a 2x2 kernel reads sums: output row 2i reads doubled rows 2i-1,
# 2i, 2i+1, which are input rows i-1, i, i; output row 2i+1 reads input rows i, i, i+1. Columns
# work the same way.
_PHASE_FOLDING = (((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1)))  # (parity, 2x2 row, 3x3 row)


def upsampling_phases(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(4 x out, in, 2, 2) weights and (4 x out) biases: for each output phase (row parity, column
    parity, in that order) the 2x2 kernel that replaces `weight`'s 3x3 kernel on the doubled
    image. Summed in fp32 at least, rounded once to the weight's dtype."""
    wide = torch.promote_types(weight.dtype, torch.float32)
    folding = torch.tensor(_PHASE_FOLDING, dtype=wide, device=weight.device)
    phases = torch.einsum("ark,oikl,bcl->aboirc", folding, weight.to(wide), folding)
    return phases.reshape(-1, *phases.shape[3:]).to(weight.dtype), bias.repeat(4)


def interleave_phases(z: torch.Tensor) -> torch.Tensor:
    """The doubled convolution's output from the four phases' 2x2 convolutions (padding 1),
    stacked along channels: output pixel (2i + a, 2j + b) is phase (a, b)'s window at (i + a, j + b).
    Assembled channels innermost, so the result is channels-last like the networks' activations."""
    n, c4, rows, cols = z.shape
    c, h, w = c4 // 4, rows - 1, cols - 1
    z = z.permute(0, 2, 3, 1).reshape(n, rows, cols, 2, 2, c)
    out = torch.stack([torch.stack([z[:, a:a + h, b:b + w, a, b] for b in (0, 1)], dim=3) for a in (0, 1)], dim=2)
    return out.reshape(n, 2 * h, 2 * w, c).permute(0, 3, 1, 2)


def fold_upsampling(net: nn.Module) -> int:
    """Every Upsample of `net` (the UNet, the VAE decoder) folded (Upsample.fold_upsampling); returns
    how many."""
    layers = [m for m in net.modules() if isinstance(m, Upsample)]
    for layer in layers:
        layer.fold_upsampling()
    return len(layers)


class OutputConv(nn.Conv2d):
    """A network's last 3x3 convolution, to 4 (UNet) or 3 (VAE) channels. cuDNN's fp16 kernels
    take channels in multiples of 8: it pads such a convolution's output with a memset and a
    padding kernel on each side of the convolution (the UNet's took 17.8 µs alone on the H100, 12.9
    padded; the VAE's 50.3 and 39.9: docs/benchmarks.md). `pad_channels` gives it weights padded
    with zero filters instead; the output is the padded convolution's first channels, the same
    numbers."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("padded_weight", None, persistent=False)  # see pad_channels
        self.register_buffer("padded_bias", None, persistent=False)

    def pad_channels(self, multiple: int = 8) -> None:
        extra = -self.out_channels % multiple
        if extra:
            self.padded_weight = F.pad(self.weight.detach(), (0, 0, 0, 0, 0, 0, 0, extra))
            self.padded_bias = F.pad(self.bias.detach(), (0, extra))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padded_weight is None:
            return super().forward(x)
        return F.conv2d(x, self.padded_weight, self.padded_bias, self.stride, self.padding)[:, :self.out_channels]


def pad_output_channels(net: nn.Module, multiple: int = 8) -> int:
    """Every OutputConv of `net` (the UNet, the VAE decoder) padded (OutputConv.pad_channels); returns
    how many."""
    layers = [m for m in net.modules() if isinstance(m, OutputConv)]
    for layer in layers:
        layer.pad_channels(multiple)
    return len(layers)


def cross_attentions(net: nn.Module) -> list[CrossAttention]:
    return [m.attn2 for m in net.modules() if isinstance(m, BasicTransformerBlock)]


def index_cross_attention(net: nn.Module) -> None:
    """Numbers the cross-attention layers of `net` (a UNet or a ControlNet), so that each takes its
    keys and values from the list cross_attention_keys_values makes. The text context is the same
    at every sampler step, so its projections can be made once per image instead of at every step:
    23 matrix products per step at SD1.5's size."""
    for i, attn in enumerate(cross_attentions(net)):
        attn.context_index = i


def fold_cross_attention(net: nn.Module, tokens: int) -> int:
    """The cross-attention layers of `net`, indexed by index_cross_attention, whose query and output
    projections are at least as large as the folded rows (heads x tokens <= channels) take them
    folded into rows made once per prompt pair from a context of `tokens` tokens
    (CrossAttention.fold_keys_values): at every step two batched products and a softmax instead of
    the query product, the attention kernel and the output product. Where the rows would be larger
    (SD1.5's 320-channel layers: 616 rows of 320), the folded products cost more than they save
    (docs/benchmarks.md). Returns the number of layers folded."""
    layers = cross_attentions(net)
    if any(attn.context_index is None for attn in layers):
        raise ValueError("fold_cross_attention needs index_cross_attention first: the folded rows are made "
                         "once per prompt pair, with the keys and values")
    folded = [attn for attn in layers if attn.heads * tokens <= attn.to_q.in_features]
    for attn in folded:
        attn.fold(tokens)
    return len(folded)


def fold_transformer_outputs(net: nn.Module) -> int:
    """Every SpatialTransformer of `net` with its output projection folded into its feed-forward's
    last product (SpatialTransformer.fold_output_projection); returns how many."""
    layers = [m for m in net.modules() if isinstance(m, SpatialTransformer)]
    for layer in layers:
        layer.fold_output_projection()
    return len(layers)


def cross_attention_keys_values(net: nn.Module, context: torch.Tensor):
    """[k0, v0, k1, v1, ...] of the context for the cross-attention layers of `net`, in their
    index order (what the network then takes in place of the context; each pair folded where
    fold_cross_attention has run), or the context itself where index_cross_attention has not run."""
    layers = cross_attentions(net)
    if not layers or layers[0].context_index is None:
        return context
    # each contiguous, so that every step's attention reads dense tensors, not views of a wider one
    return [p.contiguous() for attn in layers for p in attn.keys_values(context)]


def stack_time_projections(net: nn.Module) -> None:
    """Every ResBlock of `net` (a UNet or a ControlNet) takes its projection of the time embedding
    (SiLU, then its own Linear) from one matrix product of the network's stacked Linear weights,
    made once per call by embed_time, instead of one small product per block: the same maths, 2
    matrix products per sampler step instead of 32 at SD1.5's size. The checkpoint's own weights
    stay as they are; the stacked copy is a buffer outside the state dict."""
    blocks = [m for m in net.modules() if isinstance(m, ResBlock)]
    start = 0
    for block in blocks:
        width = block.emb_layers[1].out_features
        block.emb_columns = (start, start + width)
        start += width
    net.stacked_time_weight = torch.cat([b.emb_layers[1].weight for b in blocks])
    net.stacked_time_bias = torch.cat([b.emb_layers[1].bias for b in blocks])


def embed_time(net: nn.Module, timesteps: torch.Tensor) -> torch.Tensor:
    """The network's time embedding, or, once stack_time_projections has run, every ResBlock's
    projection of it side by side."""
    emb = net.time_embed(timestep_embedding(timesteps, net.cfg.model_channels))
    if net.stacked_time_weight is None:
        return emb
    weight = net.stacked_time_weight
    return F.linear(F.silu(emb.to(weight.dtype)), weight, net.stacked_time_bias)


def time_embedding_width(net: nn.Module) -> int:
    """Columns of embed_time's result for `net`."""
    if net.stacked_time_weight is None:
        return net.cfg.time_embed_dim
    return net.stacked_time_weight.shape[0]


class TimestepEmbedSequential(nn.Sequential):
    """Runs a block's layers in order, handing each the inputs it takes."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def encoder_blocks(cfg: UNetConfig) -> tuple[nn.ModuleList, list[int]]:
    """The UNet's input_blocks (also the ControlNet's copy) and the channels each one outputs."""
    ch = cfg.model_channels
    blocks = [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))]
    channels = [ch]
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers = [ResBlock(ch, mult * cfg.model_channels, cfg.time_embed_dim)]
            ch = mult * cfg.model_channels
            if level in cfg.attention_levels:
                layers.append(SpatialTransformer(ch, cfg.context_dim, cfg.num_heads))
            blocks.append(TimestepEmbedSequential(*layers))
            channels.append(ch)
        if level != len(cfg.channel_mult) - 1:
            blocks.append(TimestepEmbedSequential(Downsample(ch)))
            channels.append(ch)
    return nn.ModuleList(blocks), channels


def middle_block(cfg: UNetConfig) -> TimestepEmbedSequential:
    ch = cfg.model_channels * cfg.channel_mult[-1]
    return TimestepEmbedSequential(ResBlock(ch, ch, cfg.time_embed_dim),
                                   SpatialTransformer(ch, cfg.context_dim, cfg.num_heads),
                                   ResBlock(ch, ch, cfg.time_embed_dim))


# ----------------------------------------------------------------------------------------------
# UNet (ControlledUnetModel) and ControlNet (cldm/cldm.py)
# ----------------------------------------------------------------------------------------------

class UNet(nn.Module):
    """Noise prediction; `controls` (13 residuals, already scaled) is added like ControlledUnetModel:
    the last residual to the middle block's output, the others to the skip connections as they
    are popped in reverse order. `controls=None` is the plain UNet."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.time_embed = TimeEmbed(cfg)
        self.input_blocks, skip_channels = encoder_blocks(cfg)
        self.middle_block = middle_block(cfg)
        self.output_blocks = nn.ModuleList()
        ch = skip_channels[-1]
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                out_ch = mult * cfg.model_channels
                layers = [ResBlock(ch + skip_channels.pop(), out_ch, cfg.time_embed_dim)]
                ch = out_ch
                if level in cfg.attention_levels:
                    layers.append(SpatialTransformer(ch, cfg.context_dim, cfg.num_heads))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), OutputConv(ch, cfg.out_channels, 3, padding=1))
        self.register_buffer("stacked_time_weight", None, persistent=False)  # see stack_time_projections
        self.register_buffer("stacked_time_bias", None, persistent=False)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                controls: list[torch.Tensor] | None = None) -> torch.Tensor:
        emb = embed_time(self, timesteps)
        return self.decode(*self.encode(x, emb, context), emb, context, controls)

    def encode(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor):
        """The input blocks and the middle block: (h, skips). Independent of the ControlNet, so the
        fast back-end runs it concurrently with the ControlNet. `emb` is what embed_time gives (a
        row per sample, or one row for every sample): it depends on the timestep alone, so the fast
        back-end makes every step's row once, ahead of the loop. x may have half the context's rows,
        the latents that both guidance branches share (both_branches): skips[0] then has as many."""
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        return self.middle_block(h, emb, context), skips

    def decode(self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor, context: torch.Tensor,
               controls: list[torch.Tensor] | None = None) -> torch.Tensor:
        skips = list(skips)
        if controls is not None:
            controls = list(controls)
            h = h + controls.pop()
        for block in self.output_blocks:
            skip = both_branches(skips.pop(), h.shape[0])
            if controls is not None:
                skip = skip + both_branches(controls.pop(), h.shape[0])
            h = block(torch.cat([h, skip], dim=1), emb, context)
        norm, _, conv = self.out  # GroupNorm, SiLU, Conv: normalize applies the SiLU (the fused op, one kernel)
        return conv(norm.normalize(h, silu=True))


class HintBlock(nn.Sequential):
    """input_hint_block: eight 3x3 convs with SiLU between, three of stride 2 (the image is 8x the
    latent), then the zero-initialised conv to model_channels."""

    def __init__(self, cfg: UNetConfig):
        c1, c2, c3, c4 = cfg.hint_block_channels
        convs = [(cfg.hint_channels, c1, 1), (c1, c1, 1), (c1, c2, 2), (c2, c2, 1),
                 (c2, c3, 2), (c3, c3, 1), (c3, c4, 2)]
        layers = []
        for cin, cout, stride in convs:
            layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.SiLU()]
        layers.append(nn.Conv2d(c4, cfg.model_channels, 3, padding=1))
        super().__init__(*layers)


class ControlNet(nn.Module):
    """Returns the 13 control residuals (unscaled). The hint block depends on the image only, so it
    is a separate call (`embed_hint`) that the sampler makes once per image; the original runs it
    at every step with the same result."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.time_embed = TimeEmbed(cfg)
        self.input_hint_block = HintBlock(cfg)
        self.input_blocks, channels = encoder_blocks(cfg)
        self.zero_convs = nn.ModuleList(TimestepEmbedSequential(nn.Conv2d(c, c, 1)) for c in channels)
        self.middle_block = middle_block(cfg)
        ch = channels[-1]
        self.middle_block_out = TimestepEmbedSequential(nn.Conv2d(ch, ch, 1))
        self.register_buffer("stacked_time_weight", None, persistent=False)  # see stack_time_projections
        self.register_buffer("stacked_time_bias", None, persistent=False)

    def embed_hint(self, hint: torch.Tensor) -> torch.Tensor:
        return self.input_hint_block(hint)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                hint_features: torch.Tensor) -> list[torch.Tensor]:
        return self.residuals(x, embed_time(self, timesteps), context, hint_features)

    def residuals(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                  hint_features: torch.Tensor) -> list[torch.Tensor]:
        """forward() with the time embedding made already (embed_time; see UNet.encode, also for x
        of half the context's rows). hint_features has a row per sample of x, or per latent that
        both branches share."""
        outs = []
        h = x
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h = h + both_branches(hint_features, h.shape[0])
            outs.append(zero_conv(h, emb, context))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h, emb, context))
        return outs


# ----------------------------------------------------------------------------------------------
# VAE decoder (ldm/modules/diffusionmodules/model.py Decoder, attn_resolutions [])
# ----------------------------------------------------------------------------------------------

def vae_norm(channels: int) -> GroupNorm:
    return GroupNorm(32, channels, eps=1e-6)


class VAEResnetBlock(nn.Module):
    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.norm1 = vae_norm(channels)
        self.conv1 = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.norm2 = vae_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if channels != out_channels:
            self.nin_shortcut = nn.Conv2d(channels, out_channels, 1)
        # set by the fast back-end (sdcanny/fused_norm.py): conv1's bias is added by norm2's op, not by
        # a kernel of its own between the two (TorchInductor adds a CUDA convolution's bias apart)
        self.conv1_bias_in_norm = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1.normalize(x, silu=True)
        if self.conv1_bias_in_norm:
            h = self.norm2.normalize(F.conv2d(h, self.conv1.weight, None, padding=self.conv1.padding), silu=True,
                                     add_bias=self.conv1.bias)
        else:
            h = self.norm2.normalize(self.conv1(h), silu=True)
        h = self.conv2(h)
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


# SDPA has no fused kernel for the VAE's one 512-wide head but the memory-efficient one: 128 µs at
# the graded 1536 pixels on the H100, where the products and the softmax written out took 27 µs
# (docs/benchmarks.md). Up to this many pixels the scores (pixels squared) are written out too.
VAE_WRITTEN_ATTENTION_PIXELS = 4096


class VAEAttnBlock(nn.Module):
    """Single-head self-attention over pixels with 1x1-conv projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = vae_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm.normalize(x)
        q, k, v = (p(n).flatten(2).transpose(1, 2)[:, None] for p in (self.q, self.k, self.v))
        out = attention(q, k, v, written_out=h * w <= VAE_WRITTEN_ATTENTION_PIXELS)[:, 0]
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class VAEMid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = VAEResnetBlock(channels, channels)
        self.attn_1 = VAEAttnBlock(channels)
        self.block_2 = VAEResnetBlock(channels, channels)


class VAEUpLevel(nn.Module):
    def __init__(self, channels: int, out_channels: int, num_blocks: int, upsample: bool):
        super().__init__()
        self.block = nn.ModuleList(VAEResnetBlock(channels if i == 0 else out_channels, out_channels)
                                   for i in range(num_blocks))
        self.attn = nn.ModuleList()  # attn_resolutions is empty in SD1.5's VAE
        if upsample:
            self.upsample = Upsample(out_channels)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = VAEMid(ch)
        levels = []
        for level in reversed(range(len(cfg.ch_mult))):
            out_ch = cfg.ch * cfg.ch_mult[level]
            levels.append(VAEUpLevel(ch, out_ch, cfg.num_res_blocks + 1, upsample=level != 0))
            ch = out_ch
        self.up = nn.ModuleList(reversed(levels))  # indexed by level, run from the deepest
        self.norm_out = vae_norm(ch)
        self.conv_out = OutputConv(ch, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(self.norm_out.normalize(h, silu=True))


class VAEDecoder(nn.Module):
    """Scaled latents (B, 4, h, w) -> image in [-1, 1] (B, 3, 8h, 8w)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.scale_factor = cfg.scale_factor
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv((1.0 / self.scale_factor) * latents))  # as decode_first_stage


# ----------------------------------------------------------------------------------------------
# The union model: ControlNet + UNet as one module, one evaluation per denoising step
# ----------------------------------------------------------------------------------------------

class UnionModel(nn.Module):
    """eps = UNet(x, t, context, scale_i * ControlNet_i(x, t, context, hint)) for a batch in which
    each sample has its own context and 13 control scales (B, 13). Classifier-free guidance runs
    both branches as one batch [cond, uncond]; a sample with all scales 0 gets exactly the plain
    UNet (each residual adds 0), which is how guess mode's unconditional branch runs here."""

    def __init__(self, controlnet: ControlNet, unet: UNet):
        super().__init__()
        self.controlnet = controlnet
        self.unet = unet

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                hint_features: torch.Tensor, control_scales: torch.Tensor) -> torch.Tensor:
        controls = scale_controls(self.controlnet(x, timesteps, context, hint_features), control_scales)
        return self.unet(x, timesteps, context, controls)


def scale_controls(controls: list[torch.Tensor], control_scales: torch.Tensor) -> list[torch.Tensor]:
    """Residual i of sample b times control_scales[b, i] (a residual of the layers that run once for
    both branches, both_branches, made a row per branch first: guess mode scales them apart)."""
    rows = control_scales.shape[0]
    return [both_branches(c, rows) * control_scales[:, i, None, None, None].to(c.dtype)
            for i, c in enumerate(controls)]


# ----------------------------------------------------------------------------------------------
# Mixed precision: an fp16 network with explicit fp32 islands
# ----------------------------------------------------------------------------------------------

def fp32_islands(module: nn.Module) -> list[nn.Module]:
    """The submodules that compute in fp32 in a reduced-precision network: every normalisation
    (statistics over thousands of values; ldm's own UNet runs its GroupNorms in fp32), the time
    embedding MLPs (cos/sin of t * freq for t up to 999 is off by up to 0.25 rad in fp16) and each
    ResBlock's projection of that embedding. All of it is a few percent of the work at most."""
    islands = [m for m in module.modules() if isinstance(m, (GroupNorm, LayerNorm, TimeEmbed))]
    return islands + [m.emb_layers for m in module.modules() if isinstance(m, ResBlock)]


def to_mixed_precision(module: nn.Module, dtype: torch.dtype = torch.float16) -> nn.Module:
    """`module` in `dtype`, its `fp32_islands` in fp32 (in place). The islands cast their inputs
    and outputs themselves, so an ONNX export of the result holds the casts explicitly: what a
    strongly typed TensorRT network needs."""
    module.to(dtype)
    for island in fp32_islands(module):
        island.float()
    return module
