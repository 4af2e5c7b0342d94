"""The fast back-end's GPU work as five stage modules, defined once and run three ways: eager,
compiled in-process by torch.compile, or compiled ahead of time into programs that serve every
batch and image size in a range (sdcanny/programs.py).

    encode        once per image: CLIP on [cond, uncond] tokens, the ControlNet's hint block and,
                  where the networks are indexed for it, their cross-attention keys and values
    control       per step: the ControlNet's 13 residuals, scaled per sample
    unet_encode   per step, beside `control` on a second stream: the UNet's input and middle blocks
    unet_decode   per step: the UNet's output blocks with the residuals added, guidance, DDIM update
    decode        once per image: VAE decoder and the uint8 HWC conversion

Batches are [cond, uncond]: rows [:N] the conditional branch, [N:] the unconditional one. The
stage modules hold whole networks; a compiled stage reads only the weights its graph uses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .ddim import ddim_step
from .networks import ClipTextModel, ControlNet, UNet, VAEDecoder, cross_attention_keys_values, scale_controls
from .reference import to_uint8_hwc

STAGE_NAMES = ("encode", "control", "unet_encode", "unet_decode", "decode")

# Per-step values packed in one fp32 row (see fast.step_table): timestep, alpha, alpha_prev,
# sigma, sqrt(1 - alpha), padding to 32 bytes.
STEP_ROW = 8


class EncodeStage(nn.Module):
    """tokens int64 (2N, 77) and the canny map fp32 (N, 3, H, W) -> the context as the ControlNet
    takes it and as the UNet takes it, and the hint features for both branches (2N,
    model_channels, H/8, W/8), in the network dtype. The context a network takes is the text
    context (2N, 77, C) itself, or, where networks.index_cross_attention has run on the network,
    its cross-attention keys and values (networks.cross_attention_keys_values)."""

    def __init__(self, clip: ClipTextModel, controlnet: ControlNet, unet: UNet):
        super().__init__()
        self.clip = clip
        self.controlnet = controlnet
        self.unet = unet

    def forward(self, tokens: torch.Tensor, hint: torch.Tensor):
        features = self.controlnet.embed_hint(hint.to(self.controlnet.input_hint_block[0].weight.dtype))
        context = self.clip(tokens)
        # repeat, not cat([f, f]): the same rows, and Inductor (torch 2.13) fails to lower that cat
        # when height and width are symbolic
        return (cross_attention_keys_values(self.controlnet, context), cross_attention_keys_values(self.unet, context),
                features.repeat(2, 1, 1, 1))


class ControlStage(nn.Module):
    """The 13 control residuals of x2 = [x, x], each times its sample's control scale."""

    def __init__(self, controlnet: ControlNet):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, x2, t, context, hint_features, control_scales) -> list[torch.Tensor]:
        return scale_controls(self.controlnet(x2, t, context, hint_features), control_scales)


class UNetEncodeStage(nn.Module):
    """(h, skips, emb) of the UNet's first half; it does not read the ControlNet's output."""

    def __init__(self, unet: UNet):
        super().__init__()
        self.unet = unet

    def forward(self, x2, t, context):
        return self.unet.encode(x2, t, context)


class UNetDecodeStage(nn.Module):
    """The UNet's second half, guidance e = e_u + s (e_c - e_u) and the DDIM update, in fp32.
    `step` is one row of the step table; `noise` is the step's noise (zeros when eta = 0, where
    sigma is 0 too and the update is exactly the noiseless one)."""

    def __init__(self, unet: UNet):
        super().__init__()
        self.unet = unet

    def forward(self, h, skips, emb, context, controls, x, step, guidance, noise):
        eps = self.unet.decode(h, skips, emb, context, controls).to(x.dtype)
        # slices, not chunk(2): export cannot prove that chunk's split of a dynamic 2N is N
        e_cond, e_uncond = eps[:x.shape[0]], eps[x.shape[0]:]
        e_t = e_uncond + guidance * (e_cond - e_uncond)
        return ddim_step(x, e_t, step[1], step[2], step[3], step[4], noise)


class DecodeStage(nn.Module):
    """fp32 latents (N, 4, h, w) -> uint8 images (N, 8h, 8w, 3)."""

    def __init__(self, vae: VAEDecoder, channels_last: bool):
        super().__init__()
        self.vae = vae
        self.channels_last = channels_last

    def forward(self, latents):
        z = latents.to(self.vae.post_quant_conv.weight.dtype)
        if self.channels_last:  # cuDNN's fp16 convolutions are fastest in NHWC
            z = z.contiguous(memory_format=torch.channels_last)
        return to_uint8_hwc(self.vae(z).float())


@dataclass
class Stages:
    encode: EncodeStage
    control: ControlStage
    unet_encode: UNetEncodeStage
    unet_decode: UNetDecodeStage
    decode: DecodeStage

    @classmethod
    def of(cls, clip, controlnet, unet, vae, channels_last: bool) -> "Stages":
        return cls(EncodeStage(clip, controlnet, unet), ControlStage(controlnet), UNetEncodeStage(unet),
                   UNetDecodeStage(unet), DecodeStage(vae, channels_last))

    def items(self):
        return ((name, getattr(self, name)) for name in STAGE_NAMES)


def step_inputs(x: torch.Tensor, step: torch.Tensor, dtype: torch.dtype):
    """[x, x] in the network dtype and the timestep for both branches (what `control` and
    `unet_encode` take; two small kernels between the stages)."""
    x2 = torch.cat([x, x]).to(dtype)
    return x2, step[0].expand(x2.shape[0])
