"""Fidelity metrics between a candidate image and its reference: PSNR, SSIM, PD.

PD is the TensorRT Hackathon 2023 "perceptual distance": the L2 distance between the two images'
2048-d pool features of pytorch-fid's InceptionV3 (`InceptionV3([BLOCK_INDEX_BY_DIM[2048]])`,
resize_input and normalize_input at their defaults). The hackathon's compute_score.py wrote each
image with `cv2.imwrite(path.jpg, img)` and fed the path to `fid_score.calculate_activation_statistics`,
which reads it with `PIL.Image.open(path).convert('RGB')` and `TF.ToTensor()`; with one image the
"mean" it returns is that image's feature vector. `hackathon_pd_input` reproduces that path in
memory (same JPEG encoder and settings, same decoder), so PD here is the figure the graders saw.

pytorch-fid needs torchvision and downloads its weights on first use. Nothing here downloads:
`pd_unavailable_reason()` says in one line why PD cannot be computed, and callers print that
instead of a number.
"""
from __future__ import annotations

import importlib
import importlib.util
import io
import math
from pathlib import Path

import cv2
import numpy as np

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")  # pytorch_fid.inception.FID_WEIGHTS_URL (0.3.0)
PD_GATE = 12.0  # hackathon: mean PD must be below this
LATENCY_GATE_MS = 2600.0  # hackathon: mean latency must be below this


def _as_uint8_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {a.dtype} and {b.dtype}")
    return a, b


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB over all pixels and channels, data range 255; inf for identical images
    (scikit-image's peak_signal_noise_ratio, computed here so scikit-image stays optional)."""
    a, b = _as_uint8_pair(a, b)
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def ssim(a: np.ndarray, b: np.ndarray, win: int = 7) -> float:
    """Mean SSIM as scikit-image's structural_similarity computes it by default (7x7 uniform
    window, sample covariance, K1 = 0.01, K2 = 0.03, data range 255, each channel separately,
    the border of half a window left out); 1 when identical. Computed with OpenCV box filters
    so scikit-image stays optional."""
    a, b = _as_uint8_pair(a, b)
    win = min(win, min(a.shape[:2]))
    win -= 1 - win % 2  # the window must be odd
    if win < 3:
        raise ValueError(f"image {a.shape} is too small for SSIM")
    x, y = a.astype(np.float64), b.astype(np.float64)
    mean = lambda img: cv2.blur(img, (win, win), borderType=cv2.BORDER_REFLECT)  # noqa: E731
    mx, my = mean(x), mean(y)
    sample = win * win / (win * win - 1.0)
    vx, vy, vxy = (sample * (mean(x * x) - mx * mx), sample * (mean(y * y) - my * my),
                   sample * (mean(x * y) - mx * my))
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = (2 * mx * my + c1) * (2 * vxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    pad = (win - 1) // 2
    return float(s[pad:s.shape[0] - pad, pad:s.shape[1] - pad].mean())


def abs_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = _as_uint8_pair(a, b)
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).astype(np.uint8)


def diff_stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    d = abs_diff(a, b)
    return {"max_abs_diff": int(d.max()), "mean_abs_diff": float(d.mean())}


def relative_l2(x: np.ndarray, ref: np.ndarray) -> float:
    """||x - ref|| / ||ref|| (0 when both are zero)."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    den = np.linalg.norm(ref)
    num = np.linalg.norm(x - ref)
    return float(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


# ---- PD ------------------------------------------------------------------------------------------

def perceptual_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """The hackathon's PD from two feature vectors: np.linalg.norm(a - b)."""
    fa, fb = np.asarray(features_a, np.float64).ravel(), np.asarray(features_b, np.float64).ravel()
    if fa.shape != fb.shape:
        raise ValueError(f"feature vectors differ in length: {fa.shape} vs {fb.shape}")
    return float(np.linalg.norm(fa - fb))


def hackathon_pd_input(image: np.ndarray) -> np.ndarray:
    """What pytorch-fid saw in the hackathon: `cv2.imwrite('x.jpg', image)` (default quality 95),
    then `PIL.Image.open('x.jpg').convert('RGB')` and ToTensor: float32 (3, H, W) in [0, 1].
    The array returned by process() goes to cv2 unchanged, as the hackathon wrote it."""
    from PIL import Image
    ok, jpg = cv2.imencode(".jpg", np.ascontiguousarray(image))
    if not ok:
        raise ValueError(f"cv2 could not encode an image of shape {image.shape} as JPEG")
    rgb = np.asarray(Image.open(io.BytesIO(jpg.tobytes())).convert("RGB"))
    return np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)


def torch_hub_checkpoints_dir() -> Path:
    import torch
    return Path(torch.hub.get_dir()) / "checkpoints"


def inception_weights_path(url: str = FID_WEIGHTS_URL, hub_dir: Path | None = None) -> Path:
    """Where torch.hub.load_state_dict_from_url, which pytorch-fid uses, looks before downloading."""
    return (hub_dir or torch_hub_checkpoints_dir()) / url.rsplit("/", 1)[-1]


def _import_pytorch_fid():
    """(module pytorch_fid.inception, None) or (None, one-line reason)."""
    if importlib.util.find_spec("pytorch_fid") is None:
        return None, ("pytorch-fid is not installed (`pip install pytorch-fid`; it needs torchvision, "
                      "which must match your torch build)")
    try:
        return importlib.import_module("pytorch_fid.inception"), None
    except Exception as exc:  # e.g. torchvision missing or built for another torch
        return None, f"pytorch-fid is installed but does not import: {type(exc).__name__}: {exc}"


def pd_unavailable_reason(hub_dir: Path | None = None) -> str | None:
    """None if PD can be computed here without any download, else one line saying why not."""
    module, reason = _import_pytorch_fid()
    if module is None:
        return reason
    if importlib.util.find_spec("PIL") is None:
        return "Pillow is not installed (the hackathon's PD read its JPEGs with PIL)"
    weights = inception_weights_path(getattr(module, "FID_WEIGHTS_URL", FID_WEIGHTS_URL), hub_dir)
    if not weights.is_file():
        return (f"the FID Inception weights are not in the torch hub cache: {weights} is missing "
                f"(pytorch-fid would download it from {FID_WEIGHTS_URL}; this tool never downloads)")
    return None


class InceptionFeatures:
    """pytorch-fid's InceptionV3 2048-d pool features, as the hackathon computed them.
    Raises RuntimeError(reason) when pd_unavailable_reason() is not None."""

    def __init__(self, device: str | None = None):
        reason = pd_unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        import torch
        module, _ = _import_pytorch_fid()
        self.torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        block = module.InceptionV3.BLOCK_INDEX_BY_DIM[2048]
        self.model = module.InceptionV3([block]).to(self.device).eval()

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """float64 (2048,) for one HWC uint8 image (as returned by process())."""
        torch = self.torch
        x = torch.from_numpy(hackathon_pd_input(image))[None].to(self.device)
        with torch.no_grad():
            pred = self.model(x)[0]
        if pred.shape[2] != 1 or pred.shape[3] != 1:  # as fid_score.get_activations does
            pred = torch.nn.functional.adaptive_avg_pool2d(pred, output_size=(1, 1))
        return pred.squeeze(3).squeeze(2)[0].double().cpu().numpy()

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        return perceptual_distance(self(a), self(b))
