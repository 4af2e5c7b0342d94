"""Reading `models/control_sd15_canny.pth` (or a .safetensors copy) into the four networks.

The checkpoint is the original ControlNet 1.0 file: one flat state dict (optionally wrapped
in {"state_dict": ...}) whose keys start with the prefixes in `PARTS`. Every key either goes
to a network or is on the explicit `DROPPED` list below with the reason; anything else, and
any missing or mis-shaped key, is an error that names the keys.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import compat
from .config import ModelConfig, ScheduleConfig
from .networks import ClipTextModel, ControlNet, UNet, VAEDecoder
from .optional import installed
from .paths import DEFAULT_CHECKPOINT, DOCKER_CHECKPOINT

# checkpoint prefix of each network
PARTS = {
    "clip": "cond_stage_model.transformer.",
    "unet": "model.diffusion_model.",
    "controlnet": "control_model.",
    "vae": "first_stage_model.",
}

SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
)

# (pattern, reason): keys the canny2image pipeline does not use.
DROPPED = (
    (r"first_stage_model\.encoder\..*", "VAE encoder: canny2image only decodes"),
    (r"first_stage_model\.quant_conv\..*", "VAE encoder side (quant_conv)"),
    (r"(%s)" % "|".join(SCHEDULE_BUFFERS), "DDPM schedule buffer: recomputed from the schedule formula "
     "(alphas_cumprod is checked against it)"),
    (r"logvar", "training-only loss weighting"),
    (r"cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids",
     "CLIP position ids: always arange(77)"),
    (r"model_ema\..*", "EMA copy of the weights that community checkpoints carry: the model's own weights are used"),
)
_DROPPED_RE = [(re.compile(p + r"\Z"), why) for p, why in DROPPED]

# Newer `transformers` nest CLIP under `text_model.`; both spellings name the same tensors.
_CLIP_NESTED = "cond_stage_model.transformer.text_model."


class CheckpointError(ValueError):
    """The checkpoint file cannot be used; the message says which keys or what is wrong."""


def missing_checkpoint_message(path: Path) -> str:
    return (f"checkpoint not found: {path}\n"
            f"  Put the original ControlNet 1.0 canny checkpoint there (default {DEFAULT_CHECKPOINT}, or "
            f"{DOCKER_CHECKPOINT} in the hackathon docker; from lllyasviel/ControlNet on the HF hub), "
            "or make a seeded synthetic one in the same format:\n"
            f"    python3 -m sdcanny.synthetic --config sd15 --out {path}")


def check_checkpoint_path(path: Path) -> None:
    """Refuses a missing file or a directory with a message that says what to do."""
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in (".pth", ".ckpt", ".safetensors"))
        hint = f"; it holds {', '.join(inside)}" if inside else "; it holds no .pth, .ckpt or .safetensors file"
        raise CheckpointError(f"checkpoint {path} is a directory: pass the checkpoint file itself{hint}")
    if not path.is_file():
        raise FileNotFoundError(missing_checkpoint_message(path))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .pth/.ckpt (torch.load, weights only, memory-mapped where possible) or
    .safetensors file."""
    path = Path(path)
    check_checkpoint_path(path)
    if path.suffix == ".safetensors" and not installed("safetensors"):
        raise CheckpointError(f"reading {path} needs the safetensors package (pip install safetensors), "
                              "or a .pth copy of the checkpoint")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = compat.torch_load(path)
    except Exception as exc:  # torch and safetensors raise many types for a damaged file
        raise CheckpointError(f"cannot read checkpoint {path} (corrupted or truncated?): "
                              f"{type(exc).__name__}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state


def canonical_key(key: str) -> str:
    """CLIP keys in the one spelling the networks use (without `text_model.`)."""
    return PARTS["clip"] + key[len(_CLIP_NESTED):] if key.startswith(_CLIP_NESTED) else key


def dropped_reason(key: str) -> str | None:
    for pattern, why in _DROPPED_RE:
        if pattern.match(key):
            return why
    return None


def _summarise(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def build_networks(cfg: ModelConfig) -> dict[str, nn.Module]:
    return {"clip": ClipTextModel(cfg.clip), "unet": UNet(cfg.unet),
            "controlnet": ControlNet(cfg.unet), "vae": VAEDecoder(cfg.vae)}


def alphas_cumprod(schedule: ScheduleConfig) -> torch.Tensor:
    """SD1.5's 'linear' schedule: linear in sqrt(beta), cumulated in float64, stored as float32."""
    betas = torch.linspace(schedule.linear_start ** 0.5, schedule.linear_end ** 0.5,
                           schedule.timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


def split_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig,
                     expected: dict[str, dict[str, torch.Size]]) -> tuple[dict, dict[str, str]]:
    """Route each key to its network; returns ({part: {local_key: tensor}}, {dropped_key: reason}).
    `expected` is {part: {local_key: shape}}."""
    parts = {name: {} for name in PARTS}
    dropped, unexpected = {}, []
    for key, tensor in state.items():
        why = dropped_reason(key)
        if why is not None:
            dropped[key] = why
            continue
        key = canonical_key(key)
        part = next((n for n, p in PARTS.items() if key.startswith(p)), None)
        local = key[len(PARTS[part]):] if part else None
        if part is None or local not in expected[part]:
            unexpected.append(key)
        elif local in parts[part]:
            raise CheckpointError(f"checkpoint holds {key} twice (with and without 'text_model.')")
        else:
            parts[part][local] = tensor

    missing = [PARTS[n] + k for n, shapes in expected.items() for k in shapes if k not in parts[n]]
    misshaped = [f"{PARTS[n]}{k} {tuple(t.shape)} != {tuple(expected[n][k])}"
                 for n, tensors in parts.items() for k, t in tensors.items() if t.shape != expected[n][k]]
    problems = []
    if missing:
        problems.append(f"missing keys: {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_summarise(unexpected)}")
    if misshaped:
        problems.append(f"wrong shapes (checkpoint != model '{cfg.name}'): {_summarise(misshaped)}")
    if problems:
        other = other_matching_config(state, cfg)
        hint = f"\n  This looks like the '{other}' config: pass config='{other}' (--config {other})." if other else ""
        raise CheckpointError(f"checkpoint does not match the '{cfg.name}' architecture:\n  "
                              + "\n  ".join(problems) + hint)
    if "alphas_cumprod" in state:
        _check_schedule(state["alphas_cumprod"], cfg.schedule)
    non_finite = [PARTS[n] + k for n, tensors in parts.items() for k, t in tensors.items() if not all_finite(t)]
    if non_finite:
        raise CheckpointError(f"checkpoint holds NaN or infinite weights (every image would be black): "
                              f"{_summarise(non_finite)}")
    return parts, dropped


def all_finite(tensor: torch.Tensor) -> bool:
    """One summing pass (no bool copy of 5.7 GB of weights); the exact test only where the sum is
    not finite, which a NaN or inf always makes it, and an overflow rarely. Summed in fp32 (fp64
    for fp64 tensors): an fp64 sum of the fp32 checkpoint took 5x as long on 2 cores (2.5 against
    0.5 s), and weights never come near fp32's overflow."""
    if not tensor.is_floating_point():
        return True
    accumulate = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    return bool(torch.isfinite(tensor.sum(dtype=accumulate))) or bool(torch.isfinite(tensor).all())


def other_matching_config(state: dict[str, torch.Tensor], cfg: ModelConfig) -> str | None:
    """The name of another known config whose networks this state dict fits exactly, if any."""
    from .config import CONFIGS
    found = {canonical_key(k): t.shape for k, t in state.items() if dropped_reason(k) is None}
    for name, other in CONFIGS.items():
        if name == cfg.name:
            continue
        with torch.device("meta"):
            nets = build_networks(other)
        if found == {PARTS[n] + k: v.shape for n, m in nets.items() for k, v in m.state_dict().items()}:
            return name
    return None


def _check_schedule(stored: torch.Tensor, schedule: ScheduleConfig) -> None:
    """Compared at the checkpoint's precision: an fp16 or bf16 copy rounds the buffer too."""
    expected = alphas_cumprod(schedule)
    rtol = max(2 * torch.finfo(stored.dtype).eps, 1e-5) if stored.is_floating_point() else 1e-5
    if stored.shape != expected.shape or not torch.allclose(stored.float(), expected.to(stored.dtype).float(),
                                                            rtol=rtol, atol=1e-7):
        raise CheckpointError("the checkpoint's alphas_cumprod differs from SD1.5's linear schedule "
                              f"({schedule.linear_start} to {schedule.linear_end}, {schedule.timesteps} "
                              "steps); this pipeline computes the schedule from that formula")


@dataclass
class Networks:
    clip: ClipTextModel
    unet: UNet
    controlnet: ControlNet
    vae: VAEDecoder
    dropped: dict[str, str]  # checkpoint key -> why it was not loaded

    def to(self, device, dtype=None) -> "Networks":
        for net in (self.clip, self.unet, self.controlnet, self.vae):
            net.to(device=device, dtype=dtype)
        return self


def load_networks(path: str | Path, cfg: ModelConfig) -> Networks:
    """All four networks in fp32 on the CPU, in eval mode, weights taken from `path`."""
    return load_state_networks(read_state_dict(path), cfg)


def load_state_networks(state: dict[str, torch.Tensor], cfg: ModelConfig) -> Networks:
    """load_networks for a state dict already in memory."""
    with torch.device(compat.network_build_device()):
        nets = build_networks(cfg)
    expected = {n: {k: v.shape for k, v in m.state_dict().items()} for n, m in nets.items()}
    parts, dropped = split_state_dict(state, cfg, expected)
    for name, net in nets.items():
        compat.load_state_dict(net, {k: v.to(torch.float32) for k, v in parts[name].items()})
        net.eval().requires_grad_(False)
    ema = [k for k in dropped if k.startswith("model_ema.")]
    if ema:
        print(f"checkpoint: dropped {len(ema)} model_ema.* keys (an EMA copy of the weights); the model's own "
              "weights are used")
    return Networks(**nets, dropped=dropped)
