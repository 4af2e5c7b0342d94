"""The graded run behind compute_score.py: test images, reference cache, timing, metrics, report.

Flow of `run(options)`:
  1. load the test images (a directory read with cv2.imread, or built-in scikit-image photos);
  2. the "against" back-end (default: the fp32 reference): its images come from the on-disk cache
     when present, otherwise it runs (and the cache is filled); it also runs, timed, when its
     speed is wanted (`reference_timing`) or its per-step latents are (`step_error`);
  3. the candidate back-end: warm-up, then `repeat` timed runs per image;
  4. metrics per image (latency, PD, PSNR, SSIM, max/mean |diff|) and the hackathon gates;
  5. the report: images, score.json, summary.md, contact_sheet.png.
Back-ends are loaded one after the other and freed in between, so GPU memory is the candidate's.
"""
from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch

from . import metrics
from .arguments import SEED_MAX
from .backends import BACKENDS, fastest_available, unavailable_reason
from .checkpoint import CheckpointError, missing_checkpoint_message
from .config import CONFIGS
from .ddim import ddim_timesteps
from .image import hwc3, stand_in_photo, work_image_and_edges
from .optional import optional, progress
from .paths import OUTPUTS_DIR, default_checkpoint
from .pipeline import GRADED_CALL, GRADED_IMAGE_SHAPE

# The hackathon's call (sdcanny.pipeline.GRADED_CALL), split into its prompts and the rest.
HACKATHON_PROMPT = GRADED_CALL["prompt"]
A_PROMPT = GRADED_CALL["a_prompt"]
N_PROMPT = GRADED_CALL["n_prompt"]
GRADED = {k: v for k, v in GRADED_CALL.items() if k not in ("prompt", "a_prompt", "n_prompt")}
PROCESS_ARGS = tuple(GRADED_CALL)  # process()'s arguments after the image, in order

