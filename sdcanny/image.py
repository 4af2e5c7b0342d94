"""Image pre-processing exactly as lllyasviel/ControlNet's annotator.util and CannyDetector."""
from __future__ import annotations

import cv2
import numpy as np


def validate_image(image) -> None:
    """process() takes what cv2.imread returns: an H x W x 3 uint8 array."""
    if image is None:
        raise ValueError("input_image is None (cv2.imread returns None for an unreadable file)")
    if not isinstance(image, np.ndarray):
        raise ValueError(f"input_image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"input_image must be uint8, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"input_image must be H x W x 3 (colour), got shape {image.shape}; convert "
                         "grayscale or RGBA first, e.g. cv2.cvtColor(img, cv2.COLOR_GRAY2BGR / COLOR_BGRA2BGR)")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"input_image is empty: shape {image.shape}")


def stand_in_photo(shape: tuple[int, int, int], variant: int = 0) -> np.ndarray:
    """A stand-in photo (gradients and a few shapes, so Canny finds edges), BGR uint8: for warm-up
    calls, and for demos and scoring where scikit-image's photographs are not installed.
    `variant` moves the shapes, so that different variants give different edge maps."""
    h, w, _ = shape
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], axis=-1).astype(np.uint8)
    shift = variant * w // 7
    cv2.circle(img, ((w // 3 + shift) % w, h // 2), h // 4, (255, 255, 255), -1)
    cv2.rectangle(img, (w // 2 - shift // 2, h // 4), (w - 20, h - 20 - variant * h // 16), (20, 40, 200), 5)
    return img


def hwc3(x: np.ndarray) -> np.ndarray:
    """A single-channel map (H x W or H x W x 1) repeated to 3 channels; 3 channels unchanged."""
    if x.ndim == 2:
        x = x[:, :, None]
    if x.shape[2] == 3:
        return x
    if x.shape[2] == 1:
        return np.concatenate([x, x, x], axis=2)
    raise ValueError(f"expected 1 or 3 channels, got shape {x.shape}")


def work_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """The size resize_image gives: short side to `resolution`, both sides rounded to multiples of 64.
    Python's round takes ties to even, as the original's np.round does, in 0.1 µs against 3 µs (CI's
    CPU; process() asks twice a call)."""
    k = float(resolution) / min(height, width)
    return int(round(height * k / 64.0)) * 64, int(round(width * k / 64.0)) * 64


def resize_image(image: np.ndarray, resolution: int) -> np.ndarray:
    """Short side to `resolution`, both sides rounded to multiples of 64; Lanczos when enlarging,
    area when shrinking (and when the scale is exactly 1). An image already at that size is returned
    as it is, not copied: cv2.resize copies it then, whatever the interpolation, and the copy of a
    graded 256x384 image took 0.19 ms of a call's host time on the H100 machine (docs/benchmarks.md)."""
    h, w = image.shape[:2]
    new_h, new_w = work_size(h, w, resolution)
    if new_h == 0 or new_w == 0:
        raise ValueError(f"image_resolution {resolution} gives an empty image for input {h}x{w}")
    if (new_h, new_w) == (h, w):
        return image
    interpolation = cv2.INTER_LANCZOS4 if resolution > min(h, w) else cv2.INTER_AREA
    return cv2.resize(image, (new_w, new_h), interpolation=interpolation)


def canny(image: np.ndarray, low_threshold: int, high_threshold: int) -> np.ndarray:
    return cv2.Canny(image, low_threshold, high_threshold)


def work_image(image: np.ndarray, resolution: int) -> np.ndarray:
    """The original process()'s first step: the input, three channels, at the work size."""
    return resize_image(hwc3(image), resolution)


def work_image_and_edges(image: np.ndarray, resolution: int, low_threshold: float,
                         high_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The input at the work size (work_image), and its Canny edges, one channel of 0s and 255s
    (hwc3 of it is the original's three-channel map, the ControlNet's hint)."""
    work = work_image(image, resolution)
    return work, canny(work, low_threshold, high_threshold)
