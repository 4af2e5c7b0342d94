"""process()'s arguments, checked before any work: every problem is a ValueError that names the
argument, never an error from deep inside numpy or torch, a black image or a call that runs for
minutes.

The gradio app behind the original offers: 1 to 12 samples, resolution 256 to 768, 1 to 100 steps,
strength 0 to 2, scale 0.1 to 30, eta any >= 0, seed -1 to 2**31 - 1, Canny thresholds 1 to 255.
Library callers may go past the sliders where the maths allows; what it does not allow is refused.
"""
from __future__ import annotations

import math
import numbers
import random
from dataclasses import dataclass

import numpy as np

SEED_MAX = 2 ** 32 - 1  # numpy's seed range, which seed_everything feeds
RANDOM_SEED = -1  # the original's "pick one" value


@dataclass(frozen=True)
class WorkSizeLimits:
    """The largest work image process() accepts: image_resolution sets the short side, so a thin
    input becomes a long work image; one step's cost grows with its pixels (0.8 / 6.5 / 27.7 /
    83.8 s per step at 256 / 512 / 768 / 1024 squared on 2 CPU cores). The defaults admit what
    the original app offers: resolution up to 768 at any aspect ratio that stays within about a
    megapixel (768 x 1344 is 1.03 MP)."""
    max_pixels: int = 1344 * 768
    max_aspect: float = 8.0

    def check(self, input_shape: tuple, work_shape: tuple, resolution: int) -> None:
        (h, w), (wh, ww) = input_shape[:2], work_shape[:2]
        aspect = max(wh, ww) / min(wh, ww)
        if wh * ww > self.max_pixels or aspect > self.max_aspect:
            raise ValueError(
                f"image_resolution {resolution} turns this {h}x{w} input into a {wh}x{ww} work image "
                f"({wh * ww / 1e6:.2f} MP, aspect {aspect:.1f}:1); the limits are {self.max_pixels / 1e6:.2f} MP "
                f"and {self.max_aspect:g}:1. Lower image_resolution, crop the input, or raise the limits: "
                f"hackathon(max_work_pixels=..., max_aspect=...)")


def _number(name: str, value, integer: bool = False) -> float:
    """A real, finite number (bool refused: True is not a step count); integers where asked."""
    if type(value) is int or (type(value) is float and not integer and math.isfinite(value)):
        return value  # the usual case, without the abstract classes' slower checks below
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if integer and (not isinstance(value, numbers.Integral)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def _at_least(name: str, value, low, integer: bool = False):
    value = _number(name, value, integer)
    if value < low:
        raise ValueError(f"{name} must be {'an integer ' if integer else ''}>= {low}, got {value!r}")
    return value


def check_flag(name: str, value) -> bool:
    """True/False (numpy's too) or 0/1; strings such as "False" are refused, not read as True."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name} must be True or False (or 1 / 0), got {type(value).__name__} {value!r}")


def check_seed(seed) -> int:
    seed = _number("seed", seed, integer=True)
    if not (seed == RANDOM_SEED or 0 <= seed <= SEED_MAX):
        raise ValueError(f"seed must be an integer in 0..{SEED_MAX}, or -1 for a random one, got {seed!r}")
    return int(seed)


def resolve_seed(seed: int) -> int:
    """The seed to use: -1 draws one, as the original does (random.randint(0, 65535))."""
    return random.randint(0, 65535) if seed == RANDOM_SEED else seed


@dataclass(frozen=True)
class Arguments:
    prompt: str
    a_prompt: str
    n_prompt: str
    num_samples: int
    image_resolution: int
    ddim_steps: int
    guess_mode: bool
    strength: float
    scale: float
    seed: int
    eta: float
    low_threshold: float
    high_threshold: float


def check_arguments(prompt, a_prompt, n_prompt, num_samples, image_resolution, ddim_steps, guess_mode, strength,
                    scale, seed, eta, low_threshold, high_threshold) -> Arguments:
    """Every argument after the image, checked and normalised (Python ints, floats and bools)."""
    for name, value in (("prompt", prompt), ("a_prompt", a_prompt), ("n_prompt", n_prompt)):
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    num_samples = int(_at_least("num_samples", num_samples, 1, integer=True))
    image_resolution = int(_at_least("image_resolution", image_resolution, 64, integer=True))
    ddim_steps = int(_at_least("ddim_steps", ddim_steps, 1, integer=True))
    strength = float(_at_least("strength", strength, 0))
    scale = float(_number("scale", scale))
    eta = float(_at_least("eta", eta, 0))
    low = float(_at_least("low_threshold", low_threshold, 0))
    high = float(_at_least("high_threshold", high_threshold, 0))
    if low > high:
        raise ValueError(f"need low_threshold <= high_threshold, got {low_threshold!r} > {high_threshold!r}")
    return Arguments(prompt, a_prompt, n_prompt, num_samples, image_resolution, ddim_steps,
                     check_flag("guess_mode", guess_mode), strength, scale, check_seed(seed), eta, low, high)
