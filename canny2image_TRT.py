"""The hackathon entry point: `hackathon().initialize()`, then `process(...)` as in
gradio_canny2image.py, returning `num_samples` HWC uint8 images.

    from canny2image_TRT import hackathon
    h = hackathon()            # or hackathon(backend="reference" | "torch" | "trt")
    h.initialize()
    images = h.process(img, "a bird", "best quality, extremely detailed",
                       "longbody, lowres, bad anatomy, bad hands, missing fingers",
                       1, 256, 20, False, 1, 9, 2946901, 0.0, 100, 200)
"""
import time
from pathlib import Path

import cv2
import numpy as np

from sdcanny.backends import BACKENDS, DEFAULT_ENGINE_DIR, create_backend, fastest_available
from sdcanny.checkpoint import DEFAULT_CHECKPOINT
from sdcanny.config import CONFIGS
from sdcanny.pipeline import GRADED_ARGS, GRADED_IMAGE_SHAPE, Canny2Image


def warm_up_image(shape=GRADED_IMAGE_SHAPE) -> np.ndarray:
    """A stand-in photo (gradients and a few shapes, so Canny finds edges) for the warm-up call."""
    h, w, _ = shape
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], axis=-1).astype(np.uint8)
    cv2.circle(img, (w // 3, h // 2), h // 4, (255, 255, 255), -1)
    cv2.rectangle(img, (w // 2, h // 4), (w - 20, h - 20), (20, 40, 200), 5)
    return img


class hackathon:  # noqa: N801 - the name the hackathon's harness imports
    def __init__(self, backend: str | None = None, checkpoint: str | Path = DEFAULT_CHECKPOINT,
                 config: str = "sd15", device: str | None = None, engine_dir: str | Path = DEFAULT_ENGINE_DIR,
                 backend_options: dict | None = None):
        if config not in CONFIGS:
            raise ValueError(f"unknown config {config!r}; choose one of {', '.join(CONFIGS)}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"unknown back-end {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.backend_name = backend
        self.checkpoint = Path(checkpoint)
        self.cfg = CONFIGS[config]
        self.device = device
        self.engine_dir = Path(engine_dir)
        self.backend_options = backend_options
        self.pipeline: Canny2Image | None = None
        self.initialize_seconds: float | None = None

    def initialize(self, warm_up: bool = True) -> None:
        """Load the back-end; for the fast back-ends also run the graded call once, so that
        compilation and CUDA-graph capture for that shape happen here and not in process()."""
        start = time.perf_counter()
        name = self.backend_name or fastest_available(self.engine_dir)
        backend = create_backend(name, self.checkpoint, self.cfg, self.device, self.engine_dir,
                                 self.backend_options)
        self.pipeline = Canny2Image(backend, self.cfg)
        self.backend_name = name
        loaded = time.perf_counter()
        if warm_up and name != "reference":
            self.pipeline.process(warm_up_image(), *GRADED_ARGS)
        end = time.perf_counter()
        self.initialize_seconds = end - start
        print(f"canny2image: back-end '{name}', model '{self.cfg.name}', tokenizer {self.pipeline.tokenizer.backend}; "
              f"initialize() took {self.initialize_seconds:.1f} s (load {loaded - start:.1f} s, "
              f"warm-up {end - loaded:.1f} s)")

    def process(self, input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution, ddim_steps,
                guess_mode, strength, scale, seed, eta, low_threshold, high_threshold):
        if self.pipeline is None:
            raise RuntimeError("call initialize() before process()")
        return self.pipeline.process(input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution,
                                     ddim_steps, guess_mode, strength, scale, seed, eta, low_threshold,
                                     high_threshold)
