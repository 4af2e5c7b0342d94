"""The fp32 reference back-end: the original sampler's computation, step for step.

Like cldm/ddim_hacked.py it evaluates the conditional and the unconditional branch as two
separate calls, draws a fresh noise tensor at every step (scaled by sigma, so it only matters
for eta > 0), and decodes with the VAE at the end. Everything else in the project is measured
against this.
"""
from __future__ import annotations

import numpy as np
import torch

from .checkpoint import Networks
from .ddim import ddim_step
from .pipeline import GenerationRequest, seed_everything


def to_uint8_hwc(images: torch.Tensor) -> torch.Tensor:
    """VAE output in [-1, 1] (N, 3, H, W) -> uint8 (N, H, W, 3): x * 127.5 + 127.5, clipped,
    truncated (numpy's astype), as the original converts it."""
    return (images.permute(0, 2, 3, 1) * 127.5 + 127.5).clamp(0, 255).to(torch.uint8)


def scaled(controls: list[torch.Tensor], scales: tuple[float, ...]) -> list[torch.Tensor]:
    return [c * s for c, s in zip(controls, scales)]


class ReferenceBackend:
    name = "reference"

    def __init__(self, networks: Networks, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.nets = networks.to(self.device, torch.float32)
        self.last_latents: torch.Tensor | None = None
        self.step_callback = None  # optional f(i, x): latents after step i (0 = noisiest), for diagnostics

    def noise_prediction(self, x, t, context, hint_features, scales):
        """ControlLDM.apply_model: hint_features None means no control (guess-mode uncond)."""
        if hint_features is None:
            return self.nets.unet(x, t, context)
        controls = scaled(self.nets.controlnet(x, t, context, hint_features), scales)
        return self.nets.unet(x, t, context, controls)

    def generate(self, request: GenerationRequest) -> np.ndarray:
        dev, nets, sched = self.device, self.nets, request.schedule
        seed_everything(request.seed)  # as the original, after its canny map and before its first draw
        x = torch.randn(request.latent_shape, device=dev)
        cond = nets.clip(request.cond_tokens.to(dev))
        uncond = nets.clip(request.uncond_tokens.to(dev))
        hint_features = nets.controlnet.embed_hint(request.hint.to(dev))
        uncond_hint = None if request.guess_mode else hint_features
        n = request.num_samples
        for i, (index, step) in enumerate(sched.sampling_order()):
            t = torch.full((n,), step, device=dev, dtype=torch.long)
            e_cond = self.noise_prediction(x, t, cond, hint_features, request.control_scales)
            e_uncond = self.noise_prediction(x, t, uncond, uncond_hint, request.control_scales)
            e_t = e_uncond + request.guidance_scale * (e_cond - e_uncond)
            coef = lambda v: torch.full((n, 1, 1, 1), float(v[index]), device=dev)  # noqa: E731
            noise = torch.randn(x.shape, device=dev)  # drawn every step, as the original does
            x = ddim_step(x, e_t, coef(sched.alphas), coef(sched.alphas_prev), coef(sched.sigmas),
                          coef(sched.sqrt_one_minus_alphas), noise)
            if self.step_callback is not None:
                self.step_callback(i, x)
        self.last_latents = x
        return to_uint8_hwc(nets.vae(x)).cpu().numpy()
