"""Architecture of SD1.5 + ControlNet 1.0 as frozen dataclasses.

`SD15` is `models/cldm_v15.yaml` of lllyasviel/ControlNet; `TINY` is a miniature with the
same structure (four resolution levels, two res-blocks each, attention on the first three,
13 control residuals) so that tests on a CPU run through exactly the code the full model uses.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClipConfig:
    """CLIP ViT-L/14 text transformer (the `last_hidden_state` is the UNet's context)."""
    vocab_size: int = 49408
    max_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12


@dataclass(frozen=True)
class UNetConfig:
    """Shared by the UNet and the ControlNet, which copies the UNet's encoder half."""
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple = (0, 1, 2)  # attention_resolutions [4, 2, 1] <=> downsample factors 1, 2, 4
    num_heads: int = 8
    context_dim: int = 768
    hint_channels: int = 3
    hint_block_channels: tuple = (16, 32, 96, 256)  # fixed in the original ControlNet code

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    @property
    def num_control_residuals(self) -> int:
        """One per input block (the stem conv, the res-blocks, the downsamplers) plus the middle."""
        levels = len(self.channel_mult)
        return 1 + levels * self.num_res_blocks + (levels - 1) + 1


@dataclass(frozen=True)
class VAEConfig:
    """The KL autoencoder; canny2image only ever decodes."""
    z_channels: int = 4
    embed_dim: int = 4
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    out_channels: int = 3
    scale_factor: float = 0.18215

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class ScheduleConfig:
    """The DDPM schedule the checkpoint was trained with (linear in sqrt(beta))."""
    timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.0120


@dataclass(frozen=True)
class ModelConfig:
    name: str
    clip: ClipConfig
    unet: UNetConfig
    vae: VAEConfig
    schedule: ScheduleConfig = ScheduleConfig()


SD15 = ModelConfig(name="sd15", clip=ClipConfig(), unet=UNetConfig(), vae=VAEConfig())

TINY = ModelConfig(
    name="tiny",
    clip=ClipConfig(width=32, layers=2, heads=4),
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2, 2, 2), context_dim=32),
    vae=VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1),
)

CONFIGS = {c.name: c for c in (SD15, TINY)}
