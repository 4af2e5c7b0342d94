"""DDIM sampling as lllyasviel/ControlNet's cldm/ddim_hacked.py does it, float for float.

The schedule tensors are float32 like the original's `torch.full(..., alphas[index])`; sigma is
formed in float64 (the original mixes numpy float64 and torch float32 there) and then rounded.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from .checkpoint import alphas_cumprod
from .config import ScheduleConfig


@dataclass(frozen=True, eq=False)  # compared and hashed by identity (it holds tensors)
class DDIMSchedule:
    timesteps: torch.Tensor  # int64 (S,), ascending: 1, 51, ..., 951 for 20 steps
    alphas: torch.Tensor  # float32 (S,): alphas_cumprod[t]
    alphas_prev: torch.Tensor  # float32 (S,): alphas_cumprod at the previous DDIM timestep
    sigmas: torch.Tensor  # float32 (S,)
    sqrt_one_minus_alphas: torch.Tensor  # float32 (S,)

    def __len__(self) -> int:
        return len(self.timesteps)

    def sampling_order(self) -> list[tuple[int, int]]:
        """(index, timestep) pairs from the noisiest step down, as the sampler visits them."""
        return [(i, int(self.timesteps[i])) for i in reversed(range(len(self)))]


def ddim_timesteps(steps: int, num_train_steps: int = 1000) -> np.ndarray:
    """'uniform' discretisation: range(0, T, T // steps) + 1. Like the original this gives one extra
    step when `steps` does not divide T (30 steps -> 31 timesteps)."""
    if not 1 <= steps <= num_train_steps:
        raise ValueError(f"ddim_steps must be in 1..{num_train_steps}, got {steps}")
    t = np.arange(0, num_train_steps, num_train_steps // steps) + 1
    if t[-1] >= num_train_steps:
        raise ValueError(f"ddim_steps={steps} is not supported: the original sampler would index timestep "
                         f"{t[-1]} of a {num_train_steps}-step schedule")
    return t


@functools.lru_cache(maxsize=16)  # the same few (steps, eta) pairs come back call after call
def make_schedule(schedule: ScheduleConfig, steps: int, eta: float) -> DDIMSchedule:
    ac = alphas_cumprod(schedule)
    t = ddim_timesteps(steps, schedule.timesteps)
    alphas = ac[t]
    alphas_prev = torch.cat([ac[:1], ac[t[:-1]]])
    a64, p64 = alphas.double(), alphas_prev.double()
    unit = torch.sqrt((1 - p64) / (1 - a64) * (1 - a64 / p64))  # sigma at eta = 1
    sigmas = (eta * unit).to(torch.float32)
    # the update takes sqrt(1 - alpha_prev - sigma^2), in float32: past eta_max that is NaN, and the image black
    if bool((1.0 - alphas_prev - sigmas ** 2 < 0).any()):
        eta_max = float(torch.sqrt((1 - p64) / unit.clamp_min(1e-300) ** 2).min())
        raise ValueError(f"eta must be at most about {eta_max:.4g} for {steps} DDIM steps (beyond it the "
                         f"sampler's sqrt(1 - alpha_prev - sigma^2) is undefined), got {eta!r}")
    return DDIMSchedule(timesteps=torch.from_numpy(t), alphas=alphas, alphas_prev=alphas_prev,
                        sigmas=sigmas, sqrt_one_minus_alphas=torch.sqrt(1.0 - alphas))


def ddim_step(x: torch.Tensor, e_t: torch.Tensor, a_t: torch.Tensor, a_prev: torch.Tensor,
              sigma_t: torch.Tensor, sqrt_one_minus_at: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """x_{t-1} from x_t and the guided noise prediction (coefficients broadcastable to x).
    `noise` may be None when sigma_t is 0 (eta = 0): the original's sigma_t * noise is then 0."""
    pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
    dir_xt = (1.0 - a_prev - sigma_t ** 2).sqrt() * e_t
    x_prev = a_prev.sqrt() * pred_x0 + dir_xt
    if noise is not None:
        x_prev = x_prev + sigma_t * noise
    return x_prev
