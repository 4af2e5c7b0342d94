"""The canny2image front end shared by every back-end.

`Canny2Image.process()` does what gradio_canny2image.py's `process()` does before and after the
networks: input checks, HWC3 / resize / Canny, the control hint, seeding, prompt assembly and
tokenization, the DDIM schedule and control scales. A back-end turns the resulting
`GenerationRequest` into images; they differ only in how the networks are executed.
"""
from __future__ import annotations

import functools
import random
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .config import ModelConfig
from .ddim import DDIMSchedule, make_schedule
from .arguments import RANDOM_SEED, WorkSizeLimits, check_arguments, resolve_seed
from .image import canny, hwc3, validate_image, work_image, work_size
from .tokenizer import load_tokenizer

# The hackathon's graded call, after the image, on 256x384 images: process(img, **GRADED_CALL),
# or positionally process(img, *GRADED_ARGS).
GRADED_CALL = {"prompt": "a bird", "a_prompt": "best quality, extremely detailed",
               "n_prompt": "longbody, lowres, bad anatomy, bad hands, missing fingers",
               "num_samples": 1, "image_resolution": 256, "ddim_steps": 20, "guess_mode": False, "strength": 1,
               "scale": 9, "seed": 2946901, "eta": 0.0, "low_threshold": 100, "high_threshold": 200}
GRADED_ARGS = tuple(GRADED_CALL.values())
GRADED_IMAGE_SHAPE = (256, 384, 3)


