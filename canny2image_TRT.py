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

from sdcanny.backends import BACKENDS, DEFAULT_ENGINE_DIR, create_backend, fastest_available
from sdcanny.checkpoint import DEFAULT_CHECKPOINT
from sdcanny.config import CONFIGS
from sdcanny.pipeline import Canny2Image


class hackathon:  # noqa: N801 - the name the hackathon's harness imports
    def __init__(self, backend: str | None = None, checkpoint: str | Path = DEFAULT_CHECKPOINT,
                 config: str = "sd15", device: str | None = None, engine_dir: str | Path = DEFAULT_ENGINE_DIR):
        if config not in CONFIGS:
            raise ValueError(f"unknown config {config!r}; choose one of {', '.join(CONFIGS)}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"unknown back-end {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.backend_name = backend
        self.checkpoint = Path(checkpoint)
        self.cfg = CONFIGS[config]
        self.device = device
        self.engine_dir = Path(engine_dir)
        self.pipeline: Canny2Image | None = None
        self.initialize_seconds: float | None = None

    def initialize(self) -> None:
        start = time.perf_counter()
        name = self.backend_name or fastest_available(self.engine_dir)
        backend = create_backend(name, self.checkpoint, self.cfg, self.device, self.engine_dir)
        self.pipeline = Canny2Image(backend, self.cfg)
        self.backend_name = name
        self.initialize_seconds = time.perf_counter() - start
        print(f"canny2image: back-end '{name}', model '{self.cfg.name}', tokenizer "
              f"{self.pipeline.tokenizer.backend}, initialize() took {self.initialize_seconds:.1f} s")

    def process(self, input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution, ddim_steps,
                guess_mode, strength, scale, seed, eta, low_threshold, high_threshold):
        if self.pipeline is None:
            raise RuntimeError("call initialize() before process()")
        return self.pipeline.process(input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution,
                                     ddim_steps, guess_mode, strength, scale, seed, eta, low_threshold,
                                     high_threshold)
