"""Back-end choice: `reference` (fp32 eager, the original's computation), `torch` (fp16 fast path
on a CUDA GPU) and `trt` (TensorRT engines built by preprocess.sh)."""
import importlib.util
from pathlib import Path

import torch

from .config import ModelConfig

BACKENDS = ("reference", "torch", "trt")
DEFAULT_ENGINE_DIR = Path("engines")


def unavailable_reason(name: str, engine_dir: Path = DEFAULT_ENGINE_DIR) -> str | None:
    """None if back-end `name` can run here, else a one-line reason."""
    if name not in BACKENDS:
        return f"unknown back-end {name!r}; choose one of {', '.join(BACKENDS)}"
    if name == "reference":
        return None
    if not torch.cuda.is_available():
        return f"the {name} back-end needs a CUDA GPU and torch sees none"
    if name == "trt":
        if importlib.util.find_spec("tensorrt") is None:
            return "the trt back-end needs the tensorrt Python package (TensorRT 10), which is not installed"
        if not any(engine_dir.glob("*.plan")):
            return f"the trt back-end needs engines in {engine_dir}/; run `bash preprocess.sh` first"
    return None


def fastest_available(engine_dir: Path = DEFAULT_ENGINE_DIR) -> str:
    for name in ("trt", "torch", "reference"):
        if unavailable_reason(name, engine_dir) is None:
            return name
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
        from .checkpoint import load_networks
        from .fast import FastTorchBackend
        return FastTorchBackend(load_networks(checkpoint, cfg), device or "cuda", **(options or {}))
    if name == "trt":
        from .trt_backend import TrtBackend
        return TrtBackend(cfg, engine_dir, device, **(options or {}))
    raise ValueError(f"the {name} back-end is not implemented yet")
