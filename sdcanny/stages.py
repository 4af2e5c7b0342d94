"""The fast back-end's GPU work as six stage modules, defined once and run three ways: eager,
compiled in-process by torch.compile, or compiled ahead of time into programs that serve every
batch and image size in a range (sdcanny/programs.py).

    text          per prompt pair: CLIP on [cond, uncond] tokens and, where the networks are indexed
                  for it, their cross-attention keys and values
    hint          once per image: the ControlNet's hint block on the canny map
    control       per step: the ControlNet's 13 residuals
    unet_encode   per step, beside `control` on a second stream: the UNet's input and middle blocks
    unet_decode   per step: the UNet's output blocks with the residuals scaled per sample and added,
                  guidance, DDIM update
    decode        once per image: VAE decoder and the uint8 HWC conversion; whether the latents are finite

The per-step stages take the time embedding as a row made ahead for every step of the schedule
(time_rows): it depends on the timestep alone. Batches are [cond, uncond]: rows [:N] the
conditional branch, [N:] the unconditional one. The stage modules hold whole networks; a compiled
stage reads only the weights its graph uses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .ddim import ddim_step
from .networks import (ClipTextModel, ControlNet, UNet, VAEDecoder, cross_attention_keys_values, embed_time,
                       scale_controls, time_embedding_width)
from .reference import to_uint8_hwc

STAGE_NAMES = ("text", "hint", "control", "unet_encode", "unet_decode", "decode")

# Per-step values packed in one fp32 row (see fast.step_table): timestep, alpha, alpha_prev,
# sigma, sqrt(1 - alpha), padding to 32 bytes.
STEP_ROW = 8


class TextStage(nn.Module):
    """tokens int64 (2N, 77) -> the context as the ControlNet takes it and as the UNet takes it, in
    the network dtype: the text context (2N, 77, C) itself, or, where
    networks.index_cross_attention has run on the network, its cross-attention keys and values
    (networks.cross_attention_keys_values). A separate stage from the hint's, so that a repeated
    prompt pair (the graded call's) need not run it again."""

    def __init__(self, clip: ClipTextModel, controlnet: ControlNet, unet: UNet):
        super().__init__()
        self.clip = clip
        self.controlnet = controlnet
        self.unet = unet

    def forward(self, tokens: torch.Tensor):
        context = self.clip(tokens)
        return cross_attention_keys_values(self.controlnet, context), cross_attention_keys_values(self.unet, context)


class HintStage(nn.Module):
    """The canny map, uint8 (N, 1, H, W) -> the hint features (N, model_channels, H/8, W/8), in the
    network dtype: the ControlNet doubles them for both branches where its input has 2N rows
    (networks.both_branches). The map goes to the GPU as the front end made it (a byte a
    pixel, where the fp32 control takes 12) and becomes the original's three-channel control here."""

    def __init__(self, controlnet: ControlNet):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, edges: torch.Tensor):
        # / 255 in fp32 as the reference does it (exact: Canny's values are 0 and 255), then 3 channels
        hint = (edges.float() / 255.0).expand(-1, 3, -1, -1)
        return self.controlnet.embed_hint(hint.to(self.controlnet.input_hint_block[0].weight.dtype))


class ControlStage(nn.Module):
    """The 13 control residuals of the step's input (step_inputs), unscaled: unet_decode scales them where it adds
    them, in the kernels that add them. (Scaled here, each took a small kernel of its own after its
    zero convolution: 13 a step at the end of the ControlNet's stream, the longer of the two.)
    `emb` is the ControlNet's part of the step's time_rows."""

    def __init__(self, controlnet: ControlNet):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, x, emb, context, hint_features) -> list[torch.Tensor]:
        return self.controlnet.residuals(x, emb, context, hint_features)


