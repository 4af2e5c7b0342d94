"""Back-end choice: `reference` (fp32 eager, the original's computation), `torch` (fp16 fast path
on a CUDA GPU) and `trt` (TensorRT engines built by preprocess.sh)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from . import compat
from .config import ModelConfig
from .paths import DEFAULT_ENGINE_DIR

BACKENDS = ("reference", "torch", "trt")
FASTEST_FIRST = ("trt", "torch", "reference")
ENGINES = ("clip", "union", "vae")


def unavailable_reason(name: str, engine_dir: Path = DEFAULT_ENGINE_DIR, cfg: ModelConfig | None = None,
                       device: str | None = None) -> str | None:
    """None if back-end `name` can run here, else a one-line reason. For `trt` (with `cfg`), every
    engine at the graded size must be built and current for this TensorRT and GPU."""
    if name not in BACKENDS:
        return f"unknown back-end {name!r}; choose one of {', '.join(BACKENDS)}"
    if name == "reference":
        return None
    cuda_missing = compat.cuda_unavailable_reason()
    if cuda_missing is not None:
        return f"the {name} back-end needs a CUDA GPU: {cuda_missing}"
    if name == "trt":
        if importlib.util.find_spec("tensorrt") is None:
            return "the trt back-end needs TensorRT (8.6, 10.x or 11.x), which is not installed"
        try:
            import trt_utils
        except Exception as exc:  # the package is there but its libraries are not: say so, fall back
            return f"TensorRT does not load ({type(exc).__name__}: {exc})"
        if not trt_utils.FEATURES.supported:
            return f"TensorRT {trt_utils.FEATURES.version} is installed; the trt back-end needs 8.6, 10.x or 11.x"
        if cfg is not None:
            from .trt_backend import engine_problem
            problems = [p for p in (engine_problem(e, cfg, engine_dir, device or "cuda") for e in ENGINES) if p]
            if problems:
                return problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
    return None


def fastest_available(engine_dir: Path = DEFAULT_ENGINE_DIR, cfg: ModelConfig | None = None,
                      device: str | None = None) -> tuple[str, dict[str, str]]:
    """The fastest back-end that can run here, and why each faster one cannot."""
    skipped = {}
    for name in FASTEST_FIRST:
        reason = unavailable_reason(name, engine_dir, cfg, device)
        if reason is None:
            return name, skipped
        skipped[name] = reason
    raise AssertionError("the reference back-end is always available")


def create_backend(name: str, checkpoint: Path, cfg: ModelConfig, device: str | None = None,
                   engine_dir: Path = DEFAULT_ENGINE_DIR, options: dict | None = None):
    """`options` go to the back-end's constructor (e.g. {"compile": None} for an eager torch back-end)."""
    reason = unavailable_reason(name, engine_dir)
    if reason is not None:
        raise ValueError(reason)
    if name == "reference":
        from .checkpoint import load_networks
        from .reference import ReferenceBackend
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return ReferenceBackend(load_networks(checkpoint, cfg), dev)
    if name == "torch":
        from .fast import FastTorchBackend
        from .programs import PROGRAM_DIR_NAME
        return FastTorchBackend.create(checkpoint, cfg, device or "cuda", Path(engine_dir) / PROGRAM_DIR_NAME,
                                       **(options or {}))
    if name == "trt":
        from .trt_backend import TrtBackend
        return TrtBackend(cfg, engine_dir, device, **(options or {}))
    raise ValueError(f"the {name} back-end is not implemented yet")
