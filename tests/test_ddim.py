from __future__ import annotations

import numpy as np
import pytest
import torch

from sdcanny.config import ScheduleConfig
from sdcanny.ddim import ddim_step, ddim_timesteps, make_schedule


def float64_alphas_cumprod():
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def test_20_step_timesteps():
    assert ddim_timesteps(20).tolist() == list(range(1, 1000, 50))
    s = make_schedule(ScheduleConfig(), 20, 0.0)
    assert [t for _, t in s.sampling_order()] == list(range(951, 0, -50))
    assert [i for i, _ in s.sampling_order()] == list(range(19, -1, -1))


def test_alphas_match_float64_formula():
    ac = float64_alphas_cumprod()
    s = make_schedule(ScheduleConfig(), 20, 0.0)
    t = np.arange(1, 1000, 50)
    np.testing.assert_allclose(s.alphas.numpy(), ac[t], rtol=1e-6)
    np.testing.assert_allclose(s.alphas_prev.numpy(), np.concatenate([[ac[0]], ac[t[:-1]]]), rtol=1e-6)
    # formed in float32 like the original, so 1 - a loses digits near a = 1: absolute tolerance
    np.testing.assert_allclose(s.sqrt_one_minus_alphas.numpy(), np.sqrt(1 - ac[t]), rtol=0, atol=1e-6)
    assert s.sigmas.abs().max() == 0
    assert s.alphas.dtype == s.alphas_prev.dtype == s.sigmas.dtype == torch.float32


def test_sigmas_for_eta():
    ac = float64_alphas_cumprod()
    t = np.arange(1, 1000, 50)
    a, p = ac[t], np.concatenate([[ac[0]], ac[t[:-1]]])
    expected = 0.5 * np.sqrt((1 - p) / (1 - a) * (1 - a / p))
    np.testing.assert_allclose(make_schedule(ScheduleConfig(), 20, 0.5).sigmas.numpy(), expected, rtol=1e-5)


def test_uneven_step_counts_keep_the_originals_extra_step():
    assert len(ddim_timesteps(30)) == 31  # 1000 // 30 = 33 -> 0, 33, ..., 990
    assert len(ddim_timesteps(1)) == 1 and ddim_timesteps(1)[0] == 1


@pytest.mark.parametrize("steps", [0, -3, 1001, 300])
def test_unsupported_step_counts_raise(steps):
    with pytest.raises(ValueError, match="ddim_steps"):
        ddim_timesteps(steps)


def test_one_step_against_hand_derived_update():
    g = torch.Generator().manual_seed(0)
    x, e, noise = (torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    a_t, a_prev, sigma = 0.3, 0.6, 0.2
    # DDIM (Song et al. 2020, eq. 12): x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) e + sigma z
    x0 = (x - np.sqrt(1 - a_t) * e) / np.sqrt(a_t)
    expected = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma ** 2) * e + sigma * noise
    c = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    got = ddim_step(x, e, c(a_t), c(a_prev), c(sigma), c(np.sqrt(1 - a_t)), noise)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    without_noise = ddim_step(x, e, c(a_t), c(a_prev), c(0.0), c(np.sqrt(1 - a_t)), None)
    torch.testing.assert_close(without_noise, np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * e)
