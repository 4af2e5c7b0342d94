"""Optional dependencies: each one missing costs one clear line and a fallback, never a traceback.

The hackathon docker has no network, so only torch, numpy, opencv, onnx (and tensorrt for engines)
may be required. Everything else (tqdm, scikit-image, safetensors, onnxruntime, onnxsim, onnxslim,
instant-clip-tokenizer, pytorch-fid, transformers) is imported through `optional()`.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import time

_SAID: set = set()
# pip's name for a module where it differs
_PACKAGES = {"skimage": "scikit-image", "instant_clip_tokenizer": "instant-clip-tokenizer",
             "pytorch_fid": "pytorch-fid", "PIL": "Pillow"}


def optional(module: str, missing_means: str):
    """The module, or None after printing once `<package> is not installed: <missing_means>`.
    A module that is installed but fails to import is reported the same way, with the error."""
    top = module.split(".")[0]
    if importlib.util.find_spec(top) is None:
        _say(module, f"{_PACKAGES.get(top, top)} is not installed: {missing_means}")
        return None
    try:
        return importlib.import_module(module)
    except Exception as exc:  # a broken install (ABI mismatch, missing shared library): report, carry on
        _say(module, f"{module} is installed but does not import ({type(exc).__name__}: {exc}): {missing_means}")
        return None


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _say(key: str, line: str) -> None:
    if key not in _SAID:
        _SAID.add(key)
        print(line, file=sys.stderr)


class _PlainProgress:
    """tqdm's subset used here, printing a line at most every few seconds and at the end."""

    def __init__(self, iterable=None, desc: str = "", total: int | None = None, unit: str = "it",
                 leave: bool = True, disable: bool = False, interval: float = 5.0):
        self.iterable, self.desc, self.unit, self.disable = iterable, desc, unit, disable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.interval, self.start = 0, interval, time.perf_counter()
        self.last = self.start

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if not self.disable and now - self.last >= self.interval:
            self.last = now
            self._print(now)

    def close(self) -> None:
        if not self.disable:
            self._print(time.perf_counter())

    def _print(self, now: float) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        print(f"{self.desc}: {self.n}{of} {self.unit} ({now - self.start:.0f} s)", file=sys.stderr)

    @staticmethod
    def write(line: str) -> None:
        print(line)


def progress_class():
    """tqdm.tqdm where installed, else a plain line printer with the same calls."""
    tqdm = optional("tqdm", "progress is printed as plain lines")
    return tqdm.tqdm if tqdm is not None else _PlainProgress


def progress(iterable=None, **kwargs):
    cls = progress_class()
    if cls is not _PlainProgress and not sys.stderr.isatty():
        # a log file would otherwise take a line per refresh (prepare's wait refreshes every second)
        kwargs.setdefault("mininterval", 30.0)
    return cls(iterable, **kwargs)


def write(line: str) -> None:
    """A line that does not break a running progress bar."""
    progress_class().write(line)