class UNetEncodeStage(nn.Module):
    """(h, skips) of the UNet's first half; it does not read the ControlNet's output. `emb` is the
    UNet's part of the step's time_rows."""

    def __init__(self, unet: UNet):
        super().__init__()
        self.unet = unet

    def forward(self, x, emb, context):
        return self.unet.encode(x, emb, context)


class UNetDecodeStage(nn.Module):
    """The UNet's second half on the control residuals, each times its sample's control scale,
    then guidance e = e_u + s (e_c - e_u) and the DDIM update, in fp32. `step` is one row of the
    step table; `noise` is the step's noise (zeros when eta = 0, where sigma is 0 too and the
    update is exactly the noiseless one)."""

    def __init__(self, unet: UNet):
        super().__init__()
        self.unet = unet

    def forward(self, h, skips, emb, context, controls, control_scales, x, step, guidance, noise):
        eps = self.unet.decode(h, skips, emb, context, scale_controls(controls, control_scales)).to(x.dtype)
        # slices, not chunk(2): export cannot prove that chunk's split of a dynamic 2N is N
        e_cond, e_uncond = eps[:x.shape[0]], eps[x.shape[0]:]
        e_t = e_uncond + guidance * (e_cond - e_uncond)
        return ddim_step(x, e_t, step[1], step[2], step[3], step[4], noise)


class DecodeStage(nn.Module):
    """fp32 latents (N, 4, h, w) -> (uint8 images (N, 8h, 8w, 3), whether every latent is finite):
    the check in the captured graph, where after it three eager kernels and a wait took 0.35 ms of
    host time (H100, docs/benchmarks.md)."""

    def __init__(self, vae: VAEDecoder, channels_last: bool):
        super().__init__()
        self.vae = vae
        self.channels_last = channels_last

    def forward(self, latents):
        z = latents.to(self.vae.post_quant_conv.weight.dtype)
        if self.channels_last:  # cuDNN's fp16 convolutions are fastest in NHWC
            z = z.contiguous(memory_format=torch.channels_last)
        return to_uint8_hwc(self.vae(z).float()), torch.isfinite(latents).all()


@dataclass
class Stages:
    text: TextStage
    hint: HintStage
    control: ControlStage
    unet_encode: UNetEncodeStage
    unet_decode: UNetDecodeStage
    decode: DecodeStage

    @classmethod
    def of(cls, clip, controlnet, unet, vae, channels_last: bool) -> "Stages":
        return cls(TextStage(clip, controlnet, unet), HintStage(controlnet), ControlStage(controlnet),
                   UNetEncodeStage(unet), UNetDecodeStage(unet), DecodeStage(vae, channels_last))

    def items(self):
        return ((name, getattr(self, name)) for name in STAGE_NAMES)

    def time_rows(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(S, columns) for S timesteps: row j holds the ControlNet's embed_time of timesteps[j], then
        the UNet's, in the networks' dtype. The per-step stages take one row, parted by
        split_time_row, in place of the timestep: the sinusoid, the time MLP and the stacked ResBlock
        projection leave each network's step (three matrix products; at SD1.5's size their fp16
        weights are 29 MB for the ControlNet and 56 MB for the UNet)."""
        controlnet, unet = self.control.controlnet, self.unet_encode.unet
        return torch.cat([embed_time(controlnet, timesteps), embed_time(unet, timesteps)], dim=1)

    def split_time_row(self, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ControlNet's and the UNet's parts of a (1, columns) slice of time_rows, as views."""
        columns = time_embedding_width(self.control.controlnet)
        return row[:, :columns], row[:, columns:]


def step_inputs(x: torch.Tensor, dtype: torch.dtype, shared: bool = True) -> torch.Tensor:
    """What `control` and `unet_encode` take (one small kernel before the stages): x in the network
    dtype, its rows shared by both guidance branches up to the first cross-attention
    (networks.both_branches); not `shared`, [x, x], a row per branch from the first layer on."""
    return x.to(dtype) if shared else torch.cat([x, x]).to(dtype)