@dataclass(frozen=True)
class GenerationRequest:
    work_image: np.ndarray  # uint8 (H, W, 3): the input at the work size, of which the canny map is made
    canny_thresholds: tuple[float, float]  # (low, high) as process() was given them
    num_samples: int
    cond_tokens: torch.Tensor  # int64 (N, 77): prompt + ', ' + a_prompt
    uncond_tokens: torch.Tensor  # int64 (N, 77): n_prompt
    schedule: DDIMSchedule
    guidance_scale: float
    control_scales: tuple[float, ...]  # one per control residual
    guess_mode: bool  # the unconditional branch then gets no control at all
    seed: int  # resolved (never -1): a back-end seeds every generator with it right before its first draw

    @functools.cached_property
    def edges(self) -> np.ndarray:
        """uint8 (H, W): the canny map at the work size, 0s and 255s, made on the host at first use
        (the torch back-end makes it on the GPU where it can, and never asks)."""
        return canny(self.work_image, *self.canny_thresholds)

    @functools.cached_property
    def hint(self) -> torch.Tensor:
        """float32 (N, 3, H, W) in [0, 1], on the CPU: the original's control, HWC3(edges) / 255 for
        each sample, NCHW. Made at first use, in numpy (torch's CPU kernels wake all intra-op
        threads, which cost ~25 ms per call on a 16-core GPU host, measured): the torch back-end
        never asks, it sends the edges to the GPU as they are."""
        hint = np.ascontiguousarray(hwc3(self.edges).transpose(2, 0, 1)).astype(np.float32) / np.float32(255.0)
        return torch.from_numpy(np.repeat(hint[None], self.num_samples, axis=0))

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        h, w = self.work_image.shape[:2]
        return (self.num_samples, 4, h // 8, w // 8)

    @property
    def has_step_noise(self) -> bool:
        """eta > 0. With eta = 0 the reference's per-step noise is multiplied by 0. (numpy: torch's CPU
        kernels would wake their threads.)"""
        return bool((self.schedule.sigmas.numpy() > 0).any())

    def control_scale_rows(self) -> np.ndarray:
        """float32 (2, 13): the conditional branch's scales, then the unconditional one's (zeros in
        guess mode: no control there). numpy, so no torch CPU kernel runs per call."""
        cond = np.asarray(self.control_scales, np.float32)
        return np.stack([cond, cond * 0 if self.guess_mode else cond])


def draw_noise(request: GenerationRequest, device, out: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference's random numbers in its order, drawn up front for back-ends that capture their
    loop, after seeding every generator with the request's seed (seed_everything): the initial
    latents (into `out` where given, an fp32 tensor of the latent shape on `device`), then (eta > 0
    only) one tensor per step from the noisiest step down. Returns (x, step_noise) with step_noise
    (S, N, 4, h, w) indexed like the schedule."""
    seed_everything(request.seed)
    x = torch.randn(request.latent_shape, device=device) if out is None else torch.randn(request.latent_shape, out=out)
    if not request.has_step_noise:
        return x, None
    noise = {index: torch.randn(request.latent_shape, device=device) for index, _ in request.schedule.sampling_order()}
    return x, torch.stack([noise[i] for i in range(len(request.schedule))])


class Backend(Protocol):
    name: str

    def generate(self, request: GenerationRequest) -> np.ndarray:
        """uint8 (N, H, W, 3). Seeds every generator with seed_everything(request.seed), then draws
        its initial noise with torch.randn on its own device before any other random number
        (draw_noise does both; the original seeds after making its canny map). After it,
        `last_latents` holds the final latents; a back-end may also say in `last_finite` (a bool)
        whether they are all finite, which then spares the front end its own check."""


def seed_everything(seed: int) -> None:
    """pytorch_lightning.seed_everything, as the original calls it: Python's, numpy's and torch's
    generators, the CPU's and every CUDA device's. Where those are all the generators this process
    has, they are seeded directly: a recent torch.manual_seed (2.11 on the H100 machine, 2.13 in CI)
    also queues a seed for each accelerator kind torch knows of (XPU, MTIA) even where there is
    none, with a stack trace each, which took about 0.5 ms a call on the H100 host
    (docs/benchmarks.md)."""
    random.seed(seed)
    np.random.seed(seed)
    if other_generators():
        torch.manual_seed(seed)
        return
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)  # at once where CUDA has started, else when it starts


@functools.lru_cache(maxsize=1)
def other_generators() -> bool:
    """Whether torch.manual_seed has generators to seed besides the CPU's and CUDA's: an MPS, XPU
    or MTIA device, or a custom device back-end with a seed function (asked once per process)."""
    checks = [torch.backends.mps.is_available] + [getattr(getattr(torch, kind, None), "is_available", None)
                                                  for kind in ("xpu", "mtia")]  # where this torch has them
    if any(check is not None and check() for check in checks):
        return True
    backend_name = getattr(torch._C, "_get_privateuse1_backend_name", None)  # absent from older torch
    custom = getattr(torch, backend_name(), None) if backend_name is not None else None
    return hasattr(custom, "manual_seed_all")


def control_scales(strength: float, guess_mode: bool, count: int) -> tuple[float, ...]:
    if guess_mode:  # deeper residuals count more: strength * 0.825 ** (12 - i)
        return tuple(strength * (0.825 ** float(count - 1 - i)) for i in range(count))
    return (float(strength),) * count


class Images(list):
    """process()'s result: the list of HWC uint8 images the hackathon expects, which also says the
    seed it was made with (the one drawn when seed was -1)."""

    def __init__(self, images, seed: int):
        super().__init__(images)
        self.seed = seed


class Canny2Image:
    def __init__(self, backend: Backend, cfg: ModelConfig, limits: WorkSizeLimits = WorkSizeLimits()):
        self.backend = backend
        self.cfg = cfg
        self.limits = limits
        self.tokenizer = load_tokenizer(cfg.clip.max_length)
        # the last few prompts' tokens: a repeated prompt (the graded call's) is not tokenized again.
        # Kept in numpy: inside a call, after the host's wait for the GPU, one torch operation on them
        # took 0.26 ms against 0.02 in a row (docs/benchmarks.md)
        self._prompt_tokens = functools.lru_cache(maxsize=16)(lambda prompt: self.tokenizer([prompt]).numpy())
        self.last_timings: dict[str, float] = {}
        self.last_seed: int | None = None

    def request(self, input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution, ddim_steps,
                guess_mode, strength, scale, seed, eta, low_threshold, high_threshold) -> GenerationRequest:
        """Everything up to the networks. The seed is resolved here and reported where it was drawn;
        the back-end seeds the generators with it when it draws its noise (draw_noise), which keeps
        the host's seeding (0.06-0.17 ms on the H100 host) after the first GPU work is queued."""
        validate_image(input_image)
        a = check_arguments(prompt, a_prompt, n_prompt, num_samples, image_resolution, ddim_steps, guess_mode,
                            strength, scale, seed, eta, low_threshold, high_threshold)
        self.limits.check(input_image.shape, work_size(*input_image.shape[:2], a.image_resolution), a.image_resolution)
        schedule = make_schedule(self.cfg.schedule, a.ddim_steps, a.eta)
        request = GenerationRequest(
            work_image=work_image(input_image, a.image_resolution),
            canny_thresholds=(a.low_threshold, a.high_threshold), num_samples=a.num_samples,
            cond_tokens=self.prompt_tokens(a.prompt + ", " + a.a_prompt, a.num_samples),
            uncond_tokens=self.prompt_tokens(a.n_prompt, a.num_samples),
            schedule=schedule, guidance_scale=a.scale,
            control_scales=control_scales(a.strength, a.guess_mode, self.cfg.unet.num_control_residuals),
            guess_mode=a.guess_mode, seed=resolve_seed(a.seed))
        self.last_seed = request.seed
        if a.seed == RANDOM_SEED:
            print(f"canny2image: seed -1: using seed {request.seed} (pass it to reproduce this image)")
        return request

    def prompt_tokens(self, prompt: str, num_samples: int) -> torch.Tensor:
        """int64 (num_samples, max_length): the prompt's tokens in every row (a new tensor each call)."""
        return torch.from_numpy(np.repeat(self._prompt_tokens(prompt), num_samples, axis=0))

    def process(self, input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution, ddim_steps,
                guess_mode, strength, scale, seed, eta, low_threshold, high_threshold) -> Images:
        start = time.perf_counter()
        # no_grad, not inference_mode: the ahead-of-time programs' guards check that their inputs
        # are the kind of tensor they were compiled for, and inference tensors are another kind
        with torch.no_grad():
            request = self.request(input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution,
                                   ddim_steps, guess_mode, strength, scale, seed, eta, low_threshold,
                                   high_threshold)
            prepared = time.perf_counter()
            images = self.backend.generate(request)
            check_finite(self.backend, strength, scale)
        end = time.perf_counter()
        self.last_timings = {"preprocess": prepared - start, "generate": end - prepared, "total": end - start}
        return Images([images[i] for i in range(len(images))], self.last_seed)


def check_finite(backend, strength, scale) -> None:
    """A sampler that overflowed returns black images after the uint8 clamp: say so instead. The
    back-end's `last_finite` where it has one, else its `last_latents` checked here."""
    finite = getattr(backend, "last_finite", None)
    if finite is None:
        latents = getattr(backend, "last_latents", None)
        finite = latents is None or bool(torch.isfinite(latents).all())
    if not finite:
        raise FloatingPointError(f"the sampler produced NaN or infinite latents (strength={strength!r}, "
                                 f"scale={scale!r}): lower them, or check the checkpoint's weights")