# Real photographs bundled with scikit-image (no download), each with a fitting prompt.
BUILTIN_IMAGES = (
    ("astronaut", "astronaut", "an astronaut"),
    ("chelsea", "chelsea", "a cat"),
    ("coffee", "coffee", "a cup of coffee"),
    ("rocket", "rocket", "a rocket on a launch pad"),
    ("camera", "camera", "a man with a camera"),
    ("coins", "coins", "old coins"),
    ("motorcycle", "stereo_motorcycle", "a motorcycle"),
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_CACHE_DIR = OUTPUTS_DIR / "reference-cache"
FINGERPRINT_CHUNK = 4 << 20  # bytes hashed at each end of the checkpoint
CACHE_VERSION = 1
DIFF_GAIN = 10


class ScoreError(Exception):
    """Bad input or an unusable set-up; the message is for the user (exit status 2)."""


@dataclass
class TestImage:
    name: str
    image: np.ndarray  # BGR uint8 H x W x 3, as cv2.imread gives it
    prompt: str
    source: str


@dataclass
class ScoreOptions:
    backend: str | None = None  # None: the fastest available
    against: str = "reference"
    checkpoint: Path = field(default_factory=default_checkpoint)
    config: str = "sd15"
    images: Path | None = None  # None: the built-in photographs
    limit: int | None = None
    resolution: int = GRADED["image_resolution"]
    steps: int = GRADED["ddim_steps"]
    seed: int = GRADED["seed"]
    prompt: str | None = None  # None: "a bird" for a directory, each built-in image's own prompt
    warmup: int = 1
    repeat: int = 1
    reference_timing: bool = True
    refresh: bool = False
    step_error: bool = False
    out: Path | None = None
    cache_dir: Path = DEFAULT_CACHE_DIR
    device: str | None = None
    command: str = "python3 compute_score.py"


# ---- inputs --------------------------------------------------------------------------------------

def _natural_key(path: Path):
    return [int(s) if s.isdigit() else s.lower() for s in re.split(r"(\d+)", path.name)]


def load_image_dir(directory: Path, prompt: str) -> list[TestImage]:
    directory = Path(directory)
    if not directory.exists():
        raise ScoreError(f"images directory not found: {directory}")
    if not directory.is_dir():
        raise ScoreError(f"--images must be a directory, but {directory} is a file")
    paths = sorted((p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                   key=_natural_key)
    if not paths:
        raise ScoreError(f"no images in {directory} (looked for {', '.join(IMAGE_SUFFIXES)})")
    images = []
    for path in paths:
        img = cv2.imread(str(path))  # BGR, 3 channels, as the hackathon reads its pictures
        if img is None:
            raise ScoreError(f"cannot read image {path} (cv2.imread failed: not an image, or corrupted)")
        images.append(TestImage(path.stem, img, prompt, str(path)))
    return images


def load_builtin_images() -> list[TestImage]:
    skimage_data = optional("skimage.data", "using generated test patterns instead of its photographs "
                            "(pass --images DIR for real photos)")
    if skimage_data is None:
        return [TestImage(f"pattern{i}", stand_in_photo(GRADED_IMAGE_SHAPE, i), "a painting", "sdcanny.image.stand_in_photo")
                for i in range(3)]
    images = []
    for name, loader, prompt in BUILTIN_IMAGES:
        img = getattr(skimage_data, loader)()
        if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
            img = img[0]
        img = np.ascontiguousarray(img).astype(np.uint8)
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR if img.ndim == 2 else cv2.COLOR_RGB2BGR)
        images.append(TestImage(name, img, prompt, f"skimage.data.{loader}()"))
    return images


def load_images(opts: ScoreOptions) -> list[TestImage]:
    if opts.limit is not None and opts.limit < 1:
        raise ScoreError(f"--limit must be >= 1, got {opts.limit}")
    if opts.images is not None:
        images = load_image_dir(opts.images, opts.prompt or HACKATHON_PROMPT)
    else:
        images = load_builtin_images()
        if opts.prompt is not None:
            for img in images:
                img.prompt = opts.prompt
    return images[:opts.limit]


def process_args(opts: ScoreOptions, prompt: str) -> dict:
    """The 13 arguments after the image, in process()'s order: the graded ones, with the prompt,
    resolution, steps and seed from the options."""
    args = {"prompt": prompt, "a_prompt": A_PROMPT, "n_prompt": N_PROMPT, **GRADED}
    args.update(image_resolution=opts.resolution, ddim_steps=opts.steps, seed=opts.seed)
    return {k: args[k] for k in PROCESS_ARGS}


# ---- reference cache -----------------------------------------------------------------------------

def checkpoint_fingerprint(path: Path, chunk: int = FINGERPRINT_CHUNK) -> str:
    """A fast stand-in for the file's hash: its size and the sha256 of its first and last `chunk`
    bytes (a 5.7 GB checkpoint is not read in full). Any retrained, converted or truncated file
    changes it; an edit confined to the middle of the file would not."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(chunk, size - chunk))
            h.update(f.read(chunk))
    return f"size={size};sha256-ends={h.hexdigest()}"


def image_hash(image: np.ndarray) -> str:
    """sha256 of the decoded pixels (shape, dtype and bytes): what process() actually receives."""
    h = hashlib.sha256(f"{image.shape}|{image.dtype}|".encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


def reference_device(device: str | None) -> str:
    """The reference back-end's device, resolved as create_backend does; torch.randn depends on it."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def device_identity(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    return dev.type


def reference_key(fingerprint: str, img_hash: str, args: dict, config: str, device_id: str,
                  backend: str = "reference") -> str:
    payload = {"version": CACHE_VERSION, "backend": backend, "checkpoint": fingerprint, "image": img_hash,
               "config": config, "device": device_id, "args": args}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class ReferenceCache:
    """<dir>/<key>.png (lossless, the array exactly as process() returned it) + <key>.json."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> np.ndarray | None:
        path = self.dir / f"{key}.png"
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED) if path.is_file() else None
        if img is None:
            self.misses += 1
            return None
        self.hits += 1
        return img

    def put(self, key: str, image: np.ndarray, meta: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{key}.{os.getpid()}.png"
        if not cv2.imwrite(str(tmp), image):
            raise ScoreError(f"cannot write the reference cache in {self.dir}")
        os.replace(tmp, self.dir / f"{key}.png")
        (self.dir / f"{key}.json").write_text(json.dumps(meta, indent=1, sort_keys=True))


# ---- running a back-end --------------------------------------------------------------------------

@dataclass
class BackendRun:
    name: str
    initialize_seconds: float | None = None
    outputs: dict[int, np.ndarray] = field(default_factory=dict)  # image index -> first output
    latencies_ms: dict[int, list[float]] = field(default_factory=dict)  # image index -> timed runs
    stage_ms: dict[int, dict[str, float]] = field(default_factory=dict)
    repeat_identical: dict[int, bool] = field(default_factory=dict)
    steps: dict[int, list[np.ndarray]] = field(default_factory=dict)  # image index -> per-step latents
    step_error_unsupported: str | None = None
    peak_gpu_memory_mib: float | None = None
    gpu_memory_in_use_mib: float | None = None


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed_process(h, image: np.ndarray, args: dict) -> tuple[np.ndarray, float]:
    _sync()
    start = time.perf_counter()
    try:
        out = h.process(image, *args.values())
    except ValueError as exc:  # process() rejects bad arguments with ValueError
        raise ScoreError(f"process() rejected the call: {exc}") from exc
    _sync()
    return out[0], (time.perf_counter() - start) * 1000.0


def capture_steps(h, image: np.ndarray, args: dict) -> list[np.ndarray] | None:
    """Latents after every DDIM step, through the back-end's `step_callback(i, x)` attribute
    (docs/scoring.md); None when the back-end has no such attribute."""
    backend = h.pipeline.backend
    if not hasattr(backend, "step_callback"):
        return None
    latents: list[np.ndarray] = []
    backend.step_callback = lambda i, x: latents.append(x.detach().float().cpu().numpy().copy())
    try:
        h.process(image, *args.values())
    finally:
        backend.step_callback = None
    return latents


def run_backend(make_hackathon: Callable, name: str, opts: ScoreOptions, images: list[TestImage],
                todo: list[int], timed: bool, step_error: bool, device: str | None, role: str) -> BackendRun:
    """Initialize back-end `name`, then for each image index in `todo`: one output (timed
    `opts.repeat` times after `opts.warmup` warm-up runs on the first image, when `timed`)."""
    result = BackendRun(name)
    if not todo and not step_error:
        return result
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    h = make_hackathon(backend=name, checkpoint=opts.checkpoint, config=opts.config, device=device)
    try:
        h.initialize()
    except (FileNotFoundError, CheckpointError, ValueError) as exc:
        raise ScoreError(f"cannot initialize the {name} back-end: {exc}") from exc
    result.initialize_seconds = h.initialize_seconds
    args = {i: process_args(opts, images[i].prompt) for i in range(len(images))}
    if timed and todo:
        first = todo[0]
        for _ in progress(range(opts.warmup), desc=f"{role} {name}: warm-up", unit="run", leave=False):
            timed_process(h, images[first].image, args[first])
    runs = opts.repeat if timed else 1
    for i in progress(todo, desc=f"{role} {name}" + (" (timed)" if timed else ""), unit="img"):
        outs, times = [], []
        for _ in range(runs):
            out, ms = timed_process(h, images[i].image, args[i])
            outs.append(out)
            times.append(ms)
        result.outputs[i] = outs[0]
        result.repeat_identical[i] = all(np.array_equal(outs[0], o) for o in outs[1:])
        if timed:
            result.latencies_ms[i] = times
            result.stage_ms[i] = {k: v * 1000.0 for k, v in h.pipeline.last_timings.items()}
    if cuda:
        _sync()
        result.peak_gpu_memory_mib = torch.cuda.max_memory_allocated() / 2**20
        free, total = torch.cuda.mem_get_info()
        result.gpu_memory_in_use_mib = (total - free) / 2**20
    if step_error:
        if not hasattr(h.pipeline.backend, "step_callback"):
            result.step_error_unsupported = (f"back-end '{name}' does not support --step-error (it has no "
                                             "step_callback attribute; see docs/scoring.md)")
        else:
            for i in progress(range(len(images)), desc=f"{role} {name}: per-step latents", unit="img"):
                result.steps[i] = capture_steps(h, images[i].image, args[i])
    del h
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


# ---- figures -------------------------------------------------------------------------------------

def fmt_ms(v):
    return "n/a" if v is None else f"{v:.1f}"


def fmt_pd(v):
    return "n/a" if v is None else f"{v:.3f}"


def fmt_psnr(v):
    if v is None:
        return "n/a"
    return "inf" if v == math.inf else f"{v:.2f}"


def fmt_ssim(v):
    return "n/a" if v is None else f"{v:.4f}"


def fmt_diff(v):
    return "n/a" if v is None else (f"{v}" if isinstance(v, int) else f"{v:.2f}")


TABLE_COLUMNS = (("image", None), ("latency_ms", fmt_ms), ("against_ms", fmt_ms), ("PD", fmt_pd),
                 ("PSNR_dB", fmt_psnr), ("SSIM", fmt_ssim), ("max_abs_diff", fmt_diff))


def table_cells(row: dict) -> list[str]:
    return [row["name"], fmt_ms(row["latency_ms"]), fmt_ms(row["against_latency_ms"]), fmt_pd(row["pd"]),
            fmt_psnr(row["psnr"]), fmt_ssim(row["ssim"]), fmt_diff(row["max_abs_diff"])]


def _mean(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return math.inf if math.inf in values else float(np.mean(values))


def latency_stats(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"mean_ms": float(np.mean(values)), "median_ms": float(np.median(values)),
            "p90_ms": float(np.percentile(values, 90)), "min_ms": float(np.min(values)),
            "max_ms": float(np.max(values))}


GATE_WORKLOAD = {"config": "sd15", "image_resolution": GRADED["image_resolution"], "ddim_steps": GRADED["ddim_steps"],
                 "seed": GRADED["seed"]}


def gates_not_applicable(opts: ScoreOptions) -> str | None:
    """Why the hackathon's gates say nothing about this run (None: they apply). They are defined
    for SD1.5 on the graded call: a tiny model at 64 px passing them would mean nothing."""
    run = {"config": opts.config, "image_resolution": opts.resolution, "ddim_steps": opts.steps, "seed": opts.seed}
    if run == GATE_WORKLOAD:
        return None
    differ = ", ".join(f"{k} {run[k]}" for k in GATE_WORKLOAD if run[k] != GATE_WORKLOAD[k])
    return ("the hackathon's gates are defined for its workload (sd15, the graded call: resolution "
            f"{GATE_WORKLOAD['image_resolution']}, {GATE_WORKLOAD['ddim_steps']} DDIM steps, seed "
            f"{GATE_WORKLOAD['seed']}); this run has {differ}")


def gates(mean_pd: float | None, mean_latency: float | None, pd_reason: str | None,
          not_applicable: str | None = None) -> dict:
    if not_applicable is not None:
        return {"pd": {"threshold": metrics.PD_GATE, "mean": mean_pd, "pass": None},
                "latency": {"threshold_ms": metrics.LATENCY_GATE_MS, "mean_ms": mean_latency, "pass": None},
                "verdict": "N/A", "not_applicable": not_applicable}
    pd_pass = None if mean_pd is None else mean_pd < metrics.PD_GATE
    lat_pass = None if mean_latency is None else mean_latency < metrics.LATENCY_GATE_MS
    verdict = "FAIL" if False in (pd_pass, lat_pass) else ("PASS" if pd_pass and lat_pass else "INCOMPLETE")
    return {"pd": {"threshold": metrics.PD_GATE, "mean": mean_pd, "pass": pd_pass,
                   **({"reason": pd_reason} if mean_pd is None else {})},
            "latency": {"threshold_ms": metrics.LATENCY_GATE_MS, "mean_ms": mean_latency, "pass": lat_pass},
            "verdict": verdict}


def comparison_note(candidate: str, against: str, candidate_device: str | None, against_device: str) -> str | None:
    """Said in the report when the two sides cannot differ: the same back-end on the same device."""
    if candidate == against and (candidate_device or against_device) == against_device:
        return (f"trivial comparison: the candidate and the reference are both the '{candidate}' back-end on "
                f"{against_device}; their images are identical by construction, so PSNR, SSIM and PD here say "
                "nothing about fidelity (compare another back-end, e.g. --backend torch on a GPU)")
    return None


def _json_safe(obj):
    if isinstance(obj, float):
        return "inf" if obj == math.inf else ("nan" if obj != obj else obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return _json_safe(float(obj))
    if isinstance(obj, Path):
        return str(obj)
    return obj


def describe_device() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    return (f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads), "
            f"torch {torch.__version__}")


# ---- report --------------------------------------------------------------------------------------

def _label(img: np.ndarray, lines: list[str], scale: float = 0.4) -> np.ndarray:
    for k, text in enumerate(lines):
        y = 14 + 16 * k
        cv2.putText(img, text, (5, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(img, text, (5, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return img


def contact_sheet(rows: list[dict], names: tuple[str, str] = ("reference", "candidate"),
                  cell_height: int = 192) -> np.ndarray:
    """rows: {"lines": [...], "cells": [input, canny, reference, candidate, diff]} (BGR uint8, all of
    one image's generated size). One row per image, a header with the column names, a label box."""
    titles = ("input (resized)", "canny map", f"against: {names[0]}", f"candidate: {names[1]}",
              f"|diff| x {DIFF_GAIN}")
    def fit(img):
        h, w = img.shape[:2]
        width = max(1, round(w * cell_height / h))
        inter = cv2.INTER_NEAREST if cell_height > h else cv2.INTER_AREA
        return cv2.resize(img, (width, cell_height), interpolation=inter)
    fitted = [[fit(c) for c in row["cells"]] for row in rows]
    box_w = max(c.shape[1] for row in fitted for c in row)
    label_w, pad, header_h = 220, 4, 24
    width = label_w + len(titles) * (box_w + pad)
    sheet = np.full((header_h + len(rows) * (cell_height + pad), width, 3), 40, np.uint8)
    for j, title in enumerate(titles):
        x = label_w + j * (box_w + pad)
        cv2.putText(sheet, title, (x + 4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    for r, (row, cells) in enumerate(zip(rows, fitted)):
        y = header_h + r * (cell_height + pad)
        label = np.full((cell_height, label_w, 3), 40, np.uint8)
        sheet[y:y + cell_height, :label_w] = _label(label, row["lines"])
        for j, cell in enumerate(cells):
            x = label_w + j * (box_w + pad) + (box_w - cell.shape[1]) // 2
            sheet[y:y + cell_height, x:x + cell.shape[1]] = cell
    return sheet


def _default_out_dir() -> Path:
    base = OUTPUTS_DIR / f"score-{datetime.now():%Y%m%d-%H%M%S}"
    out, k = base, 1
    while out.exists():
        out, k = Path(f"{base}-{k}"), k + 1
    return out


def markdown_summary(report: dict) -> str:
    cand, ag = report["candidate"], report["against"]
    lines = [f"# compute_score: {cand['backend']} against {ag['backend']}", "",
             f"- command: `{report['command']}`", f"- date: {report['date']}", f"- device: {report['device']}",
             f"- checkpoint: `{report['workload']['checkpoint']}` ({report['workload']['checkpoint_fingerprint']}), "
             f"config {report['workload']['config']}",
             f"- workload: resolution {report['workload']['args']['image_resolution']}, "
             f"{report['workload']['args']['ddim_steps']} steps, scale {report['workload']['args']['scale']}, "
             f"seed {report['workload']['args']['seed']}, eta {report['workload']['args']['eta']}, thresholds "
             f"{report['workload']['args']['low_threshold']}/{report['workload']['args']['high_threshold']}",
             f"- timing: {report['timing']['warmup']} warm-up run(s), median of {report['timing']['repeat']} "
             "timed run(s) per image", ""]
    lines += ["| " + " | ".join(c for c, _ in TABLE_COLUMNS) + " | mean_abs_diff | prompt |",
              "|" + "---|" * (len(TABLE_COLUMNS) + 2)]
    for row in report["images"]:
        lines.append("| " + " | ".join(table_cells(row)) + f" | {fmt_diff(row['mean_abs_diff'])} | {row['prompt']} |")
    m = report["mean"]
    lines.append("| **mean** | " + " | ".join(table_cells({**m, "name": "mean"})[1:])
                 + f" | {fmt_diff(m['mean_abs_diff'])} | |")
    lines.append("")
    if not report["pd"]["available"]:
        lines += [f"PD unavailable: {report['pd']['reason']}", ""]
    speed = report["speed"]
    lines += ["## Speed", ""]
    for who in ("candidate", "against"):
        s = speed[who]
        name = report[who]["backend"]
        lines.append(f"- {who} ({name}): " + ("not timed" if s is None else
                     f"mean {s['mean_ms']:.1f} ms, median {s['median_ms']:.1f} ms, p90 {s['p90_ms']:.1f} ms"))
    lines += [f"- speedup ({ag['backend']} / {cand['backend']}, mean latency): "
              + ("n/a" if speed["speedup_mean"] is None else f"{speed['speedup_mean']:.2f}x{runs_label(speed)}"),
              f"- initialize(): candidate ({cand['backend']}) {cand['initialize_seconds']:.2f} s"
              + ("" if ag["initialize_seconds"] is None else
                 f", against ({ag['backend']}) {ag['initialize_seconds']:.2f} s"),
              f"- peak GPU memory ({cand['backend']}): {cand['peak_gpu_memory']}", ""]
    if report["comparison"]["note"]:
        lines += [f"**{report['comparison']['note']}**", ""]
    g = report["gates"]
    lines += ["## Hackathon gates", ""]
    if g["verdict"] == "N/A":
        lines += [f"Not applicable: {g['not_applicable']}.", "", "- verdict: **N/A**", ""]
    else:
        lines += [f"- mean PD < {g['pd']['threshold']:g}: " + _gate_word(g["pd"]["pass"])
                  + ("" if g["pd"]["mean"] is None else f" ({g['pd']['mean']:.3f})"),
                  f"- mean latency < {g['latency']['threshold_ms']:g} ms: " + _gate_word(g["latency"]["pass"])
                  + ("" if g["latency"]["mean_ms"] is None else f" ({g['latency']['mean_ms']:.1f} ms)"),
                  f"- verdict: **{g['verdict']}**", ""]
    se = report.get("step_error")
    if se:
        lines += ["## Per-step latent divergence", ""]
        if not se["supported"]:
            lines += [se["reason"], ""]
        else:
            lines += ["| step | timestep | mean rel L2 | max rel L2 |", "|---|---|---|---|"]
            lines += [f"| {s['index']} | {s['timestep']} | {s['mean_rel_l2']:.3e} | {s['max_rel_l2']:.3e} |"
                      for s in se["steps"]]
            lines.append("")
    lines += ["![contact sheet](contact_sheet.png)", ""]
    return "\n".join(lines)


def runs_label(speed: dict) -> str:
    n = speed["timed_runs_per_image"]
    return " from a single timed run per image" if n == 1 else f" from the median of {n} timed runs per image"


def _gate_word(passed) -> str:
    return "n/a" if passed is None else ("pass" if passed else "FAIL")


# ---- the run -------------------------------------------------------------------------------------

def run(opts: ScoreOptions, make_hackathon: Callable | None = None, echo=print) -> dict:
    """Score `opts.backend` against `opts.against`; returns the report dict (also written to disk)."""
    if make_hackathon is None:
        from canny2image_TRT import hackathon as make_hackathon
    if opts.config not in CONFIGS:
        raise ScoreError(f"unknown config {opts.config!r}; choose one of {', '.join(CONFIGS)}")
    if opts.warmup < 0 or opts.repeat < 1:
        raise ScoreError(f"need --warmup >= 0 and --repeat >= 1, got {opts.warmup} and {opts.repeat}")
    try:
        ddim_timesteps(opts.steps)
    except ValueError as exc:
        raise ScoreError(f"--steps: {exc}") from exc
    if opts.resolution < 64:
        raise ScoreError(f"--resolution must be at least 64, got {opts.resolution}")
    if not 0 <= opts.seed <= SEED_MAX:
        raise ScoreError(f"--seed must be in 0..{SEED_MAX} (-1 would draw another seed on each side of the "
                         f"comparison), got {opts.seed}")
    images = load_images(opts)
    checkpoint = Path(opts.checkpoint)
    if not checkpoint.is_file():
        raise ScoreError(missing_checkpoint_message(checkpoint))
    cfg = CONFIGS[opts.config]
    candidate = opts.backend or fastest_available(cfg=cfg, device=opts.device)[0]
    for name in (candidate, opts.against):
        if name not in BACKENDS:
            raise ScoreError(f"unknown back-end {name!r}; choose one of {', '.join(BACKENDS)}")
        reason = unavailable_reason(name, cfg=cfg, device=opts.device)
        if reason is not None:
            raise ScoreError(f"back-end '{name}' is unavailable: {reason}")
    out_dir = Path(opts.out) if opts.out else _default_out_dir()
    try:
        (out_dir / "images").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ScoreError(f"cannot create the report directory {out_dir}: {exc}") from exc

    echo(f"compute_score: {candidate} against {opts.against}, {len(images)} image(s), config {opts.config}, "
         f"checkpoint {checkpoint}, resolution {opts.resolution}, {opts.steps} steps")
    echo(f"device: {describe_device()}")
    fingerprint = checkpoint_fingerprint(checkpoint)
    all_args = [process_args(opts, img.prompt) for img in images]

    # 1. the images to compare against (cached when that is the fp32 reference)
    cache = ReferenceCache(opts.cache_dir)
    use_cache = opts.against == "reference"
    ref_dev = reference_device(opts.device) if opts.against == "reference" else opts.device
    against_imgs: dict[int, np.ndarray] = {}
    keys = {}
    if use_cache:
        dev_id = device_identity(ref_dev)
        for i, img in enumerate(images):
            keys[i] = reference_key(fingerprint, image_hash(img.image), all_args[i], opts.config, dev_id)
            cached = None if opts.refresh else cache.get(keys[i])
            if opts.refresh:
                cache.misses += 1
            if cached is not None:
                against_imgs[i] = cached
        echo(f"reference cache {opts.cache_dir}: {cache.hits} hit(s), {cache.misses} miss(es)"
             + (" (--refresh)" if opts.refresh else ""))
    cached_idx = set(against_imgs)
    timed_against = opts.reference_timing
    todo = [i for i in range(len(images)) if timed_against or i not in against_imgs]
    ag = run_backend(make_hackathon, opts.against, opts, images, todo, timed_against, opts.step_error,
                     ref_dev, "against")
    reproduced = {}
    for i, out in ag.outputs.items():
        if i in against_imgs:
            reproduced[i] = int(metrics.abs_diff(out, against_imgs[i]).max())
        else:
            against_imgs[i] = out
            if use_cache:
                cache.put(keys[i], out, {"image": images[i].source, "args": all_args[i], "config": opts.config,
                                         "checkpoint": str(checkpoint), "checkpoint_fingerprint": fingerprint,
                                         "device": device_identity(ref_dev), "torch": torch.__version__,
                                         "created": datetime.now().isoformat(timespec="seconds")})
    if reproduced and any(reproduced.values()):
        echo(f"note: re-running the reference did not reproduce the cached images exactly (max |diff| "
             f"{max(reproduced.values())}); the cached ones are used. Use --refresh to recompute them.")

    # 2. the candidate
    cand = run_backend(make_hackathon, candidate, opts, images, list(range(len(images))), True,
                       opts.step_error, opts.device, "candidate")

    # 3. metrics
    pd_reason = metrics.pd_unavailable_reason()
    pd_model = None
    if pd_reason is None:
        try:
            pd_model = metrics.InceptionFeatures()
        except Exception as exc:  # weights present but unusable, say
            pd_reason = f"pytorch-fid's InceptionV3 failed to load: {type(exc).__name__}: {exc}"
    rows, sheet_rows = [], []
    for i, img in enumerate(progress(images, desc="metrics", unit="img")):
        c, r = cand.outputs[i], against_imgs[i]
        if c.shape != r.shape:
            raise ScoreError(f"{img.name}: candidate image {c.shape} and reference {r.shape} differ in shape")
        lat = float(statistics.median(cand.latencies_ms[i]))
        ag_lat = float(statistics.median(ag.latencies_ms[i])) if i in ag.latencies_ms else None
        stem = f"{i:02d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', img.name)}"
        cv2.imwrite(str(out_dir / "images" / f"{stem}_candidate.png"), c)
        cv2.imwrite(str(out_dir / "images" / f"{stem}_reference.png"), r)
        row = {"name": img.name, "source": img.source, "prompt": img.prompt,
               "input_shape": list(img.image.shape), "output_shape": list(c.shape),
               "latency_ms": lat, "latencies_ms": cand.latencies_ms[i], "against_latency_ms": ag_lat,
               "against_latencies_ms": ag.latencies_ms.get(i), "stage_ms": cand.stage_ms.get(i),
               "pd": pd_model.distance(c, r) if pd_model is not None else None,
               "psnr": metrics.psnr(c, r), "ssim": metrics.ssim(c, r), **metrics.diff_stats(c, r),
               "repeat_identical": cand.repeat_identical.get(i),
               "reference_from_cache": i in cached_idx,
               "reference_rerun_max_abs_diff": reproduced.get(i),
               "candidate_image": f"images/{stem}_candidate.png", "reference_image": f"images/{stem}_reference.png"}
        rows.append(row)
        resized, edges = work_image_and_edges(img.image, opts.resolution, GRADED["low_threshold"],
                                              GRADED["high_threshold"])
        diff = np.clip(metrics.abs_diff(c, r).astype(np.int32) * DIFF_GAIN, 0, 255).astype(np.uint8)
        sheet_rows.append({"cells": [resized, hwc3(edges), r, c, diff],
                           "lines": [img.name[:26], f"PSNR {fmt_psnr(row['psnr'])} dB", f"SSIM {fmt_ssim(row['ssim'])}",
                                     f"PD {fmt_pd(row['pd'])}", f"max|diff| {row['max_abs_diff']}",
                                     f"{fmt_ms(lat)} ms"]})

    mean = {"latency_ms": _mean([r["latency_ms"] for r in rows]),
            "against_latency_ms": _mean([r["against_latency_ms"] for r in rows]),
            "pd": _mean([r["pd"] for r in rows]), "psnr": _mean([r["psnr"] for r in rows]),
            "ssim": _mean([r["ssim"] for r in rows]), "max_abs_diff": _mean([r["max_abs_diff"] for r in rows]),
            "mean_abs_diff": _mean([r["mean_abs_diff"] for r in rows])}
    cand_stats = latency_stats([r["latency_ms"] for r in rows])
    ag_stats = latency_stats([r["against_latency_ms"] for r in rows if r["against_latency_ms"] is not None])
    speed = {"candidate": cand_stats, "against": ag_stats,
             "speedup_mean": ag_stats["mean_ms"] / cand_stats["mean_ms"] if ag_stats else None,
             "speedup_median": ag_stats["median_ms"] / cand_stats["median_ms"] if ag_stats else None,
             "timed_runs_per_image": opts.repeat}
    peak = ("n/a (CPU)" if cand.peak_gpu_memory_mib is None else
            f"{cand.peak_gpu_memory_mib:.0f} MiB (torch.cuda.max_memory_allocated); GPU memory in use after the "
            f"runs: {cand.gpu_memory_in_use_mib:.0f} MiB (all allocators, TensorRT's included, and the CUDA context)")

    step_error = None
    if opts.step_error:
        step_error = step_error_report(ag, cand, images, opts.steps)

    report = {
        "tool": "compute_score.py", "report_version": 1, "command": opts.command,
        "date": datetime.now().astimezone().isoformat(timespec="seconds"), "device": describe_device(),
        "candidate": {"backend": cand.name, "initialize_seconds": cand.initialize_seconds,
                      "peak_gpu_memory": peak, "peak_gpu_memory_mib": cand.peak_gpu_memory_mib,
                      "gpu_memory_in_use_mib": cand.gpu_memory_in_use_mib},
        "against": {"backend": ag.name, "initialize_seconds": ag.initialize_seconds, "timed": bool(ag.latencies_ms),
                    "device": ref_dev},
        "workload": {"config": opts.config, "checkpoint": str(checkpoint), "checkpoint_fingerprint": fingerprint,
                     "images": str(opts.images) if opts.images else (
                         "built-in (scikit-image)" if images[0].source.startswith("skimage") else
                         "built-in (generated test patterns: scikit-image is not installed)"),
                     "args": {k: v for k, v in all_args[0].items() if k != "prompt"} if all_args else {}},
        "timing": {"warmup": opts.warmup, "repeat": opts.repeat, "clock": "time.perf_counter around process(), "
                   "torch.cuda.synchronize() before and after when CUDA is used"},
        "images": rows, "mean": mean, "speed": speed,
        "pd": {"available": pd_model is not None, "reason": pd_reason,
               "definition": "L2 distance of pytorch-fid InceptionV3 2048-d pool features, each image through "
                             "cv2 JPEG encode + PIL decode as in the hackathon"},
        "gates": gates(mean["pd"], mean["latency_ms"], pd_reason, gates_not_applicable(opts)),
        "comparison": {"note": comparison_note(cand.name, ag.name, opts.device, ref_dev)},
        "reference_cache": {"used": use_cache, "dir": str(opts.cache_dir), "hits": cache.hits,
                            "misses": cache.misses, "refresh": opts.refresh,
                            "key": "sha256 over checkpoint fingerprint (size + sha256 of first and last "
                                   f"{FINGERPRINT_CHUNK >> 20} MiB), image pixels, all process() arguments, "
                                   "config, reference device"},
        "step_error": step_error,
        "files": {"json": "score.json", "markdown": "summary.md", "contact_sheet": "contact_sheet.png",
                  "images": "images/"},
    }
    print_report(report, echo)
    cv2.imwrite(str(out_dir / "contact_sheet.png"), contact_sheet(sheet_rows, (ag.name, cand.name)))
    (out_dir / "score.json").write_text(json.dumps(_json_safe(report), indent=1))
    (out_dir / "summary.md").write_text(markdown_summary(report))
    report["out_dir"] = str(out_dir)
    echo(f"report: {out_dir}/summary.md, score.json, contact_sheet.png, images/")
    return report


def step_error_report(ag: BackendRun, cand: BackendRun, images: list[TestImage], steps: int) -> dict:
    for run_ in (ag, cand):
        if run_.step_error_unsupported:
            return {"supported": False, "reason": run_.step_error_unsupported}
    order = list(reversed(ddim_timesteps(steps).tolist()))
    per_image = {}
    for i, img in enumerate(images):
        a, c = ag.steps[i], cand.steps[i]
        if len(a) != len(c):
            return {"supported": False, "reason": f"{img.name}: {ag.name} reported {len(a)} steps, "
                                                  f"{cand.name} {len(c)}"}
        per_image[img.name] = [metrics.relative_l2(x, r) for x, r in zip(c, a)]
    n = len(next(iter(per_image.values()), []))
    table = [{"index": k, "timestep": order[k] if k < len(order) else None,
              "mean_rel_l2": float(np.mean([v[k] for v in per_image.values()])),
              "max_rel_l2": float(np.max([v[k] for v in per_image.values()]))} for k in range(n)]
    return {"supported": True, "metric": f"||x_{cand.name} - x_{ag.name}|| / ||x_{ag.name}|| of the latents "
            "after each DDIM step (step 0 = the noisiest)", "steps": table, "per_image": per_image}


def print_report(report: dict, echo=print) -> None:
    header = [c for c, _ in TABLE_COLUMNS]
    body = [table_cells(r) for r in report["images"]] + [table_cells({**report["mean"], "name": "mean"})]
    widths = [max(len(header[j]), *(len(b[j]) for b in body)) for j in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) if j == 0 else c.rjust(w)  # noqa: E731
                                   for j, (c, w) in enumerate(zip(cells, widths)))
    echo("")
    echo(f"{report['candidate']['backend']} against {report['against']['backend']} "
         "(latency: median of the timed runs, ms; PD, PSNR, SSIM, max |diff| against the reference image)")
    echo(line(header))
    for cells in body[:-1]:
        echo(line(cells))
    echo(line(body[-1]))
    if not report["pd"]["available"]:
        echo(f"PD unavailable: {report['pd']['reason']}. PSNR and SSIM are still computed; docs/scoring.md "
             "says how to enable PD.")
    speed, cand, ag = report["speed"], report["candidate"], report["against"]
    s = speed["candidate"]
    echo(f"speed: candidate ({cand['backend']}) mean {s['mean_ms']:.1f} ms, median {s['median_ms']:.1f} ms, "
         f"p90 {s['p90_ms']:.1f} ms over {len(report['images'])} image(s)")
    if speed["against"] is not None:
        a = speed["against"]
        echo(f"speed: against ({ag['backend']}) mean {a['mean_ms']:.1f} ms, median {a['median_ms']:.1f} ms, "
             f"p90 {a['p90_ms']:.1f} ms; speedup {speed['speedup_mean']:.2f}x (mean), "
             f"{speed['speedup_median']:.2f}x (median){runs_label(speed)}")
    else:
        echo(f"speed: against ({ag['backend']}) not timed (--no-reference-timing): no speedup figure")
    echo(f"initialize(): candidate ({cand['backend']}) {cand['initialize_seconds']:.2f} s"
         + ("" if ag["initialize_seconds"] is None else
            f", against ({ag['backend']}) {ag['initialize_seconds']:.2f} s"))
    echo(f"peak GPU memory: {cand['peak_gpu_memory']}")
    se = report.get("step_error")
    if se:
        if not se["supported"]:
            echo(f"step error: {se['reason']}")
        else:
            echo("step error (relative L2 of the latents after each step, mean / max over images):")
            for st in se["steps"]:
                echo(f"  step {st['index']:3d} (t={st['timestep']}): {st['mean_rel_l2']:.3e} / {st['max_rel_l2']:.3e}")
    if report["comparison"]["note"]:
        echo(report["comparison"]["note"])
    g = report["gates"]
    if g["verdict"] == "N/A":
        echo(f"gates: not applicable: {g['not_applicable']}")
        echo("verdict: N/A")
        return
    echo(f"gates: mean PD < {g['pd']['threshold']:g}: {_gate_word(g['pd']['pass'])}"
         + ("" if g["pd"]["mean"] is None else f" ({g['pd']['mean']:.3f})")
         + f"; mean latency < {g['latency']['threshold_ms']:g} ms: {_gate_word(g['latency']['pass'])} "
         f"({g['latency']['mean_ms']:.1f} ms)")
    echo(f"verdict: {g['verdict']}")
